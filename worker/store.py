"""PostgreSQL: runs the statements of queries.py; migrations/ beside it, as numbered .sql files."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy
from pydantic import JsonValue

from worker import __version__, queries
from worker.batch import Batcher
from worker.errors import ConfigError
from worker.models import (
    HttpResponse,
    Mode,
    Outcome,
    Result,
    State,
    TaskMessage,
    stored_message,
)
from worker.settings import redact_url

log = logging.getLogger(__name__)

# A connection of its own or one lent by the pool: both run statements alike.
Executor = asyncpg.Connection | PoolConnectionProxy

# Fixed key of the advisory lock that serialises migrations of one database.
_MIGRATION_LOCK = 0x6167_6C73
# Errors that mean "the database cannot be reached now", as opposed to a statement it refused.
DB_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
)
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("worker.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append(Migration(version, entry.name, entry.read_text()))
    return sorted(found, key=lambda m: m.version)


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    task_id: str
    plan_id: str
    job_id: str
    hub_name: str
    project_id: str | None
    name: str | None
    mode: str
    digest: bytes
    message: str
    queued_at: datetime | None
    lease_seconds: float
    reply_to: str | None
    correlation_id: str | None

    @classmethod
    def of(
        cls,
        task: TaskMessage,
        body: bytes,
        *,
        queued_at: datetime | None = None,
        lease_seconds: float = 0,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> ClaimRequest:
        """The row for `task`, whose message is `body`."""
        return cls(
            task_id=task.task_id,
            plan_id=task.plan_id,
            job_id=task.job,
            hub_name=task.hub_name,
            project_id=task.project_id,
            name=task.name,
            mode=task.wait_for_completion.value,
            digest=hashlib.sha256(body).digest(),
            message=stored_message(task, body),
            queued_at=queued_at,
            lease_seconds=lease_seconds,
            reply_to=reply_to,
            correlation_id=correlation_id,
        )


@dataclass(frozen=True, slots=True)
class Claimed:
    """This worker now runs the task's attempt number `attempts`."""

    attempts: int
    queued_at: datetime
    started_at: datetime


@dataclass(frozen=True, slots=True)
class TaskRecord:
    task_id: str
    plan_id: str
    job_id: str
    hub_name: str
    state: State
    result: Result | None
    reason: str | None
    attempts: int
    digest: bytes
    message: str
    response: str | None
    outputs: str
    worker_id: int | None
    lease_until: datetime | None
    queued_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    mode: Mode
    completed_by: str | None
    deadline: datetime | None
    reply_to: str | None
    correlation_id: str | None
    event_pending: bool
    external_started_at: datetime | None
    # The task's variables, as JSON text.
    variables: str | None
    # Only where the record was read with the liveness check (queries.SELECT_TASKS).
    worker_alive: bool = False

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> TaskRecord:
        return cls(
            task_id=row["task_id"],
            plan_id=row["plan_id"],
            job_id=row["job_id"],
            hub_name=row["hub_name"],
            state=State(row["state"]),
            result=Result(row["result"]) if row["result"] else None,
            reason=row["reason"],
            attempts=row["attempts"],
            digest=row["digest"],
            message=row["message"],
            response=row["response"],
            outputs=row["outputs"],
            worker_id=row["worker_id"],
            lease_until=row["lease_until"],
            queued_at=row["queued_at"],
            started_at=row["started_at"],
            completed_at=row["completed_at"],
            mode=Mode(row["mode"]),
            completed_by=row["completed_by"],
            deadline=row["deadline"],
            reply_to=row["reply_to"],
            correlation_id=row["correlation_id"],
            event_pending=row["event_pending"],
            external_started_at=row["external_started_at"],
            variables=row["variables"],
            worker_alive=row.get("worker_alive", False),
        )


@dataclass(frozen=True, slots=True)
class Overview:
    states: dict[str, int]
    oldest_waiting_since: datetime | None
    completed_last_minute: int
    unfinished: list[asyncpg.Record]
    failures: list[asyncpg.Record]
    workers: list[asyncpg.Record]
    dead_letters: list[asyncpg.Record]


@dataclass(frozen=True, slots=True)
class CallbackCompletion:
    task_id: str
    plan_id: str
    result: Result
    reason: str


@dataclass(frozen=True, slots=True)
class Completion:
    task_id: str
    attempts: int
    outcome: Outcome
    response_json: str | None


