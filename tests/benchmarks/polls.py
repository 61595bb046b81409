"""Poll mode under load: the worker beside a bare polling loop measured in the same run.

    python tests/benchmarks/polls.py [--tasks 10000] [--max-poll 10] [--interval 1]
                                     [--start-rate 0] [--concurrency 1000] [--seed 12]
                                     [--worker-root DIR]

Run on demand, never by pytest. N poll tasks start a job each on a local target, which answers
202 + Location and then `{"state": "running"}` to each poll of that job until its poll number n,
drawn for the task from 1..--max-poll with a seeded RNG, and `{"state": "done"}` from then on.
The tasks poll every --interval seconds until `body.state == 'done'`.

(a) The real worker (`python -m worker worker`, AGENTLESS_CONCURRENCY=--concurrency) runs them:
they are queued on its tasks queue (all at once, or at --start-rate tasks/s), and the run ends at
the Nth TaskCompleted on its events exchange. (b) Then the baseline, a process that imports
nothing of the worker's, makes the same start requests at the moments the worker's arrived at
the target, and polls the same URLs on the same schedule with one aiohttp ClientSession, holding
every task in a coroutine with no durability at all. Replaying the worker's start times gives
both contenders the same load over time, whatever pace the worker could start tasks at.

The target runs in a process of its own, as does each contender, so that /proc tells their CPU
and memory apart. It records when each request arrived and when each was answered, on the
system-wide monotonic clock: a poll was due --interval after the previous answer of its job (the
start's, for the first poll), as the worker schedules it, and its lateness is its arrival minus
that, measured alike for both contenders; it is also shown apart for the polls made while start
requests still came in and for those after, as the two compete in the worker. CPU ms per poll is
a contender's CPU from its first start request to its last completion, over the polls made (the
start requests' cost included); PostgreSQL and RabbitMQ: all their processes on this host over
the same interval.

This file is also the target's and the baseline's program (`--role target|baseline`). Queues,
exchange and schema are unique to the run and removed after it. Exit status: 0 when every target
is met, 1 when one is missed or a check fails (the process logs are kept), 2 when the run could
not be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aio_pika
import aiohttp
import jmespath
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiohttp import web
from yarl import URL

SELF: Final = Path(__file__).resolve()
ROOT: Final = SELF.parents[2]
AMQP_URL: Final = os.environ.get("AGENTLESS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL: Final = os.environ.get(
    "AGENTLESS_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
CRITERIA: Final = "body.state == 'done'"
HUB: Final = "bench"
# Completions only: the worker also publishes TaskStarted and TaskWaiting for every task, which
# the broker drops when nobody is bound to them, as an orchestrator that waits for results binds.
EVENT_KEYS: Final = "task.completed.#"
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")

# The targets.
LATENESS_P99_LIMIT_S: Final = 1.0
CPU_RATIO_LIMIT: Final = 3.0
RSS_LIMIT_MB: Final = 200.0

# From spawning a process to its readiness: interpreter start-up, imports, migrations.
START_TIMEOUT: Final = 60.0
# A run in which no task completes for this long is stuck, not slow.
STALL_TIMEOUT: Final = 60.0
# The worker lets the polls in flight finish on SIGTERM; with none left it exits within seconds.
STOP_TIMEOUT: Final = 40.0
PUBLISH_CHUNK: Final = 500
# Paced publishing wakes this often and publishes what has come due since.
PACE_TICK: Final = 0.01
# A poll task's own deadline: far beyond any run, so that only the poll that says done ends it.
TASK_TIMEOUT_S: Final = 3600

SERVICES: Final = ("postgres", "beam.smp")
# Above this share of the host's CPU spent by unrelated processes, a run's figures are suspect.
DISTURBED_PERCENT: Final = 10.0


# --- /proc (as in throughput.py) -----------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of process `pid`, in clock ticks."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    # The command name may hold spaces and parentheses; the fields after its last ')' are fixed:
    # utime and stime are the 12th and 13th of them.
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
    """(busy, total) clock ticks of all CPUs since boot."""
    with Path("/proc/stat").open() as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal; guest time is already in user.
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def ticks_to_ms(ticks: int) -> float:
    return ticks * 1000 / CLOCK_TICKS


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float
    contender_ticks: int
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
    # A process that started within the interval counts whole, one that ended is lost: the only
    # ones that come and go are the worker's pool connections, a few ms either way.
    before, after = first.services[name], last.services[name]
    return sum(ticks - before.get(pid, 0) for pid, ticks in after.items())


# --- shared by the roles ---------------------------------------------------------------------


def event_loop() -> asyncio.AbstractEventLoop:
    """The loop the worker runs on (worker/runtime.py), uvloop's where installed, for the baseline
    and the target too: the ratio then compares code, not event loops. Written here, as the
    baseline imports nothing of the worker's."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def stop_signal() -> asyncio.Event:
    """Set by SIGTERM or SIGINT. Installed before a role announces itself: the parent may signal
    as soon as it has read the announcement."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def silence_stdout() -> None:
    # Nobody reads the pipe after the lines the parent waits for: nothing more may go to it.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


# --- the target: `--role target` -----------------------------------------------------------


@dataclass(slots=True)
class Job:
    """One job as the target saw it, in monotonic seconds."""

    done_at_poll: int
    started_at: float
    arrivals: list[float] = field(default_factory=list)
    answers: list[float] = field(default_factory=list)


async def serve_target() -> int:
    """Start jobs (POST /jobs?id=&n=), answer their polls (GET /jobs/{id}), and tell what it saw
    (GET /_report) until told to forget it (POST /_reset); print the port."""
    jobs: dict[str, Job] = {}
    running = orjson.dumps({"state": "running"})
    done = orjson.dumps({"state": "done"})

    async def start(request: web.Request) -> web.Response:
        await request.read()
        job_id = request.query["id"]
        jobs[job_id] = Job(int(request.query["n"]), time.monotonic())
        return web.Response(
            status=202,
            body=orjson.dumps({"id": job_id, "state": "running"}),
            content_type="application/json",
            headers={"Location": f"/jobs/{job_id}"},
        )

    async def poll(request: web.Request) -> web.Response:
        arrived = time.monotonic()
        job = jobs.get(request.match_info["id"])
        if job is None:
            return web.Response(status=404)
        job.arrivals.append(arrived)
        body = done if len(job.arrivals) >= job.done_at_poll else running
        # The answer's time: from it the job's next poll is due.
        job.answers.append(time.monotonic())
        return web.Response(body=body, content_type="application/json")

    async def report(_: web.Request) -> web.Response:
        seen = {
            job_id: [job.done_at_poll, job.started_at, job.arrivals, job.answers]
            for job_id, job in jobs.items()
        }
        return web.Response(body=orjson.dumps(seen), content_type="application/json")

    async def reset(_: web.Request) -> web.Response:
        jobs.clear()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/jobs", start)
    app.router.add_get("/jobs/{id}", poll)
    app.router.add_get("/_report", report)
    app.router.add_post("/_reset", reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    # A contender opens up to --concurrency connections at once; the default backlog of 128
    # would drop the excess SYNs, and each dropped one costs a full second's retransmit, which
    # would be measured as lateness.
    await web.SockSite(runner, sock, backlog=4096).start()
    stopping = stop_signal()
    print(sock.getsockname()[1], flush=True)
    silence_stdout()
    await stopping.wait()
    await runner.cleanup()
    return 0


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


async def run_baseline(schedule: list[list[Any]], interval: float, concurrency: int) -> int:
    """The least a poller of these jobs does: at each start's moment, the start request; then a
    poll `interval` after each answer until the criteria hold. Waits for SIGUSR1 to begin, prints
    its tally when all are done, and exits on SIGTERM."""
    expression = jmespath.compile(CRITERIA)
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, go.set)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def follow(start_url: str, offset: float) -> bool:
            await asyncio.sleep(max(0.0, began + offset - loop.time()))
            try:
                async with session.post(start_url) as response:
                    await response.read()
                    if response.status != 202:
                        return False
                    poll_url = URL(start_url).join(URL(response.headers["Location"]))
                while True:
                    await asyncio.sleep(interval)
                    async with session.get(poll_url) as response:
                        raw = await response.read()
                    if not 200 <= response.status < 300:
                        return False
                    document = {
                        "statusCode": response.status,
                        "headers": {k.lower(): v for k, v in response.headers.items()},
                        "body": json_or_text(raw),
                    }
                    if is_truthy(expression.search(document)):
                        return True
            except aiohttp.ClientError:
                # Counted as a failed task, which the benchmark counts against the run.
                return False

        stopping = stop_signal()
        print("ready", flush=True)
        await go.wait()
        began = loop.time()
        results = await asyncio.gather(*(follow(url, offset) for url, offset in schedule))
        succeeded = sum(results)
        print(orjson.dumps({"succeeded": succeeded, "failed": len(results) - succeeded}).decode())
        sys.stdout.flush()
        silence_stdout()
        await stopping.wait()
    return 0


# --- what the target saw -------------------------------------------------------------------


def percentile(ordered: Sequence[float], share: float) -> float:
    """Nearest rank, of an ordered sequence."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


