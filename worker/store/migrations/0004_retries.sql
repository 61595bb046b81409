-- Opt-in retries: each retried attempt, oldest first. How many there were, and when a queued
-- task's next one is due, are read off it.
ALTER TABLE tasks ADD COLUMN history jsonb NOT NULL DEFAULT '[]';
