"""A byte budget for response bodies held in memory at once, across the whole process.

Each large body takes what it needs before it is read beyond a small size, all at once and in
the order asked, and holds it until the response it became is dropped (once the task's result is
recorded and published). A taker never asks again while it holds bytes, so takers cannot deadlock
one another: the bodies held are being recorded, and each one recorded makes room for the next.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque


class ByteBudget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Takers waiting for room."""
        return sum(1 for _, future in self._waiters if not future.done())

    async def take(self, wanted: int) -> int:
        """Wait until `wanted` bytes (at most the whole budget) are free, and take them: the
        number taken. First come, first served, so that a large body is never starved by small
        ones."""
        wanted = min(wanted, self.total)
        if not self._waiters and wanted <= self.free:
            self.free -= wanted
            return wanted
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((wanted, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted just as the taker was cancelled: the bytes go back.
                self.give(wanted)
            else:
                self._wake()
            raise
        return wanted

    def give(self, count: int) -> None:
        self.free += count
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            wanted, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
            elif wanted <= self.free:
                self._waiters.popleft()
                self.free -= wanted
                future.set_result(None)
            else:
                return


class Hold:
    """Bytes one body holds of a budget: given back once, by `release` or when the object it
    was handed to (`keep_until_gone`) is garbage."""

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.held = 0
        self._handed = False

    async def grow(self, wanted: int) -> None:
        """Take `wanted` bytes more; only while none are held yet (see the module's rule)."""
        assert self.held == 0, "a hold grows once, so that takers cannot deadlock"
        self.held = await self._budget.take(wanted)

    def shrink(self, to: int) -> None:
        """Give back what is held beyond `to` bytes."""
        if to < self.held:
            self._budget.give(self.held - to)
            self.held = to

    def keep_until_gone(self, owner: object) -> None:
        """Hold the bytes for as long as `owner` lives."""
        if self.held:
            weakref.finalize(owner, self._budget.give, self.held)
        self._handed = True

    def release(self) -> None:
        """Give everything back, unless it was handed to an owner."""
        if not self._handed:
            self.shrink(0)
