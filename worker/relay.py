"""The event relay: publishes the TaskCompleted events whose publishing was not confirmed.

A completion's own process publishes its event at once; a process that died before the broker
confirmed it leaves the task in the event outbox, and any worker's or API's relay publishes it
then.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from worker.completions import publish_completion
from worker.store.errors import DB_UNAVAILABLE

if TYPE_CHECKING:
    from worker.broker import Broker
    from worker.store.database import Store

log = logging.getLogger(__name__)

# The relay steps in only this long after a completion, and looks twice as often.
RELAY_AFTER_SECONDS = 5.0


class Relay:
    def __init__(self, store: Store, broker: Broker) -> None:
        self._store = store
        self._broker = broker

    async def run(self) -> None:
        while True:
            # Not while the broker blocks publishes: the relay would hold its rows locked, and a
            # database connection, for as long as the block lasts, to publish what waits anyway.
            await self._broker.unblocked()
            try:
                await self.relay_once()
            except DB_UNAVAILABLE as exc:
                log.warning("relay skipped: database unavailable (%s)", exc)
            await asyncio.sleep(RELAY_AFTER_SECONDS / 2)

    async def relay_once(self) -> None:
        async with self._store.pending_events(RELAY_AFTER_SECONDS) as records:
            for record in records:
                log.info("relaying an unconfirmed TaskCompleted", extra={"taskId": record.task_id})
                await publish_completion(
                    self._broker,
                    record,
                    reply_to=record.reply_to,
                    correlation_id=record.correlation_id,
                )
