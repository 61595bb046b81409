"""Throughput of the worker next to a bare baseline measured in the same run.

    python tests/benchmarks/throughput.py [--tasks 10000] [--delays 0,100] [--concurrency 256]
                                          [--json] [--worker-root DIR] [--replica MODE]

Run on demand, never by pytest. For each target delay, N apiResponse tasks are queued before the
consumer process starts; then (a) a bare aio-pika consume → aiohttp call → jmespath → publish with
confirms → ack loop, with no validation and no database, and (b) the real worker
(`python -m worker worker`) consume them, both on the same event loop (uvloop's where
installed). Both call the same local aiohttp target, which runs in a process of its own, as
does each contender, so that /proc tells their CPU and memory apart.

This file is also the target's and the baseline's program (`--role target|baseline`): one file to
read, and the baseline imports nothing of the worker's, so its memory and start-up stay bare.

With `--replica none|async|sync` the worker's store is a private PostgreSQL cluster made for the
run (tests/pg_replica.py) rather than the machine's: alone (none), or a primary with a streaming
replica, whose commits wait for the replica's flush (sync) or not (async); the worker reaches it
through the multi-host URL, as a deployment on a replicated PostgreSQL does. Comparing the three
gives the cost of synchronous replication.

It exits 1 when a target is missed or a run went wrong (then the contenders' logs are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import aio_pika
import aiohttp
import jmespath
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiohttp import web

SELF: Final = Path(__file__).resolve()
ROOT: Final = SELF.parents[2]
AMQP_URL: Final = os.environ.get("AGENTLESS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL: Final = os.environ.get(
    "AGENTLESS_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
CRITERIA: Final = "body.status == 'created'"
HUB: Final = "bench"
# Completions only, as an orchestrator that waits for results subscribes, and as the baseline
# publishes: the worker still publishes and confirms its TaskStarted events (the broker drops
# those nobody is bound to), but this process, which shares the machine, does not consume them.
EVENT_KEYS: Final = "task.completed.#"
# The target's count of calls by task (tasks made with `tag_calls`).
CALLS_PATH: Final = "/calls"
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")

# What the issue asks of the worker: its tasks/s as a share of the baseline's, by delay in ms.
RATIO_TARGETS: Final = {0: 0.50, 100: 0.90}
RSS_LIMIT_MB: Final = 150.0

# From spawning a contender to its first completion: interpreter start-up, imports, migrations.
START_TIMEOUT: Final = 60.0
# A contender that completes nothing for this long is stuck, not slow.
STALL_TIMEOUT: Final = 30.0
# The worker drains in-flight tasks on SIGTERM; with none left it exits within a few seconds.
STOP_TIMEOUT: Final = 40.0
PUBLISH_CHUNK: Final = 500

# Process names whose CPU is shown beside the contenders': the database and the broker.
SERVICES: Final = ("postgres", "beam.smp")
# Above this share of the host's CPU spent by unrelated processes, a run's figures are suspect.
DISTURBED_PERCENT: Final = 10.0


# --- /proc ---------------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of process `pid`, in clock ticks."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    # The command name may hold spaces and parentheses; the fields after its last ')' are fixed:
    # state is field 3, utime 14 and stime 15.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


def service_ticks() -> dict[str, dict[int, int]]:
    """CPU ticks of each PostgreSQL and RabbitMQ process on this host, by process name."""
    found: dict[str, dict[int, int]] = {name: {} for name in SERVICES}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        # A process may exit between listing /proc and reading it.
        with contextlib.suppress(OSError, ValueError, IndexError):
            name = (entry / "comm").read_text().strip()
            if name in found:
                found[name][int(entry.name)] = cpu_ticks(int(entry.name))
    return found


def host_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot: their ratio over an interval tells
    whether the whole host was saturated, in which case no delay can make a contender wait."""
    with Path("/proc/stat").open() as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal; guest time is already in user.
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def ticks_to_ms(ticks: int) -> float:
    return ticks * 1000 / CLOCK_TICKS


# --- the target: `--role target` -----------------------------------------------------------


