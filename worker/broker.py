"""RabbitMQ: publishing with confirms on a supervised connection (connection.py), and what is read
from the broker (queue depths, whether it blocks publishes).

Publishes go out round-robin on a few channels (`publish_channels`): the broker handles each
channel in one process of its own, so under load a single channel's confirms queue behind one
another; several spread them over its schedulers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import datetime
from types import TracebackType

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, HeadersType
from pamqp.commands import Basic
from pamqp.common import FieldTable

from worker.amqp import BROKER_ERRORS, BrokerBlocked, BrokerUnavailable, connection_failed
from worker.connection import SupervisedConnection
from worker.contract.models import REASON_HEADER, Names, TaskEvent
from worker.topology import declare_queue_on, delay_queue_arguments

log = logging.getLogger(__name__)

# A worker's publishing channels: on 2 cores at 1,000 tasks/s, 16 took its events' confirms from
# 100 ms each to 50 ms; more gave nothing more.
PUBLISH_CHANNELS = 16

# AMQP's delivery mode of a message that the broker keeps on disk.
PERSISTENT = 2

# How long reading the queues' depths may take.
READ_SECONDS = 10


@dataclass(frozen=True, slots=True)
class QueueDepths:
    ready: int
    consumers: int
    dead: int
    # Why RabbitMQ blocks publishes, when it does and the reader knows.
    blocked: str | None = None


class Broker(SupervisedConnection):
    """Publishing on a supervised connection; publishes wait out a lost connection and a blocked
    one. A worker holds two: one it consumes on, one it publishes on."""

    def __init__(
        self, amqp_url: str, names: Names, *, connection_name: str, publish_channels: int = 1
    ) -> None:
        super().__init__(
            amqp_url, names, connection_name=connection_name, publish_channels=publish_channels
        )
        self._published = 0
        # Publishes given up on by their caller (publish_within), finished all the same.
        self._background: set[asyncio.Task[None]] = set()
        # The channel queue depths are read on, kept open with the connection it is on: opening
        # and closing one for each read took two more round trips than the read itself.
        self._reader: tuple[AbstractConnection, AbstractChannel] | None = None
        self._opening_reader = asyncio.Lock()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await super().__aexit__(exc_type, exc, tb)

    async def publish(
        self,
        body: bytes,
        routing_key: str,
        *,
        to_events: bool = False,
        headers: HeadersType | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        timestamp: datetime | None = None,
        declare: FieldTable | None = None,
    ) -> None:
        """Publish persistently and wait for the broker's confirm, across reconnects if need be;
        with `declare`, the queue `routing_key` is declared with those arguments first, each time
        (it may have expired since it was last used)."""
        # aiormq's own properties and publish: aio-pika's Message and Exchange.publish cost as
        # much CPU again as the publish itself, on a path every task takes twice.
        properties = Basic.Properties(
            content_type="application/json",
            delivery_mode=PERSISTENT,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            timestamp=timestamp,
        )
        exchange = self.names.events if to_events else ""
        while True:
            connection = await self.connection()
            self._published += 1
            channel = self._channels[self._published % len(self._channels)]
            try:
                if declare is not None:
                    await declare_queue_on(connection, routing_key, declare)
                underlay = await channel.get_underlay_channel()
                assert isinstance(underlay, aiormq.Channel)
                # Not mandatory: an event nobody is bound to is dropped by the broker rather
                # than returned whole, to be read and discarded here. Not waiting for the
                # frame to be written: the confirm says more, and comes after it anyway.
                async with self._block.confirm_bound():
                    await underlay.basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=properties,
                        mandatory=False,
                        wait=False,
                    )
            except (*BROKER_ERRORS, asyncio.CancelledError) as exc:
                if self._closing or not connection_failed(exc):
                    raise
                log.warning("publish to %r failed: %s; retrying", routing_key, exc)
                if not isinstance(exc, aio_pika.exceptions.DeliveryError):
                    self.connection_lost()
                await asyncio.sleep(0.2)
            else:
                return

    async def publish_within(
        self,
        seconds: float,
        body: bytes,
        routing_key: str,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        """Publish as `publish` does, but answer within `seconds`: BrokerBlocked at once while
        the broker blocks publishes, else BrokerBlocked or BrokerUnavailable once `seconds`
        pass unconfirmed. The publish itself goes on until it is confirmed (or the broker is
        closed), so that what was recorded before it is not left without its message."""
        if self._block.reason is not None:
            raise BrokerBlocked(self._block.reason)
        publishing = asyncio.create_task(
            self.publish(body, routing_key, message_id=message_id, correlation_id=correlation_id)
        )
        self._background.add(publishing)
        publishing.add_done_callback(self._published_late)
        try:
            async with asyncio.timeout(seconds):
                await asyncio.shield(publishing)
        except TimeoutError:
            if self._block.reason is not None:
                raise BrokerBlocked(self._block.reason) from None
            if not self.is_ready:
                raise BrokerUnavailable(
                    f"RabbitMQ at {self._shown_url} is not reachable right now"
                ) from None
            raise BrokerUnavailable(
                f"RabbitMQ at {self._shown_url} did not confirm the message within {seconds:g} s"
            ) from None

    async def publishing_blocked(self, within: float) -> str | None:
        """Why RabbitMQ blocks publishes, if it does. A connection learns it only when it
        publishes, so one that has not is made to: an empty message to no queue, which the broker
        drops (and confirms) at once unless it blocks. After this the connection may be blocked,
        and answers nothing more until the alarm clears: ask last."""
        if self._block.reason is not None or not self.is_ready:
            return self._block.reason
        underlay = await self._channels[0].get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        with suppress(TimeoutError, *BROKER_ERRORS):
            await asyncio.wait_for(
                underlay.basic_publish(b"", routing_key=f"{self.names.prefix}.no-queue"), within
            )
        return self._block.reason

    def _published_late(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("publish failed", exc_info=error)

    async def queue_depths(self) -> QueueDepths:
        """Ready messages and consumers of the task queue, and the dead-letter queue's depth;
        BrokerUnavailable rather than a wait while there is no connection. While the broker
        blocks publishes, it answers nothing on this connection: the depths are read on one of
        their own, which publishes nothing, and say why the broker blocks."""
        if not self.is_ready:
            raise BrokerUnavailable(f"RabbitMQ at {self._shown_url} is not reachable right now")
        if (blocked := self._block.reason) is None:
            connection = await self.connection()
            return await self._depths(await self._reading_channel(connection))
        try:
            reading = await aio_pika.connect(
                self._url,
                client_properties={"connection_name": f"{self._connection_name} reading"},
                timeout=READ_SECONDS,
            )
        except BROKER_ERRORS as exc:
            raise BrokerBlocked(blocked) from exc
        async with reading, reading.channel() as channel:
            return replace(await self._depths(channel), blocked=blocked)

    async def _reading_channel(self, connection: AbstractConnection) -> AbstractChannel:
        async with self._opening_reader:
            if self._reader is not None:
                held, channel = self._reader
                if held is connection and not channel.is_closed:
                    return channel
                self._reader = None
                with suppress(*BROKER_ERRORS):
                    await channel.close()
            try:
                async with asyncio.timeout(READ_SECONDS):
                    channel = await connection.channel()
            except (*BROKER_ERRORS, TimeoutError) as exc:
                raise self._no_answer(exc) from exc
            self._reader = (connection, channel)
            return channel

    def _no_answer(self, exc: BaseException) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"RabbitMQ at {self._shown_url} did not answer: {str(exc) or type(exc).__name__}"
        )

    async def _depths(self, channel: AbstractChannel) -> QueueDepths:
        try:
            async with asyncio.timeout(READ_SECONDS):
                tasks = await channel.declare_queue(self.names.tasks, passive=True)
                dead = await channel.declare_queue(self.names.dead, passive=True)
        except (*BROKER_ERRORS, asyncio.CancelledError) as exc:
            # A refused declare (a queue deleted) closes the channel; the next read opens one.
            if not connection_failed(exc):
                raise
            raise self._no_answer(exc) from exc
        return QueueDepths(
            ready=tasks.declaration_result.message_count or 0,
            consumers=tasks.declaration_result.consumer_count or 0,
            dead=dead.declaration_result.message_count or 0,
        )

    async def publish_event(
        self, event: TaskEvent, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None:
        await self.publish_event_json(
            event.json_bytes(),
            event.routing_key,
            event.event_id,
            reply_to=reply_to,
            correlation_id=correlation_id,
        )

    async def publish_event_json(
        self,
        body: bytes,
        routing_key: str,
        event_id: str,
        *,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        """An event already serialised; to the events exchange, and to `reply_to` if given."""
        await self.publish(body, routing_key, to_events=True, message_id=event_id)
        if reply_to:
            await self.publish(body, reply_to, message_id=event_id, correlation_id=correlation_id)

    async def publish_later(self, message: AbstractIncomingMessage, seconds: int) -> None:
        """A copy of `message` back on the task queue in `seconds`, its properties kept: it waits
        in a delay queue (one per delay, every message with the same TTL, so that none waits
        behind a longer one), which dead-letters it to the task queue when its time is up."""
        if seconds > 0:
            queue, arguments = (
                self.names.delay(seconds),
                delay_queue_arguments(self.names, seconds, self.group_size),
            )
        else:
            queue, arguments = self.names.tasks, None
        await self.publish(
            message.body,
            queue,
            declare=arguments,
            headers=message.headers,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            timestamp=message.timestamp,
        )

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        """A copy of `message` on the dead-letter queue with the reason, its properties kept;
        and one to its `reply_to`, if it has one: whoever waits there for the task's result
        (`submit --wait`) learns at once that none will come, and why."""
        headers: dict[str, object] = dict(message.headers or {})
        headers[REASON_HEADER] = reason
        await self.publish(
            message.body,
            self.names.dead,
            headers=_headers(headers),
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
        )
        if message.reply_to:
            await self.publish(
                message.body,
                message.reply_to,
                headers=_headers(headers),
                message_id=message.message_id,
                correlation_id=message.correlation_id,
            )


def _headers(values: Mapping[str, object]) -> HeadersType:
    return dict(values)  # type: ignore[arg-type]
