"""The `agentless` command (SPEC §8). Settings are built here, once; signals are handled here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from itertools import zip_longest
from pathlib import Path
from typing import NoReturn

import aio_pika
import orjson
from pydantic import JsonValue, TypeAdapter

from worker import __version__, dead, logs
from worker.broker import BROKER_ERRORS, Broker, declare_topology
from worker.errors import ConfigError, InvalidTask
from worker.models import Names, Result, State, TaskEvent, TaskMessage, parse_task
from worker.queries import ORDER_COLUMNS
from worker.service import running_worker
from worker.settings import Settings, load_settings, redact_url
from worker.store import Store
from worker.tables import Column, duration, render
from worker.views import Dashboard, TaskSummary, dashboard

log = logging.getLogger("agentless")

EXIT_NOT_SUCCEEDED = 1
EXIT_USAGE = 2
EXIT_WAIT_TIMEOUT = 3

# Most rows `tasks` and `dead list` print at once: past this, a table is no longer read.
MAX_LISTED = 1000


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
    _add_operations(commands)
    return parser


def _add_operations(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands that show and repair what the queue and the database hold."""
    status = commands.add_parser(
        "status",
        help="the queue, the task states and the live workers",
        description="Show what GET /queue shows: the task queue's ready messages and consumers, "
        "the dead letters, how many tasks are queued, running, waiting and completed; and the "
        "live workers.",
    )
    status.add_argument(
        "--json", action="store_true", help="print GET /queue's JSON instead of tables"
    )
    status.set_defaults(command=cmd_status)

    tasks = commands.add_parser(
        "tasks",
        help="list tasks, newest first",
        description="List tasks from the database, newest first unless --order or --asc say "
        "otherwise. Filters compare case-insensitively, as GET /tasks does.",
    )
    tasks.add_argument("--state", type=str.lower, choices=[s.value for s in State])
    tasks.add_argument("--result", type=_result_name, choices=[r.value for r in Result])
    tasks.add_argument("--plan-id", help="planId")
    tasks.add_argument("--hub", help="hubName")
    tasks.add_argument(
        "--limit", type=_whole(1, MAX_LISTED), default=20, metavar="N", help="default 20"
    )
    tasks.add_argument(
        "--order", choices=list(ORDER_COLUMNS), default="queuedAt", help="default queuedAt"
    )
    tasks.add_argument("--asc", action="store_true", help="ascending order (default descending)")
    tasks.add_argument(
        "--json", action="store_true", help="print the task summaries as a JSON array"
    )
    tasks.set_defaults(command=cmd_tasks)

    dead_letters = commands.add_parser(
        "dead",
        help="list or requeue dead letters",
        description="Messages that could not be processed wait in the dead-letter queue "
        "({prefix}.dead), each with its reason. List them, or move them back to the task "
        "queue once their cause is fixed or has passed.",
    )
    dead_commands = dead_letters.add_subparsers(title="commands", required=True, metavar="COMMAND")
    dead_list = dead_commands.add_parser(
        "list",
        help="show dead letters and their reasons; they stay in the queue",
        description="Show the dead letters, oldest first: message id, reason, and the start of "
        "the body. Every message stays in the queue, in its order; the queue is read whole, "
        "so a large one takes a while.",
    )
    dead_list.add_argument(
        "--limit", type=_whole(1, MAX_LISTED), default=100, metavar="N", help="default 100"
    )
    dead_list.add_argument("--json", action="store_true", help="print a JSON array")
    dead_list.set_defaults(command=cmd_dead_list)
    dead_requeue = dead_commands.add_parser(
        "requeue",
        help="move dead letters back to the task queue",
        description="Move the dead letters with these message ids (task ids), or all of them, "
        "back to the task queue with their original properties; the others stay. Exits 1 if "
        "an id matches no dead letter.",
    )
    dead_requeue.add_argument("ids", nargs="*", metavar="ID", help="message id (the taskId)")
    dead_requeue.add_argument("--all", action="store_true", help="every dead letter")
    dead_requeue.set_defaults(command=cmd_dead_requeue)


def _whole(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}")
        return value

    return parse


def _result_name(text: str) -> str:
    """The result spelled as the contract spells it, whatever the case typed."""
    return next((r.value for r in Result if r.value.lower() == text.lower()), text)


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


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    board = asyncio.run(_dashboard(settings))
    if args.json:
        _print_json(board.queue.model_dump(mode="json", by_alias=True))
    else:
        print(_status_tables(board, datetime.now(UTC)))
    return 0


async def _dashboard(settings: Settings) -> Dashboard:
    async with (
        Store.open(settings.database_url, pool_size=2) as store,
        _broker(settings, "status") as broker,
    ):
        return dashboard(await broker.queue_depths(), await store.overview())


def _status_tables(board: Dashboard, now: datetime) -> str:
    queue = board.queue
    oldest = queue.oldest_waiting_age_seconds
    broker_side = [
        ("ready", str(queue.ready)),
        ("unacknowledged", str(queue.unacknowledged)),
        ("consumers", str(queue.consumers)),
        ("dead letters", str(queue.dead_letters)),
    ]
    database_side = [
        ("queued", str(queue.queued)),
        ("running", str(queue.running)),
        ("waiting", str(queue.waiting)),
        ("completed", str(queue.completed)),
        ("oldest waiting", "-" if oldest is None else duration(oldest)),
        ("completed last minute", str(queue.completed_last_minute)),
    ]
    counts = render(
        [Column("QUEUE"), Column("", right=True), Column("TASKS"), Column("", right=True)],
        (
            (*left, *right)
            for left, right in zip_longest(broker_side, database_side, fillvalue=("", ""))
        ),
    )
    if not board.workers:
        return f"{counts}\n\nno live workers"
    workers = render(
        [
            Column("WORKER", right=True),
            Column("HOST"),
            Column("PID", right=True),
            Column("VERSION"),
            Column("IN FLIGHT", right=True),
            Column("STARTED", right=True),
            Column("LAST SEEN", right=True),
        ],
        (
            (
                str(w.worker_id),
                w.host,
                str(w.pid),
                w.version,
                str(w.in_flight),
                _ago(w.started_at, now),
                _ago(w.last_seen, now),
            )
            for w in board.workers
        ),
    )
    return f"{counts}\n\n{workers}"