@dataclass
class Run:
    """One contender's figures."""

    contender: str
    tasks: int
    succeeded: int = 0
    polls: int = 0
    starts_span_s: float | None = None
    polls_per_s: float | None = None
    lateness_s: list[float] = field(default_factory=list)
    while_starting_s: list[float] = field(default_factory=list)
    after_starts_s: list[float] = field(default_factory=list)
    seconds: float | None = None
    cpu_ms_per_poll: float | None = None
    postgres_cpu_ms_per_poll: float | None = None
    rabbitmq_cpu_ms_per_poll: float | None = None
    peak_rss_mb: float | None = None
    host_busy_percent: float | None = None
    other_busy_percent: float | None = None
    # Start times, in seconds from the run's beginning, by start URL: the baseline replays them.
    start_offsets: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems and self.cpu_ms_per_poll is not None and bool(self.lateness_s)

    def late(self, share: float) -> float | None:
        return percentile(self.lateness_s, share) if self.lateness_s else None

    def record_target(
        self, seen: dict[str, list[Any]], start_urls: dict[str, str], began: float, interval: float
    ) -> None:
        """Polls, their lateness and the start times from the target's report; what went wrong."""
        missing = [job_id for job_id in start_urls if job_id not in seen]
        if missing:
            self.problems.append(f"{len(missing)} jobs were never started, e.g. {missing[0]}")
        extra = short = 0
        # (arrival, lateness) of every poll
        polls: list[tuple[float, float]] = []
        for job_id, (done_at_poll, started_at, job_arrivals, answers) in seen.items():
            self.start_offsets[start_urls[job_id]] = started_at - began
            extra += max(0, len(job_arrivals) - done_at_poll)
            short += len(job_arrivals) < done_at_poll
            previous = [started_at, *answers]
            polls.extend(
                (arrived, arrived - (previous[k] + interval))
                for k, arrived in enumerate(job_arrivals)
            )
        self.lateness_s = sorted(late for _, late in polls)
        self.polls = len(polls)
        if extra:
            self.problems.append(f"{extra} polls after the one that said done")
        if short:
            self.problems.append(f"{short} jobs polled fewer times than it takes to be done")
        starts = [started_at for _, started_at, _, _ in seen.values()]
        if starts:
            self.starts_span_s = max(starts) - min(starts)
            # Apart: the polls made while start requests still came in, which compete with them,
            # and those after, when polling is all there is to do.
            last_start = max(starts)
            self.while_starting_s = sorted(late for at, late in polls if at <= last_start)
            self.after_starts_s = sorted(late for at, late in polls if at > last_start)
        arrivals = [at for at, _ in polls]
        if len(arrivals) > 1 and max(arrivals) > min(arrivals):
            self.polls_per_s = (len(arrivals) - 1) / (max(arrivals) - min(arrivals))

    def record_cpu(self, first: Snapshot, last: Snapshot) -> None:
        if not self.polls:
            return
        self.seconds = last.at - first.at
        contender = last.contender_ticks - first.contender_ticks
        postgres = service_delta(first, last, "postgres")
        rabbitmq = service_delta(first, last, "beam.smp")
        self.cpu_ms_per_poll = ticks_to_ms(contender) / self.polls
        self.postgres_cpu_ms_per_poll = ticks_to_ms(postgres) / self.polls
        self.rabbitmq_cpu_ms_per_poll = ticks_to_ms(rabbitmq) / self.polls
        busy, total = (b - a for a, b in zip(first.host, last.host, strict=True))
        if total:
            ours = contender + postgres + rabbitmq + last.own_ticks - first.own_ticks
            self.host_busy_percent = 100 * busy / total
            self.other_busy_percent = max(0.0, 100 * (busy - ours) / total)


