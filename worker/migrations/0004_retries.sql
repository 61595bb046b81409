-- Opt-in retries: how many a task has had, when the next is due, and each retried attempt.
ALTER TABLE tasks
    ADD COLUMN retries integer NOT NULL DEFAULT 0,
    ADD COLUMN retry_at timestamptz,
    ADD COLUMN history jsonb NOT NULL DEFAULT '[]';
