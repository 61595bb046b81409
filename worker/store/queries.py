"""The SQL statements of the store, each with the rule it enforces; only the store (database.py,
batches.py, registry.py) runs them."""

from __future__ import annotations

from dataclasses import dataclass


def _lock_held(namespace_param: str, worker: str) -> str:
    """Whether worker `worker` (an id: a parameter or a column) holds its session lock now, i.e.
    is alive."""
    return f"""EXISTS (SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.classid::bigint = {namespace_param}
          AND l.objid::bigint = {worker}::bigint AND l.objsubid = 2 AND l.granted)"""


def _worker_alive(namespace_param: str) -> str:
    """Whether the worker running `t`'s attempt still holds its session lock, i.e. is alive."""
    return _lock_held(namespace_param, "t.worker_id")


def holds_own_lock(namespace_param: str, worker_param: str) -> str:
    """Whether the worker `worker_param` holds its session lock now. Worker id 0 is a store that
    registered no worker (a tool, a test), which holds none and needs none.

    Asked of the lock itself rather than of `pg_locks`: a shared try-lock on the key fails while
    the worker's session holds it, and is one lookup where the view copies every partition of
    the lock table under all their locks, on each of the worker's writes. (It also fails while
    another session waits for the key; none does: a worker takes its key when it registers, a
    new id that no row names yet, and with a try-lock after that.) When it succeeds, the worker
    is not alive, and the shared lock it took ends with the statement's transaction."""
    # A subquery, so that a statement asks once (an InitPlan), not once for each row it reads.
    lock = f"{namespace_param}::int, {worker_param}::int"
    held = f"NOT (SELECT pg_try_advisory_xact_lock_shared({lock}))"
    return f"({worker_param}::bigint = 0 OR {held})"


def state_in(*states: str) -> str:
    """`t.state` is one of `states`, written so that no index on state can serve it: statements
    that join a batch of task ids must find their rows by primary key and only then check the
    state. Given an indexable state condition, the planner picks an index on state whenever the
    statistics make that state look rare (after a burst of new waiting tasks, before autoanalyze
    has run), and then reads every unfinished task for each batch: 100 ms instead of 1."""
    listed = ", ".join(f"'{state}'" for state in states)
    return f"(t.state || '') IN ({listed})"


# How many retries the task `t` has had: one history entry each.
_RETRIES = "jsonb_array_length(t.history)"

# Every column a TaskRecord holds, of the row `t`.
RECORD = f"""t.task_id, t.plan_id, t.job_id, t.hub_name, t.state, t.result, t.reason, t.attempts,
    t.digest, t.message::text AS message, t.response::text AS response, t.outputs::text AS outputs,
    t.worker_id, t.lease_until, t.queued_at, t.started_at, t.completed_at, t.mode, t.completed_by,
    t.deadline, t.reply_to, t.correlation_id, t.external_started_at,
    (t.message -> 'variables')::text AS variables, {_RETRIES} AS retries,
    CASE WHEN t.state = 'queued' THEN (t.history -> -1 ->> 'retryAt')::timestamptz END AS retry_at,
    t.history::text AS history, t.polls,
    CASE WHEN t.state = 'polling' AND t.worker_id IS NULL THEN t.next_poll_at END AS next_poll_at,
    t.waiting_since"""

SELECT_TASKS = f"""
SELECT {RECORD}, {_worker_alive("$2")} AS worker_alive
FROM tasks t WHERE t.task_id = ANY($1::text[])
"""

