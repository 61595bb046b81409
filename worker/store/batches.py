"""The batched statements: the claims, completions and callbacks of many tasks, one statement each.

Each takes a connection and a batch, and answers each request in the batch's order: its outcome,
or the task's current record when the statement passed it over.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from worker.contract.records import TaskRecord
from worker.store import queries
from worker.store.changes import (
    CallbackCompletion,
    Claimed,
    ClaimRequest,
    Completion,
    Waited,
)
from worker.store.errors import Executor, NotLive, TaskVanished
from worker.store.rows import task_record


async def records(
    conn: Executor, task_ids: list[str], lock_namespace: int
) -> dict[str, TaskRecord]:
    rows = await conn.fetch(queries.SELECT_TASKS, task_ids, lock_namespace)
    return {row["task_id"]: task_record(row) for row in rows}


async def record(conn: Executor, task_id: str, lock_namespace: int) -> TaskRecord:
    """The task's record; TaskVanished if it has none."""
    found = await records(conn, [task_id], lock_namespace)
    if task_id not in found:
        raise TaskVanished(task_id)
    return found[task_id]


async def claims(
    conn: Executor, batch: list[ClaimRequest], worker_id: int, lock_namespace: int
) -> list[Claimed | TaskRecord]:
    rows = await conn.fetch(
        queries.CLAIM,
        [c.task_id for c in batch],
        [c.plan_id for c in batch],
        [c.job_id for c in batch],
        [c.hub_name for c in batch],
        [c.project_id for c in batch],
        [c.name for c in batch],
        [c.mode for c in batch],
        [c.digest for c in batch],
        [c.message for c in batch],
        [c.queued_at for c in batch],
        [c.lease_seconds for c in batch],
        [c.reply_to for c in batch],
        [c.correlation_id for c in batch],
        worker_id,
        lock_namespace,
    )
    if not rows:
        # The statement claims nothing at all for a worker that lost its lock.
        await ensure_live(conn, worker_id, lock_namespace)
    claimed = {
        row["task_id"]: Claimed(
            row["attempts"], row["retries"], row["queued_at"], row["started_at"]
        )
        for row in rows
    }
    missed = [c.task_id for c in batch if c.task_id not in claimed]
    found = await records(conn, missed, lock_namespace) if missed else {}
    return [claimed.get(c.task_id) or found[c.task_id] for c in batch]


async def complete(
    conn: Executor, batch: list[Completion], worker_id: int, lock_namespace: int
) -> list[asyncpg.Record]:
    """COMPLETE of each attempt in `batch` (none at all without the worker's lock): the rows of
    the tasks it completed, with their completion times."""
    if not batch:
        return []
    rows: list[asyncpg.Record] = await conn.fetch(
        queries.COMPLETE,
        [c.task_id for c in batch],
        [c.attempts for c in batch],
        [c.result.value for c in batch],
        [c.reason for c in batch],
        [c.response_json for c in batch],
        [c.outputs_json for c in batch],
        worker_id,
        lock_namespace,
    )
    return rows


async def wait(conn: Executor, write: Waited, worker_id: int, lock_namespace: int) -> bool:
    """WAIT of the attempt: whether it made its task wait (not without the worker's lock)."""
    waited = await conn.fetchval(
        queries.WAIT,
        write.task_id,
        write.attempts,
        write.response_json,
        write.deadline,
        write.started_deadline,
        write.outputs_json,
        worker_id,
        lock_namespace,
    )
    return waited is not None


async def completions(
    conn: Executor, batch: list[Completion], worker_id: int, lock_namespace: int
) -> list[datetime | TaskRecord | TaskVanished]:
    rows = await complete(conn, batch, worker_id, lock_namespace)
    if not rows:
        await ensure_live(conn, worker_id, lock_namespace)
    done: dict[str, datetime] = {row["task_id"]: row["completed_at"] for row in rows}
    missed = [c.task_id for c in batch if c.task_id not in done]
    found = await records(conn, missed, lock_namespace) if missed else {}
    return [done.get(c.task_id) or found.get(c.task_id) or TaskVanished(c.task_id) for c in batch]


async def callbacks(
    conn: Executor, batch: list[CallbackCompletion]
) -> list[tuple[bool, TaskRecord | None]]:
    """(True, record) for each task its callback completed; else (False, its record or None)."""
    rows = await conn.fetch(
        queries.COMPLETE_BY_CALLBACK,
        [c.task_id for c in batch],
        [c.plan_id for c in batch],
        [c.result.value for c in batch],
        [c.reason for c in batch],
    )
    done = {row["task_id"]: task_record(row) for row in rows}
    missed = [c for c in batch if c.task_id not in done]
    others = {}
    if missed:
        found = await conn.fetch(
            queries.SELECT_MANY_IN_PLANS,
            [c.task_id for c in missed],
            [c.plan_id for c in missed],
        )
        others = {row["task_id"]: task_record(row) for row in found}
    return [
        (True, done[c.task_id]) if c.task_id in done else (False, others.get(c.task_id))
        for c in batch
    ]


async def ensure_live(conn: Executor, worker_id: int, lock_namespace: int) -> None:
    """NotLive unless the worker holds its lock: asked when a fenced statement changed nothing,
    to tell a worker without its lock from an attempt superseded."""
    if not await conn.fetchval(queries.HOLDS_OWN_LOCK, lock_namespace, worker_id):
        raise NotLive(f"worker {worker_id} does not hold its liveness lock")
