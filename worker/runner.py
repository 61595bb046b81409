"""One task's life: claim → invoke → judge → record → publish → ack.

The message is acknowledged only after the result is committed and its event confirmed, so a
process killed at any point leaves the message to be redelivered; the store's claim decides
whether that redelivery re-runs the task (its worker died) or only re-publishes its completion.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import orjson
from aio_pika.abc import AbstractIncomingMessage

from worker.broker import BROKER_ERRORS, Broker
from worker.errors import InvalidTask
from worker.invoke import InvokeFailure, Invoker, build_macros
from worker.logs import bind_task
from worker.metrics import Metrics
from worker.models import (
    SECRET_HEADERS,
    EventName,
    Mode,
    Outcome,
    Result,
    State,
    TaskMessage,
    parse_task,
)
from worker.settings import Settings
from worker.states import judge, parse_outputs, recorded_outcome, task_event
from worker.store import DB_UNAVAILABLE, Claimed, ClaimRequest, Store, TaskRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

# Beyond the response timeout, time for an attempt to commit and publish before another worker
# may take the task over (sooner, if the attempt's worker is seen to have died).
LEASE_GRACE_SECONDS = 30


class Stopping(Exception):
    """The process is stopping: leave the message unacknowledged for another worker."""


class Runner:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        broker: Broker,
        invoker: Invoker,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._store = store
        self._broker = broker
        self._invoker = invoker
        self._metrics = metrics
        self._public_url = str(settings.public_url)
        self._lease = settings.response_timeout + LEASE_GRACE_SECONDS
        self.stopping = asyncio.Event()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Run the task in `message` through to its acknowledgement."""
        self._metrics.tasks_received.inc()
        self._metrics.tasks_in_flight.inc()
        try:
            await self._handle(message)
        except Stopping:
            log.info("stopping: task handed back to the queue")
        except Exception:
            # A bug, not bad input: hand the message back; the queue's delivery limit ends a loop.
            log.exception("task handling failed; message returned to the queue")
            await asyncio.sleep(1)
            await _settle(message.nack(requeue=True))
        finally:
            self._metrics.tasks_in_flight.dec()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            task = parse_task(message.body)
        except InvalidTask as exc:
            await self._dead_letter(message, str(exc), kind="invalid")
            return
        bind_task(task.task_id, task.plan_id)
        if task.wait_for_completion is Mode.CALLBACK:
            # Dead-lettered, not failed: it can be requeued once a worker that waits is deployed.
            await self._dead_letter(
                message, "waitForCompletion callback is not supported by this worker yet", "mode"
            )
            return
        claimed = await self._claim(message, task)
        if claimed is None:
            return
        await self._broker.publish_event(
            task_event(
                EventName.STARTED,
                task,
                attempts=claimed.attempts,
                queued_at=claimed.queued_at,
                started_at=claimed.started_at,
            )
        )
        outcome = await self._invoke(task)
        recorded = await self._db(
            lambda: self._store.complete(task.task_id, claimed.attempts, outcome)
        )
        if isinstance(recorded, TaskRecord):
            if recorded.state is not State.COMPLETED:
                log.info("attempt superseded by a newer one; its result is not recorded")
                await _settle(message.ack())
                return
            log.info("attempt superseded; re-publishing the recorded result")
            await self._publish_completion(message, task, recorded)
            return
        self._metrics.tasks_completed.labels(outcome.result.value, task.wait_for_completion).inc()
        log.info(
            "task completed",
            extra={"result": outcome.result.value, "reason": outcome.reason},
        )
        event = task_event(
            EventName.COMPLETED,
            task,
            attempts=claimed.attempts,
            queued_at=claimed.queued_at,
            started_at=claimed.started_at,
            completed_at=recorded,
            outcome=outcome,
        )
        await self._broker.publish_event(
            event, reply_to=message.reply_to, correlation_id=message.correlation_id
        )
        await _settle(message.ack())

    async def _claim(self, message: AbstractIncomingMessage, task: TaskMessage) -> Claimed | None:
        """Start an attempt; None when the message needed no run (and has been settled)."""
        request = ClaimRequest(
            task_id=task.task_id,
            plan_id=task.plan_id,
            job_id=task.job,
            hub_name=task.hub_name,
            project_id=task.project_id,
            name=task.name,
            mode=task.wait_for_completion.value,
            digest=hashlib.sha256(message.body).digest(),
            message=_stored_message(task, message.body),
            queued_at=message.timestamp,
            lease_seconds=self._lease,
        )
        while True:
            got = await self._db(lambda: self._store.claim(request))
            if isinstance(got, Claimed):
                return got
            if got.digest != request.digest:
                await self._dead_letter(
                    message,
                    f"taskId {task.task_id!r} already belongs to a different task",
                    kind="conflict",
                )
                return None
            if got.state is State.COMPLETED:
                log.info("task already completed; re-publishing its result")
                await self._publish_completion(message, task, got)
                return None
            # Another live worker runs this task now: wait until it finishes or its lease lapses.
            lease_until = got.lease_until or datetime.now(UTC)
            wait = min(max((lease_until - datetime.now(UTC)).total_seconds(), 0.5), 5.0)
            await self._pause(wait)

    async def _invoke(self, task: TaskMessage) -> Outcome:
        macros = build_macros(task, self._public_url, None)
        started = time.perf_counter()
        answer = await self._invoker.invoke(task.request, macros)
        self._metrics.invocation_duration.observe(time.perf_counter() - started)
        if isinstance(answer, InvokeFailure):
            return Outcome(Result.FAILED, answer.reason)
        return judge(answer, task.success_criteria)

    async def _publish_completion(
        self, message: AbstractIncomingMessage, task: TaskMessage, record: TaskRecord
    ) -> None:
        assert record.result is not None
        event = task_event(
            EventName.COMPLETED,
            task,
            attempts=record.attempts,
            queued_at=record.queued_at,
            started_at=record.started_at,
            completed_at=record.completed_at,
            outcome=recorded_outcome(record.result, record.reason, record.response),
            outputs=parse_outputs(record.outputs),
        )
        await self._broker.publish_event(
            event, reply_to=message.reply_to, correlation_id=message.correlation_id
        )
        await _settle(message.ack())

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str, kind: str) -> None:
        log.warning("message dead-lettered: %s", reason, extra={"messageId": message.message_id})
        await self._broker.dead_letter(message, reason)
        self._metrics.dead_letters.labels(kind).inc()
        await _settle(message.ack())

    async def _db(self, call: Callable[[], Awaitable[T]]) -> T:
        """The call, retried while the database is unreachable, until the process stops."""
        delay = 0.2
        while True:
            try:
                return await call()
            except DB_UNAVAILABLE as exc:
                log.warning("database unavailable (%s); retrying in %.1f s", exc, delay)
                await self._pause(delay)
                delay = min(delay * 2, 5.0)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return
        raise Stopping


def _stored_message(task: TaskMessage, body: bytes) -> str:
    """The message as stored: as received, unless secret header values must be redacted."""
    if not _has_secrets(task):
        return body.decode()
    data = task.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["request"] = task.request.redacted()
    if task.cancel_request is not None:
        data["cancelRequest"] = task.cancel_request.redacted()
    return orjson.dumps(data).decode()


def _has_secrets(task: TaskMessage) -> bool:
    requests = (task.request, task.cancel_request)
    return any(
        name.lower() in SECRET_HEADERS
        for request in requests
        if request is not None
        for name in request.headers
    )


async def _settle(call: Awaitable[None]) -> None:
    """Ack or nack; if the message's channel is gone, the broker redelivers it and the redelivery
    finds the recorded result."""
    try:
        await call
    except BROKER_ERRORS as exc:
        log.warning("could not settle the message (%s); it will be redelivered", exc)
