-- Listing and filtering tasks (case-insensitive ids), and a log of dead-lettered messages.
CREATE INDEX tasks_plan_lower ON tasks (lower(plan_id), queued_at);
CREATE INDEX tasks_hub_lower ON tasks (lower(hub_name), queued_at);
CREATE INDEX tasks_state_queued ON tasks (state, queued_at);
CREATE INDEX tasks_result_completed ON tasks (result, completed_at) WHERE result IS NOT NULL;
CREATE INDEX tasks_queued_at ON tasks (queued_at);
DROP INDEX IF EXISTS tasks_plan;

CREATE TABLE dead_letters (
    id         bigserial PRIMARY KEY,
    message_id text,
    reason     text NOT NULL,
    excerpt    text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_at ON dead_letters (at);
