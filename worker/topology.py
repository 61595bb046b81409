"""The AMQP topology of SPEC §3: the task, dead-letter and delay queues and the events exchange."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractChannel
from pamqp.common import FieldTable

from worker.contract.models import Names

# A quorum queue's arguments are fixed when it is first declared; change them only with a new name.
DELIVERY_LIMIT = 20


def tasks_queue_arguments(names: Names) -> FieldTable:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": names.dead,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": DELIVERY_LIMIT,
    }


def delay_queue_arguments(names: Names, seconds: int) -> FieldTable:
    """A queue whose messages go back to the task queue when they have waited `seconds`; it
    outlives its last message by a minute, then goes away by itself."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": seconds * 1000,
        "x-expires": (seconds + 60) * 1000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": names.tasks,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_topology(channel: AbstractChannel, names: Names) -> None:
    """SPEC §3; idempotent, so every process declares it at start-up."""
    await channel.declare_queue(names.dead, durable=True, arguments={"x-queue-type": "quorum"})
    await channel.declare_queue(names.tasks, durable=True, arguments=tasks_queue_arguments(names))
    await channel.declare_exchange(names.events, aio_pika.ExchangeType.TOPIC, durable=True)