@dataclass(frozen=True, slots=True)
class Context:
    connection: AbstractConnection
    target_url: str
    target_pid: int
    # Job id -> its start URL, in the order the tasks are queued.
    start_urls: dict[str, str]
    interval: float
    start_rate: float
    concurrency: int
    logs: Path
    worker_root: Path


async def target_report(context: Context) -> dict[str, list[Any]]:
    """What the target saw since its last reset; then it forgets it, for the next contender."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{context.target_url}/_report") as response:
            response.raise_for_status()
            seen: dict[str, list[Any]] = orjson.loads(await response.read())
        async with session.post(f"{context.target_url}/_reset") as response:
            response.raise_for_status()
    return seen


# --- processes -----------------------------------------------------------------------------


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


async def spawn_own_role(role: str, args: list[str], log: Path) -> asyncio.subprocess.Process:
    """This file in another role, its stdout a pipe for the lines it announces itself with."""
    with log.open("ab") as sink:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            str(SELF),
            f"--role={role}",
            *args,
            env=child_environment(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=sink,
        )


async def read_line(process: asyncio.subprocess.Process, timeout: float, what: str) -> bytes:
    assert process.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            line = await process.stdout.readline()
    except TimeoutError:
        raise BenchmarkError(f"{what}: nothing said within {timeout:.0f} s") from None
    if not line:
        raise BenchmarkError(f"{what}: exited with {await process.wait()}")
    return line


class BenchmarkError(Exception):
    """The run cannot give a valid measurement; the message says why."""


async def start_target(logs: Path) -> tuple[asyncio.subprocess.Process, str]:
    process = await spawn_own_role("target", [], logs / "target.log")
    try:
        port = int(await read_line(process, START_TIMEOUT, "the target"))
    except (BenchmarkError, ValueError):
        await stop(process)
        raise BenchmarkError(f"the target did not start; see {logs / 'target.log'}") from None
    return process, f"http://127.0.0.1:{port}"


# --- the worker's run ----------------------------------------------------------------------


def task_messages(run_id: str, context: Context) -> list[tuple[str, bytes]]:
    """SPEC §4 poll tasks: the start request to the target, the poll from its Location."""
    return [
        (
            job_id,
            orjson.dumps(
                {
                    "taskId": job_id,
                    "planId": f"plan-{run_id}",
                    "hubName": HUB,
                    "name": "polls benchmark",
                    "request": {"method": "POST", "url": start_url},
                    "waitForCompletion": "poll",
                    "successCriteria": CRITERIA,
                    "timeoutSeconds": TASK_TIMEOUT_S,
                    "poll": {"intervalSeconds": context.interval},
                }
            ),
        )
        for job_id, start_url in context.start_urls.items()
    ]


async def publish(
    connection: AbstractConnection, queue: str, tasks: list[tuple[str, bytes]], rate: float
) -> None:
    """Queue the tasks, confirmed: all at once when `rate` is 0, else `rate` per second."""
    channel = await connection.channel(publisher_confirms=True)

    def send(chunk: list[tuple[str, bytes]]) -> list[Any]:
        return [
            channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=task_id,
                ),
                routing_key=queue,
            )
            for task_id, body in chunk
        ]

    try:
        if rate <= 0:
            for start in range(0, len(tasks), PUBLISH_CHUNK):
                await asyncio.gather(*send(tasks[start : start + PUBLISH_CHUNK]))
            return
        began, sent = time.monotonic(), 0
        while sent < len(tasks):
            due = min(len(tasks), math.floor((time.monotonic() - began) * rate) + 1)
            # Not awaited before the next tick: a slow confirm must not slow the pace.
            confirms = send(tasks[sent:due])
            sent = due
            await asyncio.gather(*confirms, asyncio.sleep(PACE_TICK))
    finally:
        await channel.close()


class Completions:
    """TaskCompleted events as they arrive on the worker's events exchange."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen: set[str] = set()
        self.failed: list[str] = []
        self.duplicates = 0
        self.progressed = asyncio.Event()

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
            self.failed.append(f"{task_id}: {event.get('result')} ({event.get('reason')})")
        self.progressed.set()

    async def wait(self, process: asyncio.subprocess.Process) -> str | None:
        """Wait until every task completed; otherwise, why not."""
        exited = asyncio.ensure_future(process.wait())
        try:
            while len(self.seen) < self.expected:
                self.progressed.clear()
                progressed = asyncio.ensure_future(self.progressed.wait())
                done, _ = await asyncio.wait(
                    {progressed, exited}, timeout=STALL_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
                )
                progressed.cancel()
                count = f"{len(self.seen)} of {self.expected} completed"
                if exited in done:
                    return f"the worker exited early with code {process.returncode}; {count}"
                if not done:
                    return f"no completion for {STALL_TIMEOUT:.0f} s; {count}"
            return None
        finally:
            exited.cancel()


