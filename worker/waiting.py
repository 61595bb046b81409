"""The starts of the modes that wait: a callback task's invocation, after which the task waits
for its service, and a poll task's start request, after which it polls.

Either way the wait is recorded first and the message settled after it: a task message is never
held while its task waits (RabbitMQ would cancel a consumer that held one for half an hour).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from functools import partial
from typing import Protocol, TypeVar

from aio_pika.abc import AbstractIncomingMessage

from worker.amqp import settle
from worker.broker import Broker
from worker.contract.events import task_event
from worker.contract.judging import outputs
from worker.contract.macros import build_macros, callback_headers
from worker.contract.models import EventName, HttpResponse, Outcome, Result, TaskEvent, TaskMessage
from worker.contract.records import TaskRecord
from worker.contract.settings import Settings
from worker.contract.tokens import GRACE_SECONDS, Signer
from worker.poller import Poller
from worker.store.changes import Claimed
from worker.store.database import Store
from worker.store.errors import TaskVanished

log = logging.getLogger(__name__)

T = TypeVar("T")


class Invoking(Protocol):
    """The runner's call of a task's request, judged (or not) into an Outcome."""

    async def __call__(
        self,
        task: TaskMessage,
        macros: Mapping[str, str],
        extra_headers: Mapping[str, str] | None = None,
        *,
        judged: bool = True,
    ) -> Outcome: ...


class Retrying(Protocol):
    """The runner's way with the database: the call, retried while it is unreachable."""

    async def __call__(self, call: Callable[[], Awaitable[T]]) -> T: ...


# The runner's claim of a task from its message: the attempt, or None once the message is settled.
Claiming = Callable[[AbstractIncomingMessage, TaskMessage], Awaitable[Claimed | None]]


async def recorded_under_claim(
    message: AbstractIncomingMessage,
    task: TaskMessage,
    claimed: Claimed,
    write: Callable[[int], Awaitable[T]],
    *,
    db: Retrying,
    claim: Claiming,
) -> tuple[T, Claimed] | None:
    """`write` of the attempt (given its number), and the claim it was made under: `claimed`,
    or a new one when a failover lost that claim after the call was made (the task's row gone,
    or back as it was before the claim: submitted over HTTP, retried, taken over), so that the
    call's answer is recorded rather than the call made again; None once the message is settled
    instead."""
    current = claimed
    while True:
        try:
            written = await db(partial(write, current.attempts))
        except TaskVanished as exc:
            log.warning("%s (a failover lost its claim); claiming it again", exc)
        else:
            if not isinstance(written, TaskRecord) or not current.lost_in(written):
                return written, current
            log.warning("a failover lost the attempt's claim; claiming it again")
        again = await claim(message, task)
        if again is None:
            return None
        current = again


class Waits:
    """Starts callback and poll tasks on the runner's behalf, with its invoker and its patience
    with the database."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        broker: Broker,
        poller: Poller,
        signer: Signer,
        invoke: Invoking,
        db: Retrying,
        claim: Claiming,
    ) -> None:
        self._store = store
        self._broker = broker
        self._poller = poller
        self._signer = signer
        self._invoke = invoke
        self._db = db
        self._claim = claim
        self._callback_timeout = settings.callback_timeout
        # PlanUrl and $(system.CollectionUri): services append "/{projectId}/_apis/…" to it.
        self.public_url = str(settings.public_url).rstrip("/")

    async def start_polling(
        self,
        message: AbstractIncomingMessage,
        task: TaskMessage,
        claimed: Claimed,
        started: TaskEvent,
    ) -> tuple[Outcome, asyncio.Task[None]] | None:
        """Invoke the start request; once it is answered 2xx, the task polls and the message is
        settled. The start's failure is returned, to be retried or recorded, with its
        TaskStarted's publish, which may still be under way (as an apiResponse task's)."""
        confirmed = asyncio.create_task(self._broker.publish_event(started))
        macros = build_macros(task, self.public_url, None)
        try:
            # successCriteria are for the polls; the start answers only whether the job began.
            outcome = await self._invoke(task, macros, judged=False)
        except BaseException:
            await asyncio.gather(confirmed, return_exceptions=True)
            raise
        if outcome.result is not Result.SUCCEEDED or outcome.response is None:
            return outcome, confirmed
        start = outcome.response
        try:
            # The job was started: it polls under a new claim if a failover lost this one,
            # rather than being started again.
            found = await recorded_under_claim(
                message,
                task,
                claimed,
                lambda attempts: self._poller.begin(task, attempts, start, macros),
                db=self._db,
                claim=self._claim,
            )
        except BaseException:
            await asyncio.gather(confirmed, return_exceptions=True)
            raise
        if found is None:
            await asyncio.gather(confirmed, return_exceptions=True)
            return None
        begun, current = found
        if isinstance(begun, Outcome):
            return begun, confirmed
        # Recorded first, without waiting for the confirm; TaskWaiting still follows TaskStarted.
        await confirmed
        if begun is None:
            log.info("task polling", extra={"statusCode": start.status_code})
            await self._announce(task, current, start)
        else:
            log.info("task taken over before it could poll (a newer attempt, a cancel)")
        await settle(message.ack())
        return None

    async def invoke_callback_task(
        self, message: AbstractIncomingMessage, task: TaskMessage, claimed: Claimed
    ) -> Outcome | None:
        """Hand the external service its token; then the task waits, and the message is settled
        (never held while waiting). The invocation's failure is returned, to be recorded."""
        # Counted from the attempt's start by the database's clock (its claim's now()): the
        # deadline, and the token's expiry with it, hold whatever this machine's clock says.
        started = claimed.started_at
        deadline = started + timedelta(seconds=task.timeout_seconds or self._callback_timeout)
        started_deadline = None
        if task.started_timeout_seconds is not None:
            started_deadline = started + timedelta(seconds=task.started_timeout_seconds)
        token = self._signer.issue(task.task_id, task.plan_id, deadline.timestamp() + GRACE_SECONDS)
        outcome = await self._invoke(
            task,
            build_macros(task, self.public_url, token),
            callback_headers(task, self.public_url, token),
        )
        if outcome.result is not Result.SUCCEEDED:
            return outcome
        values = outputs(task.outputs, outcome.response)

        # The service holds a token for the task, whatever its attempt: the task waits under a
        # new claim if a failover lost this one, rather than calling again.
        found = await recorded_under_claim(
            message,
            task,
            claimed,
            lambda attempts: self._store.wait(
                task.task_id, attempts, outcome.response, deadline, started_deadline, outputs=values
            ),
            db=self._db,
            claim=self._claim,
        )
        if found is None:
            return None
        first, current = found
        if first is not None:
            # The callback came before the invocation's response and completed the task (its
            # event is the API's to publish), or a newer attempt holds the task.
            log.info("task already settled by its callback", extra={"state": first.state.value})
            await settle(message.ack())
            return None
        log.info("task waiting for its callback", extra={"deadline": deadline.isoformat()})
        await self._announce(task, current, outcome.response)
        await settle(message.ack())
        return None

    async def _announce(
        self, task: TaskMessage, claimed: Claimed, response: HttpResponse | None
    ) -> None:
        """TaskWaiting: the invocation was answered, and the task waits (a callback, a poll)."""
        event = task_event(
            EventName.WAITING,
            task,
            attempts=claimed.attempts,
            queued_at=claimed.queued_at,
            started_at=claimed.started_at,
            response=response,
        )
        await self._broker.publish_event(event)
