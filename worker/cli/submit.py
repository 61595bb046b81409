"""`agentless submit`: a task from a file and flags, queued; with --wait, its result (and, on a
terminal, how it is doing meanwhile: progress.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from contextlib import suppress
from pathlib import Path

import aio_pika
import orjson
from pydantic import JsonValue

from worker.amqp import watch_blocking
from worker.cli.connect import broker_connection, group_size
from worker.cli.dead import reason_of
from worker.cli.events import EventFeed
from worker.cli.exits import EXIT_DONE, EXIT_NOT_SUCCEEDED, EXIT_WAIT_TIMEOUT
from worker.cli.progress import Progress
from worker.contract.errors import InvalidTask, Unavailable, UsageError
from worker.contract.models import REASON_HEADER, Names, Result, TaskEvent, TaskMessage, parse_task
from worker.contract.settings import Settings
from worker.topology import declare_topology_on

# How long the broker has to confirm the task's message. A broker whose resource alarm is in
# effect confirms nothing until the alarm clears, however long that takes.
CONFIRM_SECONDS = 10.0
# Closing a connection that the broker blocks is never answered.
CLOSE_SECONDS = 2.0


def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    try:
        task = parse_task(orjson.dumps(_task_from_args(args)))
    except InvalidTask as exc:
        raise UsageError(str(exc)) from exc
    return asyncio.run(queue_task(settings, task, wait=args.wait, wait_timeout=args.wait_timeout))


_REQUEST_FLAGS = (
    ("url", "url"),
    ("method", "method"),
    ("connection", "connection"),
    ("url_suffix", "urlSuffix"),
    ("body", "body"),
)
_TASK_FLAGS = (
    ("task_id", "taskId"),
    ("plan_id", "planId"),
    ("job_id", "jobId"),
    ("hub", "hubName"),
    ("name", "name"),
    ("criteria", "successCriteria"),
    ("criteria_syntax", "criteriaSyntax"),
    ("timeout", "timeoutSeconds"),
)


def _task_from_args(args: argparse.Namespace) -> dict[str, JsonValue]:
    """The task message: the file's, if one is given, with the flags written over it."""
    data = _task_file(args.file) if args.file is not None else {}
    request = _object(data.get("request"))
    request.update(_flags(args, _REQUEST_FLAGS))
    if args.json_body is not None:
        try:
            request["body"] = orjson.loads(args.json_body)
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"--json is not JSON: {exc}") from exc
    if args.header:
        headers = _object(request.get("headers"))
        headers.update(_pairs(args.header, ":", "--header", "'Name: value'"))
        request["headers"] = headers
    data["request"] = request
    data.update(_flags(args, _TASK_FLAGS))
    if args.callback:
        data["waitForCompletion"] = "callback"
    if args.poll:
        data["waitForCompletion"] = "poll"
    poll = _flags(
        args,
        (
            ("interval", "intervalSeconds"),
            ("max_polls", "maxAttempts"),
            ("failure_criteria", "failureCriteria"),
        ),
    )
    if args.ignore_failures:
        poll["ignoreFailures"] = True
    if args.poll_url is not None:
        poll["request"] = {"method": "GET", "url": args.poll_url}
    if poll:
        data["poll"] = {**_object(data.get("poll")), **poll}
    if args.output:
        outputs = _object(data.get("outputs"))
        outputs.update(_pairs(args.output, "=", "--output", "NAME=JMESPATH"))
        data["outputs"] = outputs
    retry = _flags(args, (("retry", "attempts"), ("retry_delay", "delaySeconds")))
    if retry:
        data["retry"] = {**_object(data.get("retry")), **retry}
    task_id = data.setdefault("taskId", str(uuid.uuid4()))
    # Not a new UUID: sent again under the same --task-id (after a --wait-timeout, say), the task
    # must be the same message, or the worker dead-letters it as a different task.
    data.setdefault("planId", task_id)
    if args.var:
        variables = _object(data.get("variables"))
        variables.update(_pairs(args.var, "=", "--var", "NAME=VALUE"))
        data["variables"] = variables
    return data


def _task_file(path: Path) -> dict[str, JsonValue]:
    raw = sys.stdin.buffer.read() if str(path) == "-" else _read(path)
    try:
        loaded = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise UsageError(f"{path} must hold a JSON object (a task message)")
    return loaded


def _object(value: JsonValue) -> dict[str, JsonValue]:
    return dict(value) if isinstance(value, dict) else {}


