"""The AMQP topology of SPEC §3: the task, dead-letter and delay queues and the events exchange."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp.common import FieldTable

from worker.contract.models import Names

log = logging.getLogger(__name__)

# A quorum queue's arguments are fixed when it is first declared; change them only with a new name.
DELIVERY_LIMIT = 20

# The replicas a quorum queue starts with, one per node, each on a different node.
GROUP_SIZE = "x-quorum-initial-group-size"
# Three replicas survive the loss of any one node; more only slow every write.
MAX_GROUP_SIZE = 3


def quorum_group_size(nodes: int) -> int | None:
    """The replicas each quorum queue starts with when AGENTLESS_AMQP_URL lists `nodes` nodes:
    one per node, up to MAX_GROUP_SIZE. None for a single URL, which may as well name a load
    balancer in front of a whole cluster: RabbitMQ's own default then decides."""
    return min(nodes, MAX_GROUP_SIZE) if nodes > 1 else None


def _quorum(arguments: FieldTable, group_size: int | None) -> FieldTable:
    quorum: FieldTable = {"x-queue-type": "quorum", **arguments}
    if group_size is not None:
        quorum[GROUP_SIZE] = group_size
    return quorum


def tasks_queue_arguments(names: Names, group_size: int | None = None) -> FieldTable:
    return _quorum(
        {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": names.dead,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": DELIVERY_LIMIT,
        },
        group_size,
    )


def delay_queue_arguments(names: Names, seconds: int, group_size: int | None = None) -> FieldTable:
    """A queue whose messages go back to the task queue when they have waited `seconds`; it
    outlives its last message by a minute, then goes away by itself."""
    return _quorum(
        {
            "x-message-ttl": seconds * 1000,
            "x-expires": (seconds + 60) * 1000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": names.tasks,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
        group_size,
    )


async def declare_topology(
    channel: AbstractChannel, names: Names, group_size: int | None = None
) -> None:
    """SPEC §3; idempotent, so every process declares it at start-up."""
    await channel.declare_queue(names.dead, durable=True, arguments=_quorum({}, group_size))
    await channel.declare_queue(
        names.tasks, durable=True, arguments=tasks_queue_arguments(names, group_size)
    )
    await channel.declare_exchange(names.events, aio_pika.ExchangeType.TOPIC, durable=True)


async def declare_topology_on(
    connection: AbstractConnection, names: Names, group_size: int | None
) -> None:
    """declare_topology, where queues that already exist with another initial group size
    (declared before there was one, or by a process given another list of nodes) are used as
    they are."""

    async def existing(channel: AbstractChannel) -> None:
        await channel.declare_queue(names.dead, passive=True)
        await channel.declare_queue(names.tasks, passive=True)
        await channel.declare_exchange(names.events, aio_pika.ExchangeType.TOPIC, durable=True)

    await _declare_or_use(connection, lambda c: declare_topology(c, names, group_size), existing)


async def declare_queue_on(
    connection: AbstractConnection, name: str, arguments: FieldTable
) -> None:
    """A durable queue (the task queue, a delay queue); one that exists with another initial
    group size is used as it is."""

    async def declare(channel: AbstractChannel) -> None:
        await channel.declare_queue(name, durable=True, arguments=arguments)

    async def existing(channel: AbstractChannel) -> None:
        await channel.declare_queue(name, passive=True)

    await _declare_or_use(connection, declare, existing)


async def _declare_or_use(
    connection: AbstractConnection,
    declare: Callable[[AbstractChannel], Awaitable[None]],
    existing: Callable[[AbstractChannel], Awaitable[None]],
) -> None:
    """`declare`, or, should the broker refuse it for another initial group size, `existing`.
    Each on a channel of its own: a refused declare closes the channel it came on. A queue's
    members are the broker's to change after it is declared (`rabbitmq-queues grow`)."""
    async with connection.channel() as channel:
        try:
            await declare(channel)
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            if GROUP_SIZE not in str(exc):
                raise
        else:
            return
    log.info("a queue exists with another initial group size; it is used as it is")
    async with connection.channel() as channel:
        await existing(channel)
