-- Retention: what is known of a completed task once its row is deleted past AGENTLESS_RETENTION,
-- so that GET /tasks/{id} can tell a task that was purged (410) from one never seen (404). These
-- rows are deleted in turn one retention period after their task.
CREATE TABLE purged_tasks (
    task_id      text PRIMARY KEY,
    completed_at timestamptz NOT NULL,
    purged_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX purged_tasks_purged_at ON purged_tasks (purged_at);