class Store:
    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self._pool = pool
        self.schema = schema
        # Advisory locks of this schema's workers are told apart from other schemas' by this key.
        self.lock_namespace = zlib.crc32(schema.encode()) & 0x7FFF_FFFF
        self.worker_id = 0
        self._claims: Batcher[ClaimRequest, Claimed | TaskRecord] = Batcher(
            self._flush_claims, key=lambda c: c.task_id, isolate=_refused
        )
        self._completions: Batcher[Completion, datetime | TaskRecord] = Batcher(
            self._flush_completions, key=lambda c: c.task_id, isolate=_refused
        )
        # Callers wait on these with a person or a service at the other end: a second flush may
        # start while one is in flight, so that a slow commit does not hold up the next.
        self._callbacks: Batcher[CallbackCompletion, tuple[bool, TaskRecord | None]] = Batcher(
            self._flush_callbacks, key=lambda c: c.task_id, isolate=_refused, parallel=2
        )
        self._published: Batcher[list[str], None] = Batcher(
            self._flush_published, key=id, isolate=_refused
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
                reset=_keep_session,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise ConfigError(
                f"cannot reach PostgreSQL at {redact_url(database_url)}: {exc}"
            ) from exc
        try:
            async with pool.acquire() as conn:
                schema = await migrate(conn)
            yield cls(pool, schema)
        finally:
            await pool.close()

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(2):
                await self._pool.fetchval("SELECT 1")
        except (TimeoutError, OSError, asyncpg.PostgresError):
            return False
        return True

    async def claim(self, request: ClaimRequest) -> Claimed | TaskRecord:
        """Start an attempt of this task, or say why not: the task's current record."""
        return await self._claims.submit(request)

    async def complete(
        self, task_id: str, attempts: int, outcome: Outcome
    ) -> datetime | TaskRecord:
        """Record the attempt's result; its completion time, or the record that supersedes it."""
        response = _response_json(outcome.response)
        return await self._completions.submit(Completion(task_id, attempts, outcome, response))

    async def wait(
        self,
        task_id: str,
        attempts: int,
        response: HttpResponse | None,
        deadline: datetime,
        started_deadline: datetime | None,
    ) -> TaskRecord | None:
        """Mark the attempt's task waiting for its callback; None, or the record that got there
        first (a callback that completed it, a newer attempt)."""
        async with self._pool.acquire() as conn:
            waited = await conn.fetchval(
                queries.WAIT,
                task_id,
                attempts,
                _response_json(response),
                deadline,
                started_deadline,
            )
            if waited is not None:
                return None
            return (await self._records(conn, [task_id]))[task_id]

    async def complete_by_callback(
        self, task_id: str, plan_id: str, result: Result, reason: str
    ) -> tuple[bool, TaskRecord | None]:
        """(True, record) when this call completed the task; else (False, its record or None)."""
        return await self._callbacks.submit(CallbackCompletion(task_id, plan_id, result, reason))

    async def _flush_callbacks(
        self, batch: list[CallbackCompletion]
    ) -> list[tuple[bool, TaskRecord | None]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                queries.COMPLETE_BY_CALLBACK,
                [c.task_id for c in batch],
                [c.plan_id for c in batch],
                [c.result.value for c in batch],
                [c.reason for c in batch],
            )
            done = {row["task_id"]: TaskRecord.from_row(row) for row in rows}
            missed = [c for c in batch if c.task_id not in done]
            others = {}
            if missed:
                found = await conn.fetch(
                    queries.SELECT_MANY_IN_PLANS,
                    [c.task_id for c in missed],
                    [c.plan_id for c in missed],
                )
                others = {row["task_id"]: TaskRecord.from_row(row) for row in found}
        return [
            (True, done[c.task_id]) if c.task_id in done else (False, others.get(c.task_id))
            for c in batch
        ]

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
                return True, TaskRecord.from_row(row)
            row = await conn.fetchrow(queries.SELECT_IN_PLAN, task_id, plan_id)
        return False, None if row is None else TaskRecord.from_row(row)

    async def in_plan(self, task_id: str, plan_id: str) -> TaskRecord | None:
        row = await self._pool.fetchrow(queries.SELECT_IN_PLAN, task_id, plan_id)
        return None if row is None else TaskRecord.from_row(row)

    async def cancel(self, task_id: str, reason: str) -> TaskRecord | None:
        """Complete the task `canceled`: its record, or None if it was already completed."""
        row = await self._pool.fetchrow(queries.CANCEL, task_id, reason)
        return None if row is None else TaskRecord.from_row(row)

    async def sweep(self, limit: int = 100) -> list[TaskRecord]:
        """Fail the waiting tasks whose deadline (or started deadline) has passed."""
        rows = await self._pool.fetch(queries.SWEEP, limit)
        return [TaskRecord.from_row(row) for row in rows]

    async def take_cancel_requests(self, limit: int = 20) -> list[TaskRecord]:
        rows = await self._pool.fetch(queries.TAKE_CANCEL_REQUESTS, limit)
        return [TaskRecord.from_row(row) for row in rows]

    @asynccontextmanager
    async def pending_events(
        self, older_than: float, limit: int = 100
    ) -> AsyncIterator[list[TaskRecord]]:
        """Completions whose events no one has confirmed yet, locked until the block ends, and
        then marked published (the block publishes them, or raises)."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(queries.PENDING_EVENTS, older_than, limit)
            records = [TaskRecord.from_row(row) for row in rows]
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
        async with self._pool.acquire() as conn, conn.transaction():
            # Losing this mark in a crash only makes the relay publish the event again, which
            # at-least-once delivery allows: it need not wait for the disk.
            await conn.execute("SET LOCAL synchronous_commit = off")
            await conn.execute(queries.EVENTS_PUBLISHED, [i for ids in batch for i in ids])
        return [None] * len(batch)

    async def append_log_lines(
        self, task_id: str, plan_id: str, lines: list[str], cap: int
    ) -> bool:
        """Store the lines in order, dropping the oldest past `cap`; False if no such task."""
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
        # jsonb and text cannot hold U+0000, which a service may send.
        outputs_json = orjson.dumps(outputs).decode().replace("\\u0000", "\\ufffd")
        names = [name.replace("\x00", "\ufffd") for name in forget]
        return await self._transition(queries.MERGE_OUTPUTS, task_id, plan_id, outputs_json, names)

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
            return (await self._records(conn, [request.task_id]))[request.task_id]

    async def list_tasks(
        self,
        filters: dict[str, str],
        order: str,
        *,
        descending: bool,
        offset: int,
        limit: int,
    ) -> tuple[list[asyncpg.Record], int]:
        """One page of task summaries, and how many tasks match in all."""
        page, count = queries.list_tasks(list(filters), order, descending)
        async with self._pool.acquire() as conn:
            total: int = await conn.fetchval(count, *filters.values())
            rows = await conn.fetch(page, *filters.values(), offset, limit) if total else []
        return rows, total

    async def overview(self, *, rows: int = 20) -> Overview:
        """What the queue page and `agentless status` show from the database."""
        async with self._pool.acquire() as conn:
            counts = {r["state"]: r["n"] for r in await conn.fetch(queries.STATE_COUNTS)}
            return Overview(
                states=counts,
                oldest_waiting_since=await conn.fetchval(queries.OLDEST_WAITING),
                completed_last_minute=await conn.fetchval(queries.COMPLETED_SINCE, 60),
                unfinished=await conn.fetch(queries.UNFINISHED, rows),
                failures=await conn.fetch(queries.RECENT_FAILURES, rows),
                workers=await conn.fetch(queries.LIVE_WORKERS),
                dead_letters=await conn.fetch(queries.RECENT_DEAD_LETTERS, rows),
            )

    async def state_counts(self) -> dict[str, int]:
        return {r["state"]: r["n"] for r in await self._pool.fetch(queries.STATE_COUNTS)}

    async def record_dead_letter(self, message_id: str | None, reason: str, body: bytes) -> None:
        excerpt = body[:512].decode(errors="replace").replace("\x00", "\ufffd")
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
        return TaskRecord.from_row(rows[0]) if rows else None

    async def _records(self, conn: Executor, task_ids: list[str]) -> dict[str, TaskRecord]:
        rows = await conn.fetch(queries.SELECT_TASKS, task_ids, self.lock_namespace)
        return {row["task_id"]: TaskRecord.from_row(row) for row in rows}

    async def _flush_claims(self, batch: list[ClaimRequest]) -> list[Claimed | TaskRecord]:
        async with self._pool.acquire() as conn:
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
                self.worker_id,
                self.lock_namespace,
            )
            claimed = {
                row["task_id"]: Claimed(row["attempts"], row["queued_at"], row["started_at"])
                for row in rows
            }
            missed = [c.task_id for c in batch if c.task_id not in claimed]
            records = await self._records(conn, missed) if missed else {}
        return [claimed.get(c.task_id) or records[c.task_id] for c in batch]

    async def _flush_completions(self, batch: list[Completion]) -> list[datetime | TaskRecord]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                queries.COMPLETE,
                [c.task_id for c in batch],
                [c.attempts for c in batch],
                [c.outcome.result.value for c in batch],
                [c.outcome.reason for c in batch],
                [c.response_json for c in batch],
            )
            done: dict[str, datetime] = {row["task_id"]: row["completed_at"] for row in rows}
            missed = [c.task_id for c in batch if c.task_id not in done]
            records = await self._records(conn, missed) if missed else {}
        return [done.get(c.task_id) or records[c.task_id] for c in batch]

    @asynccontextmanager
    async def registered_worker(
        self, database_url: str, in_flight: Callable[[], int]
    ) -> AsyncIterator[int]:
        """Register this process as a worker and hold its liveness lock until the block ends.

        The lock lives on a connection of its own: when the process dies the connection drops, the
        lock goes with it, and other workers may at once take over the tasks it was running.
        """
        conn: asyncpg.Connection = await asyncpg.connect(database_url)
        self.worker_id = await conn.fetchval(
            "INSERT INTO workers (host, pid, version) VALUES ($1, $2, $3) RETURNING worker_id",
            socket.gethostname(),
            os.getpid(),
            __version__,
        )
        await conn.execute("SELECT pg_advisory_lock($1, $2)", self.lock_namespace, self.worker_id)
        heartbeat = asyncio.create_task(self._heartbeat(database_url, conn, in_flight))
        try:
            yield self.worker_id
        finally:
            heartbeat.cancel()
            with suppress(asyncio.CancelledError):
                await heartbeat
            with suppress(OSError, asyncpg.PostgresError, asyncio.TimeoutError):
                await self._pool.execute("DELETE FROM workers WHERE worker_id = $1", self.worker_id)

    async def _heartbeat(
        self, database_url: str, conn: asyncpg.Connection, in_flight: Callable[[], int]
    ) -> None:
        try:
            while True:
                await asyncio.sleep(5)
                try:
                    if conn.is_closed():
                        # The lock went with the old connection: take it again on a new one.
                        conn = await asyncpg.connect(database_url)
                        await conn.execute(
                            "SELECT pg_advisory_lock($1, $2)", self.lock_namespace, self.worker_id
                        )
                        log.info("worker lock re-acquired", extra={"workerId": self.worker_id})
                    await conn.execute(
                        "UPDATE workers SET last_seen = now(), in_flight = $2 WHERE worker_id = $1",
                        self.worker_id,
                        in_flight(),
                    )
                except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                    log.warning("worker heartbeat failed: %s", exc)
                    with suppress(Exception):
                        await conn.close(timeout=1)
        finally:
            with suppress(Exception):
                await conn.close(timeout=2)


async def _keep_session(_: asyncpg.Connection) -> None:
    """No reset when a connection goes back to the pool: the store never changes session state
    (only SET LOCAL, inside transactions), and a reset costs a round trip per batch."""


def _response_json(response: HttpResponse | None) -> str | None:
    if response is None:
        return None
    # jsonb cannot hold U+0000, which an endpoint's JSON may well contain.
    return response.model_dump_json(by_alias=True).replace("\\u0000", "\\ufffd")


def _refused(exc: BaseException) -> bool:
    return not isinstance(exc, DB_UNAVAILABLE)


async def migrate(conn: Executor) -> str:
    """Bring the schema up to date and return its name. Safe when many processes start at once:
    each waits for the lock, then re-reads the version another may have just applied."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        schema: str | None = await conn.fetchval("SELECT current_schema()")
        if schema is None:
            path: str = await conn.fetchval("SELECT current_setting('search_path')")
            schema = path.split(",", maxsplit=1)[0].strip().strip('"')
            if not _SCHEMA_NAME.fullmatch(schema):
                raise ConfigError(f"search_path names an unusable schema: {schema!r}")
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        for migration in migrations():
            if migration.version > current:
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
                log.info("migration applied", extra={"migration": migration.name})
    return schema