async def serve_target() -> int:
    """Answer every request with {"status": "created"} after `?delay=` ms; print the port."""
    answer = orjson.dumps({"status": "created"})
    # Calls by `?task=` (tasks made with `tag_calls`), read at GET /calls: how often each task's
    # endpoint was invoked, whichever process invoked it.
    calls: dict[str, int] = {}

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        task = request.query.get("task")
        if task is not None:
            calls[task] = calls.get(task, 0) + 1
        delay = float(request.query.get("delay", "0"))
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        return web.Response(body=answer, content_type="application/json")

    async def counted(_: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(calls), content_type="application/json")

    app = web.Application()
    app.router.add_get(CALLS_PATH, counted)
    app.router.add_route("*", "/{tail:.*}", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    # A contender opens `concurrency` connections at once; the default backlog of 128 would drop
    # the excess SYNs, and each dropped one costs a full second's retransmit.
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    print(sock.getsockname()[1], flush=True)
    # Nobody reads the pipe after the port: nothing more may be written to it.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    await until_signalled()
    await runner.cleanup()
    return 0


async def until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# --- the baseline: `--role baseline` -------------------------------------------------------


def is_truthy(value: object) -> bool:
    """JMESPath's truth, in which 0 is true and empty strings, lists and objects are false."""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | dict):
        return bool(value)
    return True


