"""The consume loop: prefetch, a watch on the subscription itself, a pause while the broker blocks
publishes, and a drain on stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from contextlib import suppress
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from worker.amqp import BROKER_ERRORS, cancelled_by_the_broker, unbounded_frames
from worker.broker import Broker
from worker.topology import declare_queue_on, tasks_queue_arguments

log = logging.getLogger(__name__)

Handler = Callable[[AbstractIncomingMessage], Coroutine[Any, Any, None]]

# How often the consumer checks that the broker still delivers to it.
WATCH_INTERVAL = 2.0
# Checks in a row that find messages ready, room to take them, and none arriving, before the
# subscription is taken for lost.
STARVED_CHECKS = 2
# An idle consumer renews its channel this often: a message the broker handed to a consumer that
# it no longer serves (seen when a quorum queue is deleted and declared again at once) is held as
# unacknowledged by the old channel until that channel closes.
IDLE_RENEW_SECONDS = 60.0


class _Renew(Exception):
    """The subscription is to be renewed on a new channel."""


class Consumer:
    """Consumes the task queue for as long as it runs, and re-subscribes whenever the subscription
    is lost: a new connection, a closed channel, a consumer the broker cancelled, or one the broker
    silently stopped delivering to.

    While the broker blocks the publishes of `publisher` (a resource alarm), a task taken now
    could not publish its events or be acknowledged: the subscription is cancelled until the
    block ends, and what the broker delivered before the cancel took effect is held, not started
    (sending it back would count toward its delivery limit). Tasks already started finish when
    the block ends."""

    def __init__(
        self, broker: Broker, handler: Handler, *, prefetch: int, publisher: Broker | None = None
    ) -> None:
        self.broker = broker
        self._handler = handler
        self._prefetch = prefetch
        self._publisher = publisher
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()
        self._channel: AbstractChannel | None = None
        self.consuming = asyncio.Event()
        self.subscriptions = 0
        self.deliveries = 0
        # `deliveries` when the subscription was last found starved; -1 before that.
        self._starved_at = -1

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self) -> None:
        """Consume until `stop()` is called."""
        try:
            while not self._stop.is_set():
                try:
                    await self._subscribe_on_new_channel()
                except _Renew:
                    await self._close_channel()
                except BROKER_ERRORS as exc:
                    await self._lost_channel(str(exc))
                except asyncio.CancelledError:
                    if not cancelled_by_the_broker():
                        raise
                    await self._lost_channel("its connection was closed")
        finally:
            self.consuming.clear()
            self._finished.set()

    async def _lost_channel(self, why: str) -> None:
        log.warning("consumer lost its channel: %s", why)
        await self._close_channel()
        await asyncio.sleep(0.5)

    async def _close_channel(self) -> None:
        self.consuming.clear()
        if self._channel is not None:
            await asyncio.gather(self._channel.close(), return_exceptions=True)
            self._channel = None

    async def _subscribe_on_new_channel(self) -> None:
        connection = await self.broker.connection()
        names = self.broker.names
        # Declared, not just looked up: an operator may have deleted the queue.
        await declare_queue_on(
            connection, names.tasks, tasks_queue_arguments(names, self.broker.group_size)
        )
        channel = self._channel = await connection.channel()
        await unbounded_frames(channel)
        queue = await channel.declare_queue(names.tasks, passive=True)
        while not self._stop.is_set():
            await self._until_publishable(channel)
            room = await self._room(channel)
            if self._stop.is_set():
                return
            # A new subscription's window is what its handlers leave: those of a lost channel's
            # deliveries, or of an earlier subscription, may still run (waiting for a database
            # that is cut off, say), and the worker must hold no more tasks than its prefetch
            # however often it subscribes again.
            await channel.set_qos(prefetch_count=room)
            tag = await queue.consume(self._deliver)
            self.subscriptions += 1
            self.consuming.set()
            log.info("consuming", extra={"queue": queue.name, "prefetch": self._prefetch})
            reason = await self._watch(channel, queue, tag)
            self.consuming.clear()
            # Messages in flight stay on this channel, so they can still be acknowledged.
            with suppress(*BROKER_ERRORS):
                await queue.cancel(tag)
            if reason:
                log.warning("consumer re-subscribing: %s", reason)

    async def _until_publishable(self, channel: AbstractChannel) -> None:
        """Return once the publisher is not blocked, or the consumer stops; raise if the channel
        closes meanwhile."""
        if self._publisher is None or self._blocked() is None:
            return
        log.warning("consumer paused while RabbitMQ blocks publishes")
        while self._blocked() is not None and not self._stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._publisher.unblocked(), WATCH_INTERVAL)
            if channel.is_closed:
                raise ConnectionError("the consumer's channel closed")
        log.info("consumer resuming: RabbitMQ takes publishes again")

    async def _room(self, channel: AbstractChannel) -> int:
        """Wait until fewer handlers than the prefetch run, or the consumer stops; how many more
        may. Raise if the channel closes meanwhile."""
        while len(self._in_flight) >= self._prefetch and not self._stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), WATCH_INTERVAL)
            if channel.is_closed:
                raise ConnectionError("the consumer's channel closed")
        return max(self._prefetch - len(self._in_flight), 1)

    def _blocked(self) -> str | None:
        return None if self._publisher is None else self._publisher.blocked

    async def _watch(self, channel: AbstractChannel, queue: AbstractQueue, tag: str) -> str | None:
        """Wait until the subscription needs renewing (the reason) or the consumer stops (None);
        raise if the channel itself is gone."""
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        starved = 0
        loop = asyncio.get_running_loop()
        idle_since, idle_deliveries = loop.time(), self.deliveries
        while True:
            seen = self.deliveries
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), WATCH_INTERVAL)
            if self._stop.is_set():
                return None
            if channel.is_closed or underlay.is_closed:
                raise ConnectionError("the consumer's channel closed")
            if tag not in underlay.consumers:
                return "the broker cancelled the consumer"
            if (blocked := self._blocked()) is not None:
                return f"RabbitMQ is blocking publishes ({blocked})"
            # The broker can also stop delivering without a word (seen when a quorum queue is
            # deleted and declared again at once); only starvation shows it.
            waiting = await self._ready_messages(channel, queue)
            idle = self.deliveries == seen and len(self._in_flight) < self._prefetch
            starved = starved + 1 if waiting and idle else 0
            if starved >= STARVED_CHECKS:
                if self.deliveries == self._starved_at:
                    # Starved again, with nothing delivered since the last time: the node
                    # itself no longer serves the queue (cut off from the rest of its
                    # cluster, say). Another is asked.
                    self.broker.connection_lost()
                    raise ConnectionError(f"{waiting} messages ready, none delivered by this node")
                self._starved_at = self.deliveries
                waited = WATCH_INTERVAL * starved
                return f"{waiting} messages ready but none delivered for {waited:g} s"
            if self._in_flight or self.deliveries != idle_deliveries:
                idle_since, idle_deliveries = loop.time(), self.deliveries
            elif loop.time() - idle_since >= IDLE_RENEW_SECONDS:
                raise _Renew

    async def _ready_messages(self, channel: AbstractChannel, queue: AbstractQueue) -> int:
        """The queue's ready messages, as the consumer's node sees them. A node that cannot
        answer for the queue (cut off from the rest of its cluster, its queue's members without
        a leader) cannot deliver from it either: the connection is dropped for another node."""
        try:
            async with asyncio.timeout(WATCH_INTERVAL * STARVED_CHECKS):
                ready = await channel.declare_queue(queue.name, passive=True)
        except TimeoutError:
            self.broker.connection_lost()
            raise ConnectionError("the broker node did not answer for the task queue") from None
        return ready.declaration_result.message_count or 0

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        # The handler runs in a task of the consumer's own, not in the one aiormq runs each
        # delivery in: aiormq cancels those when their channel closes, and a task whose broker
        # connection is lost must still finish its attempt (record its result, publish its event
        # once reconnected). Only its ack is lost; the redelivery finds the recorded result.
        self.deliveries += 1
        if self._blocked() is None:
            task = asyncio.create_task(self._handler(message))
        else:
            task = asyncio.create_task(self._held(message))
        self._in_flight.add(task)
        task.add_done_callback(self._handled)

    async def _held(self, message: AbstractIncomingMessage) -> None:
        """A delivery that came while the broker blocks publishes: started once it does not."""
        assert self._publisher is not None
        await self._publisher.unblocked()
        await self._handler(message)

    def _handled(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("task handler failed", exc_info=error)

    async def stop(self, grace: float) -> None:
        """Stop taking messages; let in-flight tasks finish within `grace` seconds, then cancel the
        rest (their messages go back to the queue when the channel closes)."""
        self._stop.set()
        with suppress(TimeoutError):
            await asyncio.wait_for(self._finished.wait(), WATCH_INTERVAL * 2)
        if self._in_flight:
            log.info("draining in-flight tasks", extra={"inFlight": len(self._in_flight)})
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("cancelled unfinished tasks", extra={"count": len(pending)})
                await asyncio.gather(*pending, return_exceptions=True)
        if self._channel is not None:
            await asyncio.gather(self._channel.close(), return_exceptions=True)
        log.info("stopped consuming", extra={"queue": self.broker.names.tasks})