async def consumers(connection: AbstractConnection, queue: str) -> int:
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.consumer_count or 0
    finally:
        await channel.close()


async def until_consuming(
    connection: AbstractConnection, queue: str, process: asyncio.subprocess.Process, log: Path
) -> None:
    """The worker is ready once it consumes its tasks queue (its poller starts with it)."""
    async with asyncio.timeout(START_TIMEOUT):
        while not await consumers(connection, queue):
            if process.returncode is not None:
                raise BenchmarkError(f"the worker exited with {process.returncode}; see {log}")
            await asyncio.sleep(0.1)


async def measure_worker(context: Context) -> Run:
    # Imported here: the baseline and target roles run this file too and must stay bare.
    from worker.contract.models import Names  # noqa: PLC0415
    from worker.topology import declare_topology  # noqa: PLC0415

    run_id = uuid.uuid4().hex[:10]
    names = Names(f"agentless-bench.polls.{run_id}")
    schema = f"bench_polls_{run_id}"
    run = Run("worker", len(context.start_urls))
    log = context.logs / "worker.log"
    joiner = "&" if "?" in DATABASE_URL else "?"
    env = child_environment(
        AGENTLESS_AMQP_URL=AMQP_URL,
        AGENTLESS_DATABASE_URL=f"{DATABASE_URL}{joiner}search_path={schema}",
        AGENTLESS_PREFIX=names.prefix,
        AGENTLESS_CONCURRENCY=str(context.concurrency),
        AGENTLESS_WORKER_PORT="0",
        AGENTLESS_LOG_FORMAT="json",
    )
    channel = await context.connection.channel()
    try:
        await declare_topology(channel, names)
        observed = await channel.declare_queue(exclusive=True, auto_delete=True)
        await observed.bind(names.events, EVENT_KEYS)
        completions = Completions(run.tasks)
        await observed.consume(completions.on_message, no_ack=True)
        with log.open("ab") as sink:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "worker",
                "worker",
                cwd=context.worker_root,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )
        try:
            await until_consuming(context.connection, names.tasks, process, log)
            first = take_snapshot(process.pid, context.target_pid)
            # Published while the worker runs them: a paced run's worker must not find the tasks
            # waiting for it.
            publishing = asyncio.create_task(
                publish(
                    context.connection,
                    names.tasks,
                    task_messages(run_id, context),
                    context.start_rate,
                )
            )
            problem = await completions.wait(process)
            await publishing
            if problem is None:
                last = take_snapshot(process.pid, context.target_pid)
                run.peak_rss_mb = peak_rss_mb(process.pid)
            else:
                run.problems.append(problem)
        finally:
            code = await stop(process)
        if code != 0:
            run.problems.append(f"the worker's exit code after SIGTERM was {code}, not 0")
        run.succeeded = len(completions.seen) - len(completions.failed)
        if completions.failed:
            run.problems.append(
                f"{len(completions.failed)} tasks did not succeed, e.g. {completions.failed[0]}"
            )
        run.record_target(
            await target_report(context), context.start_urls, first.at, context.interval
        )
        if problem is None:
            run.record_cpu(first, last)
        dead = await dead_letters(context.connection, names.dead)
        if dead:
            run.problems.append(f"{dead} messages dead-lettered")
        run.problems.extend(log_problems(log))
    finally:
        await channel.close()
        await delete_broker_objects(context.connection, [names.tasks, names.dead], [names.events])
        run.problems.extend(await check_and_drop_schema(schema, run))
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