def json_or_text(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")


async def run_baseline(amqp_url: str, queue_name: str, exchange_name: str, concurrency: int) -> int:
    """What any consumer of these tasks must do at the least, until SIGTERM."""
    expression = jmespath.compile(CRITERIA)
    json_headers = {"Content-Type": "application/json"}
    connection = await aio_pika.connect(
        amqp_url,
        timeout=10,
        client_properties={"connection_name": "agentless throughput baseline"},
    )
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with connection, aiohttp.ClientSession(connector=connector) as session:
        publisher = await connection.channel(publisher_confirms=True)
        events = await publisher.get_exchange(exchange_name, ensure=False)
        consumer = await connection.channel()
        await consumer.set_qos(prefetch_count=concurrency)
        queue = await consumer.get_queue(queue_name, ensure=False)

        async def handle(message: AbstractIncomingMessage) -> None:
            task: dict[str, Any] = orjson.loads(message.body)
            request: dict[str, Any] = task["request"]
            payload = request.get("body")
            succeeded = False
            try:
                async with session.request(
                    request.get("method", "POST"),
                    request["url"],
                    data=None if payload is None else orjson.dumps(payload),
                    headers=None if payload is None else json_headers,
                ) as response:
                    raw = await response.read()
                document = {
                    "statusCode": response.status,
                    "headers": {k.lower(): v for k, v in response.headers.items()},
                    "body": json_or_text(raw),
                }
                succeeded = 200 <= response.status < 300 and is_truthy(expression.search(document))
            except aiohttp.ClientError:
                # Reported as a failed task, which the benchmark counts against the run.
                succeeded = False
            event = {
                "name": "TaskCompleted",
                "eventId": f"{task['taskId']}:completed",
                "taskId": task["taskId"],
                "result": "succeeded" if succeeded else "failed",
            }
            await events.publish(
                aio_pika.Message(
                    orjson.dumps(event),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=event["eventId"],
                ),
                routing_key=f"task.completed.{task.get('hubName', 'build')}",
            )
            await message.ack()

        tag = await queue.consume(handle)
        await until_signalled()
        await queue.cancel(tag)
    return 0


# --- measuring -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float
    cpu_ticks: int
    services: dict[str, dict[int, int]]
    host: tuple[int, int]
    # The benchmark's own processes (this one and the target): not "other" load.
    own_ticks: int


def take_snapshot(pid: int, target_pid: int) -> Snapshot:
    return Snapshot(
        time.monotonic(),
        cpu_ticks(pid),
        service_ticks(),
        host_ticks(),
        cpu_ticks(os.getpid()) + cpu_ticks(target_pid),
    )


def service_delta(first: Snapshot, last: Snapshot, name: str) -> int:
    # A process that started within the interval counts whole, one that ended is lost: a few ms
    # either way, as the only ones that come and go are the worker's pool connections.
    before, after = first.services[name], last.services[name]
    return sum(ticks - before.get(pid, 0) for pid, ticks in after.items())


class Completions:
    """Completion events of one run, as they arrive on the contender's events exchange; the
    contender's /proc readings at the first and the last."""

    def __init__(self, expected: int, target_pid: int) -> None:
        self.expected = expected
        self.target_pid = target_pid
        self.pid = 0
        self.seen: set[str] = set()
        self.failed = 0
        self.duplicates = 0
        self.first: Snapshot | None = None
        self.last: Snapshot | None = None
        self._progressed = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        event: dict[str, Any] = orjson.loads(message.body)
        if event.get("name") != "TaskCompleted":
            return
        task_id = str(event["taskId"])
        if task_id in self.seen:
            # Delivery is at least once: a repeat is legal, but not a completion.
            self.duplicates += 1
            return
        self.seen.add(task_id)
        if event.get("result") != "succeeded":
            self.failed += 1
        if len(self.seen) == 1:
            self.first = take_snapshot(self.pid, self.target_pid)
        if len(self.seen) == self.expected:
            self.last = take_snapshot(self.pid, self.target_pid)
        self._progressed.set()

    async def wait(self, process: asyncio.subprocess.Process) -> str | None:
        """Wait until all tasks completed; otherwise, why not."""
        deadline = time.monotonic() + START_TIMEOUT + self.expected / 50
        exited = asyncio.ensure_future(process.wait())
        try:
            while self.last is None:
                self._progressed.clear()
                limit = STALL_TIMEOUT if self.seen else START_TIMEOUT
                limit = min(limit, deadline - time.monotonic())
                progressed = asyncio.ensure_future(self._progressed.wait())
                done, _ = await asyncio.wait(
                    {progressed, exited},
                    timeout=max(limit, 0.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                progressed.cancel()
                count = f"{len(self.seen)} of {self.expected} completed"
                if exited in done:
                    return f"exited early with code {process.returncode}; {count}"
                if not done:
                    return f"gave up after {limit:.0f} s without a completion; {count}"
            return None
        finally:
            exited.cancel()


@dataclass(frozen=True, slots=True)
class Task:
    task_id: str
    body: bytes


@dataclass
class Run:
    """One contender's figures at one delay."""

    contender: str
    delay_ms: int
    tasks: int
    completed: int = 0
    failed: int = 0
    duplicates: int = 0
    seconds: float | None = None
    tasks_per_s: float | None = None
    cpu_ms_per_task: float | None = None
    peak_rss_mb: float | None = None
    postgres_cpu_ms_per_task: float | None = None
    rabbitmq_cpu_ms_per_task: float | None = None
    host_busy_percent: float | None = None
    other_busy_percent: float | None = None
    startup_s: float | None = None
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems and self.tasks_per_s is not None

    def record(self, completions: Completions, spawned_at: float) -> None:
        self.completed = len(completions.seen)
        self.failed = completions.failed
        self.duplicates = completions.duplicates
        if completions.failed:
            self.problems.append(f"{completions.failed} tasks did not succeed")
        first, last = completions.first, completions.last
        if first is None or last is None:
            return
        intervals = self.tasks - 1
        self.startup_s = first.at - spawned_at
        self.seconds = last.at - first.at
        self.tasks_per_s = intervals / self.seconds if self.seconds > 0 else None
        self.cpu_ms_per_task = ticks_to_ms(last.cpu_ticks - first.cpu_ticks) / intervals
        postgres = service_delta(first, last, "postgres")
        rabbitmq = service_delta(first, last, "beam.smp")
        self.postgres_cpu_ms_per_task = ticks_to_ms(postgres) / intervals
        self.rabbitmq_cpu_ms_per_task = ticks_to_ms(rabbitmq) / intervals
        busy, total = (b - a for a, b in zip(first.host, last.host, strict=True))
        if total:
            ours = last.cpu_ticks - first.cpu_ticks + postgres + rabbitmq
            ours += last.own_ticks - first.own_ticks
            self.host_busy_percent = 100 * busy / total
            self.other_busy_percent = max(0.0, 100 * (busy - ours) / total)


def task_messages(
    run_id: str, target_url: str, delay_ms: int, count: int, *, tag_calls: bool = False
) -> list[Task]:
    """SPEC §4 apiResponse tasks against the target; with `tag_calls`, each call names its task,
    for the target to count (GET /calls)."""
    tasks: list[Task] = []
    for number in range(count):
        task_id = f"{run_id}-{number}"
        tag = f"&task={task_id}" if tag_calls else ""
        message = {
            "taskId": task_id,
            "planId": f"plan-{run_id}",
            "hubName": HUB,
            "name": "throughput benchmark",
            "request": {
                "method": "POST",
                "url": f"{target_url}/hook?delay={delay_ms}{tag}",
                "body": {"commit": f"{number:08x}"},
            },
            "waitForCompletion": "apiResponse",
            "successCriteria": CRITERIA,
        }
        tasks.append(Task(task_id, orjson.dumps(message)))
    return tasks


async def prepublish(connection: AbstractConnection, queue: str, tasks: list[Task]) -> None:
    """Queue every task, confirmed, so that the contender finds them all waiting."""
    async with asyncio.timeout(60 + len(tasks) / 100):
        channel = await connection.channel(publisher_confirms=True)
        try:
            for start in range(0, len(tasks), PUBLISH_CHUNK):
                await asyncio.gather(
                    *(
                        channel.default_exchange.publish(
                            aio_pika.Message(
                                task.body,
                                content_type="application/json",
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                message_id=task.task_id,
                            ),
                            routing_key=queue,
                        )
                        for task in tasks[start : start + PUBLISH_CHUNK]
                    )
                )
        finally:
            await channel.close()


def child_environment(**settings: str) -> dict[str, str]:
    """This environment without any AGENTLESS_* setting or proxy, plus `settings`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AGENTLESS_") and not k.lower().endswith("_proxy")
    }
    env.update(settings)
    return env


async def stop(process: asyncio.subprocess.Process) -> int | None:
    """SIGTERM, then the exit code; None if it had to be killed."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_TIMEOUT):
            return await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
        return None


async def measure(
    connection: AbstractConnection,
    run: Run,
    *,
    queue: str,
    exchange: str,
    tasks: list[Task],
    command: Sequence[str],
    env: dict[str, str],
    log: Path,
    target_pid: int,
    cwd: Path = ROOT,
) -> None:
    """Queue `tasks`, start `command`, time its completions, then stop it with SIGTERM."""
    channel = await connection.channel()
    try:
        observed = await channel.declare_queue(exclusive=True, auto_delete=True)
        await observed.bind(exchange, EVENT_KEYS)
        completions = Completions(len(tasks), target_pid)
        await observed.consume(completions.on_message, no_ack=True)
        await prepublish(connection, queue, tasks)
        with log.open("ab") as sink:
            spawned_at = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )
        completions.pid = process.pid
        try:
            problem = await completions.wait(process)
            if problem is not None:
                run.problems.append(problem)
            if process.returncode is None:
                run.peak_rss_mb = peak_rss_mb(process.pid)
        finally:
            run.exit_code = await stop(process)
        if run.exit_code != 0:
            run.problems.append(f"exit code after SIGTERM was {run.exit_code}, not 0")
        run.record(completions, spawned_at)
    finally:
        await channel.close()


async def delete_broker_objects(
    connection: AbstractConnection, queues: Sequence[str], exchanges: Sequence[str]
) -> None:
    # A fresh channel: the run's own may have been closed by a broker error.
    channel = await connection.channel()
    try:
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
    finally:
        await channel.close()


@dataclass(frozen=True, slots=True)
class Context:
    connection: AbstractConnection
    target_url: str
    target_pid: int
    tasks: int
    concurrency: int
    logs: Path
    worker_root: Path
    database_url: str


async def declare_baseline_objects(
    connection: AbstractConnection, queue: str, exchange: str
) -> None:
    """The baseline's task queue and events exchange, of the kinds the worker's topology has."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    finally:
        await channel.close()


def baseline_command(queue: str, exchange: str, concurrency: int) -> list[str]:
    """The bare baseline's process, consuming `queue` and publishing to `exchange`."""
    return [
        sys.executable,
        str(SELF),
        "--role=baseline",
        f"--queue={queue}",
        f"--exchange={exchange}",
        f"--concurrency={concurrency}",
    ]


# The worker's process, started in the measured checkout (`cwd`).
WORKER_COMMAND: Final = (sys.executable, "-m", "worker", "worker")


def worker_environment(
    database_url: str, schema: str, prefix: str, concurrency: int
) -> dict[str, str]:
    """A measured worker's settings: its own names and database schema, JSON logs (read for
    warnings afterwards), a probe port of its own."""
    joiner = "&" if "?" in database_url else "?"
    return child_environment(
        AGENTLESS_AMQP_URL=AMQP_URL,
        AGENTLESS_DATABASE_URL=f"{database_url}{joiner}search_path={schema}",
        AGENTLESS_PREFIX=prefix,
        AGENTLESS_CONCURRENCY=str(concurrency),
        AGENTLESS_WORKER_PORT="0",
        AGENTLESS_LOG_FORMAT="json",
    )


@dataclass(frozen=True, slots=True)
class Contender:
    """A contender's broker objects, made for one run, and how to start its process."""

    queue: str
    exchange: str
    # Further queues to delete after the run (the worker's dead letters).
    others: tuple[str, ...]
    command: tuple[str, ...]
    env: dict[str, str]
    cwd: Path

    async def delete(self, connection: AbstractConnection) -> None:
        await delete_broker_objects(connection, [self.queue, *self.others], [self.exchange])


async def declare_contender(
    connection: AbstractConnection,
    run_id: str,
    *,
    worker: bool,
    concurrency: int,
    database_url: str = "",
    schema: str = "",
    worker_root: Path = ROOT,
) -> Contender:
    """The queue and events exchange of a worker (its topology, its database `schema`) or of the
    baseline, named after `run_id`."""
    if not worker:
        queue, exchange = f"agentless-bench.{run_id}.tasks", f"agentless-bench.{run_id}.events"
        await declare_baseline_objects(connection, queue, exchange)
        env = child_environment(AGENTLESS_AMQP_URL=AMQP_URL)
        command = baseline_command(queue, exchange, concurrency)
        return Contender(queue, exchange, (), tuple(command), env, ROOT)
    # Imported here: the baseline and target roles run this file too and must stay bare.
    from worker.contract.models import Names  # noqa: PLC0415
    from worker.topology import declare_topology  # noqa: PLC0415

    names = Names(f"agentless-bench.{run_id}")
    channel = await connection.channel()
    try:
        await declare_topology(channel, names)
    finally:
        await channel.close()
    env = worker_environment(database_url, schema, names.prefix, concurrency)
    return Contender(names.tasks, names.events, (names.dead,), WORKER_COMMAND, env, worker_root)


async def until_progress_stops(
    progressed: asyncio.Event,
    finished: Callable[[], bool],
    processes: Sequence[asyncio.subprocess.Process],
    count: Callable[[], str],
) -> str | None:
    """Wait until `finished()`, `progressed` being set at each completion; otherwise why not:
    a process exited, or nothing completed for STALL_TIMEOUT."""
    exits = {asyncio.ensure_future(process.wait()) for process in processes}
    try:
        while not finished():
            progressed.clear()
            progress = asyncio.ensure_future(progressed.wait())
            done, _ = await asyncio.wait(
                {progress, *exits}, timeout=STALL_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            progress.cancel()
            if done & exits:
                codes = ", ".join(str(p.returncode) for p in processes if p.returncode is not None)
                return f"exited early with code {codes}; {count()}"
            if not done:
                return f"nothing completed for {STALL_TIMEOUT:.0f} s; {count()}"
        return None
    finally:
        for exited in exits:
            exited.cancel()


def add_worker_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--worker-root",
        type=Path,
        default=ROOT,
        metavar="DIR",
        help="the checkout whose worker to measure, e.g. a commit exported with `git archive` "
        "(default: this one)",
    )


def checked_worker_root(parser: argparse.ArgumentParser, worker_root: Path) -> Path:
    """`--worker-root` resolved, on a host with /proc; put first on sys.path, as the topology
    is declared by the measured worker's own code."""
    if not Path("/proc/self/stat").exists():
        parser.error("this benchmark reads CPU and memory from /proc: it runs on Linux only")
    resolved = worker_root.resolve()
    if not (resolved / "worker" / "__main__.py").is_file():
        parser.error(f"--worker-root: {resolved} holds no worker package")
    sys.path.insert(0, str(resolved))
    return resolved


async def measure_baseline(context: Context, delay_ms: int) -> Run:
    run_id = f"b{uuid.uuid4().hex[:10]}"
    queue, exchange = f"agentless-bench.{run_id}.tasks", f"agentless-bench.{run_id}.events"
    run = Run("baseline", delay_ms, context.tasks)
    await declare_baseline_objects(context.connection, queue, exchange)
    try:
        await measure(
            context.connection,
            run,
            queue=queue,
            exchange=exchange,
            tasks=task_messages(run_id, context.target_url, delay_ms, context.tasks),
            command=baseline_command(queue, exchange, context.concurrency),
            env=child_environment(AGENTLESS_AMQP_URL=AMQP_URL),
            log=context.logs / f"baseline-{delay_ms}ms.log",
            target_pid=context.target_pid,
        )
    finally:
        await delete_broker_objects(context.connection, [queue], [exchange])
    return run


async def measure_worker(context: Context, delay_ms: int) -> Run:
    # Imported here: the baseline and target roles run this file too and must stay bare.
    from worker.contract.models import Names  # noqa: PLC0415
    from worker.topology import declare_topology  # noqa: PLC0415

    run_id = f"w{uuid.uuid4().hex[:10]}"
    names = Names(f"agentless-bench.{run_id}")
    schema = f"bench_{run_id}"
    run = Run("worker", delay_ms, context.tasks)
    log = context.logs / f"worker-{delay_ms}ms.log"
    channel = await context.connection.channel()
    try:
        await declare_topology(channel, names)
    finally:
        await channel.close()
    env = worker_environment(context.database_url, schema, names.prefix, context.concurrency)
    try:
        await measure(
            context.connection,
            run,
            queue=names.tasks,
            exchange=names.events,
            tasks=task_messages(run_id, context.target_url, delay_ms, context.tasks),
            command=WORKER_COMMAND,
            env=env,
            log=log,
            target_pid=context.target_pid,
            cwd=context.worker_root,
        )
        dead = await dead_letters(context.connection, names.dead)
        if dead:
            run.problems.append(f"{dead} messages dead-lettered")
        run.problems.extend(log_problems(log))
    finally:
        await delete_broker_objects(context.connection, [names.tasks, names.dead], [names.events])
        run.problems.extend(
            await check_and_drop_schema(context.database_url, schema, context.tasks)
        )
    return run


async def dead_letters(connection: AbstractConnection, queue: str) -> int:
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await channel.close()


def log_problems(log: Path) -> list[str]:
    """The worker's warnings and errors: a run that had any measured something else."""
    levels: dict[str, int] = {}
    for line in log.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
            level = orjson.loads(line).get("level")
            if level in ("warning", "error", "critical"):
                levels[level] = levels.get(level, 0) + 1
    return [f"worker logged {count} {level} lines (see {log})" for level, count in levels.items()]


async def check_and_drop_schema(database_url: str, schema: str, tasks: int) -> list[str]:
    """What the database says of the run, once the schema is dropped."""
    import asyncpg  # noqa: PLC0415 - kept out of the baseline's process, as the worker's modules

    problems: list[str] = []
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        with contextlib.suppress(asyncpg.UndefinedTableError):
            succeeded = await conn.fetchval(
                f'SELECT count(*) FROM "{schema}".tasks '
                "WHERE state = 'completed' AND result = 'succeeded'"
            )
            if succeeded != tasks:
                problems.append(f"the database records {succeeded} succeeded tasks, not {tasks}")
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    return problems


# --- the benchmark: `--role bench` (the default) -------------------------------------------


async def start_target(logs: Path) -> tuple[asyncio.subprocess.Process, str]:
    with (logs / "target.log").open("ab") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SELF),
            "--role=target",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=sink,
        )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        port = int(line)
    except (TimeoutError, ValueError):
        await stop(process)
        raise RuntimeError(f"the target did not start; see {logs / 'target.log'}") from None
    return process, f"http://127.0.0.1:{port}"


