-- Listing a table of a million tasks (GET /tasks, worker/store/queries.py list_tasks). Every
-- order is (key, queued_at, task_id), and each has an index in exactly that order: a page is a
-- walk along it, with nothing to sort, and the rows before a deep page are skipped in the index
-- alone (an index-only scan finds the page's task ids; only those rows are read).
-- The indexes of 0001 and 0003 on queued_at, completed_at, state, result and the lower() forms
-- of the ids are made again with the rest of that order.
CREATE INDEX tasks_queued_order ON tasks (queued_at, task_id);
CREATE INDEX tasks_completed_order ON tasks (completed_at, queued_at, task_id);
CREATE INDEX tasks_started_order ON tasks (started_at, queued_at, task_id);
CREATE INDEX tasks_state_order ON tasks (state, queued_at, task_id);
-- The ids themselves ride along: an index-only scan of an expression needs the column it reads.
-- So does a plan's completion time: a plan of thousands of tasks is sorted by it in the index.
CREATE INDEX tasks_plan_order ON tasks (lower(plan_id), queued_at, task_id)
    INCLUDE (plan_id, completed_at);
CREATE INDEX tasks_hub_order ON tasks (lower(hub_name), queued_at, task_id) INCLUDE (hub_name);
-- A hub's latest completions (a plan has too few tasks to need the same).
CREATE INDEX tasks_hub_completed_order ON tasks (lower(hub_name), completed_at, queued_at, task_id)
    INCLUDE (hub_name);
CREATE INDEX tasks_name_order ON tasks (name, queued_at, task_id);
CREATE INDEX tasks_attempts_order ON tasks (attempts, queued_at, task_id);
-- A result is set when a task completes: by result, in queue order (the default order) and in
-- completion order (a result's latest completions, the operations page's failures). The hub
-- rides along, so that a hub's failures are found, and counted, in the index alone.
CREATE INDEX tasks_result_order ON tasks (result, queued_at, task_id) INCLUDE (hub_name)
    WHERE result IS NOT NULL;
CREATE INDEX tasks_result_completed_order ON tasks (result, completed_at, queued_at, task_id)
    INCLUDE (hub_name) WHERE result IS NOT NULL;
DROP INDEX tasks_queued_at;
DROP INDEX tasks_completed_at;
DROP INDEX tasks_state_queued;
DROP INDEX tasks_plan_lower;
DROP INDEX tasks_hub_lower;
DROP INDEX tasks_result_completed;
-- The unfinished tasks are read by state (state IN (...)) off tasks_state_order, which holds
-- every task; this partial copy of it cost each task one index entry more.
DROP INDEX tasks_unfinished;

-- Tasks that began to wait before 0006 stamped waiting_since: the age of the oldest waiting task
-- reads them here rather than every waiting task's row. Empty once they are gone.
CREATE INDEX tasks_waiting_unstamped ON tasks (started_at)
    WHERE state IN ('waiting', 'polling') AND waiting_since IS NULL;