async def check_and_drop_schema(schema: str, run: Run) -> list[str]:
    """What the database says of the run, once the schema is dropped: every task succeeded, with
    as many polls recorded as the target answered (a poll made twice counts once)."""
    import asyncpg  # noqa: PLC0415 - kept out of the baseline's and the target's processes

    problems: list[str] = []
    conn = await asyncpg.connect(DATABASE_URL, timeout=10)
    try:
        with contextlib.suppress(asyncpg.UndefinedTableError):
            row = await conn.fetchrow(
                f'SELECT count(*) AS n, coalesce(sum(polls), 0) AS polls FROM "{schema}".tasks '
                "WHERE state = 'completed' AND result = 'succeeded'"
            )
            assert row is not None
            if row["n"] != run.tasks:
                problems.append(f"the database records {row['n']} succeeded tasks, not {run.tasks}")
            if row["polls"] != run.polls:
                problems.append(
                    f"the database records {row['polls']} polls, the target answered {run.polls}"
                )
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    return problems


# --- the baseline's run --------------------------------------------------------------------


async def measure_baseline(context: Context, offsets: dict[str, float]) -> Run:
    """The baseline's process, given the worker's start times to replay."""
    run = Run("baseline", len(context.start_urls))
    schedule_file = context.logs / "schedule.json"
    # In queue order; a task the worker never started (an invalid run) starts at once.
    schedule_file.write_bytes(
        orjson.dumps([[url, offsets.get(url, 0.0)] for url in context.start_urls.values()])
    )
    process = await spawn_own_role(
        "baseline",
        [
            f"--schedule={schedule_file}",
            f"--interval={context.interval}",
            f"--concurrency={context.concurrency}",
        ],
        context.logs / "baseline.log",
    )
    try:
        await read_line(process, START_TIMEOUT, "the baseline")
        first = take_snapshot(process.pid, context.target_pid)
        process.send_signal(signal.SIGUSR1)
        # As long as the worker's run may take, with no completion seen along the way.
        limit = max(offsets.values(), default=0.0) + STALL_TIMEOUT + 20 * context.interval
        tally = orjson.loads(await read_line(process, limit, "the baseline"))
        last = take_snapshot(process.pid, context.target_pid)
        run.peak_rss_mb = peak_rss_mb(process.pid)
    finally:
        code = await stop(process)
    if code != 0:
        run.problems.append(f"the baseline's exit code after SIGTERM was {code}, not 0")
    run.succeeded = tally["succeeded"]
    if tally["failed"]:
        run.problems.append(f"{tally['failed']} tasks did not succeed")
    run.record_target(await target_report(context), context.start_urls, first.at, context.interval)
    run.record_cpu(first, last)
    return run