@dataclass(frozen=True, slots=True)
class Verdict:
    delay_ms: int
    what: str
    value: str
    target: str
    passed: bool


def verdicts(runs: list[Run]) -> list[Verdict]:
    found: list[Verdict] = []
    for delay in sorted({run.delay_ms for run in runs}):
        at = {run.contender: run for run in runs if run.delay_ms == delay}
        baseline, worker = at["baseline"], at["worker"]
        share = RATIO_TARGETS.get(delay)
        if share is not None:
            ratio = shown = None
            if worker.valid and baseline.valid and worker.tasks_per_s and baseline.tasks_per_s:
                ratio = worker.tasks_per_s / baseline.tasks_per_s
                # Rounded down: a share shown as 50.0% must not be one that fails a 50% target.
                shown = f"{math.floor(ratio * 1000) / 10:.1f}%"
            found.append(
                Verdict(
                    delay,
                    "worker/baseline tasks/s",
                    shown or "invalid run",
                    f">= {share:.0%}",
                    ratio is not None and ratio >= share,
                )
            )
        rss = worker.peak_rss_mb
        found.append(
            Verdict(
                delay,
                "worker peak RSS",
                "unknown" if rss is None else f"{rss:.1f} MB",
                f"< {RSS_LIMIT_MB:g} MB",
                rss is not None and rss < RSS_LIMIT_MB,
            )
        )
    return found


