"""Group commit: concurrent callers' writes go to the database together, one round trip for many."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

Flush = Callable[[list[In]], Awaitable[list[Out]]]


class Batcher(Generic[In, Out]):
    """Each `submit` waits for its own item's result; items that arrive while a flush is under way
    wait for the next one, so batches grow with load and a lone caller pays one round trip.

    With `parallel` above 1, a further flush may start while others are in flight (each on a
    connection of its own), once no flush is gathering callers already; with `overlap_below` too,
    only while the flushes in flight carry fewer items than that: a caller that comes during a
    small flush need not wait out its commit (concurrent commits share the disk's flushes), while
    under load the batches stay one at a time and large.

    `key` keeps two items with the same key out of one batch (one statement must not touch a row
    twice); the later one goes in the next batch. With `gather_turns`, each flush first lets the
    event loop turn, up to that many times, while each turn brings another caller, so that
    callers already on their way (woken one after another by a response, a confirm) join it:
    under load, when fewer, larger batches matter, they keep coming; a lone caller stops the
    gathering after one turn rather than waiting out turns of a loop busy with other tasks'
    work. With `weigh`, a batch also stops short of `max_weight` (say, bytes: one statement that
    carries many large values copies them all at once), though it always takes its first item.
    When a batch fails in a way `isolate` accepts (one bad item, not a lost connection), its
    items are flushed one by one so that only the bad item's caller sees the error.
    """

    def __init__(
        self,
        flush: Flush[In, Out],
        *,
        key: Callable[[In], Hashable],
        isolate: Callable[[BaseException], bool] = lambda _: True,
        max_size: int = 500,
        weigh: Callable[[In], int] | None = None,
        max_weight: int = 0,
        # One flush at a time: the next batch gathers everything that arrives meanwhile, which
        # under load means fewer, larger statements and less work for the database.
        parallel: int = 1,
        overlap_below: int = 0,
        gather_turns: int = 0,
    ) -> None:
        self._flush = flush
        self._isolate = isolate
        self._key = key
        self._max_size = max_size
        self._weigh = weigh
        self._max_weight = max_weight
        self._parallel = parallel
        self._overlap_below = overlap_below
        self._gather_turns = gather_turns
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        # Flushes under way, from their start to their batch's commit; of them, those still
        # gathering callers (before they take their batch), and the items of those in flight.
        self._running = 0
        self._gathering = 0
        self._in_flight = 0

    async def submit(self, item: In) -> Out:
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._may_start():
            self._running += 1
            self._gathering += 1
            asyncio.get_running_loop().call_soon(self._start)
        return await future

    def _may_start(self) -> bool:
        """Whether a flush may start now. One that cannot is left to those under way: each
        looks at what is pending once its batch is committed."""
        if self._running == 0:
            return True
        if self._running >= self._parallel or self._gathering:
            return False
        return not self._overlap_below or self._in_flight < self._overlap_below

    def _start(self) -> None:
        # Scheduled with call_soon so that every caller woken in the same loop iteration joins.
        task = asyncio.get_running_loop().create_task(self._drain())
        task.add_done_callback(_retrieve)

    async def _drain(self) -> None:
        gathering = True
        try:
            while True:
                await self._gather()
                batch = self._take()
                self._gathering -= 1
                gathering = False
                if batch:
                    self._in_flight += len(batch)
                    try:
                        await self._run(batch)
                    finally:
                        self._in_flight -= len(batch)
                # Done, and started again for what came meanwhile if a new flush may start.
                self._running -= 1
                if not self._pending or not self._may_start():
                    return
                self._running += 1
                self._gathering += 1
                gathering = True
        except BaseException:
            self._running -= 1
            if gathering:
                self._gathering -= 1
            raise

    async def _gather(self) -> None:
        """Let the loop turn while callers keep coming, up to `gather_turns` turns: a turn that
        brings none ends it, so that a lone caller does not wait out turns of a busy loop."""
        for _ in range(self._gather_turns):
            pending = len(self._pending)
            await asyncio.sleep(0)
            if len(self._pending) == pending:
                return

    async def _run(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except asyncio.CancelledError as exc:
            _fail(batch, exc)
            raise
        except Exception as exc:
            if len(batch) > 1 and self._isolate(exc):
                for entry in batch:
                    await self._run([entry])
            else:
                _fail(batch, exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _take(self) -> list[tuple[In, asyncio.Future[Out]]]:
        batch: list[tuple[In, asyncio.Future[Out]]] = []
        later: list[tuple[In, asyncio.Future[Out]]] = []
        seen: set[Hashable] = set()
        weight = 0
        for entry in self._pending:
            item, future = entry
            if future.done():
                continue
            key = self._key(item)
            heavier = weight + (self._weigh(item) if self._weigh is not None else 0)
            if (
                key in seen
                or len(batch) >= self._max_size
                or (batch and heavier > self._max_weight)
            ):
                later.append(entry)
                continue
            seen.add(key)
            batch.append(entry)
            weight = heavier
        self._pending = later
        return batch


def _fail(batch: list[tuple[In, asyncio.Future[Out]]], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
