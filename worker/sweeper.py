"""Background duties over the store: callback deadlines, cancel requests, unconfirmed events.

Every worker sweeps; SKIP LOCKED in the statements lets any number sweep at once without two
acting on one task. API processes run only the event relay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from worker.broker import Broker
from worker.contract.models import (
    REDACTED,
    EventName,
    TaskMessage,
    TaskRequest,
    event_id,
    routing_key,
)
from worker.contract.tokens import GRACE_SECONDS, Signer
from worker.invoke import InvokeFailure, Invoker, build_macros
from worker.logs import bind_task
from worker.states import completed_event
from worker.store.database import DB_UNAVAILABLE, Store, TaskRecord

log = logging.getLogger(__name__)

# How often deadlines are checked: a task times out within this (and a statement) of its deadline.
SWEEP_INTERVAL = 0.5
# A completion's own process publishes its event at once; the relay steps in only after this.
RELAY_AFTER_SECONDS = 5.0


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
    task: the row's pending mark, committed with the completion, already guarantees the event
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


class Sweeper:
    def __init__(
        self,
        store: Store,
        broker: Broker,
        *,
        invoker: Invoker | None = None,
        signer: Signer | None = None,
        public_url: str = "",
    ) -> None:
        self._store = store
        self._broker = broker
        self._invoker = invoker
        self._signer = signer
        self._public_url = public_url
        self._next_relay = 0.0

    async def run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except DB_UNAVAILABLE as exc:
                log.warning("sweep skipped: database unavailable (%s)", exc)
            await asyncio.sleep(SWEEP_INTERVAL)

    async def sweep_once(self) -> None:
        if self._invoker is not None:
            timed_out = await self._store.sweep()
            for record in timed_out:
                log.info(
                    "task completed",
                    extra={
                        "taskId": record.task_id,
                        "planId": record.plan_id,
                        "result": record.result,
                        "reason": record.reason,
                    },
                )
            await publish_completions(self._broker, self._store, timed_out)
            requests = await self._store.take_cancel_requests()
            if requests:
                await asyncio.gather(*(self._invoke_cancel_request(r) for r in requests))
        if time.monotonic() >= self._next_relay:
            self._next_relay = time.monotonic() + RELAY_AFTER_SECONDS / 2
            async with self._store.pending_events(RELAY_AFTER_SECONDS) as records:
                for record in records:
                    log.info(
                        "relaying an unconfirmed TaskCompleted", extra={"taskId": record.task_id}
                    )
                    await publish_completion(
                        self._broker,
                        record,
                        reply_to=record.reply_to,
                        correlation_id=record.correlation_id,
                    )

    async def _invoke_cancel_request(self, record: TaskRecord) -> None:
        """Best effort, once: the outcome is logged, and changes nothing about the task."""
        assert self._invoker is not None
        assert self._signer is not None
        bind_task(record.task_id, record.plan_id)
        task = TaskMessage.model_validate_json(record.message)
        request = task.cancel_request
        if request is None:
            return
        kept = {name: value for name, value in request.headers.items() if value != REDACTED}
        if len(kept) < len(request.headers):
            # Secret header values are never stored; credentials belong in a service connection.
            log.warning("cancelRequest sent without its secret headers, which are not kept")
            request = TaskRequest.model_validate(
                request.model_dump(by_alias=True) | {"headers": kept}
            )
        token = self._signer.issue(task.task_id, task.plan_id, time.time() + GRACE_SECONDS)
        answer = await self._invoker.invoke(request, build_macros(task, self._public_url, token))
        if isinstance(answer, InvokeFailure):
            log.warning("cancelRequest failed: %s", answer.reason)
        else:
            log.info("cancelRequest sent", extra={"statusCode": answer.status_code})