def number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(runs: list[Run], found: list[Verdict], tasks: int, concurrency: int) -> str:
    cpus = len(os.sched_getaffinity(0))
    lines = [
        f"agentless throughput: {tasks} apiResponse tasks per run, concurrency {concurrency}, "
        f"{cpus} CPUs, Python {sys.version.split()[0]}",
        "tasks/s: (N-1) / time from the 1st to the Nth completion event seen on the contender's",
        "  events exchange; all N tasks are queued before the contender starts, and its start-up",
        "  is not timed. CPU ms/task: the contender process's utime+stime over that interval,",
        "  / (N-1); PostgreSQL and RabbitMQ: all their processes on this host, same interval.",
        "  Peak RSS: the contender's VmHWM after its Nth completion. Host busy: all CPUs, same",
        "  interval; near 100% the host is saturated and the target delay cannot be what limits.",
        "  Other: the part of that busy time not spent by the contender, the target, PostgreSQL,",
        "  RabbitMQ or this benchmark (other processes, interrupts); much above 0 = disturbed.",
        "",
        f"{'delay':>6}  {'contender':<9}  {'tasks/s':>8}  {'CPU ms/task':>11}  "
        f"{'peak RSS MB':>11}  {'PostgreSQL CPU ms/task':>22}  {'RabbitMQ CPU ms/task':>20}  "
        f"{'host busy %':>11}  {'other %':>7}",
    ]
    lines.extend(
        f"{run.delay_ms:>4}ms  {run.contender:<9}  {number(run.tasks_per_s, 1):>8}  "
        f"{number(run.cpu_ms_per_task, 3):>11}  {number(run.peak_rss_mb, 1):>11}  "
        f"{number(run.postgres_cpu_ms_per_task, 3):>22}  "
        f"{number(run.rabbitmq_cpu_ms_per_task, 3):>20}  "
        f"{number(run.host_busy_percent, 0):>11}  {number(run.other_busy_percent, 0):>7}"
        for run in runs
    )
    lines += ["", f"{'delay':>6}  {'target':<24}  {'measured':>11}  {'wanted':>9}  verdict"]
    lines += [
        f"{v.delay_ms:>4}ms  {v.what:<24}  {v.value:>11}  {v.target:>9}  "
        f"{'PASS' if v.passed else 'FAIL'}"
        for v in found
    ]
    for run in runs:
        lines += [f"problem: {run.delay_ms} ms {run.contender}: {p}" for p in run.problems]
    disturbed = [
        f"{run.delay_ms} ms {run.contender}"
        for run in runs
        if run.other_busy_percent is not None and run.other_busy_percent > DISTURBED_PERCENT
    ]
    if disturbed:
        lines.append(
            f"note: other processes took over {DISTURBED_PERCENT:g}% of the host's CPU during "
            f"{', '.join(disturbed)}; run again on a quiet host for figures to compare."
        )
    return "\n".join(lines)


