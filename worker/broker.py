"""RabbitMQ: one supervised connection, consuming, publishing with confirms.

Publishes go out round-robin on a few channels (`publish_channels`): the broker handles each
channel in one process of its own, so under load a single channel's confirms queue behind one
another; several spread them over its schedulers.

The connection is a plain one that this module watches and re-opens itself, rather than aio-pika's
robust connection, whose consumers do not always come back after a broker restart. It is re-opened
when it is lost, and when it falls silent: a black-holed network path shows nothing at all, so
the broker is asked something every half heartbeat, and a question left unanswered for a whole
heartbeat (`?heartbeat=N` in the URL, DEFAULT_HEARTBEAT seconds if it names none) drops the
connection.

While one of RabbitMQ's resource alarms is in effect (memory or disk space), it blocks every
connection that publishes: it stops reading from it, so nothing sent on it is answered, and says so
with connection.blocked. Then the broker is not asked anything (an unanswered question would drop
a connection that is only waiting), publishes wait for their confirms for as long as the block
lasts plus the usual bound, and `blocked` says why, so that the worker stops taking new tasks and
the API refuses new ones at once instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    HeadersType,
)
from pamqp.commands import Basic
from pamqp.common import FieldTable

from worker.amqp import (
    BROKER_ERRORS,
    DEFAULT_HEARTBEAT,
    BrokerBlocked,
    BrokerUnavailable,
    cancelled_by_the_broker,
    connection_failed,
    unbounded_frames,
    watch_blocking,
    with_heartbeat,
)
from worker.blocking import PublishBlock
from worker.contract.errors import ConfigError
from worker.contract.models import REASON_HEADER, Names, TaskEvent
from worker.contract.settings import redact_url
from worker.topology import declare_topology, delay_queue_arguments

log = logging.getLogger(__name__)

# A worker's publishing channels: on 2 cores at 1,000 tasks/s, 16 took its events' confirms from
# 100 ms each to 50 ms; more gave nothing more.
PUBLISH_CHANNELS = 16

# AMQP's delivery mode of a message that the broker keeps on disk.
PERSISTENT = 2

# How long a publish waits for its confirm, while the broker is not blocking publishes, before the
# connection is taken for lost and the publish made again on a new one.
CONFIRM_SECONDS = 30.0

# How long closing a connection may take: a blocked connection's close is never answered.
CLOSE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class QueueDepths:
    ready: int
    consumers: int
    dead: int
    # Why RabbitMQ blocks publishes, when it was asked (publishing_blocked) and does.
    blocked: str | None = None


class Broker:
    """One connection, re-opened whenever it is lost; publishes wait it out. A worker holds two:
    one it consumes on, one it publishes on."""

    def __init__(
        self, amqp_url: str, names: Names, *, connection_name: str, publish_channels: int = 1
    ) -> None:
        self.names = names
        self._url, heartbeat = with_heartbeat(amqp_url)
        self._shown_url = redact_url(amqp_url)
        # Seconds between probes; a probe unanswered for twice that means a silent broker. With
        # the heartbeat off, the probe still runs, at the default's pace.
        self._probe_interval = (heartbeat or DEFAULT_HEARTBEAT) / 2
        self._connection_name = connection_name
        self._connection: AbstractConnection | None = None
        self._publish_channels = publish_channels
        self._channels: tuple[AbstractChannel, ...] = ()
        self._published = 0
        self._probe: AbstractChannel | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._block = PublishBlock(CONFIRM_SECONDS)
        # Publishes given up on by their caller (publish_within), finished all the same.
        self._background: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Broker:
        try:
            await self._open()
        except BROKER_ERRORS as exc:
            raise ConfigError(f"cannot reach RabbitMQ at {self._shown_url}: {exc}") from exc
        self._supervisor = asyncio.create_task(self._supervise(), name="broker-supervisor")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        for task in (self._supervisor, *self._background):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(task for task in (self._supervisor, *self._background) if task is not None),
            return_exceptions=True,
        )
        if self._connection is not None and not self._connection.is_closed:
            # A blocked connection's close is never answered: not waited for at all.
            bound = 0.1 if self._block.reason is not None else CLOSE_SECONDS
            await asyncio.gather(
                asyncio.wait_for(self._connection.close(), bound), return_exceptions=True
            )

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    @property
    def blocked(self) -> str | None:
        """Why RabbitMQ is blocking this connection's publishes (its words, e.g. "low on
        memory"), while it is; None otherwise."""
        return self._block.reason

    async def unblocked(self) -> None:
        """Return once the broker is not blocking publishes (at once if it is not)."""
        await self._block.lifted()

    def _blocked_on(self, connection: AbstractConnection, reason: str | None) -> None:
        # A late word on a connection already replaced says nothing about the new one.
        if connection is not self._connection:
            return
        if reason is None:
            self._block.lift()
        else:
            self._block.block(reason)

    async def connection(self) -> AbstractConnection:
        """The current open connection, once there is one."""
        while True:
            await self._ready.wait()
            if self._connection is not None and not self._connection.is_closed:
                return self._connection
            self.connection_lost()

    def connection_lost(self) -> None:
        """Say that the connection is unusable; the supervisor opens a new one."""
        if self._ready.is_set():
            self._ready.clear()
            self._lost.set()

    def _lost_connection(self, connection: AbstractConnection) -> None:
        # A late close callback of a connection already replaced says nothing about the new one.
        if connection is self._connection:
            self.connection_lost()

    async def _open(self) -> None:
        connection = await aio_pika.connect(
            self._url,
            client_properties={"connection_name": self._connection_name},
            timeout=10,
        )
        try:
            channels = [
                await connection.channel(publisher_confirms=True)
                for _ in range(self._publish_channels)
            ]
            for channel in channels:
                await unbounded_frames(channel)
            await declare_topology(channels[0], self.names)
            # The probe's own channel: aiormq closes a channel whose call times out.
            probe = await connection.channel()
        except BaseException:
            await asyncio.gather(connection.close(), return_exceptions=True)
            raise
        connection.close_callbacks.add(lambda *_: self._lost_connection(connection))
        for channel in (*channels, probe):
            channel.close_callbacks.add(lambda *_: self._lost_connection(connection))
        watch_blocking(
            connection,
            lambda reason: self._blocked_on(connection, reason),
            lambda: self._blocked_on(connection, None),
        )
        self._connection, self._channels, self._probe = connection, tuple(channels), probe
        # A new connection is not blocked until it publishes, whatever the last one was.
        self._block.lift(quietly=True)
        self._lost.clear()
        self._ready.set()

    async def _supervise(self) -> None:
        while True:
            await self._watch()
            log.warning("broker connection lost; reconnecting")
            await self._close_lost()
            await self._reopen()

    async def _watch(self) -> None:
        """Return once the connection is lost, or silent: a probe (a passive declare, which the
        broker answers at once) left unanswered for twice the probe interval."""
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._probe_interval)
            if self._lost.is_set():
                return
            if self._block.reason is not None:
                # Nothing is answered on a blocked connection; aiormq's heartbeat watch still
                # sees a broker that is gone.
                continue
            assert self._probe is not None
            try:
                async with asyncio.timeout(self._probe_interval * 2):
                    await self._probe.get_exchange(self.names.events)
            except TimeoutError:
                log.warning(
                    "broker silent for %g s; dropping the connection", self._probe_interval * 2
                )
            except BROKER_ERRORS:
                pass
            except asyncio.CancelledError:
                if not cancelled_by_the_broker():
                    raise
            else:
                continue
            self.connection_lost()
            return

    async def _close_lost(self) -> None:
        """Close the lost connection, its channels first, with a ConnectionError: whatever waits
        on them (a publish's confirm) fails with it and is retried on the next connection.
        Closed along with their connection, they would fail their waiters with a CancelledError,
        which ends the task that waits instead."""
        lost = ConnectionError("the broker connection was lost")

        async def close(channel: AbstractChannel | None) -> None:
            if channel is None or channel.is_closed:
                return
            underlay = await channel.get_underlay_channel()
            # A silent broker never confirms the close: aiormq gives up after a heartbeat.
            await asyncio.wait_for(underlay.close(lost), self._probe_interval * 4)

        await asyncio.gather(
            close(self._probe), *map(close, self._channels), return_exceptions=True
        )
        if self._connection is not None:
            await asyncio.gather(self._connection.close(), return_exceptions=True)

    async def _reopen(self) -> None:
        """Open a new connection, trying again with a growing delay until one opens."""
        delay = 0.5
        while True:
            try:
                await self._open()
            except BROKER_ERRORS as exc:
                failure = str(exc) or type(exc).__name__
            except asyncio.CancelledError:
                if not cancelled_by_the_broker():
                    raise
                failure = "the connection closed while it was being set up"
            else:
                log.info("broker connection re-established")
                return
            log.warning(
                "broker reconnect failed: %s; retrying in %.1f s",
                failure,
                delay,
                extra={"amqpUrl": self._shown_url},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)

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
            await self.connection()
            self._published += 1
            channel = self._channels[self._published % len(self._channels)]
            try:
                if declare is not None:
                    await channel.declare_queue(routing_key, durable=True, arguments=declare)
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
        BrokerUnavailable rather than a wait while there is no connection, BrokerBlocked while
        the broker answers nothing on it."""
        if not self.is_ready:
            raise BrokerUnavailable(f"RabbitMQ at {self._shown_url} is not reachable right now")
        if self._block.reason is not None:
            raise BrokerBlocked(self._block.reason)
        connection = await self.connection()
        try:
            async with asyncio.timeout(10), connection.channel() as channel:
                tasks = await channel.declare_queue(self.names.tasks, passive=True)
                dead = await channel.declare_queue(self.names.dead, passive=True)
        except (*BROKER_ERRORS, asyncio.CancelledError) as exc:
            if not connection_failed(exc):
                raise
            raise BrokerUnavailable(
                f"RabbitMQ at {self._shown_url} did not answer: {str(exc) or type(exc).__name__}"
            ) from exc
        return QueueDepths(
            ready=tasks.declaration_result.message_count or 0,
            consumers=tasks.declaration_result.consumer_count or 0,
            dead=dead.declaration_result.message_count or 0,
        )

    async def publish_event(
        self, event: TaskEvent, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None:
        await self.publish_event_json(
            event.model_dump_json(by_alias=True).encode(),
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
            queue, arguments = self.names.delay(seconds), delay_queue_arguments(self.names, seconds)
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
        """A copy of `message` on the dead-letter queue with the reason, its properties kept."""
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


def _headers(values: Mapping[str, object]) -> HeadersType:
    return dict(values)  # type: ignore[arg-type]
