"""Publishing TaskCompleted events of completed tasks, from their records."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

from worker.contract.events import completed_event
from worker.contract.models import EventName, event_id, routing_key

if TYPE_CHECKING:
    from worker.broker import Broker
    from worker.contract.records import TaskRecord
    from worker.store.database import Store


async def publish_completion(
    broker: Broker, record: TaskRecord, *, reply_to: str | None, correlation_id: str | None
) -> None:
    """The TaskCompleted event of a completed task, from its record."""
    await broker.publish_event_json(
        completed_event(record),
        routing_key(EventName.COMPLETED, record.hub_name),
        event_id(record.task_id, EventName.COMPLETED),
        reply_to=reply_to,
        correlation_id=correlation_id,
    )


async def publish_completions(broker: Broker, store: Store, records: Iterable[TaskRecord]) -> None:
    """Publish the TaskCompleted events of tasks completed without a task message in hand, then
    mark them published; a crash in between leaves them to the relay."""
    published = []
    for record in records:
        await publish_completion(
            broker, record, reply_to=record.reply_to, correlation_id=record.correlation_id
        )
        published.append(record.task_id)
    if published:
        store.events_published_soon(published)


class Announcer:
    """Publishes completion events after their commit, without holding up whoever completed the
    task: the outbox row, committed with the completion, already guarantees the event
    (the relay publishes what is not confirmed), so an answer need not wait for the broker."""

    def __init__(self, broker: Broker, store: Store) -> None:
        self._broker = broker
        self._store = store
        self._tasks: set[asyncio.Task[None]] = set()

    def announce(self, record: TaskRecord) -> None:
        task = asyncio.get_running_loop().create_task(
            publish_completions(self._broker, self._store, [record])
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, grace: float) -> None:
        """On the way out: let the publishes under way finish (the relay has the rest)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
