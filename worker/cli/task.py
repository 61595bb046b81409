"""`agentless task`, `cancel` and `logs`: one task, as GET /tasks/{id}, POST /tasks/{id}/cancel
and GET /tasks/{id}/logs answer, read from and written to the database directly."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
from pydantic import JsonValue

from worker.broker import Broker
from worker.cli.exits import EXIT_DONE, EXIT_NOT_SUCCEEDED
from worker.completions import publish_completion
from worker.contract.errors import UsageError
from worker.contract.models import Names, State
from worker.contract.requests import ID_PATTERN
from worker.contract.settings import Settings
from worker.store.database import Store
from worker.text import duration, one_line, shorten
from worker.views import TaskDetail

# How long a cancel waits for the broker to take its TaskCompleted event; past that, a worker's
# or an API's relay publishes it.
ANNOUNCE_SECONDS = 10
# How often `logs --follow` looks for new lines.
FOLLOW_SECONDS = 0.5
# Longest value the summary shows of a JSON field (a response body, the outputs).
SHOWN_CHARS = 200


def _no_such_task(task_id: str) -> str:
    return (
        f"agentless: there is no task {task_id!r} (a task still in the queue is known once a "
        "worker takes it)"
    )


async def _unknown(store: Store, task_id: str) -> str:
    """Why the store has no row of the task: it was purged past the retention (GET /tasks/{id}
    answers 410), or nothing is known of it (404)."""
    completed_at = await store.retention.purged_completion(task_id)
    if completed_at is None:
        return _no_such_task(task_id)
    stamp = completed_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return (
        f"agentless: task {task_id!r} completed at {stamp} and was deleted after the retention "
        "period (AGENTLESS_RETENTION); its result and log are no longer kept"
    )


def _task_id(text: str) -> str:
    if not ID_PATTERN.fullmatch(text):
        raise UsageError(f"{text!r} is not a task id (1-128 of A-Z a-z 0-9 . _ : -)")
    return text


# --- task ---------------------------------------------------------------------------------------


def cmd_task(settings: Settings, args: argparse.Namespace) -> int:
    task_id = _task_id(args.id)
    detail, now = asyncio.run(_detail(settings, task_id))
    if isinstance(detail, str):
        print(detail, file=sys.stderr)
        return EXIT_NOT_SUCCEEDED
    if args.json:
        print(detail.model_dump_json(by_alias=True, indent=2))
    else:
        print(summary(detail, now))
    return EXIT_DONE


async def _detail(settings: Settings, task_id: str) -> tuple[TaskDetail | str, datetime]:
    """The task, or why there is none to show; and the time by the database's clock (its ages'
    now)."""
    async with Store.open(settings.database_url, pool_size=1) as store:
        record = await store.get(task_id)
        now = store.clock.now()
        if record is None:
            return await _unknown(store, task_id), now
    return TaskDetail.from_record(record), now


def summary(task: TaskDetail, now: datetime) -> str:
    """The task as a person reads it: one field a line, the empty ones left out."""
    rows = list(_rows(task, now))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {one_line(value)}".rstrip() for label, value in rows)


def _rows(task: TaskDetail, now: datetime) -> Iterator[tuple[str, str]]:
    yield "task", task.task_id
    if task.name:
        yield "name", task.name
    yield "plan", f"{task.plan_id}  job {task.job_id}  hub {task.hub_name}"
    yield "mode", task.mode.value
    yield "state", task.state.value if task.result is None else f"completed, {task.result.value}"
    if task.reason:
        yield "reason", task.reason
    yield "attempts", str(task.attempts) + (f" ({task.retries} retried)" if task.retries else "")
    for label, at in (
        ("queued", task.queued_at),
        ("started", task.started_at),
        ("completed", task.completed_at),
        ("deadline", task.deadline),
        ("retry at", task.retry_at),
        ("next poll", task.next_poll_at),
    ):
        if at is not None:
            yield label, _when(at, now)
    if task.polls:
        yield "polls", str(task.polls)
    yield "request", _request(task.request)
    if task.response is not None:
        response = task.response
        yield (
            "response",
            f"{response.status_code} in {response.elapsed_ms} ms: " + _json(response.body),
        )
    for past in task.history:
        answer = "no response" if past.status_code is None else f"HTTP {past.status_code}"
        yield f"attempt {past.attempt}", f"{answer}: {past.reason}"
    if task.outputs:
        yield "outputs", _json(task.outputs)
    if task.variables:
        yield "variables", _json(task.variables)
    for event in task.events:
        result = "" if event.result is None else f" {event.result.value}"
        yield "received", f"{event.name}{result} {_when(event.at, now)}"


def _when(at: datetime, now: datetime) -> str:
    stamp = at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    seconds = (now - at).total_seconds()
    if seconds < 0:
        return f"{stamp} (in {duration(-seconds)})"
    return f"{stamp} ({duration(seconds)} ago)"


def _request(request: dict[str, JsonValue]) -> str:
    method = request.get("method") or "POST"
    if request.get("connection"):
        where = f"connection {request['connection']}{request.get('urlSuffix') or ''}"
    else:
        where = str(request.get("url") or "")
    return f"{method} {where}"


def _json(value: JsonValue) -> str:
    return shorten(orjson.dumps(value).decode(), SHOWN_CHARS)


# --- cancel -------------------------------------------------------------------------------------


def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_cancel(settings, _task_id(args.id)))


async def _cancel(settings: Settings, task_id: str) -> int:
    """As POST /tasks/{id}/cancel: the task completes `canceled` and its TaskCompleted event is
    published; a task already completed stays as it is."""
    async with (
        Store.open(settings.database_url, pool_size=1) as store,
        Broker(
            settings.amqp_url, Names(settings.prefix), connection_name="agentless cancel"
        ) as broker,
    ):
        record = await store.cancel(task_id)
        if record is None:
            existing = await store.get(task_id)
            if existing is None:
                print(await _unknown(store, task_id), file=sys.stderr)
            else:
                print(
                    f"agentless: task {task_id!r} already completed with result "
                    f"{existing.result}; nothing to cancel",
                    file=sys.stderr,
                )
            return EXIT_NOT_SUCCEEDED
        try:
            async with asyncio.timeout(ANNOUNCE_SECONDS):
                await publish_completion(
                    broker, record, reply_to=record.reply_to, correlation_id=record.correlation_id
                )
            await store.events_published([record.task_id])
        except TimeoutError:
            print(
                "agentless: RabbitMQ did not take the TaskCompleted event in time; a relay "
                "publishes it later",
                file=sys.stderr,
            )
    print(f"task {task_id} canceled")
    return EXIT_DONE


# --- logs ---------------------------------------------------------------------------------------


def cmd_logs(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_logs(settings, _task_id(args.id), follow=args.follow))


async def _logs(settings: Settings, task_id: str, *, follow: bool) -> int:
    """The lines the task's service posted, oldest first; with `follow`, new ones as they come,
    until the task completes (or SIGINT or SIGTERM)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    show = one_line if sys.stdout.isatty() else str
    async with Store.open(settings.database_url, pool_size=1) as store:
        shown = 0  # lines shown or dropped before they could be
        while True:
            record = await store.get(task_id)
            if record is None:
                print(await _unknown(store, task_id), file=sys.stderr)
                return EXIT_NOT_SUCCEEDED
            lines, dropped = await store.log_lines(task_id)
            total = dropped + len(lines)
            fresh = total - shown
            if fresh > len(lines):
                missed = fresh - len(lines)
                print(
                    f"agentless: {missed} older line(s) were dropped to keep the newest",
                    file=sys.stderr,
                )
                fresh = len(lines)
            for _, line in lines[len(lines) - fresh :]:
                print(show(line), flush=True)
            shown = total
            if not follow or record.state is State.COMPLETED:
                return EXIT_DONE
            try:
                await asyncio.wait_for(stop.wait(), FOLLOW_SECONDS)
            except TimeoutError:
                continue
            return EXIT_DONE