# --- the benchmark: `--role bench` (the default) -------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    what: str
    value: str
    target: str
    passed: bool


def verdicts(baseline: Run, worker: Run) -> list[Verdict]:
    p99 = worker.late(0.99)
    found = [
        Verdict(
            "worker poll lateness p99",
            "invalid run" if p99 is None else f"{p99:.3f} s",
            f"< {LATENESS_P99_LIMIT_S:g} s",
            p99 is not None and p99 < LATENESS_P99_LIMIT_S,
        )
    ]
    ratio = None
    if worker.cpu_ms_per_poll is not None and baseline.cpu_ms_per_poll:
        ratio = worker.cpu_ms_per_poll / baseline.cpu_ms_per_poll
    found.append(
        Verdict(
            "worker/baseline CPU per poll",
            # Rounded up: a ratio shown as 3.00x must not be one that misses a 3x target.
            "invalid run" if ratio is None else f"{math.ceil(ratio * 100) / 100:.2f}x",
            f"<= {CPU_RATIO_LIMIT:g}x",
            ratio is not None and ratio <= CPU_RATIO_LIMIT,
        )
    )
    rss = worker.peak_rss_mb
    found.append(
        Verdict(
            "worker peak RSS",
            "unknown" if rss is None else f"{rss:.1f} MB",
            f"< {RSS_LIMIT_MB:g} MB",
            rss is not None and rss < RSS_LIMIT_MB,
        )
    )
    return found


