"""Latency of the worker under open-loop load, next to the bare baseline at the same rates.

    python tests/benchmarks/latency.py [--seconds 30] [--rounds 6] [--loads 25,50,75]
                                       [--peak-tasks 5000] [--peak RATE] [--concurrency 256]
                                       [--no-ungathered] [--json] [--worker-root DIR]

Run on demand, never by pytest. First the worker's peak rate is measured as throughput.py
measures it (apiResponse tasks queued in advance, 0 ms target). Then, at each share of that peak,
the contenders are started afresh (each a process of its own, on a fresh queue and, for a worker,
a fresh database schema) and sent apiResponse tasks against the same 0 ms target with Poisson
arrivals: exponential gaps between publishes, each published with a confirm that nobody waits
for before the next publish, so that a slow contender does not slow the arrivals down (open
loop). After a warm-up, the contenders take turns, one segment of `seconds / rounds` each per
round, each segment's tasks completed before the next begins: whatever else the host runs
meanwhile falls on all of them alike. Each task's latency runs from its publish to its
TaskCompleted event, received here from the contender's events exchange (`task.completed.#`).
The contenders:

- baseline: throughput.py's bare consumer (consume, call, JMESPath, publish the completion with a
  confirm, ack; no database);
- worker: the worker (`python -m worker worker`, run by this file's `--role=worker` so that
  its claim and completion batches are timed: see below);
- worker, ungathered: the same worker with its store's batches flushed at once rather than after
  gathering while callers keep coming, for up to a few turns of the event loop
  (`worker.store.database.GATHER_TURNS` set to 0 in its process before it starts); beside the
  worker, it shows what gathering costs in latency.

In both workers each claim and completion is timed from its submission to its batch (the wait:
the gathering turns, and a flush still under way when no second one may start beside it) and
each batch's flush (its statement and commit): a few microseconds of bookkeeping per task,
reported for the measured tasks' batches.

It exits 1 when the worker's p50 or p99 at 50% of the peak is further from the baseline's than
the targets allow, or a run went wrong (then the contenders' logs are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from argparse import SUPPRESS
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import AMQPError

# Run as a script, Python puts this file's directory on sys.path, not the repository's root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.benchmarks import throughput
from tests.benchmarks.throughput import AMQP_URL, DATABASE_URL, Snapshot, Task

# What the issue asks at 50% of the peak: the worker's percentiles beside the baseline's, in ms.
TARGET_LOAD: Final = 50
P50_MARGIN_MS: Final = 2.0
P99_MARGIN_MS: Final = 10.0
QUANTILES: Final = (0.50, 0.99, 0.999)

# Arrivals before the measured ones, at the same rate: connections opened, caches warm, the
# worker's first batches and its start-up scans behind it.
WARMUP_SECONDS: Final = 3.0
# From spawning a contender to its subscription to the task queue.
SUBSCRIBE_TIMEOUT: Final = 60.0

# Run in the worker's process before it starts, for the ungathered contender: a benchmark's knob,
# not a setting. It fails (and so does the run) if the constant is gone or renamed.
SELF: Final = Path(__file__).resolve()
# A worker task's latency, split at the times the database records: publish → claim statement
# (the broker's delivery, validation, the claim's batch wait), claim → completion statement (the
# claim's commit, the call, the completion's batch wait), completion → event here (its commit,
# TaskCompleted's publish and routing).
STAGES: Final = ("to claim", "claim to completion", "completion to event")
# The batches timed in the worker, by the name of the Store's flush method.
TIMED_BATCHES: Final = {"_flush_claims": "claims", "_flush_completions": "completions"}


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    worker: bool
    command: tuple[str, ...]


BASELINE: Final = Contender("baseline", worker=False, command=())
WORKER: Final = Contender(
    "worker", worker=True, command=(sys.executable, str(SELF), "--role=worker")
)
UNGATHERED_WORKER: Final = Contender(
    "worker, ungathered",
    worker=True,
    command=(sys.executable, str(SELF), "--role=worker", "--gather-turns=0"),
)


# --- the worker, its batches timed: `--role=worker` ----------------------------------------


def run_timed_worker(gather_turns: int | None, stats: Path) -> int:
    """`python -m worker worker` in this process, its claim and completion batches timed; with
    `gather_turns`, its store's batches gather for that many turns rather than its own. Each
    batch's (start, flush ms, its items' waits in ms) go to `stats` as JSON on the way out."""
    import runpy  # noqa: PLC0415

    # The measured checkout, the working directory, before this one.
    sys.path.insert(0, os.getcwd())
    from worker.store import batch, database  # noqa: PLC0415

    if not isinstance(getattr(database, "GATHER_TURNS", None), int):
        sys.exit("worker.store.database.GATHER_TURNS is gone: latency.py needs updating")
    if gather_turns is not None:
        database.GATHER_TURNS = gather_turns
    submitted: dict[int, float] = {}
    timed: dict[str, list[tuple[float, float, list[float]]]] = {
        name: [] for name in TIMED_BATCHES.values()
    }
    batcher: Any = batch.Batcher
    submit, take, run = batcher.submit, batcher._take, batcher._run

    def name_of(self: Any) -> str | None:
        return TIMED_BATCHES.get(getattr(self._flush, "__name__", ""))

    async def timed_submit(self: Any, item: Any) -> Any:
        if name_of(self) is not None:
            submitted[id(item)] = time.perf_counter()
        return await submit(self, item)

    def timed_take(self: Any) -> Any:
        taken = take(self)
        self._taken_at = time.perf_counter()
        self._waits = [
            (self._taken_at - submitted.pop(id(item), self._taken_at)) * 1000 for item, _ in taken
        ]
        return taken

    async def timed_run(self: Any, entries: Any) -> None:
        name, began = name_of(self), time.perf_counter()
        waits = getattr(self, "_waits", [])
        self._waits = []
        try:
            await run(self, entries)
        finally:
            if name is not None and waits:
                timed[name].append((began, (time.perf_counter() - began) * 1000, waits))

    batcher.submit, batcher._take, batcher._run = timed_submit, timed_take, timed_run
    sys.argv = ["worker", "worker"]
    try:
        runpy.run_module("worker", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        stats.write_bytes(orjson.dumps(timed))
    return 0


@dataclass(frozen=True, slots=True)
class BatchTimes:
    """One kind of batch, over the measured tasks' time: how long items waited to be taken into
    a batch, how long its flush took, and how many a batch held."""

    batches: int
    mean_size: float
    wait_p50_ms: float
    wait_p99_ms: float
    flush_p50_ms: float
    flush_p99_ms: float


def batch_times(stats: Path, windows: Sequence[tuple[float, float]]) -> dict[str, BatchTimes]:
    """The batches that started within `windows` (the measured segments)."""
    found: dict[str, list[list[Any]]] = orjson.loads(stats.read_bytes())
    times = {}
    for name, batches in found.items():
        kept = [entry for entry in batches if any(a <= entry[0] <= b for a, b in windows)]
        if not kept:
            continue
        waits = sorted(wait for _, _, items in kept for wait in items)
        flushes = sorted(flush for _, flush, _ in kept)
        times[name] = BatchTimes(
            len(kept),
            len(waits) / len(kept),
            quantile(waits, 0.5),
            quantile(waits, 0.99),
            quantile(flushes, 0.5),
            quantile(flushes, 0.99),
        )
    return times


@dataclass
class LatencyRun:
    """One contender's figures at one arrival rate."""

    contender: str
    load_percent: int
    rate: float
    measured: int
    completed: int = 0
    failed: int = 0
    duplicates: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None
    arrivals_per_s: float | None = None
    publish_lag_p99_ms: float | None = None
    cpu_ms_per_task: float | None = None
    postgres_cpu_ms_per_task: float | None = None
    rabbitmq_cpu_ms_per_task: float | None = None
    host_busy_percent: float | None = None
    exit_code: int | None = None
    # The worker's claim and completion batches, by kind.
    batches: dict[str, BatchTimes] = field(default_factory=dict)
    # Where a worker's tasks spent their latency, by stage: (p50, p99) in ms.
    stages: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Busy time of the host not spent by the contender, PostgreSQL, RabbitMQ, the target or
    # this benchmark (other processes, the contenders idle meanwhile, interrupts).
    other_busy_percent: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems and self.p99_ms is not None


def quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least a share `q` of the values at or below it."""
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


class Arrivals:
    """Each task's publish time, taken just before its publish, and its completion event's
    arrival here: both on this process's monotonic clock."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.expected = {task.task_id for task in tasks}
        self.published: dict[str, float] = {}
        self.completed: dict[str, float] = {}
        # The same moments by the wall clock, which the database's timestamps share.
        self.published_at: dict[str, float] = {}
        self.completed_at: dict[str, float] = {}
        self.failed = 0
        self.duplicates = 0
        self.progressed = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        arrived = time.perf_counter()
        event: dict[str, Any] = orjson.loads(message.body)
        task_id = str(event.get("taskId"))
        if event.get("name") != "TaskCompleted" or task_id not in self.expected:
            return
        if task_id in self.completed:
            self.duplicates += 1
            return
        self.completed[task_id] = arrived
        self.completed_at[task_id] = time.time()
        if event.get("result") != "succeeded":
            self.failed += 1
        self.progressed.set()

    def latencies_ms(self, tasks: Sequence[Task]) -> list[float]:
        return sorted(
            (self.completed[task.task_id] - self.published[task.task_id]) * 1000
            for task in tasks
            if task.task_id in self.completed
        )

    async def wait(self, count: int, process: asyncio.subprocess.Process) -> None:
        """Wait until `count` tasks completed; raise Failed if they do not."""
        problem = await throughput.until_progress_stops(
            self.progressed,
            lambda: len(self.completed) >= count,
            [process],
            lambda: f"{len(self.completed)} of {count} completed",
        )
        if problem is not None:
            raise Failed(problem)