# A task is claimed when it is new or queued, or when its running attempt's worker is gone or
# overran its lease; a completed task, or a different task under the same id, is never claimed.
# Nor does a worker claim anything while it does not hold its own lock: other workers would take
# its attempts over at once. The queue time is the message's (its publisher's clock), never later
# than the database's now: a publisher's clock ahead would date a task after its start.
CLAIM = f"""
INSERT INTO tasks AS t (task_id, plan_id, job_id, hub_name, project_id, name, mode, state,
                        attempts, digest, message, reply_to, correlation_id, worker_id,
                        lease_until, queued_at, started_at)
SELECT i.task_id, i.plan_id, i.job_id, i.hub_name, i.project_id, i.name, i.mode, 'running', 1,
       i.digest, i.message::jsonb, i.reply_to, i.correlation_id, $14,
       now() + make_interval(secs => i.lease), least(i.queued_at, now()), now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::bytea[], $9::text[], $10::timestamptz[], $11::float8[], $12::text[], $13::text[])
     AS i(task_id, plan_id, job_id, hub_name, project_id, name, mode, digest, message, queued_at,
          lease, reply_to, correlation_id)
WHERE {holds_own_lock("$15", "$14")}
ON CONFLICT (task_id) DO UPDATE
SET state = 'running', attempts = t.attempts + 1, worker_id = EXCLUDED.worker_id,
    lease_until = EXCLUDED.lease_until, started_at = now(), updated_at = now(),
    reply_to = coalesce(EXCLUDED.reply_to, t.reply_to),
    correlation_id = coalesce(EXCLUDED.correlation_id, t.correlation_id)
WHERE t.digest = EXCLUDED.digest
  AND (t.state = 'queued'
       OR (t.state = 'running'
           AND (t.lease_until < now() OR NOT {_worker_alive("$15")})))
RETURNING t.task_id, t.attempts, {_RETRIES} AS retries, t.queued_at, t.started_at
"""

# Only the attempt that holds the task records its result: a late, superseded attempt is fenced.
# So is a worker that does not hold its lock now (after a failover, say, until it holds one on
# the new primary): other workers may be taking its tasks over.
COMPLETE = f"""
UPDATE tasks AS t
SET state = 'completed', result = i.result, reason = i.reason, response = i.response::jsonb,
    outputs = t.outputs || i.outputs::jsonb, completed_at = now(), completed_by = 'worker',
    lease_until = NULL, updated_at = now()
FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::text[])
     AS i(task_id, attempts, result, reason, response, outputs)
WHERE t.task_id = i.task_id AND {state_in("running")} AND t.attempts = i.attempts
  AND {holds_own_lock("$8", "$7")}
RETURNING t.task_id, t.completed_at
"""

# A failed attempt to be tried again: the task is queued once more, fenced like COMPLETE, and
# the attempt joins the task's history.
RETRY = f"""
UPDATE tasks AS t
SET state = 'queued', reason = $4::text, response = $5::jsonb, lease_until = NULL,
    updated_at = now(),
    history = t.history || jsonb_build_array(jsonb_build_object(
        'attempt', t.attempts, 'startedAt', t.started_at, 'endedAt', now(), 'reason', $4::text,
        'statusCode', ($5::jsonb -> 'statusCode'), 'retryAt', due.at))
FROM (SELECT now() + make_interval(secs => $3) AS at) AS due
WHERE t.task_id = $1 AND t.state = 'running' AND t.attempts = $2 AND {holds_own_lock("$7", "$6")}
RETURNING due.at
"""

# A callback task whose invocation was accepted waits; fenced like COMPLETE. A callback that came
# first has completed the task already, and then this changes nothing. The outputs evaluated on
# the invocation's response give way to the service's output variables of the same name.
WAIT = f"""
UPDATE tasks AS t
SET state = 'waiting', response = $3::jsonb, deadline = $4, started_deadline = $5,
    outputs = $6::jsonb || t.outputs, lease_until = NULL, waiting_since = now(), updated_at = now()
WHERE t.task_id = $1 AND t.state = 'running' AND t.attempts = $2 AND {holds_own_lock("$8", "$7")}
RETURNING t.updated_at
"""


def with_event_outbox(completing: str) -> str:
    """`completing`, a statement that completes tasks and returns their records, with each
    task's TaskCompleted event kept in the outbox by the same statement: the process that
    completes it holds no task message, so the event is published from the outbox, and only
    its confirmation deletes it there (the relay publishes what stays unconfirmed)."""
    return f"""
WITH completed AS ({completing}), outboxed AS (
    INSERT INTO event_outbox (task_id) SELECT task_id FROM completed
    ON CONFLICT (task_id) DO NOTHING
)
SELECT * FROM completed
"""


