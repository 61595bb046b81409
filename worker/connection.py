"""A supervised RabbitMQ connection: opened with the topology declared and its publishing
channels, watched, and re-opened whenever it is lost.

The connection is a plain one, watched and re-opened here, rather than aio-pika's robust
connection, whose consumers do not always come back after a broker restart. It is re-opened
when it is lost, and when it falls silent: a black-holed network path shows nothing at all, so
the broker is asked something every half heartbeat, and a question left unanswered for a whole
heartbeat (`?heartbeat=N` in the URL, DEFAULT_HEARTBEAT seconds if it names none) drops the
connection.

While one of RabbitMQ's resource alarms is in effect (memory or disk space), it blocks every
connection that publishes: it stops reading from it, so nothing sent on it is answered, and says so
with connection.blocked. Then the broker is not asked anything (an unanswered question would drop
a connection that is only waiting), publishes wait for their confirms for as long as the block
lasts plus the usual bound (blocking.py), and `blocked` says why, so that the worker stops taking
new tasks and the API refuses new ones at once instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from types import TracebackType
from typing import Self

from aio_pika.abc import AbstractChannel, AbstractConnection

from worker.amqp import (
    BROKER_ERRORS,
    CONNECT_SECONDS,
    DEFAULT_HEARTBEAT,
    cancelled_by_the_broker,
    connect_to_a_node,
    unbounded_frames,
    watch_blocking,
    with_heartbeat,
)
from worker.blocking import PublishBlock
from worker.contract.errors import ConfigError
from worker.contract.models import Names
from worker.contract.settings import redact_url, split_amqp_urls
from worker.topology import declare_topology_on, quorum_group_size

log = logging.getLogger(__name__)

# How long a publish waits for its confirm, while the broker is not blocking publishes, before the
# connection is taken for lost and the publish made again on a new one.
CONFIRM_SECONDS = 30.0

# How long closing a connection may take: a blocked connection's close is never answered.
CLOSE_SECONDS = 5.0


class SupervisedConnection:
    """One connection, re-opened whenever it is lost; what is asked of it waits that out.
    Blocked publishes are known (`blocked`) and waited out too."""

    def __init__(
        self, amqp_url: str, names: Names, *, connection_name: str, publish_channels: int = 1
    ) -> None:
        self.names = names
        nodes = [with_heartbeat(url) for url in split_amqp_urls(amqp_url)]
        self._urls = tuple(url for url, _ in nodes)
        heartbeat = nodes[0][1]
        # The node of the connection open now, or last open: the next is tried first after it.
        self._node = 0
        self._shown_urls = tuple(redact_url(url) for url in self._urls)
        self.group_size = quorum_group_size(len(self._urls))
        # Seconds between probes; a probe unanswered for twice that means a silent broker. With
        # the heartbeat off, the probe still runs, at the default's pace.
        self._probe_interval = (heartbeat or DEFAULT_HEARTBEAT) / 2
        self._connection_name = connection_name
        self._connection: AbstractConnection | None = None
        self._publish_channels = publish_channels
        self._channels: tuple[AbstractChannel, ...] = ()
        self._probe: AbstractChannel | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._block = PublishBlock(CONFIRM_SECONDS)

    async def __aenter__(self) -> Self:
        try:
            await self._open()
        except BROKER_ERRORS as exc:
            where = ",".join(self._shown_urls)
            raise ConfigError(f"cannot reach RabbitMQ at {where}: {exc}") from exc
        self._supervisor = asyncio.create_task(self._supervise(), name="broker-supervisor")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        if self._connection is not None and not self._connection.is_closed:
            # A blocked connection's close is never answered: not waited for at all.
            bound = 0.1 if self._block.reason is not None else CLOSE_SECONDS
            await asyncio.gather(
                asyncio.wait_for(self._connection.close(), bound), return_exceptions=True
            )

    @property
    def _shown_url(self) -> str:
        """The node of the connection, as a person may read it (no password)."""
        return self._shown_urls[self._node]

    @property
    def _url(self) -> str:
        return self._urls[self._node]

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

    async def _open(self, first: int = 0) -> None:
        """Connect to the first node that answers, from `first` on, and set the connection up."""
        connection, self._node = await connect_to_a_node(
            self._urls,
            first,
            client_properties={"connection_name": self._connection_name},
            timeout=CONNECT_SECONDS,
        )
        try:
            channels = [
                await connection.channel(publisher_confirms=True)
                for _ in range(self._publish_channels)
            ]
            for channel in channels:
                await unbounded_frames(channel)
            await declare_topology_on(connection, self.names, self.group_size)
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
        # The lost node last: in a cluster, another is most likely to answer at once.
        first = (self._node + 1) % len(self._urls)
        while True:
            try:
                await self._open(first)
            except BROKER_ERRORS as exc:
                failure = str(exc) or type(exc).__name__
            except asyncio.CancelledError:
                if not cancelled_by_the_broker():
                    raise
                failure = "the connection closed while it was being set up"
            else:
                log.info("broker connection re-established", extra={"amqpUrl": self._shown_url})
                return
            log.warning("broker reconnect failed: %s; retrying in %.1f s", failure, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)
