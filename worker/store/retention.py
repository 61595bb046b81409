"""Retention in the store: deleting completed tasks, dead letters and the records of purged tasks
past AGENTLESS_RETENTION, one small batch per short transaction.

Each batch takes a transaction-scoped advisory lock first and gives up at once without it, so
that one process of a deployment purges at a time: several purging side by side would only
compete for the same rows, and for the disk the hot path writes to. SKIP LOCKED passes over
rows another statement holds, so a purge never waits for the hot path, and the hot path waits
for a purge only on the rows of tasks that are already completed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import asyncpg

# The purge lock's key: the schema's namespace in the low half, this tag in the high one. Its
# single-key form (objsubid 1) keeps it apart from workers' liveness locks (two keys, objsubid 2)
# and from the migration lock, whose high half is 0.
_PURGE_TAG = 0x7075_7267


class Purged(StrEnum):
    """What a purge deletes, as the metrics and logs name it."""

    TASKS = "tasks"
    DEAD_LETTERS = "dead_letters"
    TOMBSTONES = "tombstones"


# Completed tasks past the retention, oldest first, with their log lines (ON DELETE CASCADE):
# their outputs, history and the events they received are columns of their rows. A task whose
# TaskCompleted event is not yet confirmed, or whose cancelRequest is yet to be sent, is kept
# until that is done. Each leaves its completion time behind in purged_tasks.
_PURGE_TASKS = """
WITH doomed AS (
    SELECT t.task_id FROM tasks t
    WHERE t.completed_at < now() - make_interval(secs => $1) AND t.completed_at >= $3
      AND t.state = 'completed'
      AND t.cancel_state IS DISTINCT FROM 'pending'
      AND NOT EXISTS (SELECT FROM event_outbox o WHERE o.task_id = t.task_id)
    ORDER BY t.completed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM tasks t USING doomed d WHERE t.task_id = d.task_id
    RETURNING t.task_id, t.completed_at
), kept AS (
    INSERT INTO purged_tasks (task_id, completed_at)
    SELECT task_id, completed_at FROM gone
    -- The same id purged again: it was submitted again once it had been purged.
    ON CONFLICT (task_id) DO UPDATE
    SET completed_at = EXCLUDED.completed_at, purged_at = EXCLUDED.purged_at
    RETURNING completed_at
)
SELECT count(*) AS deleted, max(completed_at) AS reached FROM kept
"""

_PURGE_DEAD_LETTERS = """
WITH gone AS (
    DELETE FROM dead_letters WHERE id IN (
        SELECT id FROM dead_letters WHERE at < now() - make_interval(secs => $1) AND at >= $3
        ORDER BY at LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING at
)
SELECT count(*) AS deleted, max(at) AS reached FROM gone
"""

# A purged task is remembered for one retention period more, then forgotten (404).
_PURGE_TOMBSTONES = """
WITH gone AS (
    DELETE FROM purged_tasks WHERE task_id IN (
        SELECT task_id FROM purged_tasks
        WHERE purged_at < now() - make_interval(secs => $1) AND purged_at >= $3
        ORDER BY purged_at LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING purged_at
)
SELECT count(*) AS deleted, max(purged_at) AS reached FROM gone
"""

_STATEMENTS = {
    Purged.TASKS: _PURGE_TASKS,
    Purged.DEAD_LETTERS: _PURGE_DEAD_LETTERS,
    Purged.TOMBSTONES: _PURGE_TOMBSTONES,
}

_COMPLETED_AT = "SELECT completed_at FROM purged_tasks WHERE task_id = $1"


# Where a round starts: before any row.
FROM_THE_START = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch's outcome: how many rows it deleted and the time of the latest (where the next
    batch of the round starts), or that another process holds the lock."""

    deleted: int
    reached: datetime = FROM_THE_START
    locked_out: bool = False


class RetentionStore:
    def __init__(self, pool: asyncpg.Pool, lock_namespace: int) -> None:
        self._pool = pool
        self._lock_key = (_PURGE_TAG << 32) | lock_namespace

    async def purge(
        self, kind: Purged, retention: float, limit: int, start: datetime = FROM_THE_START
    ) -> Batch:
        """Delete up to `limit` rows of `kind` older than `retention` seconds, by the database's
        clock, and not older than `start`, in one transaction; nothing if another process holds
        the purge lock.

        A round passes the previous batch's `reached` as `start`: the rows that batch deleted
        stay in the index until a vacuum, and a scan from the oldest end would read them all
        again at every batch (the growth benchmark read 11.5 entries of that index per task in the
        rounds that a purge of 36,000 tasks fell in)."""
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", self._lock_key):
                return Batch(0, locked_out=True)
            # A commit lost in a crash is only a batch to delete again in the next round: it
            # need not wait for the disk (nor for a synchronous replica).
            await conn.execute("SET LOCAL synchronous_commit = off")
            row = await conn.fetchrow(_STATEMENTS[kind], retention, limit, start)
        assert row is not None
        return Batch(row["deleted"], row["reached"] or start)

    async def autovacuum(self) -> bool:
        """Whether the server runs autovacuum, which makes the space of purged rows reusable."""
        on: bool = await self._pool.fetchval("SELECT current_setting('autovacuum')::boolean")
        return on

    async def purged_completion(self, task_id: str) -> datetime | None:
        """When the purged task `task_id` had completed; None if no purge is remembered of it."""
        completed_at: datetime | None = await self._pool.fetchval(_COMPLETED_AT, task_id)
        return completed_at