_HAS_CANCEL_REQUEST = "coalesce(jsonb_typeof(t.message -> 'cancelRequest'), 'null') <> 'null'"

# The external service's TaskCompleted: accepted while the task runs or waits, whichever came
# first of the invocation's response and the callback; and while it is queued for a retry, since
# a valid token means that an earlier invocation reached the service (it may have timed out on
# the way back). The retry then finds the task completed. Not past the deadline, by the
# database's clock, though no sweep has yet failed the task.
COMPLETE_BY_CALLBACK = with_event_outbox(f"""
UPDATE tasks AS t
SET state = 'completed', result = i.result, reason = i.reason, completed_at = now(),
    completed_by = 'callback', lease_until = NULL, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS i(task_id, plan_id, result, reason)
WHERE t.task_id = i.task_id AND t.plan_id = i.plan_id AND t.mode = 'callback'
  AND ({state_in("running", "waiting")} OR ({state_in("queued")} AND {_RETRIES} > 0))
  AND (t.deadline IS NULL OR now() < t.deadline)
RETURNING {RECORD}
""")

SELECT_MANY_IN_PLANS = f"""
SELECT {RECORD} FROM tasks t
JOIN unnest($1::text[], $2::text[]) AS i(task_id, plan_id)
  ON t.task_id = i.task_id AND t.plan_id = i.plan_id
"""

EXTERNAL_STARTED = f"""
UPDATE tasks AS t
SET external_started_at = coalesce(t.external_started_at, now()), updated_at = now()
WHERE t.task_id = $1 AND t.plan_id = $2 AND t.mode = 'callback'
  AND t.state IN ('running', 'waiting')
RETURNING {RECORD}
"""

SELECT_IN_PLAN = f"SELECT {RECORD} FROM tasks t WHERE t.task_id = $1 AND t.plan_id = $2"

# The task's message published again, with a reply address, while the task waits or polls: its
# TaskCompleted goes to that address from now on, which is the caller waiting now (one before may
# have given up, its reply queue gone with it).
REDIRECT_REPLY = f"""
UPDATE tasks AS t SET reply_to = $2, correlation_id = $3
WHERE t.task_id = $1 AND {state_in("waiting", "polling")}
RETURNING t.task_id
"""

# Waiting and polling tasks past their deadline, or waiting ones past the time by which the
# service had to say it started; SKIP LOCKED lets every worker sweep at once without two completing
# one task. A poll in flight then finds its task completed, and records nothing.
# One condition per scan, each in its partial index's order: a plain index scan stops at the
# limit and marks the entries of rows that have since completed as dead, so that the next sweep
# skips them. Both deadlines in one OR made a bitmap scan, which marks nothing: it read every
# task completed since the last vacuum whose deadline had passed, each sweep (33 ms for 40,000).
# SWEEP_PLAN, set for its transaction, keeps that plan whatever the statistics say: without
# them (autovacuum off, the table never analyzed) the planner took every waiting task through
# bitmaps of the state indexes and sorted them, 35-50 ms a sweep with 100,000 waiting.
SWEEP_PLAN = "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off"
SWEEP = with_event_outbox(f"""
WITH waiting AS (
    SELECT task_id FROM tasks
    WHERE state = 'waiting' AND deadline <= now()
    ORDER BY deadline
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), not_started AS (
    SELECT task_id FROM tasks
    WHERE state = 'waiting' AND started_deadline <= now() AND external_started_at IS NULL
    ORDER BY started_deadline
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), polling AS (
    SELECT task_id FROM tasks
    WHERE state = 'polling' AND deadline <= now()
    ORDER BY deadline
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks AS t
SET state = 'completed', result = 'failed',
    reason = CASE
        WHEN t.state = 'polling' THEN 'poll criteria not met after ' || t.polls
             || CASE WHEN t.polls = 1 THEN ' poll' ELSE ' polls' END || ': timed out after '
             || round(extract(epoch FROM t.deadline - t.started_at))::bigint || ' s'
        WHEN t.deadline <= now() THEN 'timed out waiting for callback'
        ELSE 'external service did not start' END,
    completed_at = now(), completed_by = 'timeout', updated_at = now(),
    next_poll_at = NULL, worker_id = NULL,
    cancel_state = CASE WHEN {_HAS_CANCEL_REQUEST} THEN 'pending' END
FROM (
    SELECT task_id FROM waiting UNION SELECT task_id FROM not_started
    UNION SELECT task_id FROM polling
) AS due
WHERE t.task_id = due.task_id
RETURNING {RECORD}
""")

