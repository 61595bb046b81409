"""The dead-letter queue as an operator sees it: read it without taking anything away, and move
chosen messages back to the task queue once what killed them is fixed or has passed.

AMQP 0-9-1 cannot peek, so both operations take messages with basic.get and give back what they
do not keep. How a quorum queue takes messages back decides the rest:

- Where they go. RabbitMQ 3.x puts them at the back of a queue without a delivery limit, such as
  ours (checked on 3.10); 4.x, where every quorum queue has a limit (20 by default), near the
  head. Reading the whole queue and giving it back in the order it came leaves the order as it
  was under either rule; giving back only the first N would rotate the queue by N on 3.x. So
  `list` reads everything, however few it shows.
- What they cost. Since 4.3, basic.nack does not count towards the delivery limit, while
  basic.reject and a closed channel do; so messages are given back with basic.nack, one by one in
  the order they came. 3.x counts every return but sets no limit. 4.0 to 4.2 count every return
  against the default limit of 20 and drop a message past it (the dead-letter queue has nowhere
  further to send it): there, only a dead-letter queue declared or policed with an unlimited
  delivery limit is safe to list again and again.

A dead letter published while a scan runs may land before the ones given back; two scans at once
each see part of the queue. Neither loses a message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, DeliveryMode

from worker.broker import Broker
from worker.contract.models import REASON_HEADER
from worker.views import View

EXCERPT_CHARS = 80

# What RabbitMQ writes in `x-death` when it dead-letters a message itself, as a sentence.
BROKER_REASONS = {
    "delivery_limit": "delivered too many times without being acknowledged",
    "rejected": "rejected by a consumer",
    "expired": "its time-to-live ran out",
    "maxlen": "the queue was over its length limit",
}

# Headers that record a message's death, set by a worker or the broker. A requeued task is a
# fresh delivery: stale ones would mislead whoever reads the next death.
DEATH_HEADERS = frozenset(
    {
        REASON_HEADER,
        "x-acquired-count",
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


class DeadLetter(View):
    """One message of the dead-letter queue."""

    message_id: str | None = None
    reason: str
    excerpt: str


@dataclass(frozen=True, slots=True)
class DeadLetters:
    shown: list[DeadLetter]
    total: int


@dataclass(slots=True)
class Requeued:
    moved: list[DeadLetter] = field(default_factory=list)
    # Requested ids that no dead letter carries.
    missing: list[str] = field(default_factory=list)
    # Why the broker refused to take a message back, which ended the move.
    refused: str | None = None


def reason_of(headers: Mapping[str, object]) -> str:
    """Why the message died: the worker's own reason, else the broker's."""
    given = headers.get(REASON_HEADER)
    if given:
        return _text(given)
    deaths = headers.get("x-death")
    # The most recent death comes first.
    if isinstance(deaths, Sequence) and deaths and isinstance(deaths[0], Mapping):
        cause = _text(deaths[0].get("reason", "unknown"))
        queue = _text(deaths[0].get("queue", "?"))
        return f"RabbitMQ dead-lettered it from {queue}: {BROKER_REASONS.get(cause, cause)}"
    first = headers.get("x-first-death-reason")
    if first:
        return f"RabbitMQ dead-lettered it: {BROKER_REASONS.get(_text(first), _text(first))}"
    return "no reason recorded"


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    return DeadLetter(
        message_id=message.message_id,
        reason=reason_of(message.headers or {}),
        excerpt=message.body[: EXCERPT_CHARS * 4].decode(errors="replace")[:EXCERPT_CHARS],
    )


def revived(message: AbstractIncomingMessage) -> aio_pika.Message:
    """The task message as it was first published, without the record of its death.

    The timestamp stays because the worker takes a task's queuedAt from it; user_id does not,
    because RabbitMQ refuses one that is not the publishing connection's user.
    """
    headers = {k: v for k, v in (message.headers or {}).items() if k not in DEATH_HEADERS}
    return aio_pika.Message(
        message.body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=headers,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


async def list_dead(broker: Broker, *, limit: int) -> DeadLetters:
    """The first `limit` dead letters, and how many there are; every one stays in the queue."""
    connection = await broker.connection()
    async with connection.channel() as channel:
        queue, depth = await _dead_queue(channel, broker)
        held: list[int] = []
        shown: list[DeadLetter] = []
        try:
            while len(held) < depth:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                held.append(_tag(message))
                if len(shown) < limit:
                    shown.append(describe(message))
        finally:
            await _give_back(channel, held)
    return DeadLetters(shown, len(held))


async def requeue(broker: Broker, message_ids: Sequence[str] | None) -> Requeued:
    """Move the dead letters with these message ids (all of them, with None) to the task queue.

    Each copy is confirmed by the broker before its dead letter is acknowledged, so a crash in
    between leaves a duplicate, which the worker runs once, never a loss.
    """
    wanted = None if message_ids is None else set(message_ids)
    found: set[str] = set()
    result = Requeued()
    connection = await broker.connection()
    # A message the task queue cannot route back must raise, not vanish once acknowledged.
    async with connection.channel(publisher_confirms=True, on_return_raises=True) as channel:
        queue, depth = await _dead_queue(channel, broker)
        kept: list[int] = []
        try:
            for _ in range(depth):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                # Given back with the rest unless it is moved: whatever goes wrong meanwhile.
                kept.append(_tag(message))
                if wanted is not None and message.message_id not in wanted:
                    continue
                try:
                    await channel.default_exchange.publish(
                        revived(message), routing_key=broker.names.tasks, timeout=30
                    )
                except (aio_pika.exceptions.DeliveryError, aio_pika.exceptions.PublishError):
                    result.refused = (
                        f"RabbitMQ did not take {message.message_id or 'a message without id'} "
                        f"back on {broker.names.tasks} (is that queue full?); "
                        "it stays a dead letter"
                    )
                    break
                await message.ack()
                kept.pop()
                if message.message_id is not None:
                    found.add(message.message_id)
                result.moved.append(describe(message))
        finally:
            await _give_back(channel, kept)
    if message_ids is not None and result.refused is None:
        result.missing = [i for i in dict.fromkeys(message_ids) if i not in found]
    return result


async def _dead_queue(channel: AbstractChannel, broker: Broker) -> tuple[AbstractQueue, int]:
    """The dead-letter queue and the number of messages ready in it now: a scan stops there, so
    that letters dying while it runs cannot keep it going."""
    queue = await channel.declare_queue(broker.names.dead, passive=True)
    return queue, queue.declaration_result.message_count or 0


async def _give_back(channel: AbstractChannel, delivery_tags: list[int]) -> None:
    if channel.is_closed:
        # The broker has returned whatever the channel held.
        return
    underlay = await channel.get_underlay_channel()
    for tag in delivery_tags:
        await underlay.basic_nack(delivery_tag=tag, multiple=False, requeue=True)


def _tag(message: AbstractIncomingMessage) -> int:
    # Only the tag is kept of a message given back later: the queue may be large.
    assert message.delivery_tag is not None
    return message.delivery_tag


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
