"""The purge duty: completed tasks, dead letters and the tombstones of purged tasks are deleted
once older than AGENTLESS_RETENTION (SPEC §2).

Every API process runs it (`agentless api` and `agentless run`); the store's purge lock lets one
of them delete at a time (store/retention.py). A round deletes small batches, each its own short
transaction, with a pause between them so that the hot path's statements never queue behind a
purge; a round that finds less than a full batch of everything ends, and the next starts a round
interval later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import asyncpg

from worker.metrics import Metrics
from worker.store.database import Store
from worker.store.errors import DB_UNAVAILABLE
from worker.store.retention import FROM_THE_START, Purged

log = logging.getLogger(__name__)

# Rows a batch deletes: a thousand completed tasks take some tens of milliseconds to delete with
# their log lines, so no row lock, and no connection of the pool, is held for longer.
BATCH_ROWS = 1000
# The pause between two batches of a backlog, which leaves the database to the hot path.
BATCH_PAUSE_SECONDS = 0.05
# How often a process looks for rows past the retention once it found none left.
ROUND_SECONDS = 60.0


class Purger:
    def __init__(
        self,
        store: Store,
        retention: float,
        *,
        metrics: Metrics,
        round_seconds: float = ROUND_SECONDS,
        batch_rows: int = BATCH_ROWS,
        batch_pause: float = BATCH_PAUSE_SECONDS,
    ) -> None:
        """`retention` in seconds, above 0 (0 keeps everything: no purger runs then)."""
        self._store = store
        self._retention = retention
        self._metrics = metrics
        self._round_seconds = round_seconds
        self._batch_rows = batch_rows
        self._batch_pause = batch_pause
        self._server_checked = False

    async def run(self) -> None:
        while True:
            try:
                if not self._server_checked:
                    await self._check_server()
                await self.purge_once()
            except DB_UNAVAILABLE as exc:
                log.warning("purge skipped: database unavailable (%s)", exc)
            except asyncpg.PostgresError:
                # A statement refused (a read-only primary during a failover, say) is tried again
                # next round rather than ending retention for the process's life.
                log.exception("purge failed")
            await asyncio.sleep(self._round_seconds)

    async def _check_server(self) -> None:
        # Deleted rows leave dead tuples, which only a vacuum makes room for new rows: without
        # autovacuum the tables keep growing (and their scans slowing) as if nothing were deleted.
        if not await self._store.retention.autovacuum():
            log.warning(
                "PostgreSQL runs without autovacuum: the space of purged tasks is reused only "
                "once tasks, task_logs and purged_tasks are vacuumed (schedule VACUUM, or turn "
                "autovacuum on)"
            )
        self._server_checked = True

    async def purge_once(self) -> dict[Purged, int]:
        """One round: rows past the retention deleted, by kind, until less than a batch is left
        (or another process holds the purge lock)."""
        deleted = dict.fromkeys(Purged, 0)
        for kind in Purged:
            start = FROM_THE_START
            while True:
                batch = await self._store.retention.purge(
                    kind, self._retention, self._batch_rows, start
                )
                if batch.locked_out:
                    self._report(deleted)
                    return deleted
                deleted[kind] += batch.deleted
                if batch.deleted:
                    self._metrics.purged.labels(kind.value).inc(batch.deleted)
                if batch.deleted < self._batch_rows:
                    break
                start = batch.reached
                await asyncio.sleep(self._batch_pause)
        self._report(deleted)
        return deleted

    def _report(self, deleted: dict[Purged, int]) -> None:
        if any(deleted.values()):
            log.info(
                "purged past the retention: %d tasks, %d dead letters, %d tombstones",
                deleted[Purged.TASKS],
                deleted[Purged.DEAD_LETTERS],
                deleted[Purged.TOMBSTONES],
                extra={"purged": {kind.value: count for kind, count in deleted.items()}},
            )


@asynccontextmanager
async def purging(store: Store, retention: float, metrics: Metrics) -> AsyncIterator[None]:
    """Run the purge duty for as long as the block runs; none with a retention of 0."""
    if retention <= 0:
        yield
        return
    duty = asyncio.create_task(Purger(store, retention, metrics=metrics).run(), name="purger")
    try:
        yield
    finally:
        duty.cancel()
        with suppress(asyncio.CancelledError):
            await duty