class Failed(Exception):
    """A contender's run went wrong: why."""


async def publish_open_loop(
    connection: AbstractConnection,
    queue: str,
    tasks: Sequence[Task],
    rate: float,
    arrivals: Arrivals,
    rng: random.Random,
) -> list[float]:
    """Publish `tasks` at Poisson times of mean `rate`/s, each with a confirm that the next
    publish does not wait for; once all are confirmed, how late each publish left, in ms."""
    channel = await connection.channel(publisher_confirms=True)
    lags: list[float] = []
    pending: set[asyncio.Future[Any]] = set()
    try:
        due = time.perf_counter()
        for task in tasks:
            due += rng.expovariate(rate)
            ahead = due - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)
            now, wall = time.perf_counter(), time.time()
            lags.append(max(now - due, 0.0) * 1000)
            arrivals.published[task.task_id] = now
            arrivals.published_at[task.task_id] = wall
            message = aio_pika.Message(
                task.body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=task.task_id,
                # The publish time in the message itself, for anyone reading the queue; the
                # latencies use the monotonic clock above.
                headers={"x-published-at": wall},
            )
            confirm = asyncio.ensure_future(
                channel.default_exchange.publish(message, routing_key=queue)
            )
            pending.add(confirm)
            confirm.add_done_callback(pending.discard)
        # A publish the broker refused fails the run here.
        await asyncio.gather(*pending)
    finally:
        await channel.close()
    return lags


async def until_subscribed(
    connection: AbstractConnection, queue: str, process: asyncio.subprocess.Process
) -> None:
    """Return once the contender consumes `queue`; raise Failed if it exits or takes too long."""
    channel = await connection.channel()
    try:
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
            while True:
                declared = await channel.declare_queue(queue, passive=True)
                if declared.declaration_result.consumer_count:
                    return
                if process.returncode is not None:
                    raise Failed(f"exited with code {process.returncode} before consuming")
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise Failed(f"not consuming after {SUBSCRIBE_TIMEOUT:.0f} s") from None
    finally:
        await channel.close()


@dataclass(frozen=True, slots=True)
class Setup:
    connection: AbstractConnection
    target_url: str
    target_pid: int
    concurrency: int
    seconds: float
    rounds: int
    logs: Path
    worker_root: Path
    database_url: str
    rng: random.Random


