"""RabbitMQ blocking a connection's publishes while one of its resource alarms (memory, disk space)
is in effect: what a Broker knows of it, and the bounds on confirms that must not run meanwhile."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

log = logging.getLogger(__name__)


class PublishBlock:
    """Whether the broker blocks one connection's publishes, and why (its words, e.g. "low on
    memory"). A blocked connection is not read by the broker at all, so a confirm awaited on it
    comes only once the alarm clears, however long that takes: the bounds on those waits are put
    off until then, and run in full again from it."""

    def __init__(self, confirm_seconds: float) -> None:
        self.reason: str | None = None
        self._confirm_seconds = confirm_seconds
        self._lifted = asyncio.Event()
        self._lifted.set()
        self._bounds: set[asyncio.Timeout] = set()

    async def lifted(self) -> None:
        """Return once publishes are not blocked (at once if they are not)."""
        await self._lifted.wait()

    def block(self, reason: str) -> None:
        log.warning("RabbitMQ is blocking publishes: %s", reason, extra={"reason": reason})
        self.reason = reason
        self._lifted.clear()
        for bound in self._bounds:
            bound.reschedule(None)

    def lift(self, *, quietly: bool = False) -> None:
        if self.reason is not None and not quietly:
            log.info("RabbitMQ is taking publishes again")
        self.reason = None
        self._lifted.set()
        deadline = asyncio.get_running_loop().time() + self._confirm_seconds
        for bound in self._bounds:
            bound.reschedule(deadline)

    @asynccontextmanager
    async def confirm_bound(self) -> AsyncIterator[None]:
        """TimeoutError once the block's body has waited `confirm_seconds` unblocked."""
        async with asyncio.timeout(None if self.reason else self._confirm_seconds) as bound:
            self._bounds.add(bound)
            try:
                yield
            finally:
                self._bounds.discard(bound)
