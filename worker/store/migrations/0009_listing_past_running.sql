-- The listing indexes of 0008, made cheaper for the worker (worker/store/queries.py list_tasks).
-- A task the worker runs is written twice: inserted as running by its claim, then updated as
-- completed; the update changes state, so every index gets an entry for each row version, and
-- 0008's ten order indexes doubled PostgreSQL's index upkeep per task. The running tasks are few
-- (no more than the workers' concurrency), so the order indexes leave them out and hold only
-- the row versions that last: queued (submitted over HTTP), waiting, polling and completed. One
-- small index holds the running tasks, which a listing reads beside an order index and sorts
-- into its page (a merge of the two). A task the worker runs now costs each order index one
-- entry, not two; the indexes on what only completed tasks have (a completion time, a result)
-- already held one.
CREATE INDEX tasks_running ON tasks (queued_at, task_id) WHERE state = 'running';
-- Unfinished tasks that are not running (queued, waiting, polling), in queue order: the end of
-- a list by completedAt or result, where tasks without either come last. A task the worker runs
-- never enters it.
CREATE INDEX tasks_unfinished_order ON tasks (queued_at, task_id)
    WHERE completed_at IS NULL AND state <> 'running';

CREATE INDEX tasks_queued_order_2 ON tasks (queued_at, task_id) WHERE state <> 'running';
CREATE INDEX tasks_started_order_2 ON tasks (started_at, queued_at, task_id)
    WHERE state <> 'running';
CREATE INDEX tasks_state_order_2 ON tasks (state, queued_at, task_id) WHERE state <> 'running';
CREATE INDEX tasks_plan_order_2 ON tasks (lower(plan_id), queued_at, task_id)
    INCLUDE (plan_id, completed_at) WHERE state <> 'running';
CREATE INDEX tasks_hub_order_2 ON tasks (lower(hub_name), queued_at, task_id) INCLUDE (hub_name)
    WHERE state <> 'running';
CREATE INDEX tasks_name_order_2 ON tasks (name, queued_at, task_id) WHERE state <> 'running';
CREATE INDEX tasks_attempts_order_2 ON tasks (attempts, queued_at, task_id)
    WHERE state <> 'running';
-- A hub's latest completions: what a list of a hub by completedAt reads (it says the tasks are
-- not running, as the index does).
CREATE INDEX tasks_hub_completed_order_2
    ON tasks (lower(hub_name), completed_at, queued_at, task_id) INCLUDE (hub_name)
    WHERE state <> 'running';
-- Only completed tasks have a completion time: the index of it need hold no other. The last
-- hour's completions (the operations page's chart) and the purge read it too.
CREATE INDEX tasks_completed_order_2 ON tasks (completed_at, queued_at, task_id)
    WHERE completed_at IS NOT NULL;

DROP INDEX tasks_queued_order;
DROP INDEX tasks_started_order;
DROP INDEX tasks_state_order;
DROP INDEX tasks_plan_order;
DROP INDEX tasks_hub_order;
DROP INDEX tasks_name_order;
DROP INDEX tasks_attempts_order;
DROP INDEX tasks_completed_order;
DROP INDEX tasks_hub_completed_order;

ALTER INDEX tasks_queued_order_2 RENAME TO tasks_queued_order;
ALTER INDEX tasks_started_order_2 RENAME TO tasks_started_order;
ALTER INDEX tasks_state_order_2 RENAME TO tasks_state_order;
ALTER INDEX tasks_plan_order_2 RENAME TO tasks_plan_order;
ALTER INDEX tasks_hub_order_2 RENAME TO tasks_hub_order;
ALTER INDEX tasks_name_order_2 RENAME TO tasks_name_order;
ALTER INDEX tasks_attempts_order_2 RENAME TO tasks_attempts_order;
ALTER INDEX tasks_completed_order_2 RENAME TO tasks_completed_order;
ALTER INDEX tasks_hub_completed_order_2 RENAME TO tasks_hub_completed_order;