@dataclass
class CpuTicks:
    """CPU ticks summed over a contender's measured segments."""

    contender: int = 0
    postgres: int = 0
    rabbitmq: int = 0
    host_busy: int = 0
    host_total: int = 0
    own: int = 0

    def add(self, first: Snapshot, last: Snapshot) -> None:
        self.contender += last.cpu_ticks - first.cpu_ticks
        self.own += last.own_ticks - first.own_ticks
        self.postgres += throughput.service_delta(first, last, "postgres")
        self.rabbitmq += throughput.service_delta(first, last, "beam.smp")
        self.host_busy += last.host[0] - first.host[0]
        self.host_total += last.host[1] - first.host[1]


class Contestant:
    """One contender's process at one rate, on a queue (and, for a worker, a database schema) of
    its own, from its start to its stop; its tasks and what was measured of them."""

    def __init__(self, setup: Setup, contender: Contender, load: int, rate: float) -> None:
        self.setup, self.contender, self.rate = setup, contender, rate
        self.run_id = f"l{uuid.uuid4().hex[:10]}"
        self.schema = f"bench_{self.run_id}"
        warmup = max(round(rate * WARMUP_SECONDS), 1)
        per_round = max(round(rate * setup.seconds / setup.rounds), 1)
        tasks = throughput.task_messages(
            self.run_id, setup.target_url, 0, warmup + per_round * setup.rounds
        )
        self.warmup = tasks[:warmup]
        self.segments = [
            tasks[warmup + n * per_round : warmup + (n + 1) * per_round]
            for n in range(setup.rounds)
        ]
        self.arrivals = Arrivals(tasks)
        self.run = LatencyRun(contender.name, load, rate, per_round * setup.rounds)
        self.log = setup.logs / f"{contender.name.replace(', ', '-')}-{load}.log"
        self.stats = self.log.with_suffix(".batches.json")
        self.windows: list[tuple[float, float]] = []
        self.lags: list[float] = []
        self.cpu = CpuTicks()
        self.queue = self.exchange = ""
        self.dead: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self.observer: aio_pika.abc.AbstractChannel | None = None

    async def start(self) -> None:
        setup, connection = self.setup, self.setup.connection
        objects = await throughput.declare_contender(
            connection,
            self.run_id,
            worker=self.contender.worker,
            concurrency=setup.concurrency,
            database_url=setup.database_url,
            schema=self.schema,
            worker_root=setup.worker_root,
        )
        self.queue, self.exchange, self.dead = objects.queue, objects.exchange, [*objects.others]
        command = objects.command
        if self.contender.worker:
            command = (*self.contender.command, f"--batch-stats={self.stats}")
        self.observer = await connection.channel()
        observed = await self.observer.declare_queue(exclusive=True, auto_delete=True)
        await observed.bind(self.exchange, throughput.EVENT_KEYS)
        await observed.consume(self.arrivals.on_message, no_ack=True)
        with self.log.open("ab") as sink:
            self.process = await asyncio.create_subprocess_exec(
                *command,
                cwd=objects.cwd,
                env=objects.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )
        await until_subscribed(connection, self.queue, self.process)

    async def send(self, tasks: list[Task], measured: bool) -> None:
        """Publish `tasks` at the rate and wait for their completions."""
        assert self.process is not None
        setup = self.setup
        first = throughput.take_snapshot(self.process.pid, setup.target_pid)
        lags = await publish_open_loop(
            setup.connection, self.queue, tasks, self.rate, self.arrivals, setup.rng
        )
        await self.arrivals.wait(len(self.arrivals.published), self.process)
        if measured:
            self.cpu.add(first, throughput.take_snapshot(self.process.pid, setup.target_pid))
            self.lags += lags
            began = self.arrivals.published[tasks[0].task_id]
            self.windows.append((began, time.perf_counter()))

    async def finish(self) -> LatencyRun:
        """Stop the process, drop its queue and schema; its figures."""
        run, setup = self.run, self.setup
        try:
            if self.process is not None:
                run.exit_code = await throughput.stop(self.process)
                if run.exit_code != 0:
                    run.problems.append(f"exit code after SIGTERM was {run.exit_code}, not 0")
        finally:
            if self.observer is not None:
                await self.observer.close()
            if self.queue:
                await throughput.delete_broker_objects(
                    setup.connection, [self.queue, *self.dead], [self.exchange]
                )
        measured = [task for segment in self.segments for task in segment]
        latencies = self.arrivals.latencies_ms(measured)
        run.completed = len(latencies)
        run.failed, run.duplicates = self.arrivals.failed, self.arrivals.duplicates
        if run.failed:
            run.problems.append(f"{run.failed} tasks failed")
        if latencies and run.completed == run.measured:
            run.p50_ms, run.p99_ms, run.p999_ms = (quantile(latencies, q) for q in QUANTILES)
            run.max_ms = latencies[-1]
        if self.lags:
            run.publish_lag_p99_ms = quantile(sorted(self.lags), 0.99)
        published = self.arrivals.published
        if all(segment[-1].task_id in published for segment in self.segments):
            spent = sum(
                published[segment[-1].task_id] - published[segment[0].task_id]
                for segment in self.segments
            )
            if spent > 0:
                run.arrivals_per_s = (run.measured - len(self.segments)) / spent
        ticks = throughput.ticks_to_ms
        if run.completed:
            run.cpu_ms_per_task = ticks(self.cpu.contender) / run.completed
            run.postgres_cpu_ms_per_task = ticks(self.cpu.postgres) / run.completed
            run.rabbitmq_cpu_ms_per_task = ticks(self.cpu.rabbitmq) / run.completed
        cpu = self.cpu
        if cpu.host_total:
            run.host_busy_percent = 100 * cpu.host_busy / cpu.host_total
            ours = cpu.contender + cpu.postgres + cpu.rabbitmq + cpu.own
            run.other_busy_percent = max(0.0, 100 * (cpu.host_busy - ours) / cpu.host_total)
        if self.contender.worker and self.process is not None:
            if self.stats.exists():
                run.batches = batch_times(self.stats, self.windows)
            else:
                run.problems.append("the worker wrote no batch times")
            run.problems.extend(throughput.log_problems(self.log))
            run.stages = await self.stages(measured)
            run.problems.extend(
                await throughput.check_and_drop_schema(
                    setup.database_url, self.schema, len(self.arrivals.published)
                )
            )
        return run

    async def stages(self, measured: list[Task]) -> dict[str, tuple[float, float]]:
        """The measured tasks' latency split at the worker's claim and completion statements,
        by the times the database recorded (its now(), when each statement began)."""
        import asyncpg  # noqa: PLC0415 - kept out of the baseline's process, as throughput.py

        conn = await asyncpg.connect(self.setup.database_url, timeout=10)
        rows = []
        try:
            rows = await conn.fetch(
                "SELECT task_id, extract(epoch FROM started_at)::float8 AS started, "
                f'extract(epoch FROM completed_at)::float8 AS completed FROM "{self.schema}".tasks '
                "WHERE task_id = any($1::text[])",
                [task.task_id for task in measured],
            )
        except asyncpg.UndefinedTableError:
            pass  # A worker that never started: its problems say so.
        finally:
            await conn.close()
        published, received = self.arrivals.published_at, self.arrivals.completed_at
        spans: dict[str, list[float]] = {name: [] for name in STAGES}
        for row in rows:
            task_id = row["task_id"]
            if task_id not in received or row["started"] is None or row["completed"] is None:
                continue
            marks = (published[task_id], row["started"], row["completed"], received[task_id])
            for name, begin, end in zip(STAGES, marks, marks[1:], strict=False):
                spans[name].append((end - begin) * 1000)
        return {
            name: (quantile(sorted(values), 0.5), quantile(sorted(values), 0.99))
            for name, values in spans.items()
            if values
        }


