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
# A heartbeat unanswered this long means the lock's session is lost, or may as well be: the
# worker stops claiming at once rather than wait to hear from a silent network.
HEARTBEAT_TIMEOUT = 3
# PostgreSQL's own watch on the session that holds the lock: when the worker's host is cut off
# (or frozen), the server's TCP keepalives end the session, and the lock with it, about
# 10 + 3 * 2 = 16 s after it last heard from the worker. The worker has stopped claiming by then:
# at most HEARTBEAT_SECONDS + HEARTBEAT_TIMEOUT = 8 s after its last answered heartbeat.
SESSION_KEEPALIVES = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
}
_FAILURES = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


@asynccontextmanager
async def registered_worker(
    store: Store, database_url: str, in_flight: Callable[[], int]
) -> AsyncIterator[int]:
    """Register this process as a worker and hold its liveness lock until the block ends; the
    store's claims then name this worker, and `store.live` says whether it holds the lock.

    The lock lives on a connection of its own: when the process dies the connection drops, the
    lock goes with it, and other workers may at once take over the tasks it was running.
    """
    conn = await _connect(store, database_url)
    worker_id: int = await conn.fetchval(
        queries.REGISTER_WORKER, socket.gethostname(), os.getpid(), __version__
    )
    await conn.execute(queries.LOCK_WORKER, store.lock_namespace, worker_id)
    store.worker_id = worker_id
    store.live.set()
    heartbeat = asyncio.create_task(_heartbeat(store, database_url, conn, in_flight))
    try:
        yield worker_id
    finally:
        heartbeat.cancel()
        with suppress(asyncio.CancelledError):
            await heartbeat
        with suppress(*_FAILURES):
            await store.unregister_worker(worker_id)


async def _connect(store: Store, database_url: str) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(
        database_url, timeout=HEARTBEAT_TIMEOUT + 2, server_settings=SESSION_KEEPALIVES
    )
    # The lock ends with its session: claims stop the moment the connection is seen to close,
    # not at the next heartbeat.
    conn.add_termination_listener(lambda _: store.live.clear())
    return conn


async def _relock(store: Store, database_url: str) -> asyncpg.Connection | None:
    """A new session holding the lock; None while the lost session still holds it (the server
    has yet to see that session end)."""
    conn = await _connect(store, database_url)
    try:
        async with asyncio.timeout(HEARTBEAT_TIMEOUT):
            held = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", store.lock_namespace, store.worker_id
            )
    except BaseException:
        conn.terminate()
        raise
    if not held:
        await conn.close(timeout=1)
        return None
    return conn


async def _heartbeat(
    store: Store,
    database_url: str,
    conn: asyncpg.Connection | None,
    in_flight: Callable[[], int],
) -> None:
    worker_id = store.worker_id
    try:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                if conn is not None and conn.is_closed():
                    conn = None
                if conn is None:
                    conn = await _relock(store, database_url)
                    if conn is None:
                        log.warning("worker lock still held by its lost session; waiting")
                        continue
                    log.info("worker lock re-acquired", extra={"workerId": worker_id})
                async with asyncio.timeout(HEARTBEAT_TIMEOUT):
                    await conn.execute(queries.HEARTBEAT, worker_id, in_flight())
                store.live.set()
            except _FAILURES as exc:
                if store.live.is_set() or conn is not None:
                    log.warning(
                        "worker lost its database session (%s): claiming nothing until it "
                        "holds its lock again",
                        str(exc) or type(exc).__name__,
                        extra={"workerId": worker_id},
                    )
                store.live.clear()
                if conn is not None:
                    # Not a polite close: the server may be unreachable.
                    conn.terminate()
                    conn = None
    finally:
        if conn is not None:
            with suppress(Exception):
                await conn.close(timeout=2)