async def bench(
    tasks: int,
    delays: list[int],
    concurrency: int,
    logs: Path,
    worker_root: Path,
    database_url: str,
) -> list[Run]:
    """Each delay's baseline run, then its worker run, in that order."""
    runs: list[Run] = []
    target, target_url = await start_target(logs)
    try:
        connection = await aio_pika.connect(
            AMQP_URL,
            timeout=10,
            client_properties={"connection_name": "agentless throughput benchmark"},
        )
        async with connection:
            context = Context(
                connection,
                target_url,
                target.pid,
                tasks,
                concurrency,
                logs,
                worker_root,
                database_url,
            )
            for delay in delays:
                for measure_one in (measure_baseline, measure_worker):
                    run = await measure_one(context, delay)
                    runs.append(run)
                    # Progress, on stderr so that stdout holds only the results.
                    print(
                        f"{delay} ms {run.contender}: {number(run.tasks_per_s, 1)} tasks/s",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        await stop(target)
    return runs


# What --replica makes the worker's store, as the report names it.
STORES: Final = {
    None: "the machine's PostgreSQL",
    "none": "a private PostgreSQL cluster without a replica",
    "async": "a private PostgreSQL primary with an asynchronous streaming replica",
    "sync": "a private PostgreSQL primary with a synchronous streaming replica",
}


@contextlib.contextmanager
def store_url(replica: str | None) -> Iterator[str]:
    """The database URL the worker's runs use: the machine's (no --replica), else that of a
    private cluster made for the run, and dropped after it."""
    if replica is None:
        yield DATABASE_URL
        return
    # This checkout's test support, whichever checkout's worker is measured.
    sys.path.insert(0, str(ROOT))
    from tests.pg_cluster import PgCluster  # noqa: PLC0415
    from tests.pg_replica import ReplicatedPg  # noqa: PLC0415

    sys.path.remove(str(ROOT))
    name = f"agentless_bench_{uuid.uuid4().hex[:8]}"
    began = time.monotonic()
    if replica == "none":
        alone = PgCluster.create(name, free_port())
        drop, url = alone.drop, alone.url
    else:
        pair = ReplicatedPg.create(name, (free_port(), free_port()))
        drop, url = pair.drop, pair.url
        try:
            pair.set_replication("sync" if replica == "sync" else "async")
        except BaseException:
            drop()
            raise
    print(f"{STORES[replica]} made in {time.monotonic() - began:.1f} s", file=sys.stderr)
    try:
        yield url
    finally:
        drop()


COMMITS: Final = 500


async def commit_latency(database_url: str) -> tuple[float, float]:
    """Median and 99th percentile of a single-row insert's commit, one after the other, in ms:
    what a synchronous replica adds to each of the worker's commits (its claims, its results)."""
    import asyncpg  # noqa: PLC0415 - kept out of the baseline's process, as the worker's modules

    schema = f"bench_commits_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"; CREATE TABLE "{schema}".t (i int)')
        took = []
        for i in range(COMMITS):
            began = time.perf_counter()
            await conn.execute(f'INSERT INTO "{schema}".t VALUES ($1)', i)
            took.append((time.perf_counter() - began) * 1000)
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    took.sort()
    return took[len(took) // 2], took[len(took) * 99 // 100]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_benchmark(
    tasks: int,
    delays: list[int],
    concurrency: int,
    as_json: bool,
    worker_root: Path,
    replica: str | None = None,
) -> int:
    logs = Path(tempfile.mkdtemp(prefix="agentless-throughput-"))
    with store_url(replica) as database_url:
        # Run as a script, Python puts this file's directory on sys.path, not the repository
        # root; and the topology is declared by the measured worker's own code.
        sys.path.insert(0, str(worker_root))
        runs = asyncio.run(bench(tasks, delays, concurrency, logs, worker_root, database_url))
        commits = asyncio.run(commit_latency(database_url))
    found = verdicts(runs)
    print(
        f"worker's store: {STORES[replica]}; one commit at a time takes {commits[0]:.2f} ms "
        f"(median), {commits[1]:.2f} ms (99th percentile) over {COMMITS} single-row inserts"
    )
    print(report(runs, found, tasks, concurrency))
    if as_json:
        results = {
            "tasks": tasks,
            "concurrency": concurrency,
            "replica": replica,
            "commit_ms": {"median": commits[0], "p99": commits[1]},
            "runs": [asdict(run) for run in runs],
            "verdicts": [asdict(v) for v in found],
        }
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    passed = all(v.passed for v in found) and all(run.valid for run in runs)
    if passed:
        shutil.rmtree(logs)
    else:
        # The contenders' logs say why a run failed.
        print(f"logs kept in {logs}", file=sys.stderr)
    return 0 if passed else 1


def delays_ms(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of milliseconds") from None
    if not values or any(value < 0 for value in values):
        raise argparse.ArgumentTypeError("a comma-separated list of milliseconds, each >= 0")
    return values


def integers(what: str, lowest: int, highest: int | None = None) -> Callable[[str], list[int]]:
    """An argument type: a comma-separated list of `what`, each from `lowest` to `highest`."""
    bounds = f"each >= {lowest}" if highest is None else f"each in {lowest}..{highest}"

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"a comma-separated list of {what}") from None
        if not values or any(v < lowest or (highest is not None and v > highest) for v in values):
            raise argparse.ArgumentTypeError(f"a comma-separated list of {what}, {bounds}")
        return values

    return parse


def at_least(lowest: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < lowest:
            raise argparse.ArgumentTypeError(f"at least {lowest}")
        return value

    return parse


def event_loop() -> asyncio.AbstractEventLoop:
    """The baseline's loop: the one the worker runs on (worker/runtime.py), uvloop's where it is
    installed, so that the ratio compares the code rather than the event loops. Written here, as
    the baseline imports nothing of the worker's."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Tasks/s, CPU per task and peak RSS of the worker and of a bare baseline."
    )
    # Two at least: the rate is timed between the first completion and the last.
    parser.add_argument("--tasks", type=at_least(2), default=10_000, help="per run (default 10000)")
    parser.add_argument(
        "--delays", type=delays_ms, default=[0, 100], help="target delays in ms (default 0,100)"
    )
    parser.add_argument("--concurrency", type=at_least(1), default=256, help="default 256")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    add_worker_root(parser)
    parser.add_argument(
        "--replica",
        choices=["none", "async", "sync"],
        help="run the worker's store on a private PostgreSQL cluster made for the run: alone "
        "(none), or with a streaming replica, asynchronous or synchronous (default: the "
        "machine's PostgreSQL, AGENTLESS_DATABASE_URL)",
    )
    parser.add_argument(
        "--role", choices=["bench", "target", "baseline"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--exchange", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "target":
        return asyncio.run(serve_target())
    if args.role == "baseline":
        with asyncio.Runner(loop_factory=event_loop) as runner:
            return runner.run(run_baseline(AMQP_URL, args.queue, args.exchange, args.concurrency))
    worker_root = checked_worker_root(parser, args.worker_root)
    return run_benchmark(
        args.tasks, args.delays, args.concurrency, args.json, worker_root, args.replica
    )


if __name__ == "__main__":
    sys.exit(main())
