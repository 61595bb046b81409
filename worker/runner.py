"""One task's life: claim → invoke → judge → record → publish → ack.

The message is acknowledged only after the result is committed and its event confirmed, so a
process killed at any point leaves the message to be redelivered; the store's claim decides
whether that redelivery re-runs the task (its worker died) or only re-publishes its completion.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import TypeVar

from aio_pika.abc import AbstractIncomingMessage

from worker import executions
from worker.amqp import settle
from worker.broker import Broker
from worker.completions import publish_completion
from worker.contract import retries
from worker.contract.errors import InvalidTask
from worker.contract.events import task_event
from worker.contract.judging import judge, outputs
from worker.contract.macros import build_macros
from worker.contract.models import (
    EventName,
    Mode,
    Outcome,
    Result,
    State,
    TaskMessage,
    parse_task,
)
from worker.contract.records import CompletedBy, TaskRecord
from worker.contract.settings import Settings
from worker.contract.tokens import Signer
from worker.invoke import InvokeFailure, Invoker
from worker.logs import bind_task
from worker.metrics import Metrics
from worker.poller import Poller
from worker.store.changes import Claimed, ClaimRequest
from worker.store.database import Store
from worker.store.errors import DB_UNAVAILABLE, TaskVanished
from worker.waiting import Waits, recorded_under_claim

log = logging.getLogger(__name__)

T = TypeVar("T")

# Beyond the response timeout, time for an attempt to commit and publish before another worker
# may take the task over (sooner, if the attempt's worker is seen to have died).
LEASE_GRACE_SECONDS = 30
# Attempts a task may start before it is taken for poison: each further start means the worker
# running the last one died (or lost its lease), so the task ends `abandoned` instead of being
# handed to worker after worker.
MAX_ATTEMPTS = 5


class Stopping(Exception):
    """The process is stopping: leave the message unacknowledged for another worker."""


class Runner:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        broker: Broker,
        invoker: Invoker,
        signer: Signer,
        metrics: Metrics,
        poller: Poller,
    ) -> None:
        self._store = store
        self._poller = poller
        self._broker = broker
        self._invoker = invoker
        self._metrics = metrics
        self._waits = Waits(
            settings,
            store=store,
            broker=broker,
            poller=poller,
            signer=signer,
            invoke=self._invoke,
            db=self._db,
            claim=self._claim,
        )
        self._lease = settings.response_timeout + LEASE_GRACE_SECONDS
        self.stopping = asyncio.Event()
        # The tasks this worker runs an attempt of now, from its claim to its settling.
        self._running: set[str] = set()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Run the task in `message` through to its acknowledgement."""
        self._metrics.tasks_received.inc()
        self._metrics.tasks_in_flight.inc()
        try:
            await self._handle(message)
        except Stopping:
            log.info("stopping: task handed back to the queue")
        except TaskVanished as exc:
            # Before its call (the call's result is recorded under a new claim instead): the
            # task is claimed afresh from its message, as if it were new.
            log.warning("%s (a failover lost its last commits); message handed back", exc)
            await settle(message.nack(requeue=True))
        except Exception:
            # A bug, not bad input: hand the message back; the queue's delivery limit ends a loop
            # (a reject counts towards it on every RabbitMQ version; a nack no longer does).
            log.exception("task handling failed; message returned to the queue")
            await asyncio.sleep(1)
            await settle(message.reject(requeue=True))
        finally:
            self._metrics.tasks_in_flight.dec()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            task = parse_task(message.body)
        except InvalidTask as exc:
            # Perhaps a message that names a definition: it becomes the task it stands for.
            found = await executions.task_of(message, exc, self._store, self._db)
            if isinstance(found, executions.Refused):
                await self._dead_letter(message, found.reason, kind=found.kind)
                return
            task = found
        bind_task(task.task_id, task.plan_id)
        if task.wait_for_completion is Mode.POLL:
            # New poll tasks add to the polls to make: they start at the pace the poller keeps.
            await self._poller.keep_up()
        claimed = await self._claim(message, task)
        if claimed is None:
            return
        self._running.add(task.task_id)
        try:
            await self._run(message, task, claimed)
        finally:
            self._running.discard(task.task_id)

    async def _run(
        self, message: AbstractIncomingMessage, task: TaskMessage, claimed: Claimed
    ) -> None:
        # Retries are attempts that ended, not ones whose worker died.
        if claimed.attempts - claimed.retries > MAX_ATTEMPTS:
            log.warning("task abandoned: its worker died in each of its attempts")
            reason = (
                f"abandoned after {MAX_ATTEMPTS} attempts: the worker running it stopped "
                "before it completed, each time"
            )
            await self._complete(message, task, claimed, Outcome(Result.ABANDONED, reason))
            return
        attempted = await self._attempt(message, task, claimed, time.monotonic())
        if attempted is None:
            return
        outcome, confirmed = attempted
        match retries.plan(task.retry, outcome, claimed.retries):
            case retries.Retry() as retry:
                await self._retry(message, task, claimed, outcome, retry, started=confirmed)
                return
            case retries.NoRetry(reason=reason):
                outcome = Outcome(outcome.result, reason, outcome.response)
        await self._complete(message, task, claimed, outcome, started=confirmed)

    async def _attempt(
        self,
        message: AbstractIncomingMessage,
        task: TaskMessage,
        claimed: Claimed,
        claimed_at: float,
    ) -> tuple[Outcome, asyncio.Task[None] | None] | None:
        """Make the attempt's call: its outcome, and its TaskStarted's publish if that may still
        be under way; None when the message has been settled already."""
        started = task_event(
            EventName.STARTED,
            task,
            attempts=claimed.attempts,
            queued_at=claimed.queued_at,
            started_at=claimed.started_at,
        )
        if task.wait_for_completion is Mode.CALLBACK:
            # Confirmed before the call: the service may report back at once, and the API's
            # events must not overtake this one. (The confirm may wait out a broker cut off past
            # the lease: what follows checks the attempt still holds its task.)
            await self._broker.publish_event(started)
        if not await self._still_holds(message, task, claimed, claimed_at):
            return None
        if task.wait_for_completion is Mode.POLL:
            return await self._waits.start_polling(message, task, claimed, started)
        if task.wait_for_completion is Mode.CALLBACK:
            outcome = await self._waits.invoke_callback_task(message, task, claimed)
            return None if outcome is None else (outcome, None)
        # The confirm comes while the endpoint answers; TaskCompleted, published only after it,
        # still follows TaskStarted. The result is recorded without waiting for it: a broker cut
        # off past the lease must not leave an attempt that was made unrecorded, for another
        # worker to make again.
        confirmed = asyncio.create_task(self._broker.publish_event(started))
        try:
            outcome = await self._invoke(task, build_macros(task, self._waits.public_url, None))
        except BaseException:
            await asyncio.gather(confirmed, return_exceptions=True)
            raise
        return outcome, confirmed

    async def _still_holds(
        self, message: AbstractIncomingMessage, task: TaskMessage, claimed: Claimed, since: float
    ) -> bool:
        """Whether the attempt may call its endpoint. Not if another worker may have taken the
        task over: this worker lost its liveness lock, or its claim is so old that the lease
        could end before the call does. Then the lease is renewed in the database, if the
        attempt still holds its task (waiting while this worker holds no lock); if it does not,
        the message is settled as the newer record says, and no call is made."""
        fresh = time.monotonic() - since < LEASE_GRACE_SECONDS / 2
        if fresh and self._store.live.is_set():
            return True
        renewed = await self._db(
            lambda: self._store.renew_lease(task.task_id, claimed.attempts, self._lease)
        )
        if isinstance(renewed, TaskRecord):
            log.info("attempt taken over before its call; not calling the endpoint")
            await self._superseded(message, renewed)
            return False
        return True

    async def _retry(
        self,
        message: AbstractIncomingMessage,
        task: TaskMessage,
        claimed: Claimed,
        outcome: Outcome,
        retry: retries.Retry,
        *,
        started: asyncio.Task[None] | None = None,
    ) -> None:
        """Queue the task again, by way of a delay queue: no worker slot or unacknowledged
        message is held while it waits. Recorded first, so that a crash before the message is
        settled only brings the retry forward. `started` is the TaskStarted publish, if it may
        still be under way."""
        delay = retries.bucket(retry.delay)
        try:
            found = await recorded_under_claim(
                message,
                task,
                claimed,
                lambda attempts: self._store.retry(task.task_id, attempts, outcome, delay),
                db=self._db,
                claim=self._claim,
            )
        finally:
            if started is not None:
                await started
        if found is None:
            return
        recorded, current = found
        if isinstance(recorded, TaskRecord) and not _retry_recorded(recorded, current):
            await self._superseded(message, recorded)
            return
        log.info(
            "attempt failed; retrying",
            extra={"reason": outcome.reason, "retry": retry.number, "delaySeconds": delay},
        )
        self._metrics.tasks_retried.inc()
        await self._broker.publish_later(message, delay)
        await settle(message.ack())

    async def _complete(
        self,
        message: AbstractIncomingMessage,
        task: TaskMessage,
        claimed: Claimed,
        outcome: Outcome,
        *,
        started: asyncio.Task[None] | None = None,
    ) -> None:
        """Record the attempt's result; then, its TaskStarted confirmed (`started`, if that may
        still be under way), publish its TaskCompleted and acknowledge the message."""
        if task.outputs and outcome.outputs is None:
            outcome = replace(outcome, outputs=outputs(task.outputs, outcome.response))
        try:
            found = await recorded_under_claim(
                message,
                task,
                claimed,
                lambda attempts: self._store.complete(task.task_id, attempts, outcome),
                db=self._db,
                claim=self._claim,
            )
        finally:
            if started is not None:
                await started
        if found is None:
            return
        recorded, claimed = found
        if isinstance(recorded, TaskRecord):
            await self._superseded(message, recorded)
            return
        self._metrics.completed(
            task.wait_for_completion,
            outcome.result.value,
            CompletedBy.WORKER,
            queued_at=claimed.queued_at,
            completed_at=recorded,
        )
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
        await settle(message.ack())

    async def _superseded(self, message: AbstractIncomingMessage, record: TaskRecord) -> None:
        """This attempt lost its task to another (or to a callback, a cancel)."""
        if record.state is not State.COMPLETED:
            log.info("attempt superseded by a newer one; its result is not recorded")
            await settle(message.ack())
            return
        log.info("attempt superseded; re-publishing the recorded result")
        await self._publish_completion(message, record)

    async def _claim(self, message: AbstractIncomingMessage, task: TaskMessage) -> Claimed | None:
        """Start an attempt; None when the message needed no run (and has been settled)."""
        request = ClaimRequest.of(
            task,
            message.body,
            queued_at=message.timestamp,
            lease_seconds=self._lease,
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
        )
        answer_lost = False

        async def claim() -> Claimed | TaskRecord:
            nonlocal answer_lost
            try:
                return await self._store.claim(request)
            except DB_UNAVAILABLE:
                answer_lost = True
                raise

        while True:
            got = await self._db(claim)
            if isinstance(got, Claimed):
                return got
            if (
                answer_lost
                and got.state is State.RUNNING
                and got.worker_id == self._store.worker_id
                and task.task_id not in self._running
            ):
                # This worker's own claim, committed while its answer was lost (the database
                # failed over, or the connection dropped, mid-commit): the attempt is this one,
                # rather than one to wait out for its lease.
                log.info("claim recorded though its answer was lost; running that attempt")
                return Claimed(
                    got.attempts, got.retries, got.queued_at, got.started_at or got.queued_at
                )
            if got.digest != request.digest:
                await self._dead_letter(
                    message,
                    f"taskId {task.task_id!r} already belongs to a different task",
                    kind="conflict",
                )
                return None
            if got.state is State.COMPLETED:
                log.info("task already completed; re-publishing its result")
                await self._publish_completion(message, got)
                return None
            if got.state in (State.WAITING, State.POLLING):
                # Its invocation was answered and recorded, and the message's settling lost (or
                # the task published again): the task's row carries it on from here.
                reply_to = message.reply_to
                if reply_to and not await self._db(
                    partial(
                        self._store.redirect_reply, task.task_id, reply_to, message.correlation_id
                    )
                ):
                    continue  # completed meanwhile: the result goes to this caller too
                log.info("task already past its invocation", extra={"state": got.state.value})
                await settle(message.ack())
                return None
            # Another live worker runs this task now: wait until it finishes or its lease lapses.
            # The lease is the database's time: read by its clock.
            now = self._store.clock.now()
            wait = min(max(((got.lease_until or now) - now).total_seconds(), 0.5), 5.0)
            await self._pause(wait)

    async def _invoke(
        self,
        task: TaskMessage,
        macros: Mapping[str, str],
        extra_headers: Mapping[str, str] | None = None,
        *,
        judged: bool = True,
    ) -> Outcome:
        started = time.perf_counter()
        answer = await self._invoker.invoke(task.request, macros, extra_headers=extra_headers)
        self._metrics.invocation_duration.observe(time.perf_counter() - started)
        if isinstance(answer, InvokeFailure):
            return Outcome(Result.FAILED, answer.reason, transient=answer.transient)
        criterion = task.success_criteria if judged else None
        return judge(answer, criterion, task.criteria_syntax)

    async def _publish_completion(
        self, message: AbstractIncomingMessage, record: TaskRecord
    ) -> None:
        await publish_completion(
            self._broker,
            record,
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
        )
        await settle(message.ack())

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str, kind: str) -> None:
        log.warning("message dead-lettered: %s", reason, extra={"messageId": message.message_id})
        await self._broker.dead_letter(message, reason)
        self._metrics.dead_letters.labels(kind).inc()
        try:
            await self._store.record_dead_letter(message.message_id, reason, message.body)
        except DB_UNAVAILABLE as exc:
            # The broker's copy is the one that matters; this is the operators' history.
            log.warning("dead letter not recorded in the database: %s", exc)
        await settle(message.ack())

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


def _retry_recorded(record: TaskRecord, claimed: Claimed) -> bool:
    """Whether `record` is the retry of `claimed`'s attempt, recorded by a statement whose answer
    was lost (and so is found when it is run again)."""
    return (
        record.state is State.QUEUED
        and record.attempts == claimed.attempts
        and record.retries == claimed.retries + 1
    )
