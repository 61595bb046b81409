-- Callback mode: who completed a task, events still to publish, deadlines, cancel requests, logs.
ALTER TABLE tasks
    ADD COLUMN reply_to            text,
    ADD COLUMN correlation_id      text,
    -- worker | callback | timeout | cancel
    ADD COLUMN completed_by        text,
    -- completed by a process that holds no task message: the event is published from this row
    ADD COLUMN event_pending       boolean NOT NULL DEFAULT false,
    ADD COLUMN started_deadline    timestamptz,
    ADD COLUMN external_started_at timestamptz,
    -- pending | done: the task's cancelRequest, invoked once on cancellation or timeout
    ADD COLUMN cancel_state        text,
    ADD COLUMN logs_created        integer NOT NULL DEFAULT 0,
    ADD COLUMN log_lines_dropped   bigint NOT NULL DEFAULT 0;

CREATE INDEX tasks_waiting_deadline ON tasks (deadline) WHERE state = 'waiting';
CREATE INDEX tasks_started_deadline ON tasks (started_deadline)
    WHERE state = 'waiting' AND external_started_at IS NULL;
CREATE INDEX tasks_event_pending ON tasks (updated_at) WHERE event_pending;
CREATE INDEX tasks_cancel_pending ON tasks (updated_at) WHERE cancel_state = 'pending';

-- Log lines posted by external services, in order, a bounded number per task.
CREATE TABLE task_logs (
    task_id text NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
    seq     bigserial,
    at      timestamptz NOT NULL DEFAULT now(),
    line    text NOT NULL,
    PRIMARY KEY (task_id, seq)
);

-- Secrets every process sharing the database shares (the callback signing key).
CREATE TABLE secrets (
    name  text PRIMARY KEY,
    value bytea NOT NULL
);