def number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def phase(lateness: list[float]) -> str:
    if not lateness:
        return "no polls"
    return (
        f"{percentile(lateness, 0.5):.3f} / {percentile(lateness, 0.99):.3f} "
        f"({len(lateness):,} polls)"
    )


def report(runs: list[Run], found: list[Verdict], args: argparse.Namespace) -> str:
    cpus = len(os.sched_getaffinity(0))
    pace = "all queued at once" if args.start_rate <= 0 else f"queued at {args.start_rate:g}/s"
    worker = runs[-1]
    lines = [
        f"agentless polls: {args.tasks:,} poll tasks, each done at a poll drawn from "
        f"1..{args.max_poll} (seed {args.seed}), every {args.interval:g} s; worker concurrency "
        f"{args.concurrency}; {cpus} CPUs, Python {sys.version.split()[0]}",
        f"starts: tasks {pace}; the worker started them over {number(worker.starts_span_s, 1)} s,"
        " and the baseline replays those start times",
        "polls/s: polls / time from the first poll's arrival to the last's. Lateness: a poll's",
        "  arrival at the target - (the job's previous answer + interval). CPU ms/poll: the",
        "  contender's utime+stime from its first start request to its last completion / polls;",
        "  PostgreSQL and RabbitMQ: all their processes on this host over that interval (the",
        "  RabbitMQ figure includes this benchmark's publishing and event consumption). Peak RSS:",
        "  VmHWM at the last completion. Other %: the host's busy time not spent by a contender,",
        "  the target, PostgreSQL, RabbitMQ or this benchmark; much above 0 = disturbed.",
        "",
        f"{'contender':<9}  {'polls':>7}  {'polls/s':>8}  {'CPU ms/poll':>11}  "
        f"{'PostgreSQL ms/poll':>18}  {'RabbitMQ ms/poll':>16}  {'late p50 s':>10}  "
        f"{'late p99 s':>10}  {'late max s':>10}  {'peak RSS MB':>11}  {'host busy %':>11}  "
        f"{'other %':>7}",
    ]
    lines.extend(
        f"{run.contender:<9}  {run.polls:>7,}  {number(run.polls_per_s, 0):>8}  "
        f"{number(run.cpu_ms_per_poll, 3):>11}  {number(run.postgres_cpu_ms_per_poll, 3):>18}  "
        f"{number(run.rabbitmq_cpu_ms_per_poll, 3):>16}  {number(run.late(0.50), 3):>10}  "
        f"{number(run.late(0.99), 3):>10}  {number(run.late(1.0), 3):>10}  "
        f"{number(run.peak_rss_mb, 1):>11}  {number(run.host_busy_percent, 0):>11}  "
        f"{number(run.other_busy_percent, 0):>7}"
        for run in runs
    )
    lines += ["", "lateness s (p50 / p99, polls) while start requests still came in, and after:"]
    lines += [
        f"  {run.contender:<9}  while {phase(run.while_starting_s)};  "
        f"after {phase(run.after_starts_s)}"
        for run in runs
    ]
    lines += ["", f"{'target':<30}  {'measured':>11}  {'wanted':>9}  verdict"]
    lines += [
        f"{v.what:<30}  {v.value:>11}  {v.target:>9}  {'PASS' if v.passed else 'MISS'}"
        for v in found
    ]
    lines += ["", "checks:"]
    for run in runs:
        verdict = "OK" if run.valid else "INVALID"
        lines.append(
            f"  {run.contender}: {run.succeeded:,} of {run.tasks:,} succeeded in "
            f"{number(run.seconds, 1)} s -> {verdict}"
        )
        lines += [f"    problem: {p}" for p in run.problems]
    disturbed = [
        run.contender
        for run in runs
        if run.other_busy_percent is not None and run.other_busy_percent > DISTURBED_PERCENT
    ]
    if disturbed:
        lines.append(
            f"note: other processes took over {DISTURBED_PERCENT:g}% of the host's CPU during "
            f"the {' and '.join(disturbed)} run; run again on a quiet host for figures to compare."
        )
    return "\n".join(lines)