# An invoked task's cancelRequest is due when it is cancelled; a queued one was never invoked,
# unless it is queued for a retry.
CANCEL = with_event_outbox(f"""
UPDATE tasks AS t
SET state = 'completed', result = 'canceled', reason = $2, completed_at = now(),
    completed_by = 'cancel', lease_until = NULL, updated_at = now(),
    next_poll_at = NULL, worker_id = NULL,
    cancel_state = CASE WHEN (t.state IN ('running', 'waiting', 'polling') OR {_RETRIES} > 0)
                             AND {_HAS_CANCEL_REQUEST}
                        THEN 'pending' END
WHERE t.task_id = $1 AND t.state <> 'completed'
RETURNING {RECORD}
""")

# Completions made by processes that hold no task message, whose events are not yet confirmed.
PENDING_EVENTS = f"""
SELECT {RECORD} FROM event_outbox o JOIN tasks t ON t.task_id = o.task_id
WHERE o.since < now() - make_interval(secs => $1)
ORDER BY o.since
LIMIT $2
FOR UPDATE OF o SKIP LOCKED
"""

# A mark lost in a crash only makes the relay publish the event again, which at-least-once
# delivery allows: its commit need not wait for the disk. The setting is made by the statement
# itself, for its own transaction, so that a mark is one round trip rather than four (BEGIN, SET
# LOCAL, DELETE, COMMIT); a row is deleted only once the setting is made.
EVENTS_PUBLISHED = """
WITH unflushed AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))
DELETE FROM event_outbox o USING unflushed WHERE o.task_id = ANY($1::text[])
"""

# Marked done before the call: a cancelRequest is invoked at most once, best effort.
TAKE_CANCEL_REQUESTS = f"""
WITH due AS (
    SELECT task_id FROM tasks WHERE cancel_state = 'pending'
    ORDER BY updated_at LIMIT $1 FOR UPDATE SKIP LOCKED
)
UPDATE tasks AS t SET cancel_state = 'done', updated_at = now()
FROM due WHERE t.task_id = due.task_id
RETURNING {RECORD}
"""

# A completed task's log is final, as its outputs are: lines are kept only until it completes.
# The row lock orders them against the completion: kept before it, or refused after it.
LOCK_TASK_IN_PLAN = """
SELECT 1 FROM tasks WHERE task_id = $1 AND plan_id = $2 AND state <> 'completed' FOR UPDATE
"""

APPEND_LOG_LINES = """
INSERT INTO task_logs (task_id, at, line)
SELECT $1, now(), line FROM unnest($2::text[]) WITH ORDINALITY AS l(line, n) ORDER BY n
"""

# Past the cap, the oldest lines go; the task row counts how many went.
TRIM_LOG_LINES = """
WITH gone AS (
    DELETE FROM task_logs
    WHERE task_id = $1 AND seq <= (
        SELECT seq FROM task_logs WHERE task_id = $1 ORDER BY seq DESC OFFSET $2 LIMIT 1)
    RETURNING 1
)
UPDATE tasks SET log_lines_dropped = log_lines_dropped + (SELECT count(*) FROM gone)
WHERE task_id = $1
"""

READ_LOG_LINES = "SELECT at, line FROM task_logs WHERE task_id = $1 ORDER BY seq"

