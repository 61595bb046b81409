"""Poll tasks: starting to poll once the start request is answered, and making the due polls.

No message, coroutine or connection is held between two polls: a polling task is its row, and
every worker's poller takes what is due from the store, makes the poll, and records its answer,
fenced by the count of polls recorded (worker/store/polls.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Final

from pydantic import ValidationError

from worker.completions import publish_completions
from worker.contract import polling
from worker.contract.errors import describe
from worker.contract.macros import build_macros
from worker.contract.models import HttpResponse, Outcome, Result, TaskMessage
from worker.contract.records import TaskRecord
from worker.contract.requests import TaskRequest
from worker.contract.response_macros import UnresolvedMacro
from worker.invoke import InvokeFailure
from worker.logs import bind_task
from worker.store.changes import DuePoll, PollAnswer, PollStarted
from worker.store.errors import DB_UNAVAILABLE
from worker.store.storable import outputs_json, response_json, storable_text

if TYPE_CHECKING:
    from worker.broker import Broker
    from worker.contract.sealing import Sealer
    from worker.contract.settings import Settings
    from worker.invoke import Invoker
    from worker.metrics import Metrics
    from worker.store.database import Store

log = logging.getLogger(__name__)

# How often an idle poller looks for due polls: a poll is made within this of its due time.
LOOK_INTERVAL: Final = 0.05
# The most polls one statement takes.
TAKE_LIMIT: Final = 500
# Beyond the response timeout, time for a poll's answer to be recorded before another worker may
# make the poll again (sooner, once its worker is seen to have died).
LEASE_GRACE_SECONDS: Final = 10
# Parsed task messages kept for the polls to come; past this many the cache starts anew.
_PARSED_LIMIT: Final = 50_000
# Polls taken this late mean that the poller is behind: new tasks wait for it to catch up.
BEHIND_SECONDS: Final = 0.2
# New poll tasks start at a paced rate (per second) that halves whenever the poller falls behind
# and grows again while it keeps up: slowed, never stopped.
START_RATE_MIN: Final = 20.0
START_RATE_MAX: Final = 5_000.0
START_RATE_GROWTH: Final = 1.1
START_RATE_FIRST: Final = 500.0


class Poller:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        broker: Broker,
        invoker: Invoker,
        sealer: Sealer,
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._broker = broker
        self._invoker = invoker
        self._sealer = sealer
        self._metrics = metrics
        self._public_url = str(settings.public_url).rstrip("/")
        self._timeout = settings.callback_timeout
        self._limit = settings.concurrency
        # The fewest polls worth a statement to take, unless the poller is idle.
        self._batch = max(1, min(self._limit // 10, TAKE_LIMIT))
        self._lease = settings.response_timeout + LEASE_GRACE_SECONDS
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._room = asyncio.Event()
        self._stop = asyncio.Event()
        self._pacing = asyncio.Lock()
        # From a pace the poller can follow: it is raised while the poller keeps up, which with
        # no polls to make takes a couple of seconds.
        self._start_rate = START_RATE_FIRST
        self._next_start = 0.0
        # task id -> (its stored message, the message parsed, its poll request, its macros)
        self._parsed: dict[str, tuple[str, TaskMessage, TaskRequest, dict[str, str]]] = {}

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def keep_up(self) -> None:
        """Pace new poll tasks, more slowly while polls are late: a poll is a promise on a
        schedule, a new task waiting in the queue breaks none, and both share the worker's one
        event loop."""
        async with self._pacing:
            now = time.monotonic()
            if self._next_start > now:
                await self._wait(self._stop, self._next_start - now)
            self._next_start = max(now, self._next_start) + 1 / self._start_rate

    async def begin(
        self, task: TaskMessage, attempts: int, start: HttpResponse, macros: Mapping[str, str]
    ) -> TaskRecord | Outcome | None:
        """Record that the task polls from now on: None; the record that holds it instead
        (another attempt, a cancel), TaskVanished if it has none; the failed outcome when no poll
        request can be made of the start response."""
        try:
            start_url, connection_url = self._invoker.target(task.request, macros)
            request = polling.poll_request(task, start, start_url, connection_url)
        except UnresolvedMacro as exc:
            return Outcome(Result.FAILED, f"poll request: {exc}", start)
        except ValidationError as exc:
            return Outcome(Result.FAILED, f"poll request: {describe(exc)}", start)
        stored, secrets = polling.split_secrets(request)
        sealed = self._sealer.seal(secrets, task.task_id) if secrets else None
        return await self._store.start_polling(
            PollStarted(
                task.task_id,
                attempts,
                response_json=response_json(start),
                timeout_seconds=task.timeout_seconds or self._timeout,
                first_delay=polling.first_delay(task.polling, start),
                poll_request_json=stored.model_dump_json(by_alias=True),
                poll_secrets=sealed,
                outputs_json="{}",
            )
        )

    async def run(self) -> None:
        """Take and make due polls until `stop()`."""
        while not self._stop.is_set():
            room = min(self._limit - len(self._in_flight), TAKE_LIMIT)
            if room < self._batch:
                # Nearly full: wait for a batch's worth of room rather than take a few at a time.
                self._room.clear()
                await self._wait(self._room, LOOK_INTERVAL)
                continue
            try:
                taken = await self._store.polls.take(room, self._lease, self._store.worker_id)
            except DB_UNAVAILABLE as exc:
                log.warning("polls not taken: database unavailable (%s)", exc)
                await self._wait(self._stop, 1.0)
                continue
            except Exception:
                # A poller that stopped would leave every poll task to the other workers, or to
                # none: it carries on, and the log shows what went wrong.
                log.exception("polls not taken")
                await self._wait(self._stop, 1.0)
                continue
            # Due times are the database's: lateness is measured by its clock.
            now = self._store.clock.now()
            latest = 0.0
            for due in taken:
                late = max((now - due.due_at).total_seconds(), 0)
                latest = max(latest, late)
                self._metrics.poll_lateness.observe(late)
                made = asyncio.create_task(self._poll(due))
                self._in_flight[due.task_id] = made
                made.add_done_callback(partial(self._made, due.task_id))
            if len(taken) < room and latest < BEHIND_SECONDS:
                self._start_rate = min(self._start_rate * START_RATE_GROWTH, START_RATE_MAX)
            else:
                self._start_rate = max(self._start_rate / 2, START_RATE_MIN)
            if len(taken) < room:
                await self._wait(self._stop, LOOK_INTERVAL)

    def _made(self, task_id: str, _: asyncio.Task[None]) -> None:
        self._in_flight.pop(task_id, None)
        if self._limit - len(self._in_flight) >= self._batch:
            self._room.set()

    async def _wait(self, event: asyncio.Event, seconds: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    async def stop(self, grace: float) -> None:
        """Take no more polls; let those in flight finish within `grace` seconds, then hand the
        rest back, due at once, to the workers that remain."""
        self._stop.set()
        if not self._in_flight:
            return
        _, pending = await asyncio.wait(set(self._in_flight.values()), timeout=grace)
        unfinished = [task_id for task_id, made in self._in_flight.items() if made in pending]
        for made in pending:
            made.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if unfinished:
            with suppress(*DB_UNAVAILABLE):
                await self._store.polls.release(self._store.worker_id, unfinished)
            log.info("unfinished polls handed back", extra={"count": len(unfinished)})

    def _parse(self, due: DuePoll) -> tuple[TaskMessage, TaskRequest, dict[str, str]]:
        cached = self._parsed.get(due.task_id)
        if cached is not None and cached[0] == due.message:
            return cached[1], cached[2], cached[3]
        if len(self._parsed) >= _PARSED_LIMIT:
            self._parsed.clear()
        task = TaskMessage.model_validate_json(due.message)
        request = TaskRequest.model_validate_json(due.poll_request)
        macros = build_macros(task, self._public_url, None)
        self._parsed[due.task_id] = (due.message, task, request, macros)
        return task, request, macros

    async def _poll(self, due: DuePoll) -> None:
        try:
            task, request, macros = self._parse(due)
            bind_task(task.task_id, task.plan_id)
            if due.poll_secrets is not None:
                secrets = self._sealer.unseal(due.poll_secrets, task.task_id)
                request = request.model_copy(update={"headers": request.headers | secrets})
            number = due.polls + 1
            started = time.perf_counter()
            answer = await self._invoker.invoke(request, macros)
            answered = time.monotonic()
            self._metrics.invocation_duration.observe(time.perf_counter() - started)
            found: HttpResponse | Outcome
            if isinstance(answer, InvokeFailure):
                found = Outcome(Result.FAILED, answer.reason, transient=answer.transient)
            else:
                found = answer
            verdict = polling.judge_poll(task, found, number)
            await self._record(task, due, verdict, answered)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The lease runs out, and the poll is made again: by then the fault may have passed.
            log.exception("poll failed; it will be made again", extra={"taskId": due.task_id})

    async def _record(
        self,
        task: TaskMessage,
        due: DuePoll,
        verdict: Outcome | polling.PollAgain,
        answered: float,
    ) -> None:
        if isinstance(verdict, polling.PollAgain):
            delay, result, outputs = verdict.delay, None, "{}"
        else:
            delay, result, outputs = 0.0, verdict.result, outputs_json(verdict.outputs)
        answer = PollAnswer(
            task.task_id,
            due.polls,
            storable_text(verdict.reason),
            response_json(verdict.response),
            delay=delay,
            result=result,
            outputs_json=outputs,
            answered=answered,
        )
        recorded = await self._retrying(answer)
        if recorded is True:
            self._metrics.polls.labels("again").inc()
            return
        self._parsed.pop(task.task_id, None)
        if isinstance(recorded, TaskRecord):
            assert recorded.result is not None
            self._metrics.polls.labels(recorded.result.value).inc()
            self._metrics.record_completed(recorded)
            log.info(
                "task completed",
                extra={"result": recorded.result.value, "reason": recorded.reason},
            )
            await publish_completions(self._broker, self._store, [recorded])
        else:
            self._metrics.polls.labels("superseded").inc()
            log.info("poll superseded (a newer poll, a cancel or the deadline); not recorded")

    async def _retrying(self, answer: PollAnswer) -> bool | TaskRecord | None:
        """Record the answer, waiting out a database that cannot be reached, until the poller
        stops (then the poll is made again by whoever takes it next)."""
        delay = 0.2
        while True:
            try:
                return await self._store.polls.record(answer)
            except DB_UNAVAILABLE as exc:
                if self._stop.is_set():
                    raise
                log.warning("poll not recorded: database unavailable (%s)", exc)
                await self._wait(self._stop, delay)
                delay = min(delay * 2, 5.0)