def cmd_tasks(settings: Settings, args: argparse.Namespace) -> int:
    filters = {
        name: value
        for name, value in (
            ("state", args.state),
            ("result", args.result),
            ("planId", args.plan_id),
            ("hubName", args.hub),
        )
        if value is not None
    }
    summaries, total = asyncio.run(
        _tasks(settings, filters, args.order, descending=not args.asc, limit=args.limit)
    )
    if args.json:
        print(_SUMMARIES.dump_json(summaries, by_alias=True, indent=2).decode())
        return 0
    if not summaries:
        print("no tasks match", file=sys.stderr)
        return 0
    now = datetime.now(UTC)
    print(
        render(
            [
                Column("TASK ID"),
                Column("STATE"),
                Column("RESULT"),
                Column("ATTEMPTS", right=True),
                Column("AGE", right=True),
                Column("REASON", squeeze=True),
            ],
            (
                (
                    t.task_id,
                    t.state,
                    t.result or "-",
                    str(t.attempts),
                    duration((now - t.queued_at).total_seconds()),
                    t.reason or "",
                )
                for t in summaries
            ),
            width=_terminal_width(),
        )
    )
    if total > len(summaries):
        print(f"{len(summaries)} of {total} tasks shown; --limit shows more", file=sys.stderr)
    return 0


_SUMMARIES = TypeAdapter(list[TaskSummary])


async def _tasks(
    settings: Settings, filters: dict[str, str], order: str, *, descending: bool, limit: int
) -> tuple[list[TaskSummary], int]:
    async with Store.open(settings.database_url, pool_size=1) as store:
        rows, total = await store.list_tasks(
            filters, order, descending=descending, offset=0, limit=limit
        )
    return [TaskSummary.from_row(row) for row in rows], total


def cmd_dead_list(settings: Settings, args: argparse.Namespace) -> int:
    letters = asyncio.run(_dead_list(settings, args.limit))
    if args.json:
        print(_DEAD_LETTERS.dump_json(letters.shown, by_alias=True, indent=2).decode())
        return 0
    if not letters.shown:
        print(f"no dead letters in {Names(settings.prefix).dead}", file=sys.stderr)
        return 0
    print(_dead_table(letters.shown))
    if letters.total > len(letters.shown):
        print(
            f"{len(letters.shown)} of {letters.total} dead letters shown; --limit shows more",
            file=sys.stderr,
        )
    return 0


_DEAD_LETTERS = TypeAdapter(list[dead.DeadLetter])


async def _dead_list(settings: Settings, limit: int) -> dead.DeadLetters:
    async with _broker(settings, "dead list") as broker:
        return await dead.list_dead(broker, limit=limit)


def cmd_dead_requeue(settings: Settings, args: argparse.Namespace) -> int:
    if args.ids and args.all:
        _fail("give the message ids to requeue or --all, not both")
    if not args.ids and not args.all:
        _fail("give the message ids to requeue, or --all")
    requeued = asyncio.run(_dead_requeue(settings, None if args.all else args.ids))
    tasks_queue = Names(settings.prefix).tasks
    if requeued.moved:
        print(f"moved {len(requeued.moved)} dead letter(s) back to {tasks_queue}:")
        print(_dead_table(requeued.moved))
    elif not requeued.missing and requeued.refused is None:
        print("no dead letters to move", file=sys.stderr)
    if requeued.refused is not None:
        print(f"agentless: {requeued.refused}", file=sys.stderr)
        return 1
    if requeued.missing:
        print(
            f"agentless: no dead letter has the message id {', '.join(requeued.missing)}",
            file=sys.stderr,
        )
        return 1
    return 0


async def _dead_requeue(settings: Settings, ids: list[str] | None) -> dead.Requeued:
    async with _broker(settings, "dead requeue") as broker:
        return await dead.requeue(broker, ids)


def _dead_table(letters: list[dead.DeadLetter]) -> str:
    return render(
        [Column("MESSAGE ID"), Column("REASON", squeeze=True), Column("BODY", squeeze=True)],
        ((d.message_id or "-", d.reason, d.excerpt) for d in letters),
        width=_terminal_width(),
    )


@asynccontextmanager
async def _broker(settings: Settings, command: str) -> AsyncIterator[Broker]:
    """The project's broker connection, which declares the topology; a failure on the way is
    reported as the other commands report an unreachable broker."""
    names = Names(settings.prefix)
    async with Broker(settings.amqp_url, names, connection_name=f"agentless {command}") as broker:
        try:
            yield broker
        except BROKER_ERRORS as exc:
            why = str(exc) or type(exc).__name__
            raise ConfigError(f"RabbitMQ at {redact_url(settings.amqp_url)} failed: {why}") from exc


def _terminal_width() -> int | None:
    """The width to fit tables to on a terminal; piped output keeps whole lines for grep."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _ago(then: datetime, now: datetime) -> str:
    return f"{duration((now - then).total_seconds())} ago"


def _print_json(value: JsonValue) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
