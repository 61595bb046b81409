"""Poll tasks in the store: starting to poll, taking due polls, recording their answers.

Between two polls a task is only its row: the due time is indexed, any worker takes what is due
(SKIP LOCKED), and the count of recorded polls fences each answer, so that a poll made twice,
because its first worker died, counts once, and a superseded worker records nothing.
"""

from __future__ import annotations

import time

import asyncpg

from worker.contract.records import TaskRecord
from worker.store import batches
from worker.store import poll_queries as queries
from worker.store.batch import Batcher
from worker.store.changes import DuePoll, PollAnswer, PollStarted
from worker.store.errors import Executor, refused
from worker.store.rows import task_record

# Turns of the event loop a batch of answers waits for more: polls come due together.
GATHER_TURNS = 4


class PollStore:
    def __init__(self, pool: asyncpg.Pool, lock_namespace: int) -> None:
        self._pool = pool
        self._lock_namespace = lock_namespace
        self._answers: Batcher[PollAnswer, bool | TaskRecord | None] = Batcher(
            self._flush_answers,
            key=lambda a: a.task_id,
            isolate=refused,
            gather_turns=GATHER_TURNS,
        )

    async def start(self, write: PollStarted, worker_id: int) -> TaskRecord | None:
        """Mark the attempt's task polling, its deadline `timeout_seconds` from now and its first
        poll `first_delay` from now: None; else the record that holds the task instead (another
        attempt, a cancel); TaskVanished if the task has no row; NotLive while the worker does
        not hold its lock."""
        async with self._pool.acquire() as conn:
            if await started(conn, write, worker_id, self._lock_namespace):
                return None
            await batches.ensure_live(conn, worker_id, self._lock_namespace)
            return await batches.record(conn, write.task_id, self._lock_namespace)

    async def take(self, limit: int, lease_seconds: float, worker_id: int) -> list[DuePoll]:
        """Up to `limit` due polls, taken by this worker for `lease_seconds`."""
        rows = await self._pool.fetch(
            queries.TAKE_POLLS, limit, lease_seconds, worker_id, self._lock_namespace
        )
        return [
            DuePoll(
                task_id=row["task_id"],
                polls=row["polls"],
                due_at=row["due_at"],
                message=row["message"],
                poll_request=row["poll_request"],
                poll_secrets=row["poll_secrets"],
            )
            for row in rows
        ]

    async def record(self, answer: PollAnswer) -> bool | TaskRecord | None:
        """Record a poll's answer: True when the task polls on; the completed task's record when
        the answer completed it; False or None when the poll was superseded (a newer poll, a
        cancel, the deadline)."""
        return await self._answers.submit(answer)

    async def rescue(self) -> int:
        """Make the polls in flight on dead workers due again; how many there were."""
        rows = await self._pool.fetch(queries.RESCUE_POLLS, self._lock_namespace)
        return len(rows)

    async def release(self, worker_id: int, task_ids: list[str]) -> None:
        """Hand back polls taken but not made (the worker is stopping)."""
        await self._pool.execute(queries.RELEASE_POLLS, worker_id, task_ids)

    async def _flush_answers(self, batch: list[PollAnswer]) -> list[bool | TaskRecord | None]:
        going_on = [a for a in batch if a.result is None]
        finished = [a for a in batch if a.result is not None]
        polled: set[str] = set()
        now = time.monotonic()
        done: dict[str, TaskRecord] = {}
        async with self._pool.acquire() as conn, conn.transaction():
            if going_on:
                rows = await conn.fetch(
                    queries.POLLED,
                    [a.task_id for a in going_on],
                    [a.polls for a in going_on],
                    [a.reason for a in going_on],
                    [a.response_json for a in going_on],
                    [max(a.delay - (now - a.answered), 0) for a in going_on],
                )
                polled = {row["task_id"] for row in rows}
            if finished:
                rows = await conn.fetch(
                    queries.POLL_FINISHED,
                    [a.task_id for a in finished],
                    [a.polls for a in finished],
                    [a.result.value for a in finished if a.result is not None],
                    [a.reason for a in finished],
                    [a.response_json for a in finished],
                    [a.outputs_json for a in finished],
                )
                done = {row["task_id"]: task_record(row) for row in rows}
        return [(a.task_id in polled) if a.result is None else done.get(a.task_id) for a in batch]


async def started(conn: Executor, write: PollStarted, worker_id: int, lock_namespace: int) -> bool:
    """START_POLLING of the attempt: whether it made its task poll (not without the worker's
    lock)."""
    updated = await conn.fetchval(
        queries.START_POLLING,
        write.task_id,
        write.attempts,
        write.response_json,
        write.timeout_seconds,
        write.first_delay,
        write.poll_request_json,
        write.poll_secrets,
        write.outputs_json,
        worker_id,
        lock_namespace,
    )
    return updated is not None