LOG_LINES_DROPPED = "SELECT log_lines_dropped FROM tasks WHERE task_id = $1"

CREATE_LOG = """
UPDATE tasks SET logs_created = logs_created + 1, updated_at = now()
WHERE task_id = $1 AND plan_id = $2 AND state <> 'completed'
RETURNING logs_created
"""

# Outputs are final once the task completes: its TaskCompleted has carried them.
MERGE_OUTPUTS = f"""
UPDATE tasks AS t SET outputs = (t.outputs - $4::text[]) || $3::jsonb, updated_at = now()
WHERE t.task_id = $1 AND t.plan_id = $2 AND t.state <> 'completed'
RETURNING {RECORD}
"""

SIGNING_KEY = """
WITH made AS (
    INSERT INTO secrets (name, value) VALUES ('signing-key', $1)
    ON CONFLICT (name) DO NOTHING
    RETURNING value
)
SELECT value FROM made UNION ALL SELECT value FROM secrets WHERE name = 'signing-key'
LIMIT 1
"""

# What a task list shows of each task: no bodies.
SUMMARY = """t.task_id, t.plan_id, t.job_id, t.hub_name, t.name, t.mode, t.state, t.result,
    t.reason, t.attempts, t.queued_at, t.started_at, t.completed_at, t.deadline, t.polls"""

# Sortable fields of GET /tasks and the keys behind them (the only text spliced into SQL). Ids
# sort as they filter, case-insensitively, by the lower() forms the indexes hold (0008).
ORDER_COLUMNS = {
    "taskId": "t.task_id",
    "planId": "lower(t.plan_id)",
    "hubName": "lower(t.hub_name)",
    "name": "t.name",
    "state": "t.state",
    "result": "t.result",
    "attempts": "t.attempts",
    "queuedAt": "t.queued_at",
    "startedAt": "t.started_at",
    "completedAt": "t.completed_at",
}
# Ties are broken by the queue time, then the task id, in the same direction: each order has an
# index on exactly (key, queued_at, task_id) (migration 0008), so that a page is a walk along it.
_TIES = ("t.queued_at", "t.task_id")

# Fields that may be empty sort those last in either direction. No one btree scan gives both
# "DESC NULLS LAST" and "ASC NULLS LAST", so the tasks with a value and those without are read
# as two parts, one after the other: each then follows an index.
_PARTS = {
    "name": ("t.name IS NOT NULL", "t.name IS NULL"),
    "result": ("t.result IS NOT NULL", "t.result IS NULL"),
    "startedAt": ("t.started_at IS NOT NULL", "t.started_at IS NULL"),
    "completedAt": ("t.completed_at IS NOT NULL", "t.completed_at IS NULL"),
}
# A result and a completion time are set exactly when a task completes: a task with either is
# completed, and one in another state has neither. The planner cannot know it; the statements
# leave out what it implies, so that they match the indexes, which hold neither state.
_SET_ON_COMPLETION = frozenset({"result", "completedAt"})

# Filters of GET /tasks: each compares with the next parameter. State and result come validated
# and spelled as stored, so they compare as they are and reach the indexes on (state, …) and
# (result, …); ids compare case-insensitively, through the indexed lower() forms.
_FILTERS = {
    "state": "t.state = {}",
    "result": "t.result = {}",
    "planId": "lower(t.plan_id) = lower({})",
    "hubName": "lower(t.hub_name) = lower({})",
    # Tasks executed from a definition (0010): by its id (server-made, in lower case), or
    # carrying a tag, exactly.
    "definition": "t.definition_id = lower({})",
    "tag": "t.tags @> ARRAY[{}::text]",
}
# A filter that another condition implies still takes its parameter, as a condition that holds.
_IMPLIED = "{}::text IS NOT NULL"


@dataclass(frozen=True, slots=True)
class Listing:
    """The statements of one GET /tasks: filters by name, in order, are $1, $2, …, $n.

    `parts` are read one after the other (their rows, in order, are the list), each with $n+1
    the offset into it and $n+2 the limit; `part_counts[i]` counts part i's rows up to $n+1.
    `count` counts the matching tasks up to $n+1; `estimate`'s plan estimates how many there are.
    """

    parts: tuple[str, ...]
    part_counts: tuple[str, ...]
    count: str
    estimate: str