async def measure_at(
    setup: Setup, contenders: Sequence[Contender], load: int, rate: float
) -> list[LatencyRun]:
    """The contenders at `rate`/s, each started afresh and warmed up, then in turn, a segment
    each per round, so that what else the host runs meanwhile falls on all of them alike."""
    playing = [Contestant(setup, contender, load, rate) for contender in contenders]
    try:
        for contestant in playing:
            await contestant.start()
        for contestant in playing:
            await contestant.send(contestant.warmup, measured=False)
        for round_ in range(setup.rounds):
            # Each contender goes first in turn: none always follows the same one.
            turn = round_ % len(playing)
            for contestant in playing[turn:] + playing[:turn]:
                await contestant.send(contestant.segments[round_], measured=True)
    except (Failed, AMQPError) as exc:
        failing = next((c for c in playing if c.process and c.process.returncode is not None), None)
        (failing or playing[0]).run.problems.append(f"{type(exc).__name__}: {exc}")
    return [await contestant.finish() for contestant in playing]


async def peak_rate(
    connection: AbstractConnection,
    target_url: str,
    target_pid: int,
    tasks: int,
    concurrency: int,
    logs: Path,
    worker_root: Path,
    database_url: str,
) -> throughput.Run:
    """The worker's tasks/s with its queue full, as throughput.py measures it at 0 ms."""
    context = throughput.Context(
        connection,
        target_url,
        target_pid,
        tasks,
        concurrency,
        logs,
        worker_root,
        database_url,
    )
    return await throughput.measure_worker(context, 0)


