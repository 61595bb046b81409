-- One row per task: its state, result and what its invocation answered.
CREATE TABLE tasks (
    task_id      text PRIMARY KEY,
    plan_id      text NOT NULL,
    job_id       text NOT NULL,
    hub_name     text NOT NULL,
    project_id   text,
    name         text,
    mode         text NOT NULL,
    state        text NOT NULL,
    result       text,
    reason       text,
    attempts     integer NOT NULL DEFAULT 0,
    -- sha256 of the task message: tells a redelivery from a different task under the same id
    digest       bytea NOT NULL,
    -- the task message, secret header values redacted
    message      jsonb NOT NULL,
    response     jsonb,
    outputs      jsonb NOT NULL DEFAULT '{}',
    -- the worker running the current attempt, and until when that attempt may run
    worker_id    bigint,
    lease_until  timestamptz,
    deadline     timestamptz,
    queued_at    timestamptz NOT NULL,
    started_at   timestamptz,
    completed_at timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX tasks_unfinished ON tasks (state, queued_at) WHERE state <> 'completed';
CREATE INDEX tasks_plan ON tasks (plan_id);
CREATE INDEX tasks_completed_at ON tasks (completed_at);

-- Live worker processes; each holds a session advisory lock on its id while it runs.
CREATE TABLE workers (
    worker_id  bigserial PRIMARY KEY,
    host       text NOT NULL,
    pid        integer NOT NULL,
    version    text NOT NULL,
    in_flight  integer NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now()
);
