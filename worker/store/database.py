"""The store: every read and write of tasks, workers and dead letters, run as the statements of
queries.py over a pool, the busiest ones batched."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import datetime

import asyncpg
from pydantic import JsonValue

from worker.contract.clock import Clock
from worker.contract.errors import ConfigError
from worker.contract.models import (
    HttpResponse,
    Outcome,
    Result,
    State,
)
from worker.contract.records import (
    ClusterState,
    Overview,
    TaskRecord,
    WorkerRecord,
)
from worker.contract.settings import redact_url
from worker.store import batches, listing, overview, queries
from worker.store.batch import Batcher
from worker.store.changes import (
    CallbackCompletion,
    Claimed,
    ClaimRequest,
    Completion,
    PollStarted,
    Waited,
)
from worker.store.clock import follow, keep_measuring, measure
from worker.store.definitions import DefinitionStore
from worker.store.errors import DB_UNAVAILABLE, NotLive, TaskVanished, refused
from worker.store.listing import TaskList
from worker.store.polls import PollStore
from worker.store.recent import RecentWrites
from worker.store.retention import RetentionStore
from worker.store.rows import task_record, worker_record
from worker.store.schema import migrate
from worker.store.storable import outputs_json, response_json, storable_text
from worker.store.throughput import MinuteCount, last_minutes

log = logging.getLogger(__name__)

# The reason a cancelled task records, whoever cancelled it (the API or the command line).
CANCEL_REASON = "canceled by request"

# Turns of the event loop a worker's batch waits for more callers: at concurrency 256 on two
# cores, 4 took the throughput benchmark from about 90% of the baseline's rate to over 100%.
# Fewer statements, and the tasks each one releases move on together, so the broker confirms
# their events and takes their acks in fewer frames.
GATHER_TURNS = 4
# A second claim or completion batch may go while one is in flight if that one holds fewer
# items than this: at moderate load a task need not wait out another's commit, while under load
# the batches still go one at a time and large.
OVERLAP_BELOW = 8
# The response text one completion statement carries, beyond its first task's: asyncpg builds
# a statement whole, so a batch of large responses would hold every one of them twice more.
COMPLETION_BATCH_CHARS = 1024 * 1024
# Every statement of the store finds its rows through an index (a task's key, an order, a due
# time). A statement's plan is cached per connection and, after five executions, kept: made
# while the tasks table was nearly empty, it may read the whole table, and with autovacuum off
# (or before it first runs) nothing makes the planner look again, so that each completion then
# read every task, on the hot path, a little more with each task. Without sequential scans the
# planner takes the index however small it thinks the table is. Where there is no index to take
# (the workers table, a row a process), the scan's cost is counted as prohibitive, which would
# make PostgreSQL compile the statement to machine code (JIT) at every execution: half a second
# for the overview. Short statements never gain from that: no JIT.
SESSION_SETTINGS = {"enable_seqscan": "off", "jit": "off"}


class Store:
    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self._pool = pool
        self.schema = schema
        # Advisory locks of this schema's workers are told apart from other schemas' by this key.
        self.lock_namespace = zlib.crc32(schema.encode()) & 0x7FFF_FFFF
        self.worker_id = 0
        # Whether the registered worker holds its liveness lock (registry.py). A store that
        # registers no worker claims on no lock, and counts as live throughout.
        self.live = asyncio.Event()
        self.live.set()
        # The database's clock, for what this process decides by the time of day.
        self.clock = Clock()
        self.polls = PollStore(pool, self.lock_namespace)
        # Purging completed tasks past AGENTLESS_RETENTION, and what is known of purged ones.
        self.retention = RetentionStore(pool, self.lock_namespace)
        # Task definitions and their executions (SPEC §9).
        self.definitions = DefinitionStore(pool)
        # What this worker recorded lately, to record again should a failover have lost it.
        self.recent = RecentWrites()
        self._claims: Batcher[ClaimRequest, Claimed | TaskRecord] = Batcher(
            self._flush_claims,
            key=lambda c: c.task_id,
            isolate=refused,
            gather_turns=GATHER_TURNS,
            parallel=2,
            overlap_below=OVERLAP_BELOW,
        )
        self._completions: Batcher[Completion, datetime | TaskRecord | TaskVanished] = Batcher(
            self._flush_completions,
            key=lambda c: c.task_id,
            isolate=refused,
            gather_turns=GATHER_TURNS,
            parallel=2,
            overlap_below=OVERLAP_BELOW,
            weigh=lambda c: len(c.response_json or ""),
            max_weight=COMPLETION_BATCH_CHARS,
        )
        # Callers wait on these with a person or a service at the other end: a second flush may
        # start while one is in flight, so that a slow commit does not hold up the next.
        self._callbacks: Batcher[CallbackCompletion, tuple[bool, TaskRecord | None]] = Batcher(
            self._flush_callbacks, key=lambda c: c.task_id, isolate=refused, parallel=2
        )
        self._published: Batcher[list[str], None] = Batcher(
            self._flush_published, key=id, isolate=refused
        )
        self._marking: set[asyncio.Task[None]] = set()

    @classmethod
    @asynccontextmanager
    async def open(cls, database_url: str, *, pool_size: int = 6) -> AsyncIterator[Store]:
        try:
            pool = await asyncpg.create_pool(
                database_url,
                min_size=1,
                max_size=pool_size,
                command_timeout=60,
                init=_set_session,
                reset=_keep_session,
            )
        except (*DB_UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise ConfigError(
                f"cannot reach PostgreSQL at {redact_url(database_url)}: {exc}"
            ) from exc
        measuring = None
        try:
            async with pool.acquire() as conn:
                schema = await migrate(conn)
            store = cls(pool, schema)
            follow(store.clock, await measure(pool))
            measuring = asyncio.create_task(keep_measuring(pool, store.clock))
            yield store
        finally:
            if measuring is not None:
                measuring.cancel()
                with suppress(asyncio.CancelledError):
                    await measuring
            await pool.close()

    async def write_recent_again(self) -> int:
        """Record again what this worker recorded lately (recent.py): after it takes its lock
        again, on what may be a new primary. How many writes had been lost."""
        async with self._pool.acquire() as conn:
            return await self.recent.write_again(conn, self.worker_id, self.lock_namespace)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(2):
                await self._pool.fetchval("SELECT 1")
        except (*DB_UNAVAILABLE, asyncpg.PostgresError):
            return False
        return True

    async def claim(self, request: ClaimRequest) -> Claimed | TaskRecord:
        """Start an attempt of this task, or say why not: the task's current record."""
        return await self._claims.submit(request)

    async def complete(
        self, task_id: str, attempts: int, outcome: Outcome
    ) -> datetime | TaskRecord:
        """Record the attempt's result; its completion time, or the record that supersedes it;
        NotLive while this worker does not hold its lock, TaskVanished if the task has no row."""
        response = response_json(outcome.response)
        outputs = outputs_json(outcome.outputs)
        completion = Completion(
            task_id, attempts, outcome.result, outcome.reason, response, outputs
        )
        recorded = await self._completions.submit(completion)
        if isinstance(recorded, TaskVanished):
            raise recorded
        if not isinstance(recorded, TaskRecord):
            self.recent.add(completion)
        return recorded

    async def renew_lease(
        self, task_id: str, attempts: int, lease_seconds: float
    ) -> datetime | TaskRecord:
        """Start the attempt's lease again, if the attempt still holds its task and this worker
        its lock: the new end of the lease, or the task's record; NotLive without the lock."""
        async with self._pool.acquire() as conn:
            until: datetime | None = await conn.fetchval(
                queries.RENEW_LEASE, task_id, attempts, lease_seconds, self.lock_namespace
            )
            if until is not None:
                return until
            record = await batches.record(conn, task_id, self.lock_namespace)
            if record.state is State.RUNNING and record.attempts == attempts:
                raise NotLive(f"worker {self.worker_id} does not hold its liveness lock")
            return record

    async def retry(
        self, task_id: str, attempts: int, outcome: Outcome, delay: float
    ) -> datetime | TaskRecord:
        """Queue the task again after the attempt's failure: when the retry is due, or the
        record that supersedes the attempt; NotLive while this worker does not hold its lock."""
        async with self._pool.acquire() as conn:
            retry_at: datetime | None = await conn.fetchval(
                queries.RETRY,
                task_id,
                attempts,
                delay,
                storable_text(outcome.reason),
                response_json(outcome.response),
                self.worker_id,
                self.lock_namespace,
            )
            if retry_at is not None:
                return retry_at
            await batches.ensure_live(conn, self.worker_id, self.lock_namespace)
            return await batches.record(conn, task_id, self.lock_namespace)

    async def wait(
        self,
        task_id: str,
        attempts: int,
        response: HttpResponse | None,
        deadline: datetime,
        started_deadline: datetime | None,
        *,
        outputs: dict[str, JsonValue] | None = None,
    ) -> TaskRecord | None:
        """Mark the attempt's task waiting for its callback; None, or the record that got there
        first (a callback that completed it, a newer attempt); NotLive while this worker does
        not hold its lock."""
        write = Waited(
            task_id,
            attempts,
            response_json(response),
            deadline,
            started_deadline,
            outputs_json(outputs),
        )
        async with self._pool.acquire() as conn:
            waited = await batches.wait(conn, write, self.worker_id, self.lock_namespace)
            if waited:
                self.recent.add(write)
                return None
            await batches.ensure_live(conn, self.worker_id, self.lock_namespace)
            return await batches.record(conn, task_id, self.lock_namespace)

    async def start_polling(self, write: PollStarted) -> TaskRecord | None:
        """Mark the attempt's task polling: None, or the record that holds the task instead
        (another attempt, a cancel); TaskVanished if it has no row; NotLive while this worker
        does not hold its lock."""
        found = await self.polls.start(write, self.worker_id)
        if found is None:
            self.recent.add(write)
        return found

    async def complete_by_callback(
        self, task_id: str, plan_id: str, result: Result, reason: str
    ) -> tuple[bool, TaskRecord | None]:
        """(True, record) when this call completed the task; else (False, its record or None)."""
        return await self._callbacks.submit(CallbackCompletion(task_id, plan_id, result, reason))

    async def _flush_callbacks(
        self, batch: list[CallbackCompletion]
    ) -> list[tuple[bool, TaskRecord | None]]:
        async with self._pool.acquire() as conn:
            return await batches.callbacks(conn, batch)

    async def external_started(self, task_id: str, plan_id: str) -> tuple[bool, TaskRecord | None]:
        """Note that the external service said it started; like complete_by_callback."""
        return await self._transition(queries.EXTERNAL_STARTED, task_id, plan_id)

    async def _transition(
        self, statement: str, task_id: str, plan_id: str, *args: object
    ) -> tuple[bool, TaskRecord | None]:
        """Run an UPDATE … RETURNING of one task of a plan: (True, the updated record), or
        (False, the record as it is, or None if the plan has no such task)."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(statement, task_id, plan_id, *args)
            if row is not None:
                return True, task_record(row)
            row = await conn.fetchrow(queries.SELECT_IN_PLAN, task_id, plan_id)
        return False, None if row is None else task_record(row)

    async def in_plan(self, task_id: str, plan_id: str) -> TaskRecord | None:
        row = await self._pool.fetchrow(queries.SELECT_IN_PLAN, task_id, plan_id)
        return None if row is None else task_record(row)

    async def redirect_reply(self, task_id: str, reply_to: str, correlation_id: str | None) -> bool:
        """Send the TaskCompleted of a task that waits or polls to `reply_to`; False when the
        task does neither (any more)."""
        changed = await self._pool.fetchval(
            queries.REDIRECT_REPLY, task_id, reply_to, correlation_id
        )
        return changed is not None

    async def cancel(self, task_id: str) -> TaskRecord | None:
        """Complete the task `canceled`: its record, or None if it was already completed."""
        row = await self._pool.fetchrow(queries.CANCEL, task_id, CANCEL_REASON)
        return None if row is None else task_record(row)

    async def sweep(self, limit: int = 100) -> list[TaskRecord]:
        """Fail the waiting tasks whose deadline (or started deadline) has passed."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(queries.SWEEP_PLAN)
            rows = await conn.fetch(queries.SWEEP, limit)
        return [task_record(row) for row in rows]

    async def take_cancel_requests(self, limit: int = 20) -> list[TaskRecord]:
        rows = await self._pool.fetch(queries.TAKE_CANCEL_REQUESTS, limit)
        return [task_record(row) for row in rows]

    @asynccontextmanager
    async def pending_events(
        self, older_than: float, limit: int = 100
    ) -> AsyncIterator[list[TaskRecord]]:
        """Completions whose events no one has confirmed yet, locked until the block ends, and
        then taken out of the outbox (the block publishes them, or raises)."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(queries.PENDING_EVENTS, older_than, limit)
            records = [task_record(row) for row in rows]
            yield records
            if records:
                await conn.execute(queries.EVENTS_PUBLISHED, [r.task_id for r in records])

    async def events_published(self, task_ids: list[str]) -> None:
        await self._published.submit(task_ids)

    def events_published_soon(self, task_ids: list[str]) -> None:
        """Mark the events published without waiting: a mark lost to a crash only means that the
        relay publishes the event again, which at-least-once delivery allows."""
        task = asyncio.get_running_loop().create_task(self._mark_published(task_ids))
        self._marking.add(task)
        task.add_done_callback(self._marking.discard)

    async def _mark_published(self, task_ids: list[str]) -> None:
        try:
            await self._published.submit(task_ids)
        except DB_UNAVAILABLE as exc:
            log.warning("events not marked published (the relay will publish them again): %s", exc)

    async def _flush_published(self, batch: list[list[str]]) -> list[None]:
        await self._pool.execute(queries.EVENTS_PUBLISHED, [i for ids in batch for i in ids])
        return [None] * len(batch)

    async def append_log_lines(
        self, task_id: str, plan_id: str, lines: list[str], cap: int
    ) -> bool:
        """Store the lines in order, dropping the oldest past `cap`; False, keeping none, if the
        plan has no such task or it has completed (its log is final then)."""
        async with self._pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(queries.LOCK_TASK_IN_PLAN, task_id, plan_id) is None:
                return False
            await conn.execute(queries.APPEND_LOG_LINES, task_id, lines)
            await conn.execute(queries.TRIM_LOG_LINES, task_id, cap)
        return True

    async def log_lines(self, task_id: str) -> tuple[list[tuple[datetime, str]], int]:
        """The task's stored log lines, oldest first, and how many were dropped before them."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(queries.READ_LOG_LINES, task_id)
            dropped = await conn.fetchval(queries.LOG_LINES_DROPPED, task_id)
        return [(row["at"], row["line"]) for row in rows], dropped or 0

    async def create_log(self, task_id: str, plan_id: str) -> int | None:
        number: int | None = await self._pool.fetchval(queries.CREATE_LOG, task_id, plan_id)
        return number

    async def merge_outputs(
        self, task_id: str, plan_id: str, outputs: dict[str, JsonValue], forget: list[str]
    ) -> tuple[bool, TaskRecord | None]:
        """Set output variables, and drop those in `forget`, while the task is not completed;
        like complete_by_callback."""
        names = [storable_text(name) for name in forget]
        return await self._transition(
            queries.MERGE_OUTPUTS, task_id, plan_id, outputs_json(outputs), names
        )

    async def submit(self, request: ClaimRequest) -> datetime | TaskRecord:
        """Record a task submitted over HTTP as queued: its queue time, or the existing record."""
        async with self._pool.acquire() as conn:
            queued_at: datetime | None = await conn.fetchval(
                queries.INSERT_QUEUED,
                request.task_id,
                request.plan_id,
                request.job_id,
                request.hub_name,
                request.project_id,
                request.name,
                request.mode,
                request.digest,
                request.message,
            )
            if queued_at is not None:
                return queued_at
            return await batches.record(conn, request.task_id, self.lock_namespace)

    async def list_tasks(
        self,
        filters: dict[str, str],
        order: str,
        *,
        descending: bool,
        offset: int,
        limit: int,
    ) -> TaskList:
        """One page of task summaries, and how many tasks match in all (listing.py)."""
        async with self._pool.acquire() as conn:
            return await listing.page(
                conn, filters, order, descending=descending, offset=offset, limit=limit
            )

    async def overview(self, *, limit: int = 20) -> Overview:
        """What the queue page and `agentless status` show from the database."""
        async with self._pool.acquire() as conn:
            return await overview.overview(conn, limit)

    async def throughput(self) -> list[MinuteCount]:
        """Completions per minute over the last hour, oldest first (the operations page)."""
        return await last_minutes(self._pool)

    async def unregister_worker(self, worker_id: int) -> None:
        await self._pool.execute(queries.UNREGISTER_WORKER, worker_id)

    async def live_workers(self) -> list[WorkerRecord]:
        return [worker_record(row) for row in await self._pool.fetch(queries.LIVE_WORKERS)]

    async def cluster_state(self) -> ClusterState:
        """What the metrics export of the whole deployment (metrics.ClusterGauges)."""
        async with self._pool.acquire() as conn:
            return await overview.cluster_state(conn)

    async def record_dead_letter(self, message_id: str | None, reason: str, body: bytes) -> None:
        excerpt = storable_text(body[:512].decode(errors="replace"))
        await self._pool.execute(queries.RECORD_DEAD_LETTER, message_id, reason, excerpt)

    async def signing_key(self, candidate: bytes) -> bytes:
        """The key every process of this database shares: `candidate`, if none was kept yet."""
        while True:
            # A statement racing another's insert may see neither row: ask again.
            key: bytes | None = await self._pool.fetchval(queries.SIGNING_KEY, candidate)
            if key is not None:
                return key

    async def get(self, task_id: str) -> TaskRecord | None:
        rows = await self._pool.fetch(queries.SELECT_TASKS, [task_id], self.lock_namespace)
        return task_record(rows[0]) if rows else None

    async def _flush_claims(self, batch: list[ClaimRequest]) -> list[Claimed | TaskRecord]:
        async with self._pool.acquire() as conn:
            return await batches.claims(conn, batch, self.worker_id, self.lock_namespace)

    async def _flush_completions(
        self, batch: list[Completion]
    ) -> list[datetime | TaskRecord | TaskVanished]:
        async with self._pool.acquire() as conn:
            return await batches.completions(conn, batch, self.worker_id, self.lock_namespace)


async def _set_session(conn: asyncpg.Connection) -> None:
    """SESSION_SETTINGS, once for each new connection: set after it is made rather than asked
    for as it is made, which a connection pooler in front of PostgreSQL may refuse."""
    await conn.execute(
        "; ".join(f"SET {name} = {value}" for name, value in SESSION_SETTINGS.items())
    )


async def _keep_session(_: asyncpg.Connection) -> None:
    """No reset when a connection goes back to the pool: the store changes session state only
    as it opens a connection (SESSION_SETTINGS) and then only by SET LOCAL, inside transactions;
    and a reset costs a round trip per batch."""
