"""A worker process's registration: its row in `workers`, its liveness lock, its heartbeat."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING

import asyncpg

from worker import __version__
from worker.store import queries

if TYPE_CHECKING:
    from worker.store.database import Store

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5
_FAILURES = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


@asynccontextmanager
async def registered_worker(
    store: Store, database_url: str, in_flight: Callable[[], int]
) -> AsyncIterator[int]:
    """Register this process as a worker and hold its liveness lock until the block ends; the
    store's claims then name this worker.

    The lock lives on a connection of its own: when the process dies the connection drops, the
    lock goes with it, and other workers may at once take over the tasks it was running.
    """
    conn: asyncpg.Connection = await asyncpg.connect(database_url)
    worker_id: int = await conn.fetchval(
        queries.REGISTER_WORKER, socket.gethostname(), os.getpid(), __version__
    )
    await conn.execute(queries.LOCK_WORKER, store.lock_namespace, worker_id)
    store.worker_id = worker_id
    heartbeat = asyncio.create_task(
        _heartbeat(store.lock_namespace, worker_id, database_url, conn, in_flight)
    )
    try:
        yield worker_id
    finally:
        heartbeat.cancel()
        with suppress(asyncio.CancelledError):
            await heartbeat
        with suppress(*_FAILURES):
            await store.unregister_worker(worker_id)


async def _heartbeat(
    namespace: int,
    worker_id: int,
    database_url: str,
    conn: asyncpg.Connection,
    in_flight: Callable[[], int],
) -> None:
    try:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                if conn.is_closed():
                    # The lock went with the old connection: take it again on a new one.
                    conn = await asyncpg.connect(database_url)
                    await conn.execute(queries.LOCK_WORKER, namespace, worker_id)
                    log.info("worker lock re-acquired", extra={"workerId": worker_id})
                await conn.execute(queries.HEARTBEAT, worker_id, in_flight())
            except _FAILURES as exc:
                log.warning("worker heartbeat failed: %s", exc)
                with suppress(Exception):
                    await conn.close(timeout=1)
    finally:
        with suppress(Exception):
            await conn.close(timeout=2)
