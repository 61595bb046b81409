-- Two lists that 0008 and 0009 left to a sort or a long count (worker/store/queries.py
-- list_tasks), each given an index in its own order.
-- A plan's tasks by completion time: a plan of thousands of tasks was read whole off the plan's
-- queue-order index and sorted (tens of milliseconds at 20,000 tasks, a deep page most). Only
-- completed tasks are in it, as in tasks_completed_order, and it says they are not running, as
-- the lists that read it do (0009): both conditions, so that one index-only scan serves them.
CREATE INDEX tasks_plan_completed_order ON tasks (lower(plan_id), completed_at, queued_at, task_id)
    INCLUDE (plan_id) WHERE completed_at IS NOT NULL AND state <> 'running';
-- The plan's queue-order index no longer carries the completion time: narrower, and no longer
-- what the planner would sort a plan's completions from.
CREATE INDEX tasks_plan_order_2 ON tasks (lower(plan_id), queued_at, task_id) INCLUDE (plan_id)
    WHERE state <> 'running';
DROP INDEX tasks_plan_order;
ALTER INDEX tasks_plan_order_2 RENAME TO tasks_plan_order;
-- A hub's tasks of one result (its failures, say): their total was counted off the result's
-- index, whose hub column told them apart, reading every task of that result (80,000 for
-- 9,000 of the hub's). In queue order, and carrying the completion time, so that a list of them
-- by completedAt sorts only its own tasks, read in the index alone.
CREATE INDEX tasks_hub_result_order ON tasks (lower(hub_name), result, queued_at, task_id)
    INCLUDE (hub_name, completed_at) WHERE result IS NOT NULL;
-- Statistics of the lower-case ids, which a filter by plan or hub compares: the planner takes no
-- statistics from a partial index (the order indexes of 0009 are all partial), so it guessed
-- every plan and hub to hold 0.5% of the tasks. A plan of a third of them was then read off a
-- bitmap and sorted whole rather than walked in its order. Gathered by ANALYZE; nothing on the
-- hot path.
CREATE STATISTICS tasks_plan_lower ON (lower(plan_id)) FROM tasks;
CREATE STATISTICS tasks_hub_lower ON (lower(hub_name)) FROM tasks;
