"""The SQL statements of poll tasks (worker/store/polls.py runs them)."""

from __future__ import annotations

from worker.store.queries import RECORD, holds_own_lock, state_in, with_event_outbox

# A poll task whose start request was answered polls from now on; fenced like COMPLETE (the
# attempt, and the worker's lock: a worker that lost its lock may have lost the task to another).
# Its deadline and first poll are set by the database's clock, which sweeps and takes them.
START_POLLING = f"""
UPDATE tasks AS t
SET state = 'polling', response = $3::jsonb, deadline = now() + make_interval(secs => $4),
    next_poll_at = now() + make_interval(secs => $5),
    poll_request = $6::jsonb, poll_secrets = $7, outputs = t.outputs || $8::jsonb,
    worker_id = NULL, lease_until = NULL, waiting_since = now(), updated_at = now()
WHERE t.task_id = $1 AND t.state = 'running' AND t.attempts = $2 AND {holds_own_lock("$10", "$9")}
RETURNING t.updated_at
"""

# Due polls, each taken by this worker until its lease ends: the due time moves to the lease's
# end, so that a poll whose worker dies is due again then (sooner, once RESCUE_POLLS sees it).
# None while the worker does not hold its lock: RESCUE_POLLS would hand them on at once.
TAKE_POLLS = f"""
WITH due AS (
    SELECT task_id, next_poll_at FROM tasks
    WHERE state = 'polling' AND next_poll_at <= now() AND {holds_own_lock("$4", "$3")}
    ORDER BY next_poll_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks AS t SET next_poll_at = now() + make_interval(secs => $2), worker_id = $3
FROM due
WHERE t.task_id = due.task_id
RETURNING t.task_id, t.polls, due.next_poll_at AS due_at, t.message::text AS message,
    t.poll_request::text AS poll_request, t.poll_secrets
"""

# A poll's answer that leaves its task polling. `polls` is the fence: only the poll that was
# taken at that count records, once, so a poll made twice (its first worker died) counts once.
POLLED = f"""
UPDATE tasks AS t
SET polls = t.polls + 1, reason = i.reason, response = coalesce(i.response::jsonb, t.response),
    next_poll_at = now() + make_interval(secs => i.delay), worker_id = NULL
FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::float8[])
     AS i(task_id, polls, reason, response, delay)
WHERE t.task_id = i.task_id AND {state_in("polling")} AND t.polls = i.polls
RETURNING t.task_id
"""

# A poll's answer that completes its task; fenced like POLLED. The event is published from the
# outbox, as the sweeper's are: no task message is in hand.
POLL_FINISHED = with_event_outbox(f"""
UPDATE tasks AS t
SET state = 'completed', polls = t.polls + 1, result = i.result, reason = i.reason,
    response = coalesce(i.response::jsonb, t.response), outputs = t.outputs || i.outputs::jsonb,
    completed_at = now(), completed_by = 'worker', next_poll_at = NULL,
    worker_id = NULL, lease_until = NULL, updated_at = now()
FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::text[])
     AS i(task_id, polls, result, reason, response, outputs)
WHERE t.task_id = i.task_id AND {state_in("polling")} AND t.polls = i.polls
RETURNING {RECORD}
""")

# Polls in flight on a worker that is gone (its session lock with it) are due again at once.
RESCUE_POLLS = """
UPDATE tasks AS t SET next_poll_at = now(), worker_id = NULL
WHERE t.state = 'polling' AND t.worker_id IS NOT NULL
  AND t.worker_id NOT IN (
      SELECT l.objid::bigint FROM pg_locks l
      WHERE l.locktype = 'advisory' AND l.classid::bigint = $1 AND l.objsubid = 2 AND l.granted)
RETURNING t.task_id
"""

# A stopping worker hands back the polls it took but did not make.
RELEASE_POLLS = """
UPDATE tasks SET next_poll_at = now(), worker_id = NULL
WHERE state = 'polling' AND worker_id = $1 AND task_id = ANY($2::text[])
"""
