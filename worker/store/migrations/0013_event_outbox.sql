-- Events still to publish move from a flag on the task's row to a table of their own. The flag
-- was named in a partial index (tasks_event_pending), so marking an event published could not be
-- a HOT update: it wrote a new version of the row into every index of tasks (twenty-odd since
-- 0008), and left one more dead row version per task for the vacuum, for every task a callback,
-- a sweep, a cancellation or a poll completed. A row here is inserted by the statement that
-- completes the task and deleted once its event is confirmed.
CREATE TABLE event_outbox (
    task_id text PRIMARY KEY,
    since   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_outbox_since ON event_outbox (since);
-- A vacuum whenever some hundreds of rows are dead, whatever the table's peak size was: it is
-- a queue, near empty when the broker keeps up.
ALTER TABLE event_outbox SET (autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_scale_factor = 0,
                              autovacuum_vacuum_threshold = 500);

INSERT INTO event_outbox (task_id, since) SELECT task_id, updated_at FROM tasks WHERE event_pending;
DROP INDEX tasks_event_pending;
ALTER TABLE tasks DROP COLUMN event_pending;
