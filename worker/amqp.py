"""What aio-pika and aiormq need watching for: how a lost connection shows, the heartbeat a URL
asks for, the bound on a channel's frames, and the broker blocking a connection's publishes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from yarl import URL

from worker.contract.settings import redact_url

log = logging.getLogger(__name__)

# What a lost or refused connection, channel or publish looks like from aio-pika and aiormq.
BROKER_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    RuntimeError,
)

# How long opening a connection to one node may take before the next is tried.
CONNECT_SECONDS = 10

# The AMQP heartbeat in seconds when the URL names none. RabbitMQ advises 5 to 20 s; aiormq's own
# default of 60 s would leave a silent connection unnoticed for three minutes.
DEFAULT_HEARTBEAT = 10


def cancelled_by_the_broker() -> bool:
    """Whether the CancelledError being handled means a lost connection rather than a cancelled
    task: aiormq fails whatever waits on a channel that it closes (because its connection closed,
    or went silent past the heartbeat) with a CancelledError, though nothing cancelled the task
    that waits."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


async def unbounded_frames(channel: AbstractChannel) -> None:
    """Let `channel` take in every frame that arrives for it at once. aiormq queues at most 10
    frames per channel (aio-pika offers no way to ask for more) and its connection's reader stops
    for the channel's each time that queue fills: with 3 frames to a delivery, a busy process took
    in only a few deliveries per turn of its event loop, and the prefetch window sat half empty
    in the socket. The broker still bounds the frames: deliveries by the prefetch, confirms by
    the publishes waiting for them."""
    frames = getattr(await channel.get_underlay_channel(), "frames", None)
    # asyncio.Queue reads its bound from this attribute on every put; 0 means none. Should a
    # later aiormq keep its frames elsewhere, the channel keeps its bound: slower, not wrong.
    if isinstance(frames, asyncio.Queue) and hasattr(frames, "_maxsize"):
        frames._maxsize = 0


def connection_failed(exc: BaseException) -> bool:
    """Whether `exc`, raised by a broker call, means that the connection or channel was lost."""
    return not isinstance(exc, asyncio.CancelledError) or cancelled_by_the_broker()


def with_heartbeat(amqp_url: str) -> tuple[str, int]:
    """`amqp_url` with DEFAULT_HEARTBEAT unless it names a heartbeat, and the heartbeat in force
    (0 when it is off: aiormq reads anything but a number from 0 to 65534 as off)."""
    url = URL(amqp_url)
    given = url.query.get("heartbeat")
    if given is None:
        return str(url.update_query(heartbeat=DEFAULT_HEARTBEAT)), DEFAULT_HEARTBEAT
    try:
        heartbeat = int(given)
    except ValueError:
        heartbeat = 0
    return amqp_url, heartbeat if 0 <= heartbeat < 65535 else 0


async def connect_to_a_node(
    urls: Sequence[str], first: int = 0, **options: Any
) -> tuple[AbstractConnection, int]:
    """A connection to the first of `urls` (a cluster's nodes) that answers, trying them in turn
    from `first` on, and the index of its node. Should none answer, the error of each is raised,
    in one: aiormq's for a login refused (the same credentials are refused everywhere), else an
    AMQPConnectionError that names every node and what it said."""
    failures: list[str] = []
    for step in range(len(urls)):
        node = (first + step) % len(urls)
        try:
            return await aio_pika.connect(urls[node], **options), node
        except aiormq.exceptions.ProbableAuthenticationError:
            raise
        except BROKER_ERRORS as exc:
            if len(urls) == 1:
                raise
            why = str(exc) or type(exc).__name__
            failures.append(f"{redact_url(urls[node])}: {why}")
    raise aio_pika.exceptions.AMQPConnectionError(f"no node answered ({'; '.join(failures)})")


class BrokerUnavailable(ConnectionError):
    """The broker cannot be asked now; the connection is being re-opened."""

    # What an HTTP answer tells its client to wait before asking again, in seconds.
    retry_after = 1


class BrokerBlocked(BrokerUnavailable):
    """The broker is blocking this connection's publishes: one of its resource alarms (memory or
    disk space) is in effect, and nothing published gets through until it clears."""

    retry_after = 5

    def __init__(self, reason: str) -> None:
        super().__init__(f"RabbitMQ is blocking publishes ({reason}) until its alarm clears")
        self.reason = reason


def watch_blocking(
    connection: AbstractConnection,
    blocked: Callable[[str], None],
    unblocked: Callable[[], None],
) -> bool:
    """Call `blocked` with RabbitMQ's reason (e.g. "low on memory") when it sends
    connection.blocked on `connection`, and `unblocked` at connection.unblocked; whether it could.

    aiormq reads both frames, but only to hold back a connection's first writes, and tells no one:
    its handlers are wrapped on this connection's instance. Should a later aiormq handle them
    elsewhere, nothing is watched and publishes simply wait, as they did before."""
    underlay = getattr(getattr(connection, "transport", None), "connection", None)
    on_blocked = getattr(underlay, "_Connection__handle_connection_blocked", None)
    on_unblocked = getattr(underlay, "_Connection__handle_connection_unblocked", None)
    if on_blocked is None or on_unblocked is None:
        return False

    async def handle_blocked(frame: Any) -> None:
        await on_blocked(frame)
        blocked(str(getattr(frame, "reason", "") or "no reason given"))

    async def handle_unblocked(frame: Any) -> None:
        await on_unblocked(frame)
        unblocked()

    setattr(underlay, "_Connection__handle_connection_blocked", handle_blocked)  # noqa: B010
    setattr(underlay, "_Connection__handle_connection_unblocked", handle_unblocked)  # noqa: B010
    return True


async def settle(call: Awaitable[None]) -> None:
    """Ack or nack a message; if its channel is gone, the broker redelivers it and the redelivery
    finds the recorded result."""
    try:
        await call
    except BROKER_ERRORS as exc:
        log.warning(
            "could not settle the message (%s); it will be redelivered",
            str(exc) or type(exc).__name__,
        )