@dataclass
class Results:
    peak: float | None
    peak_run: dict[str, Any] | None
    runs: list[LatencyRun]


async def bench(args: argparse.Namespace, logs: Path) -> Results:
    target, target_url = await throughput.start_target(logs)
    runs: list[LatencyRun] = []
    peak_run = None
    try:
        connection = await aio_pika.connect(
            AMQP_URL,
            timeout=10,
            client_properties={"connection_name": "agentless latency benchmark"},
        )
        async with connection:
            peak = args.peak
            if peak is None:
                measured = await peak_rate(
                    connection,
                    target_url,
                    target.pid,
                    args.peak_tasks,
                    args.concurrency,
                    logs,
                    args.worker_root,
                    DATABASE_URL,
                )
                peak_run = asdict(measured)
                progress(f"peak: {throughput.number(measured.tasks_per_s, 1)} tasks/s")
                if not measured.valid or measured.tasks_per_s is None:
                    progress(f"the peak run went wrong: {measured.problems}")
                    return Results(None, peak_run, runs)
                peak = measured.tasks_per_s
            setup = Setup(
                connection,
                target_url,
                target.pid,
                args.concurrency,
                args.seconds,
                args.rounds,
                logs,
                args.worker_root,
                DATABASE_URL,
                random.Random(args.seed),
            )
            contenders = [BASELINE, WORKER] + ([] if args.no_ungathered else [UNGATHERED_WORKER])
            for load in args.loads:
                for run in await measure_at(setup, contenders, load, peak * load / 100):
                    runs.append(run)
                    progress(
                        f"{load}% {run.contender}: p50 {throughput.number(run.p50_ms, 2)} ms, "
                        f"p99 {throughput.number(run.p99_ms, 2)} ms"
                        + (f" ({'; '.join(run.problems)})" if run.problems else "")
                    )
    finally:
        await throughput.stop(target)
    return Results(peak, peak_run, runs)


def progress(line: str) -> None:
    # On stderr, so that stdout holds only the results.
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Verdict:
    what: str
    value: str
    target: str
    passed: bool


def difference(worker: LatencyRun, baseline: LatencyRun, attribute: str) -> float | None:
    mine, theirs = getattr(worker, attribute), getattr(baseline, attribute)
    if not (worker.valid and baseline.valid) or mine is None or theirs is None:
        return None
    return float(mine - theirs)


def verdicts(runs: list[LatencyRun]) -> list[Verdict]:
    at = {(run.load_percent, run.contender): run for run in runs}
    baseline, worker = at.get((TARGET_LOAD, BASELINE.name)), at.get((TARGET_LOAD, WORKER.name))
    if baseline is None or worker is None:
        return []
    found = []
    for attribute, label, margin in (
        ("p50_ms", "p50", P50_MARGIN_MS),
        ("p99_ms", "p99", P99_MARGIN_MS),
    ):
        extra = difference(worker, baseline, attribute)
        found.append(
            Verdict(
                f"{TARGET_LOAD}% load: worker {label} - baseline {label}",
                "invalid run" if extra is None else f"{extra:+.2f} ms",
                f"<= {margin:g} ms",
                extra is not None and extra <= margin,
            )
        )
    return found


