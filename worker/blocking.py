"""RabbitMQ blocking a connection's publishes while one of its resource alarms (memory, disk space)
is in effect: what a Broker knows of it, and the bounds on confirms that must not run meanwhile."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

log = logging.getLogger(__name__)

# The bounds are checked this often, as a share of their length: a confirm gives up between one
# bound and one bound and a tenth after its publish.
CHECKS_PER_BOUND = 10


class PublishBlock:
    """Whether the broker blocks one connection's publishes, and why (its words, e.g. "low on
    memory"). A blocked connection is not read by the broker at all, so a confirm awaited on it
    comes only once the alarm clears, however long that takes: the bounds on those waits are put
    off until then, and run in full again from it.

    Every publish takes a bound, so the bounds share one timer rather than each take its own
    (an `asyncio.timeout` a publish cost more than the rest of its bookkeeping here): they are
    kept in the order they started, and each check ends the overdue ones from the oldest on."""

    def __init__(self, confirm_seconds: float) -> None:
        self.reason: str | None = None
        self._confirm_seconds = confirm_seconds
        self._lifted = asyncio.Event()
        self._lifted.set()
        # The bounds in force, oldest first (a dict keeps the order they were added in).
        self._bounds: dict[ConfirmBound, None] = {}
        self._check: asyncio.TimerHandle | None = None

    async def lifted(self) -> None:
        """Return once publishes are not blocked (at once if they are not)."""
        await self._lifted.wait()

    def block(self, reason: str) -> None:
        log.warning("RabbitMQ is blocking publishes: %s", reason, extra={"reason": reason})
        self.reason = reason
        self._lifted.clear()

    def lift(self, *, quietly: bool = False) -> None:
        if self.reason is not None and not quietly:
            log.info("RabbitMQ is taking publishes again")
        self.reason = None
        self._lifted.set()
        now = asyncio.get_running_loop().time()
        for bound in self._bounds:
            bound.since = now

    def confirm_bound(self) -> ConfirmBound:
        """TimeoutError once the block's body has waited `confirm_seconds` unblocked."""
        return ConfirmBound(self)

    def _add(self, bound: ConfirmBound) -> None:
        self._bounds[bound] = None
        if self._check is None:
            self._schedule(bound.since)

    def _remove(self, bound: ConfirmBound) -> None:
        del self._bounds[bound]

    def _schedule(self, now: float) -> None:
        self._check = asyncio.get_running_loop().call_at(
            now + self._confirm_seconds / CHECKS_PER_BOUND, self._end_overdue
        )

    def _end_overdue(self) -> None:
        self._check = None
        if not self._bounds:
            return
        now = asyncio.get_running_loop().time()
        if self.reason is None:
            started_before = now - self._confirm_seconds
            for bound in self._bounds:
                if bound.since > started_before:
                    break
                bound.expire()
        self._schedule(now)


class ConfirmBound:
    """One publish's bound (PublishBlock.confirm_bound): cancels its task when overdue, and turns
    that cancellation into TimeoutError, as `asyncio.timeout` does."""

    __slots__ = ("_block", "_cancelling", "_expired", "_task", "since")

    def __init__(self, block: PublishBlock) -> None:
        self._block = block
        self._expired = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self.since = asyncio.get_running_loop().time()
        self._block._add(self)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._block._remove(self)
        if (
            self._expired
            and exc_type is asyncio.CancelledError
            and self._task.uncancel() <= self._cancelling
        ):
            raise TimeoutError from exc

    def expire(self) -> None:
        if not self._expired:
            self._expired = True
            self._task.cancel()