def _flags(args: argparse.Namespace, names: tuple[tuple[str, str], ...]) -> dict[str, JsonValue]:
    return {field: getattr(args, flag) for flag, field in names if getattr(args, flag) is not None}


def _pairs(items: list[str], separator: str, flag: str, form: str) -> dict[str, JsonValue]:
    pairs: dict[str, JsonValue] = {}
    for item in items:
        name, found, value = item.partition(separator)
        if not found or not name.strip():
            raise UsageError(f"{flag} {item!r} is not of the form {form}")
        pairs[name.strip()] = value.strip()
    return pairs


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc


async def queue_task(
    settings: Settings,
    task: TaskMessage,
    *,
    wait: bool,
    wait_timeout: float,
    body: bytes | None = None,
    receipt: str | None = None,
    command: str = "submit",
) -> int:
    """Publish the task (as `body`, the bytes its row was recorded from, when it has one) and
    print `receipt` (by default its taskId and planId); or, with `wait`, its TaskCompleted
    event. The exit code."""
    names = Names(settings.prefix)
    connection = await broker_connection(settings, command)
    blocked: list[str] = []
    watch_blocking(connection, blocked.append, blocked.clear)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology_on(connection, names, group_size(settings))
        reply_queue = None
        feed = None
        if wait:
            reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            if sys.stderr.isatty():
                # Bound before the task is published, so that none of its events is missed.
                feed = await EventFeed.bound(channel, names, task.hub_name)
        if body is None:
            body = task.model_dump_json(by_alias=True, exclude_none=True).encode()
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=task.task_id,
            correlation_id=task.task_id,
            reply_to=None if reply_queue is None else reply_queue.name,
        )
        try:
            await asyncio.wait_for(
                channel.default_exchange.publish(message, routing_key=names.tasks),
                CONFIRM_SECONDS,
            )
        except TimeoutError:
            raise Unavailable(_unconfirmed(task, blocked, command)) from None
        if reply_queue is None:
            if receipt is None:
                receipt = orjson.dumps({"taskId": task.task_id, "planId": task.plan_id}).decode()
            print(receipt)
            return EXIT_DONE
        showing = (
            None
            if feed is None
            else asyncio.create_task(Progress(task, sys.stderr).run(feed, settings))
        )
        try:
            event = await asyncio.wait_for(_next_reply(reply_queue, task.task_id), wait_timeout)
        except TimeoutError:
            event = None
        finally:
            if showing is not None:
                showing.cancel()
                await asyncio.gather(showing, return_exceptions=True)
    finally:
        with suppress(TimeoutError):
            await asyncio.wait_for(connection.close(), CLOSE_SECONDS)
    if event is None:
        print(
            f"agentless: no result for task {task.task_id} within {wait_timeout:g} s; "
            "it stays queued or running",
            file=sys.stderr,
        )
        return EXIT_WAIT_TIMEOUT
    print(orjson.dumps(orjson.loads(event), option=orjson.OPT_INDENT_2).decode())
    result = TaskEvent.model_validate_json(event).result
    return EXIT_DONE if result is Result.SUCCEEDED else EXIT_NOT_SUCCEEDED


# The flag that sends a task again under its id, by command.
_SAME_ID = {"submit": "--task-id", "execute": "--execution-id"}


def _unconfirmed(task: TaskMessage, blocked: list[str], command: str) -> str:
    """Why the task's message was not confirmed, and what to do: it may still be queued once the
    broker reads it, so sending it again (the same taskId) is the safe way to be sure."""
    if blocked:
        why = f"RabbitMQ is blocking publishes ({blocked[-1]}) until its resource alarm clears"
    else:
        why = f"RabbitMQ did not confirm the task within {CONFIRM_SECONDS:g} s"
    return (
        f"{why}; task {task.task_id} may not be queued: {command} it again later with the same "
        f"{_SAME_ID.get(command, 'id')} (it runs once however often it is sent)"
    )


async def _next_reply(queue: aio_pika.abc.AbstractQueue, task_id: str) -> bytes:
    """The task's TaskCompleted event; UsageError if the worker dead-lettered the task instead
    (it sends the dead-lettered message back, with the reason)."""
    async with queue.iterator() as replies:
        async for message in replies:
            await message.ack()
            if message.correlation_id != task_id:
                continue
            headers = message.headers or {}
            if REASON_HEADER in headers:
                raise UsageError(f"task {task_id} was dead-lettered: {reason_of(headers)}")
            return message.body
    raise ConnectionError("the reply queue was closed")
