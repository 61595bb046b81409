-- When a callback or poll task began to wait: the metrics' waiting→completed durations and the
-- age of the oldest waiting task. Tasks already waiting before this migration have none, and are
-- taken as waiting since their attempt started.
ALTER TABLE tasks ADD COLUMN waiting_since timestamptz;

CREATE INDEX tasks_waiting_since ON tasks (waiting_since) WHERE state IN ('waiting', 'polling');
