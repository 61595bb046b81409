"""The `agentless` command (SPEC §8). Settings are built here, once; signals are handled here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import uuid
from pathlib import Path
from typing import NoReturn

import aio_pika
import orjson
from pydantic import JsonValue

from worker import __version__, logs
from worker.broker import BROKER_ERRORS, declare_topology
from worker.errors import ConfigError, InvalidTask
from worker.models import Names, Result, TaskEvent, TaskMessage, parse_task
from worker.service import running_worker
from worker.settings import Settings, load_settings, redact_url

log = logging.getLogger("agentless")

EXIT_NOT_SUCCEEDED = 1
EXIT_USAGE = 2
EXIT_WAIT_TIMEOUT = 3


def main(argv: list[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        _fail(str(exc))
    logs.configure(settings.effective_log_format, getattr(logging, args.log_level.upper()))
    try:
        code: int = args.command(settings, args)
    except ConfigError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentless",
        description="Agentless task worker: HTTP tasks from RabbitMQ, judged by JMESPath, "
        "state in PostgreSQL. Configured by AGENTLESS_* environment variables.",
    )
    parser.add_argument("--version", action="version", version=f"agentless {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=".env-style file of AGENTLESS_* settings; the environment wins over it",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    worker = commands.add_parser(
        "worker",
        help="consume and run tasks until SIGTERM",
        description="Consume the task "
        "queue and run tasks until SIGTERM or SIGINT; then finish in-flight tasks and exit 0.",
    )
    worker.set_defaults(command=cmd_worker)

    run = commands.add_parser(
        "run",
        help="a worker and the HTTP API in one process",
        description="Run a worker and the HTTP API (AGENTLESS_API_HOST:AGENTLESS_API_PORT) in "
        "one process: for a laptop and the quick start.",
    )
    run.set_defaults(command=cmd_run)

    api = commands.add_parser(
        "api",
        help="the HTTP API alone",
        description="Serve the callback API and the task API on "
        "AGENTLESS_API_HOST:AGENTLESS_API_PORT; any number may run against one broker and "
        "database.",
    )
    api.set_defaults(command=cmd_api)

    submit = commands.add_parser(
        "submit",
        help="queue a task; with --wait, print its result",
        description="Queue a task from a JSON file (SPEC §4) and/or flags; flags win over the "
        "file. With --wait, print the TaskCompleted event and exit 0 only if it succeeded.",
    )
    submit.add_argument("file", nargs="?", type=Path, help="task message JSON file, or - for stdin")
    submit.add_argument("--url", help="absolute http(s) URL to call")
    submit.add_argument("-X", "--method", help="HTTP method (default POST)")
    submit.add_argument(
        "-H", "--header", action="append", default=[], metavar="'NAME: VALUE'", help="repeatable"
    )
    body = submit.add_mutually_exclusive_group()
    body.add_argument("-d", "--body", help="request body, sent as text")
    body.add_argument("--json", dest="json_body", metavar="JSON", help="request body, as JSON")
    submit.add_argument("--connection", help="service connection name instead of --url")
    submit.add_argument("--url-suffix", help="appended to the connection's URL")
    submit.add_argument("--criteria", help="JMESPath success criterion")
    submit.add_argument(
        "--callback",
        action="store_true",
        help="wait for the external service's TaskCompleted (waitForCompletion: callback)",
    )
    submit.add_argument(
        "--timeout", type=int, metavar="SECONDS", help="timeoutSeconds of a callback task"
    )
    submit.add_argument("--task-id", help="default: a new UUID")
    submit.add_argument("--plan-id", help="default: a new UUID")
    submit.add_argument("--job-id")
    submit.add_argument("--hub", help="hubName (default build)")
    submit.add_argument("--name", help="display name")
    submit.add_argument(
        "--var", action="append", default=[], metavar="NAME=VALUE", help="variable, repeatable"
    )
    submit.add_argument("--wait", action="store_true", help="wait for the result and print it")
    submit.add_argument(
        "--wait-timeout", type=float, default=600, metavar="SECONDS", help="default 600"
    )
    submit.set_defaults(command=cmd_submit)
    return parser


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"agentless: {message}", file=sys.stderr)
    sys.exit(code)


def cmd_worker(settings: Settings, _: argparse.Namespace) -> int:
    return asyncio.run(_worker(settings))


async def _worker(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_worker(settings) as worker:
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({stopped, worker.consuming}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            stopped.cancel()
            log.error("the consume loop ended unexpectedly; exiting")
            return 1
        log.info("stop requested; finishing in-flight tasks")
    return 0


def cmd_run(settings: Settings, _: argparse.Namespace) -> int:
    return _serve(settings, worker=True)


def cmd_api(settings: Settings, _: argparse.Namespace) -> int:
    return _serve(settings, worker=False)


def _serve(settings: Settings, *, worker: bool) -> int:
    # Only `run` serves HTTP: the other commands need not load the API at all.
    from aiohttp import web  # noqa: PLC0415

    from callback_api.app import create_app, failed_key  # noqa: PLC0415

    app = create_app(settings, worker=worker)
    web.run_app(
        app,
        host=settings.api_host,
        port=settings.api_port,
        access_log=None,
        print=lambda text: log.info(text.strip().splitlines()[0]),
    )
    return 1 if app[failed_key] else 0


def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    try:
        task = parse_task(orjson.dumps(_task_from_args(args)))
    except InvalidTask as exc:
        _fail(str(exc))
    return asyncio.run(_submit(settings, task, wait=args.wait, wait_timeout=args.wait_timeout))


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
            _fail(f"--json is not JSON: {exc}")
    if args.header:
        headers = _object(request.get("headers"))
        headers.update(_pairs(args.header, ":", "--header", "'Name: value'"))
        request["headers"] = headers
    data["request"] = request
    data.update(_flags(args, _TASK_FLAGS))
    if args.callback:
        data["waitForCompletion"] = "callback"
    data.setdefault("taskId", str(uuid.uuid4()))
    data.setdefault("planId", str(uuid.uuid4()))
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
        _fail(f"{path} is not JSON: {exc}")
    if not isinstance(loaded, dict):
        _fail(f"{path} must hold a JSON object (a task message)")
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
            _fail(f"{flag} {item!r} is not of the form {form}")
        pairs[name.strip()] = value.strip()
    return pairs


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")


async def _submit(settings: Settings, task: TaskMessage, *, wait: bool, wait_timeout: float) -> int:
    names = Names(settings.prefix)
    try:
        connection = await aio_pika.connect(
            settings.amqp_url,
            client_properties={"connection_name": "agentless submit"},
            timeout=10,
        )
    except BROKER_ERRORS as exc:
        raise ConfigError(
            f"cannot reach RabbitMQ at {redact_url(settings.amqp_url)}: {exc}"
        ) from exc
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, names)
        reply_queue = None
        if wait:
            reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        body = task.model_dump_json(by_alias=True, exclude_none=True).encode()
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=task.task_id,
                correlation_id=task.task_id,
                reply_to=None if reply_queue is None else reply_queue.name,
            ),
            routing_key=names.tasks,
        )
        if reply_queue is None:
            print(orjson.dumps({"taskId": task.task_id, "planId": task.plan_id}).decode())
            return 0
        try:
            event = await asyncio.wait_for(_next_reply(reply_queue, task.task_id), wait_timeout)
        except TimeoutError:
            print(
                f"agentless: no result for task {task.task_id} within {wait_timeout:g} s; "
                "it stays queued or running",
                file=sys.stderr,
            )
            return EXIT_WAIT_TIMEOUT
    print(orjson.dumps(orjson.loads(event), option=orjson.OPT_INDENT_2).decode())
    result = TaskEvent.model_validate_json(event).result
    return 0 if result is Result.SUCCEEDED else EXIT_NOT_SUCCEEDED


async def _next_reply(queue: aio_pika.abc.AbstractQueue, task_id: str) -> bytes:
    async with queue.iterator() as replies:
        async for message in replies:
            await message.ack()
            if message.correlation_id == task_id:
                return message.body
    raise ConnectionError("the reply queue was closed")