def gathering_costs(runs: list[LatencyRun]) -> list[str]:
    """What gathering adds to the worker's latency: the worker minus the ungathered worker."""
    at = {(run.load_percent, run.contender): run for run in runs}
    lines = []
    for load in sorted({run.load_percent for run in runs}):
        worker, ungathered = at.get((load, WORKER.name)), at.get((load, UNGATHERED_WORKER.name))
        if worker is None or ungathered is None:
            continue
        parts = []
        for attribute, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
            extra = difference(worker, ungathered, attribute)
            parts.append(f"{label} {'-' if extra is None else f'{extra:+.2f}'} ms")
        cpu = difference(worker, ungathered, "cpu_ms_per_task")
        parts.append(f"worker CPU/task {'-' if cpu is None else f'{cpu:+.3f}'} ms")
        lines.append(f"  at {load}%: {', '.join(parts)}")
    return lines


def batch_lines(runs: list[LatencyRun]) -> list[str]:
    timed = [run for run in runs if run.batches]
    if not timed:
        return []
    number = throughput.number
    lines = [
        "",
        "the workers' batches over the measured tasks: wait = from a claim's or completion's",
        "  submission to its batch's start (the gathering turns, and a flush still under way);",
        "  flush = the batch's statement and commit; size = items per batch.",
        f"{'load':>4}  {'contender':<18}  {'batch':<11}  {'batches':>7}  {'size':>5}  "
        f"{'wait p50 ms':>11}  {'wait p99 ms':>11}  {'flush p50 ms':>12}  {'flush p99 ms':>12}",
    ]
    for run in timed:
        for name, times in sorted(run.batches.items()):
            lines.append(
                f"{run.load_percent:>3}%  {run.contender:<18}  {name:<11}  {times.batches:>7}  "
                f"{times.mean_size:>5.2f}  {number(times.wait_p50_ms, 2):>11}  "
                f"{number(times.wait_p99_ms, 2):>11}  {number(times.flush_p50_ms, 2):>12}  "
                f"{number(times.flush_p99_ms, 2):>12}"
            )
    return lines


def stage_lines(runs: list[LatencyRun]) -> list[str]:
    staged = [run for run in runs if run.stages]
    if not staged:
        return []
    lines = [
        "",
        "where the workers' latency went (by the database's timestamps; p50 / p99 ms): to claim =",
        "  publish to the claim statement; claim to completion = to the completion statement",
        "  (claim commit, call, batch wait); completion to event = its commit, publish, routing.",
        f"{'load':>4}  {'contender':<18}  " + "  ".join(f"{name:>21}" for name in STAGES),
    ]
    for run in staged:
        cells = (
            "-"
            if name not in run.stages
            else f"{run.stages[name][0]:.2f} / {run.stages[name][1]:.2f}"
            for name in STAGES
        )
        lines.append(
            f"{run.load_percent:>3}%  {run.contender:<18}  " + "  ".join(f"{c:>21}" for c in cells)
        )
    return lines


