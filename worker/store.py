"""PostgreSQL: the only module with SQL. Migrations live beside it as numbered .sql files."""

from __future__ import annotations

import asyncio
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
from asyncpg.pool import PoolConnectionProxy

from worker import __version__
from worker.batch import Batcher
from worker.errors import ConfigError
from worker.models import Outcome, Result, State
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
    worker_alive: bool

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
            worker_alive=row["worker_alive"],
        )


@dataclass(frozen=True, slots=True)
class Completion:
    task_id: str
    attempts: int
    outcome: Outcome
    response_json: str | None


def _worker_alive(namespace_param: str) -> str:
    """Whether the worker running `t`'s attempt still holds its session lock, i.e. is alive."""
    return f"""EXISTS (SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.classid::bigint = {namespace_param}
          AND l.objid::bigint = t.worker_id AND l.objsubid = 2 AND l.granted)"""


_SELECT_TASKS = f"""
SELECT t.task_id, t.plan_id, t.job_id, t.hub_name, t.state, t.result, t.reason, t.attempts,
       t.digest, t.message::text AS message, t.response::text AS response,
       t.outputs::text AS outputs, t.worker_id, t.lease_until, t.queued_at, t.started_at,
       t.completed_at, {_worker_alive("$2")} AS worker_alive
FROM tasks t WHERE t.task_id = ANY($1::text[])
"""

# A task is claimed when it is new or queued, or when its running attempt's worker is gone or
# overran its lease; a completed task, or a different task under the same id, is never claimed.
_CLAIM = f"""
INSERT INTO tasks AS t (task_id, plan_id, job_id, hub_name, project_id, name, mode, state,
                        attempts, digest, message, worker_id, lease_until, queued_at, started_at)
SELECT i.task_id, i.plan_id, i.job_id, i.hub_name, i.project_id, i.name, i.mode, 'running', 1,
       i.digest, i.message::jsonb, $12, now() + make_interval(secs => i.lease),
       coalesce(i.queued_at, now()), now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::bytea[], $9::text[], $10::timestamptz[], $11::float8[])
     AS i(task_id, plan_id, job_id, hub_name, project_id, name, mode, digest, message, queued_at,
          lease)
ON CONFLICT (task_id) DO UPDATE
SET state = 'running', attempts = t.attempts + 1, worker_id = EXCLUDED.worker_id,
    lease_until = EXCLUDED.lease_until, started_at = now(), updated_at = now()
WHERE t.digest = EXCLUDED.digest
  AND (t.state = 'queued'
       OR (t.state = 'running'
           AND (t.lease_until < now() OR NOT {_worker_alive("$13")})))
RETURNING t.task_id, t.attempts, t.queued_at, t.started_at
"""

# Only the attempt that holds the task records its result: a late, superseded attempt is fenced.
_COMPLETE = """
UPDATE tasks AS t
SET state = 'completed', result = i.result, reason = i.reason, response = i.response::jsonb,
    completed_at = now(), lease_until = NULL, updated_at = now()
FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::text[])
     AS i(task_id, attempts, result, reason, response)
WHERE t.task_id = i.task_id AND t.state = 'running' AND t.attempts = i.attempts
RETURNING t.task_id, t.completed_at
"""


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

    @classmethod
    @asynccontextmanager
    async def open(cls, database_url: str, *, pool_size: int = 6) -> AsyncIterator[Store]:
        try:
            pool = await asyncpg.create_pool(
                database_url, min_size=1, max_size=pool_size, command_timeout=60
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
        response = None
        if outcome.response is not None:
            # jsonb cannot hold U+0000, which an endpoint's JSON may well contain.
            response = outcome.response.model_dump_json(by_alias=True).replace("\\u0000", "\\ufffd")
        return await self._completions.submit(Completion(task_id, attempts, outcome, response))

    async def get(self, task_id: str) -> TaskRecord | None:
        rows = await self._pool.fetch(_SELECT_TASKS, [task_id], self.lock_namespace)
        return TaskRecord.from_row(rows[0]) if rows else None

    async def _records(self, conn: Executor, task_ids: list[str]) -> dict[str, TaskRecord]:
        rows = await conn.fetch(_SELECT_TASKS, task_ids, self.lock_namespace)
        return {row["task_id"]: TaskRecord.from_row(row) for row in rows}

    async def _flush_claims(self, batch: list[ClaimRequest]) -> list[Claimed | TaskRecord]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                _CLAIM,
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
                _COMPLETE,
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
