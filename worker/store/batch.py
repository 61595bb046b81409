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

    `key` keeps two items with the same key out of one batch (one statement must not touch a row
    twice); the later one goes in the next batch. With `gather_turns`, each flush first lets the
    event loop turn that many times, so that callers already on their way (woken by a response,
    a confirm) join it: an idle process loses a fraction of a millisecond to it, a busy one a few,
    which is when fewer, larger batches matter. With `weigh`, a batch also stops short of
    `max_weight` (say, bytes: one statement that carries many large values copies them all at
    once), though it always takes its first item. When a batch fails in a way `isolate` accepts
    (one bad item, not a lost connection), its items are flushed one by one so that only the bad
    item's caller sees the error.
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
        gather_turns: int = 0,
    ) -> None:
        self._flush = flush
        self._isolate = isolate
        self._key = key
        self._max_size = max_size
        self._weigh = weigh
        self._max_weight = max_weight
        self._parallel = parallel
        self._gather_turns = gather_turns
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._running = 0

    async def submit(self, item: In) -> Out:
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._running < self._parallel:
            self._running += 1
            asyncio.get_running_loop().call_soon(self._start)
        return await future

    def _start(self) -> None:
        # Scheduled with call_soon so that every caller woken in the same loop iteration joins.
        task = asyncio.get_running_loop().create_task(self._drain())
        task.add_done_callback(_retrieve)

    async def _drain(self) -> None:
        try:
            while self._pending:
                for _ in range(self._gather_turns):
                    await asyncio.sleep(0)
                batch = self._take()
                await self._run(batch)
        finally:
            self._running -= 1

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