def list_tasks(filters: dict[str, str], order: str, descending: bool) -> Listing:
    """The statements that list the tasks matching `filters` (by name: value) in this order."""
    state = filters.get("state")
    completed = state == "completed"
    with_result = "result" in filters

    def where(*extra: str, completed_implied: bool = False) -> list[str]:
        return [
            *(
                (
                    _IMPLIED
                    if name == "state" and completed and completed_implied
                    else _FILTERS[name]
                ).format(f"${i}")
                for i, name in enumerate(filters, 1)
            ),
            *extra,
        ]

    direction = "DESC" if descending else "ASC"
    # The task id is unique: it has no ties to break.
    ties = [] if order == "taskId" else [tie for tie in _TIES if tie != ORDER_COLUMNS[order]]
    keyed = [ORDER_COLUMNS[order], *ties]
    # Each part: its conditions, its keys, and whether only completed tasks can match it (its
    # rows are then in the indexes of completion times and results, running tasks never).
    parts: list[tuple[list[str], list[str], bool]] = []
    if order in _PARTS:
        with_value, without = _PARTS[order]
        on_completion = order in _SET_ON_COMPLETION
        if not (on_completion and state is not None and not completed):
            conditions = where(with_value, completed_implied=on_completion or with_result)
            if on_completion and not with_result and _BY_ID.intersection(filters):
                # Completed tasks only, none running: said, so that the plan's or hub's index,
                # which leaves running tasks out, can serve it (0009).
                conditions.append(_NOT_RUNNING)
            parts.append((conditions, keyed, on_completion or with_result))
        if not (on_completion and (completed or with_result)):
            # An unfinished state implies the empty value: said again, it would only mislead the
            # planner's estimate (it takes the two for independent, and their rows for few).
            implied = on_completion and state is not None
            parts.append(
                (
                    where(*([] if implied else [without]), completed_implied=with_result),
                    ties,
                    with_result,
                )
            )
    else:
        parts.append((where(completed_implied=with_result), keyed, with_result))
    # By task id alone, the primary key holds every task, running or not.
    whole = order == "taskId" and not filters
    offset, limit = len(filters) + 1, len(filters) + 2
    selects = [
        _not_running_or_running(
            conditions,
            keys,
            completed_only or whole,
            state,
            direction=direction,
            bound=f"${offset}::bigint + ${limit}::bigint",
        )
        for conditions, keys, completed_only in parts
    ]
    everything = _not_running_or_running(
        where(completed_implied=with_result), [], with_result or not filters, state
    )
    return Listing(
        # The page's task ids come off the index alone (an index-only scan past the offset);
        # only the page's own rows are read.
        parts=tuple(
            f"""SELECT {SUMMARY} FROM tasks t WHERE t.task_id IN (
                SELECT u.task_id FROM ({select}) AS u
                ORDER BY {_ordered(len(keys), direction)}
                OFFSET ${offset} LIMIT ${limit})
            ORDER BY {", ".join(f"{key} {direction}" for key in keys)}"""
            for select, (_, keys, _) in zip(selects, parts, strict=True)
        ),
        part_counts=tuple(
            _capped_count(
                _not_running_or_running(conditions, [], completed_only or whole, state), offset
            )
            for conditions, _, completed_only in parts
        ),
        count=_capped_count(everything, offset),
        estimate=f"SELECT 1 FROM tasks t {_where(*where(completed_implied=with_result))}",
    )


# The order indexes leave out running tasks (migration 0009): the worker writes each task twice,
# running then completed, and the running ones are few (no more than the workers' concurrency).
# A list that may hold running tasks reads them apart, off their own index, and merges them
# into its order (a Merge Append of the order index and the running tasks, sorted).
_NOT_RUNNING = "t.state <> 'running'"
_RUNNING = "t.state = 'running'"
# Filters read off indexes that leave out the running tasks (their queue and completion orders).
_BY_ID = frozenset({"planId", "hubName"})


