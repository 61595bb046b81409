"""Barriers: a test that asserts that something did NOT happen first waits until it would have.

Each barrier orders after the mechanism that could still act on what the test did (the task
queue, the deadline sweep, an API's announcements), never after a length of time.
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel

from tests.callbacks import callback_task, post, waiting
from tests.conftest import Api, Events, Target, publish, task_message
from worker.contract.models import Names
from worker.contract.settings import Settings


async def events_arrived(channel: AbstractChannel, settings: Settings, events: Events) -> None:
    """Every event already in the test's events queue has arrived: a marker published to the
    events exchange now is queued behind them, and the queue delivers in order."""
    marker = uuid.uuid4().hex
    exchange = await channel.get_exchange(Names(settings.prefix).events, ensure=False)
    body = orjson.dumps({"name": "Barrier", "taskId": marker})
    await exchange.publish(aio_pika.Message(body), routing_key="task.barrier")
    async with asyncio.timeout(10), events.changed:
        await events.changed.wait_for(lambda: bool(events.named("Barrier", marker)))


async def worker_caught_up(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    """Every task message queued before now has been handled by the API's worker through to its
    acknowledgement (its calls made, its events published), and those events have arrived.

    A sentinel task queued now is delivered after them; the worker handles its deliveries side by
    side, so once the sentinel has completed it waits until the worker holds no message at all. A
    worker settles a message only after the broker confirmed its events, so they are queued by
    then; `events_arrived` sees them through."""
    sentinel = task_message(target)
    await publish(channel, api.settings, sentinel)
    await events.completed(str(sentinel["taskId"]))
    async with asyncio.timeout(10):
        while api.worker.consumer.in_flight:
            await asyncio.sleep(0.05)
    await events_arrived(channel, api.settings, events)


async def api_caught_up(
    url: str, api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    """The API process at `url` has published the events of whatever it answered before now, and
    they have arrived: a sentinel callback task completed through it now has its TaskCompleted
    arrived, and an API process publishes its events on one connection, in the order it makes
    them."""
    task, headers = await waiting(api, channel, events, target)
    completed = {"name": "TaskCompleted", "taskId": task["taskId"], "result": "succeeded"}
    status, _, _ = await post(f"{url}/plans/plan-1/events", completed, headers["AuthToken"])
    assert status == 200
    await events.completed(task["taskId"])


async def swept(
    channel: AbstractChannel, settings: Settings, events: Events, target: Target
) -> None:
    """The deadline sweep has run on past now: every deadline less than a second away has been
    swept, the first sweep begun after now (the one that would repeat what an earlier one did)
    has run to its end (its timeouts published, its cancelRequests answered), and the events
    of those sweeps have arrived.

    A sentinel callback task queued now is due a second from now or later: the sweep that times
    it out began after now and took every task due by then. A second sentinel, queued once the
    first has timed out, times out in a later sweep, and a worker begins a sweep only when its
    last one has ended; its event is published after theirs. With several workers this holds for
    the one that swept the first sentinel."""
    for _ in range(2):
        sentinel = callback_task(target, timeoutSeconds=1)
        await publish(channel, settings, sentinel)
        event = await events.completed(sentinel["taskId"])
        assert event["reason"] == "timed out waiting for callback"
