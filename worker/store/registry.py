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
from worker.store.errors import DB_UNAVAILABLE

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
# Between the end of the lock's session and the first try to take the lock again.
RELOCK_PAUSE_SECONDS = 0.5
# The worker's own writes hold its key for an instant as they check that it is alive (a shared
# try-lock, queries.holds_own_lock): a try to take it that meets one is made again, a few times,
# before the lock is taken to be the lost session's still.
RELOCK_TRIES = 5
RELOCK_TRY_PAUSE_SECONDS = 0.05
# A database out of reach, or one that refuses: among several hosts, none read-write (yet).
_FAILURES = (*DB_UNAVAILABLE, asyncpg.PostgresError)


@asynccontextmanager
async def registered_worker(
    store: Store, database_url: str, in_flight: Callable[[], int]
) -> AsyncIterator[int]:
    """Register this process as a worker and hold its liveness lock until the block ends; the
    store's claims then name this worker, and `store.live` says whether it holds the lock.

    The lock lives on a connection of its own: when the process dies the connection drops, the
    lock goes with it, and other workers may at once take over the tasks it was running.
    """
    session = _Session(store, database_url)
    conn = await session.connect()
    worker_id: int = await conn.fetchval(
        queries.REGISTER_WORKER, socket.gethostname(), os.getpid(), __version__
    )
    await conn.execute(queries.LOCK_WORKER, store.lock_namespace, worker_id)
    store.worker_id = worker_id
    store.live.set()
    heartbeat = asyncio.create_task(session.beat(conn, in_flight))
    try:
        yield worker_id
    finally:
        heartbeat.cancel()
        with suppress(asyncio.CancelledError):
            await heartbeat
        with suppress(*_FAILURES):
            await store.unregister_worker(worker_id)


class _Session:
    """The connection that holds the lock, watched, and replaced when it is lost."""

    def __init__(self, store: Store, database_url: str) -> None:
        self._store = store
        self._url = database_url
        # Set when the lock's connection ends by no choice of ours.
        self._lost = asyncio.Event()
        self._dropping: set[asyncpg.Connection] = set()

    async def connect(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            self._url, timeout=HEARTBEAT_TIMEOUT + 2, server_settings=SESSION_KEEPALIVES
        )
        conn.add_termination_listener(self._ended)
        return conn

    def _ended(self, conn: object) -> None:
        if conn in self._dropping:
            self._dropping.discard(conn)
            return
        # The lock ends with its session: claims stop the moment the connection is seen to
        # close, and the heartbeat takes the lock again at once rather than at its next beat.
        self._store.live.clear()
        self._lost.set()

    def drop(self, conn: asyncpg.Connection) -> None:
        """Abort the connection at once, without a word to a server that may not hear it."""
        self._dropping.add(conn)
        conn.terminate()

    async def relock(self) -> asyncpg.Connection | None:
        """A new session holding the lock; None while the lost session still holds it (the
        server has yet to see that session end)."""
        conn = await self.connect()
        try:
            async with asyncio.timeout(HEARTBEAT_TIMEOUT):
                for _ in range(RELOCK_TRIES):
                    held = await conn.fetchval(
                        "SELECT pg_try_advisory_lock($1, $2)",
                        self._store.lock_namespace,
                        self._store.worker_id,
                    )
                    if held:
                        break
                    await asyncio.sleep(RELOCK_TRY_PAUSE_SECONDS)
        except BaseException:
            self.drop(conn)
            raise
        if not held:
            self.drop(conn)
            return None
        return conn

    async def beat(self, conn: asyncpg.Connection | None, in_flight: Callable[[], int]) -> None:
        """Every HEARTBEAT_SECONDS: say the worker is alive (and how busy), and take the lock
        again if its session was lost; `store.live` follows."""
        worker_id = self._store.worker_id
        rewrite = False
        try:
            while True:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), HEARTBEAT_SECONDS)
                if self._lost.is_set():
                    # Not in a tight loop, should sessions end as soon as they begin.
                    await asyncio.sleep(RELOCK_PAUSE_SECONDS)
                    self._lost.clear()
                try:
                    if conn is not None and conn.is_closed():
                        conn = None
                        _lost_session("its connection closed", worker_id)
                    if conn is None:
                        conn = await self.relock()
                        if conn is None:
                            log.warning("worker lock still held by its lost session; waiting")
                            continue
                        log.info("worker lock re-acquired", extra={"workerId": worker_id})
                        # Perhaps on a new primary, which may lack the last writes.
                        rewrite = True
                    async with asyncio.timeout(HEARTBEAT_TIMEOUT):
                        await conn.execute(queries.HEARTBEAT, worker_id, in_flight())
                    self._store.live.set()
                    if rewrite:
                        await self._store.write_recent_again()
                        rewrite = False
                except _FAILURES as exc:
                    if self._store.live.is_set() or conn is not None:
                        _lost_session(str(exc) or type(exc).__name__, worker_id)
                    self._store.live.clear()
                    if conn is not None:
                        self.drop(conn)
                        conn = None
        finally:
            if conn is not None:
                self._dropping.add(conn)
                with suppress(Exception):
                    await conn.close(timeout=2)


def _lost_session(why: str, worker_id: int) -> None:
    log.warning(
        "worker lost its database session (%s): claiming nothing until it holds its lock again",
        why,
        extra={"workerId": worker_id},
    )
