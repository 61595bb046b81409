"""A publish's confirm bound does not run while RabbitMQ blocks the connection (worker/blocking.py),
and what watch_blocking does with a connection it cannot watch."""

from __future__ import annotations

import asyncio

import pytest

from worker.amqp import watch_blocking
from worker.blocking import PublishBlock

BOUND = 0.05


async def _awaiting_a_confirm(block: PublishBlock, started: asyncio.Event) -> None:
    async with block.confirm_bound():
        started.set()
        await asyncio.Event().wait()


async def test_a_confirm_bound_is_put_off_while_blocked_and_runs_whole_after() -> None:
    block = PublishBlock(BOUND)
    started = asyncio.Event()
    waiting = asyncio.create_task(_awaiting_a_confirm(block, started))
    await started.wait()
    block.block("low on memory")
    # Many times the bound: a confirm on a blocked connection comes only after the block.
    await asyncio.sleep(BOUND * 10)
    assert (waiting.done(), block.reason) == (False, "low on memory")
    block.lift()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(waiting, 5)
    assert block.reason is None


async def test_a_confirm_awaited_from_within_a_block_has_no_bound_until_it_ends() -> None:
    block = PublishBlock(BOUND)
    block.block("low on disk space")
    started = asyncio.Event()
    waiting = asyncio.create_task(_awaiting_a_confirm(block, started))
    await started.wait()
    lifted = asyncio.create_task(block.lifted())
    await asyncio.sleep(BOUND * 10)
    assert (waiting.done(), lifted.done()) == (False, False)
    block.lift()
    await asyncio.wait_for(lifted, 5)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(waiting, 5)


async def test_an_unblocked_confirm_bound_runs_as_usual() -> None:
    block = PublishBlock(BOUND)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(_awaiting_a_confirm(block, asyncio.Event()), 5)


def test_a_connection_without_aiormqs_handlers_is_not_watched() -> None:
    # Publishes then simply wait for the block to end, as they did before it was watched.
    assert watch_blocking(object(), print, print) is False  # type: ignore[arg-type]


async def test_bounds_end_each_at_its_own_time_and_only_their_own_cancels_become_timeouts() -> None:
    block = PublishBlock(BOUND * 4)
    first_started, later_started = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(_awaiting_a_confirm(block, first_started))
    await first_started.wait()
    await asyncio.sleep(BOUND * 2)
    later = asyncio.create_task(_awaiting_a_confirm(block, later_started))
    cancelled = asyncio.create_task(_awaiting_a_confirm(block, asyncio.Event()))
    await later_started.wait()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(first, 5)
    # Started half a bound later, it is still waiting when the first one's bound ends.
    assert not later.done()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(later, 5)


async def test_a_body_that_ends_in_time_is_not_cancelled_later() -> None:
    block = PublishBlock(BOUND)
    async with block.confirm_bound():
        await asyncio.sleep(0)
    # Past the bound, on the same task: nothing of the bound is left to cancel it.
    await asyncio.sleep(BOUND * 3)