def start_urls(target_url: str, tasks: int, max_poll: int, seed: int) -> dict[str, str]:
    """Each job's start URL, which tells the target at which poll the job is done: drawn once,
    so that both contenders poll the same URLs the same number of times."""
    rng = random.Random(seed)  # a reproducible draw, not a secret
    return {
        f"poll-{i:05d}": f"{target_url}/jobs?id=poll-{i:05d}&n={rng.randint(1, max_poll)}"
        for i in range(tasks)
    }


async def bench(args: argparse.Namespace, logs: Path) -> list[Run]:
    """The worker's run, then the baseline's, which replays the worker's start times."""
    target, target_url = await start_target(logs)
    try:
        connection = await aio_pika.connect(
            AMQP_URL, timeout=10, client_properties={"connection_name": "agentless polls benchmark"}
        )
        async with connection:
            context = Context(
                connection,
                target_url,
                target.pid,
                start_urls(target_url, args.tasks, args.max_poll, args.seed),
                args.interval,
                args.start_rate,
                args.concurrency,
                logs,
                args.worker_root,
            )
            worker = await measure_worker(context)
            # Progress, on stderr so that stdout holds only the results.
            print(f"worker: {worker.polls:,} polls", file=sys.stderr, flush=True)
            baseline = await measure_baseline(context, worker.start_offsets)
            print(f"baseline: {baseline.polls:,} polls", file=sys.stderr, flush=True)
    finally:
        await stop(target)
    return [baseline, worker]


def at_least(lowest: float, kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> float:
        value = kind(text)
        if value < lowest:
            raise argparse.ArgumentTypeError(f"at least {lowest:g}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Polls/s, CPU per poll, poll lateness and peak RSS of the worker in poll mode, "
        "beside a bare polling loop."
    )
    parser.add_argument("--tasks", type=at_least(1, int), default=10_000, help="default 10000")
    parser.add_argument(
        "--max-poll",
        type=at_least(1, int),
        default=10,
        help="each job is done at a poll drawn from 1..this (default 10)",
    )
    parser.add_argument(
        "--interval", type=at_least(1, float), default=1.0, help="seconds between polls (1)"
    )
    parser.add_argument(
        "--start-rate",
        type=at_least(0, float),
        default=0.0,
        help="tasks queued per second; 0 (the default) queues them all at once",
    )
    parser.add_argument(
        "--concurrency",
        type=at_least(1, int),
        default=1000,
        help="the worker's AGENTLESS_CONCURRENCY and the baseline's connection limit (1000)",
    )
    parser.add_argument("--seed", type=int, default=12, help="of the draw of polls (12)")
    parser.add_argument(
        "--worker-root",
        type=Path,
        default=ROOT,
        metavar="DIR",
        help="the checkout whose worker to measure, e.g. a commit exported with `git archive` "
        "(default: this one)",
    )
    parser.add_argument(
        "--role", choices=["bench", "target", "baseline"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--schedule", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "target":
        with asyncio.Runner(loop_factory=event_loop) as runner:
            return runner.run(serve_target())
    if args.role == "baseline":
        with asyncio.Runner(loop_factory=event_loop) as runner:
            # [[start URL, seconds from the beginning], ...]
            schedule = orjson.loads(args.schedule.read_bytes())
            return runner.run(run_baseline(schedule, args.interval, args.concurrency))
    if not Path("/proc/self/stat").exists():
        parser.error("this benchmark reads CPU and memory from /proc: it runs on Linux only")
    args.worker_root = args.worker_root.resolve()
    if not (args.worker_root / "worker" / "__main__.py").is_file():
        parser.error(f"--worker-root: {args.worker_root} holds no worker package")
    # Run as a script, Python puts this file's directory on sys.path, not the repository root;
    # and the topology is declared by the measured worker's own code.
    sys.path.insert(0, str(args.worker_root))
    logs = Path(tempfile.mkdtemp(prefix="agentless-polls-"))
    try:
        runs = asyncio.run(bench(args, logs))
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}; logs in {logs}", file=sys.stderr)
        return 2
    found = verdicts(*runs)
    print(report(runs, found, args))
    passed = all(v.passed for v in found) and all(run.valid for run in runs)
    if passed:
        shutil.rmtree(logs)
    else:
        # The processes' logs say why a run failed.
        print(f"logs kept in {logs}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