def _not_running_or_running(
    conditions: list[str],
    keys: list[str],
    completed_only: bool,
    state: str | None,
    *,
    direction: str = "",
    bound: str = "",
) -> str:
    """The tasks that match `conditions`, each with its task id and `keys` as k0, k1, …: a scan
    of the order index and one of the running tasks, unless the conditions leave out either."""
    columns = ", ".join(["t.task_id", *(f"{key} AS k{i}" for i, key in enumerate(keys))])
    if completed_only:
        return f"SELECT {columns} FROM tasks t {_where(*conditions)}"
    scans = []
    if state != "running":
        scans.append(_where(*conditions, _NOT_RUNNING))
    if state in (None, "running"):
        scans.append(_where(*conditions, _RUNNING))
    if len(scans) == 1:
        return f"SELECT {columns} FROM tasks t {scans[0]}"
    # Each scan in its own order and bounded by the page's end, said inside it: the planner then
    # reads each as far as the page needs and merges them (a Merge Append). A union of bare scans
    # is read whole and sorted; one ordered but unbounded may be planned as a sort of it all.
    ordered = (
        f"ORDER BY {', '.join(f'{key} {direction}' for key in keys)} LIMIT {bound}" if keys else ""
    )
    return "\n                UNION ALL ".join(
        f"(SELECT {columns} FROM tasks t {where} {ordered})" for where in scans
    )


def _ordered(keys: int, direction: str) -> str:
    """The ORDER BY of a union's rows, by the keys it selected as k0, k1, …, then the task id."""
    named = [f"u.k{i}" for i in range(keys)]
    return ", ".join(f"{key} {direction}" for key in named or ["u.task_id"])


def _where(*conditions: str) -> str:
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


def _capped_count(select: str, cap: int) -> str:
    """How many rows `select` returns, counting no further than the cap: the cost stays
    bounded."""
    return f"SELECT count(*) FROM ({select} LIMIT ${cap}) AS capped"


INSERT_QUEUED = """
INSERT INTO tasks (task_id, plan_id, job_id, hub_name, project_id, name, mode, state, digest,
                   message, queued_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9::jsonb, now())
ON CONFLICT (task_id) DO NOTHING
RETURNING queued_at
"""

# The overview's and the metrics' statements are worker/store/overview.py's.

LIVE_WORKERS = """
SELECT worker_id, host, pid, version, in_flight, started_at, last_seen FROM workers
WHERE last_seen > now() - interval '30 seconds'
ORDER BY started_at
"""

RECORD_DEAD_LETTER = """
INSERT INTO dead_letters (message_id, reason, excerpt) VALUES ($1, $2, $3)
"""

RECENT_DEAD_LETTERS = """
SELECT message_id, reason, excerpt, at FROM dead_letters ORDER BY at DESC LIMIT $1
"""

REGISTER_WORKER = """
INSERT INTO workers (host, pid, version) VALUES ($1, $2, $3) RETURNING worker_id
"""

# Held for the process's life on a connection of its own (what _worker_alive looks for).
LOCK_WORKER = "SELECT pg_advisory_lock($1, $2)"

HOLDS_OWN_LOCK = f"SELECT {holds_own_lock('$1', '$2')}"

# An attempt about to invoke its endpoint long after its claim: its lease starts again, if the
# attempt still holds its task and its worker its lock.
RENEW_LEASE = f"""
UPDATE tasks AS t SET lease_until = now() + make_interval(secs => $3), updated_at = now()
WHERE t.task_id = $1 AND t.state = 'running' AND t.attempts = $2
  AND {holds_own_lock("$4", "t.worker_id")}
RETURNING t.lease_until
"""

HEARTBEAT = "UPDATE workers SET last_seen = now(), in_flight = $2 WHERE worker_id = $1"

UNREGISTER_WORKER = "DELETE FROM workers WHERE worker_id = $1"
