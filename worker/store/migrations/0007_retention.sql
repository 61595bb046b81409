-- Retention: what is known of a completed task once its row is deleted past AGENTLESS_RETENTION,
-- so that GET /tasks/{id} can tell a task that was purged (410) from one never seen (404). These
-- rows are deleted in turn one retention period after their task.
CREATE TABLE purged_tasks (
    task_id      text PRIMARY KEY,
    completed_at timestamptz NOT NULL,
    purged_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX purged_tasks_purged_at ON purged_tasks (purged_at);

-- No per-table autovacuum settings: the hot path's updates already leave at least one dead tuple
-- per task (its completion), the purge one more, which autovacuum's defaults keep in check; and
-- an index scan skips the entries of purged rows, marked dead at its first pass, without waiting
-- for a vacuum. A server run without autovacuum is told
-- so by the purge duty: there the space of purged rows is reused only after a manual VACUUM.
