-- Poll mode: how many polls were recorded, when the next is due (while one is in flight: until
-- when its worker may take to record it), and the request it makes.
ALTER TABLE tasks
    ADD COLUMN polls        integer NOT NULL DEFAULT 0,
    ADD COLUMN next_poll_at timestamptz,
    -- the poll request, resolved from the start response; secret header values left out
    ADD COLUMN poll_request jsonb,
    -- those secret header values, sealed under a key derived from the signing key
    ADD COLUMN poll_secrets bytea;

CREATE INDEX tasks_poll_due ON tasks (next_poll_at) WHERE state = 'polling';
-- A polling task names a worker only while that worker's poll is in flight.
CREATE INDEX tasks_poll_in_flight ON tasks (worker_id)
    WHERE state = 'polling' AND worker_id IS NOT NULL;
CREATE INDEX tasks_polling_deadline ON tasks (deadline) WHERE state = 'polling';