def report(results: Results, args: argparse.Namespace) -> str:
    number = throughput.number
    cpus = len(os.sched_getaffinity(0))
    peak = "-" if results.peak is None else f"{results.peak:.1f}"
    how = "given with --peak" if results.peak_run is None else f"{args.peak_tasks} tasks queued"
    lines = [
        f"agentless latency: apiResponse tasks, 0 ms target, concurrency {args.concurrency}, "
        f"{cpus} CPUs, Python {sys.version.split()[0]}",
        f"worker's peak: {peak} tasks/s ({how}, as throughput.py measures it)",
        f"Poisson arrivals at each share of that peak for {args.seconds:g} s (after "
        f"{WARMUP_SECONDS:g} s of warm-up) in {args.rounds} segments, the contenders taking turns;",
        "latency: from just before a task's publish to its TaskCompleted event's arrival in this",
        "  process. Arrivals/s: as published. Publish lag: how late the publishes left against",
        "  their Poisson schedule (this process's own delays). CPU ms/task: the contender's",
        "  utime+stime / tasks; PostgreSQL and RabbitMQ: all their processes on this host.",
        "  Host busy: all CPUs during the contender's segments; other: the part of it spent by",
        "  none of the contender, PostgreSQL, RabbitMQ, the target and this benchmark.",
        "",
        f"{'load':>4}  {'rate/s':>7}  {'contender':<18}  {'tasks':>6}  {'p50 ms':>7}  "
        f"{'p99 ms':>7}  {'p99.9 ms':>8}  {'max ms':>7}  {'arrivals/s':>10}  "
        f"{'lag p99 ms':>10}  {'CPU ms/task':>11}  {'PG ms/task':>10}  {'MQ ms/task':>10}  "
        f"{'host busy %':>11}  {'other %':>7}",
    ]
    lines.extend(
        f"{run.load_percent:>3}%  {run.rate:>7.1f}  {run.contender:<18}  {run.completed:>6}  "
        f"{number(run.p50_ms, 2):>7}  {number(run.p99_ms, 2):>7}  {number(run.p999_ms, 2):>8}  "
        f"{number(run.max_ms, 1):>7}  {number(run.arrivals_per_s, 1):>10}  "
        f"{number(run.publish_lag_p99_ms, 2):>10}  {number(run.cpu_ms_per_task, 3):>11}  "
        f"{number(run.postgres_cpu_ms_per_task, 3):>10}  "
        f"{number(run.rabbitmq_cpu_ms_per_task, 3):>10}  {number(run.host_busy_percent, 0):>11}  "
        f"{number(run.other_busy_percent, 0):>7}"
        for run in results.runs
    )
    lines += batch_lines(results.runs)
    lines += stage_lines(results.runs)
    costs = gathering_costs(results.runs)
    if costs:
        lines += ["", "what gathering costs (worker minus worker, ungathered):", *costs]
    found = verdicts(results.runs)
    lines += ["", f"{'target':<36}  {'measured':>11}  {'wanted':>9}  verdict"]
    lines += [
        f"{v.what:<36}  {v.value:>11}  {v.target:>9}  {'PASS' if v.passed else 'FAIL'}"
        for v in found
    ]
    for run in results.runs:
        lines += [f"problem: {run.load_percent}% {run.contender}: {p}" for p in run.problems]
    return "\n".join(lines)


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("a positive number")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Publish-to-completion latency of the worker and of a bare baseline under "
        "Poisson arrivals at shares of the worker's peak rate."
    )
    parser.add_argument(
        "--seconds", type=positive, default=30.0, help="measured per run (default 30)"
    )
    parser.add_argument(
        "--loads",
        type=throughput.integers("percentages", 1, 99),
        default=[25, 50, 75],
        help="shares of the peak, in %% (default 25,50,75)",
    )
    parser.add_argument(
        "--peak-tasks",
        type=throughput.at_least(2),
        default=5000,
        help="tasks of the peak run (default 5000)",
    )
    parser.add_argument(
        "--peak", type=positive, help="the worker's peak in tasks/s, rather than measuring it"
    )
    parser.add_argument(
        "--rounds",
        type=throughput.at_least(1),
        default=6,
        help="segments per contender and rate, the contenders taking turns (default 6)",
    )
    parser.add_argument("--concurrency", type=throughput.at_least(1), default=256)
    parser.add_argument(
        "--no-ungathered",
        action="store_true",
        help="leave out the worker whose batches flush without gathering",
    )
    parser.add_argument("--seed", type=int, default=16, help="of the arrival times (default 16)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    throughput.add_worker_root(parser)
    parser.add_argument("--role", choices=["bench", "worker"], default="bench", help=SUPPRESS)
    parser.add_argument("--gather-turns", type=int, help=SUPPRESS)
    parser.add_argument("--batch-stats", type=Path, help=SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "worker":
        return run_timed_worker(args.gather_turns, args.batch_stats)
    args.worker_root = throughput.checked_worker_root(parser, args.worker_root)
    logs = Path(tempfile.mkdtemp(prefix="agentless-latency-"))
    with asyncio.Runner(loop_factory=throughput.event_loop) as runner:
        results = runner.run(bench(args, logs))
    print(report(results, args))
    if args.json:
        print(
            orjson.dumps(
                {
                    "peak": results.peak,
                    "peak_run": results.peak_run,
                    "runs": [asdict(run) for run in results.runs],
                    "verdicts": [asdict(v) for v in verdicts(results.runs)],
                },
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
    found = verdicts(results.runs)
    passed = (
        results.peak is not None
        and (bool(found) or TARGET_LOAD not in args.loads)
        and all(v.passed for v in found)
        and all(run.valid for run in results.runs)
    )
    if passed:
        shutil.rmtree(logs)
    else:
        print(f"logs kept in {logs}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
