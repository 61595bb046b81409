"""Horizontal scaling on one machine: 1, 2 and 3 worker processes on one queue and one database.

    python tests/benchmarks/horizontal.py [--tasks 12000] [--processes 1,2,3] [--delay 100]
                                          [--concurrency 64] [--json] [--worker-root DIR]

Run on demand, never by pytest. For each number of processes, N apiResponse tasks against
throughput.py's target (100 ms before it answers) are queued; then that many bare baseline
consumers (throughput.py's), and after them that many workers (`python -m worker worker`, all on
the same queue and database schema), consume them, each at the same concurrency (its prefetch).
The rate is timed from the moment the broker counts all of them as consumers to the last
completion event, so that start-ups staggered by a second do not count.

Every task's call carries its id, and the target counts the calls: each task must have been
invoked exactly once, and each worker task must have been recorded as one attempt. The CPU of
the contenders, PostgreSQL, RabbitMQ and the target over the timed interval, in cores, says what
the two cores were spent on as processes were added.

It exits 1 when a task was invoked twice (or not at all), or a run went wrong (then the
contenders' logs are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import aio_pika
import aiohttp
import asyncpg
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

# Run as a script, Python puts this file's directory on sys.path, not the repository's root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.benchmarks import throughput
from tests.benchmarks.throughput import AMQP_URL, CLOCK_TICKS, DATABASE_URL, Task

SUBSCRIBE_TIMEOUT: Final = 60.0


@dataclass(frozen=True, slots=True)
class Reading:
    """CPU ticks since boot of what shares the host, at one moment."""

    at: float
    contenders: int
    target: int
    bench: int
    services: dict[str, dict[int, int]]
    host: tuple[int, int]


def read(pids: list[int], target_pid: int) -> Reading:
    return Reading(
        time.monotonic(),
        sum(throughput.cpu_ticks(pid) for pid in pids),
        throughput.cpu_ticks(target_pid),
        throughput.cpu_ticks(os.getpid()),
        throughput.service_ticks(),
        throughput.host_ticks(),
    )


class Finished:
    """The completion events of one run; a reading of the host when all contenders consume and
    when the last task completed."""

    def __init__(self, tasks: list[Task]) -> None:
        self.expected = {task.task_id for task in tasks}
        self.seen: set[str] = set()
        self.failed = 0
        self.duplicates = 0
        self.pids: list[int] = []
        self.target_pid = 0
        self.first: Reading | None = None
        self.seen_at_first = 0
        self.last: Reading | None = None
        self.progressed = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        event: dict[str, Any] = orjson.loads(message.body)
        task_id = str(event.get("taskId"))
        if event.get("name") != "TaskCompleted" or task_id not in self.expected:
            return
        if task_id in self.seen:
            self.duplicates += 1
            return
        self.seen.add(task_id)
        if event.get("result") != "succeeded":
            self.failed += 1
        if len(self.seen) == len(self.expected):
            self.last = read(self.pids, self.target_pid)
        self.progressed.set()

    def start(self) -> None:
        self.first = read(self.pids, self.target_pid)
        self.seen_at_first = len(self.seen)

    async def wait(self, processes: list[asyncio.subprocess.Process]) -> str | None:
        """Wait until every task completed; otherwise, why not."""
        return await throughput.until_progress_stops(
            self.progressed,
            lambda: self.last is not None,
            processes,
            lambda: f"{len(self.seen)} of {len(self.expected)} completed",
        )


@dataclass
class ScaleRun:
    """One contender's figures with one number of processes."""

    contender: str
    processes: int
    tasks: int
    timed_tasks: int = 0
    tasks_per_s: float | None = None
    cpu_ms_per_task: float | None = None
    # Cores busy over the timed interval (the host has len(os.sched_getaffinity(0))).
    contender_cores: float | None = None
    postgres_cores: float | None = None
    rabbitmq_cores: float | None = None
    target_cores: float | None = None
    host_busy_cores: float | None = None
    # Busy time not spent by any of the above nor this benchmark: other processes, interrupts.
    other_cores: float | None = None
    # Tasks each worker recorded as its attempt's (from the database).
    per_worker: list[int] = field(default_factory=list)
    invoked_twice: int = 0
    never_invoked: int = 0
    attempts_not_one: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems and self.tasks_per_s is not None

    def record(self, finished: Finished) -> None:
        first, last = finished.first, finished.last
        if first is None or last is None:
            return
        self.timed_tasks = len(finished.expected) - finished.seen_at_first
        seconds = last.at - first.at
        if seconds <= 0 or self.timed_tasks < 1:
            return
        self.tasks_per_s = self.timed_tasks / seconds

        def cores(ticks: int) -> float:
            return ticks / CLOCK_TICKS / seconds

        self.cpu_ms_per_task = throughput.ticks_to_ms(last.contenders - first.contenders) / (
            self.timed_tasks
        )
        self.contender_cores = cores(last.contenders - first.contenders)
        self.target_cores = cores(last.target - first.target)
        for name, attribute in (("postgres", "postgres_cores"), ("beam.smp", "rabbitmq_cores")):
            before, after = first.services[name], last.services[name]
            ticks = sum(value - before.get(pid, 0) for pid, value in after.items())
            setattr(self, attribute, cores(ticks))
        busy, total = (b - a for a, b in zip(first.host, last.host, strict=True))
        if total:
            self.host_busy_cores = len(os.sched_getaffinity(0)) * busy / total
            ours = self.contender_cores + self.target_cores + cores(last.bench - first.bench)
            ours += (self.postgres_cores or 0.0) + (self.rabbitmq_cores or 0.0)
            self.other_cores = max(self.host_busy_cores - ours, 0.0)


async def calls_by_task(target_url: str) -> dict[str, int]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{target_url}{throughput.CALLS_PATH}") as response,
    ):
        counted: dict[str, int] = orjson.loads(await response.read())
        return counted


async def until_consumers(
    connection: AbstractConnection, queue: str, wanted: int, processes: list[Any]
) -> None:
    """Return once the broker counts `wanted` consumers of `queue`; raise if a process exits or
    they take too long."""
    channel = await connection.channel()
    try:
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
            while True:
                declared = await channel.declare_queue(queue, passive=True)
                if (declared.declaration_result.consumer_count or 0) >= wanted:
                    return
                if any(process.returncode is not None for process in processes):
                    raise RuntimeError("a process exited before consuming")
                await asyncio.sleep(0.02)
    finally:
        await channel.close()


@dataclass(frozen=True, slots=True)
class Setup:
    connection: AbstractConnection
    target_url: str
    target_pid: int
    tasks: int
    delay_ms: int
    concurrency: int
    logs: Path
    worker_root: Path
    database_url: str


async def measure(setup: Setup, worker: bool, processes: int) -> ScaleRun:
    contender = "worker" if worker else "baseline"
    run = ScaleRun(contender, processes, setup.tasks)
    run_id = f"h{uuid.uuid4().hex[:10]}"
    schema = f"bench_{run_id}"
    objects = await throughput.declare_contender(
        setup.connection,
        run_id,
        worker=worker,
        concurrency=setup.concurrency,
        database_url=setup.database_url,
        schema=schema,
        worker_root=setup.worker_root,
    )
    tasks = throughput.task_messages(
        run_id, setup.target_url, setup.delay_ms, setup.tasks, tag_calls=True
    )
    finished = Finished(tasks)
    finished.target_pid = setup.target_pid
    logs = [setup.logs / f"{contender}-{processes}-{n}.log" for n in range(processes)]
    channel = await setup.connection.channel()
    started: list[asyncio.subprocess.Process] = []
    try:
        observed = await channel.declare_queue(exclusive=True, auto_delete=True)
        await observed.bind(objects.exchange, throughput.EVENT_KEYS)
        await observed.consume(finished.on_message, no_ack=True)
        await throughput.prepublish(setup.connection, objects.queue, tasks)
        for log in logs:
            with log.open("ab") as sink:
                started.append(
                    await asyncio.create_subprocess_exec(
                        *objects.command,
                        cwd=objects.cwd,
                        env=objects.env,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=sink,
                        stderr=sink,
                    )
                )
        finished.pids = [process.pid for process in started]
        try:
            await until_consumers(setup.connection, objects.queue, processes, started)
            finished.start()
            problem = await finished.wait(started)
            if problem is not None:
                run.problems.append(problem)
        except (RuntimeError, TimeoutError) as exc:
            run.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            codes = await asyncio.gather(*(throughput.stop(process) for process in started))
        run.problems.extend(
            f"process {n} exited with {code} after SIGTERM, not 0"
            for n, code in enumerate(codes)
            if code != 0
        )
        run.record(finished)
        if finished.failed:
            run.problems.append(f"{finished.failed} tasks failed")
        calls = await calls_by_task(setup.target_url)
        counts = [calls.get(task.task_id, 0) for task in tasks]
        run.invoked_twice = sum(1 for count in counts if count > 1)
        run.never_invoked = sum(1 for count in counts if count == 0)
        if run.invoked_twice:
            run.problems.append(f"{run.invoked_twice} tasks invoked more than once")
        if run.never_invoked:
            run.problems.append(f"{run.never_invoked} tasks never invoked")
        for dead in objects.others:
            dead_lettered = await throughput.dead_letters(setup.connection, dead)
            if dead_lettered:
                run.problems.append(f"{dead_lettered} messages dead-lettered")
    finally:
        await channel.close()
        await objects.delete(setup.connection)
    if worker:
        for log in logs:
            run.problems.extend(throughput.log_problems(log))
        await attempts(setup.database_url, schema, run)
        run.problems.extend(
            await throughput.check_and_drop_schema(setup.database_url, schema, setup.tasks)
        )
    return run


async def attempts(database_url: str, schema: str, run: ScaleRun) -> None:
    """What the database recorded: attempts per task, and which worker made each."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(
            f'SELECT worker_id, attempts, count(*) AS n FROM "{schema}".tasks '
            "GROUP BY worker_id, attempts"
        )
    finally:
        await conn.close()
    per_worker: Counter[int] = Counter()
    for row in rows:
        per_worker[row["worker_id"]] += row["n"]
        if row["attempts"] != 1:
            run.attempts_not_one += row["n"]
    run.per_worker = sorted(per_worker.values(), reverse=True)
    if run.attempts_not_one:
        run.problems.append(f"{run.attempts_not_one} tasks recorded with attempts other than 1")


async def bench(args: argparse.Namespace, logs: Path) -> list[ScaleRun]:
    runs: list[ScaleRun] = []
    target, target_url = await throughput.start_target(logs)
    try:
        connection = await aio_pika.connect(
            AMQP_URL,
            timeout=10,
            client_properties={"connection_name": "agentless horizontal benchmark"},
        )
        async with connection:
            setup = Setup(
                connection,
                target_url,
                target.pid,
                args.tasks,
                args.delay,
                args.concurrency,
                logs,
                args.worker_root,
                DATABASE_URL,
            )
            for processes in args.processes:
                for worker in (False, True):
                    run = await measure(setup, worker, processes)
                    runs.append(run)
                    print(
                        f"{processes} x {run.contender}: "
                        f"{throughput.number(run.tasks_per_s, 1)} tasks/s"
                        + (f" ({'; '.join(run.problems)})" if run.problems else ""),
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        await throughput.stop(target)
    return runs


def report(runs: list[ScaleRun], args: argparse.Namespace) -> str:
    number = throughput.number
    cpus = len(os.sched_getaffinity(0))
    lines = [
        f"agentless horizontal: {args.tasks} apiResponse tasks per run, {args.delay} ms target, "
        f"concurrency {args.concurrency} per process, {cpus} CPUs, Python "
        f"{sys.version.split()[0]}",
        "tasks/s: tasks completed from the moment all N processes consume to the last completion,",
        "  / that time. Cores: CPU time over that interval / its length: all N contender",
        "  processes, all of PostgreSQL's and RabbitMQ's, the target; host: every CPU's busy time;",
        "  other: the host's busy time that none of those nor this benchmark spent.",
        "  x1: the rate as a multiple of the same contender's with one process. Per worker: tasks",
        "  each worker ran, from the database. Twice: tasks whose endpoint was called more than",
        "  once (counted at the target); attempts: worker tasks recorded with attempts but 1.",
        "",
        f"{'N':>2}  {'contender':<9}  {'tasks/s':>8}  {'x1':>5}  {'CPU ms/task':>11}  "
        f"{'contenders':>10}  {'PostgreSQL':>10}  {'RabbitMQ':>8}  {'target':>6}  "
        f"{'host busy':>9}  {'other':>5}  {'twice':>5}  {'attempts':>8}  per worker",
    ]
    single = {run.contender: run.tasks_per_s for run in runs if run.processes == 1}
    for run in runs:
        alone = single.get(run.contender)
        scale = run.tasks_per_s / alone if run.tasks_per_s and alone else None
        lines.append(
            f"{run.processes:>2}  {run.contender:<9}  {number(run.tasks_per_s, 1):>8}  "
            f"{number(scale, 2):>5}  {number(run.cpu_ms_per_task, 3):>11}  "
            f"{number(run.contender_cores, 2):>10}  {number(run.postgres_cores, 2):>10}  "
            f"{number(run.rabbitmq_cores, 2):>8}  {number(run.target_cores, 2):>6}  "
            f"{number(run.host_busy_cores, 2):>9}  {number(run.other_cores, 2):>5}  "
            f"{run.invoked_twice:>5}  "
            f"{run.attempts_not_one if run.contender == 'worker' else '-':>8}  "
            f"{' / '.join(map(str, run.per_worker)) or '-'}"
        )
    twice = sum(run.invoked_twice + run.attempts_not_one for run in runs)
    lines += [
        "",
        f"no task invoked twice: {'PASS' if not twice else 'FAIL'}",
    ]
    for run in runs:
        lines += [f"problem: {run.processes} x {run.contender}: {p}" for p in run.problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Tasks/s of 1, 2 and 3 workers on one queue and database, beside as many "
        "bare baselines; every task invoked exactly once."
    )
    parser.add_argument(
        "--tasks", type=throughput.at_least(2), default=12_000, help="per run (default 12000)"
    )
    parser.add_argument(
        "--processes",
        type=throughput.integers("process counts", 1),
        default=[1, 2, 3],
        help="numbers of processes (default 1,2,3)",
    )
    parser.add_argument(
        "--delay", type=throughput.at_least(0), default=100, help="target delay in ms (100)"
    )
    parser.add_argument(
        "--concurrency", type=throughput.at_least(1), default=64, help="per process (default 64)"
    )
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    throughput.add_worker_root(parser)
    args = parser.parse_args(argv)
    args.worker_root = throughput.checked_worker_root(parser, args.worker_root)
    logs = Path(tempfile.mkdtemp(prefix="agentless-horizontal-"))
    with asyncio.Runner(loop_factory=throughput.event_loop) as runner:
        runs = runner.run(bench(args, logs))
    print(report(runs, args))
    if args.json:
        print(orjson.dumps([asdict(run) for run in runs], option=orjson.OPT_INDENT_2).decode())
    passed = all(run.valid for run in runs)
    if passed:
        shutil.rmtree(logs)
    else:
        print(f"logs kept in {logs}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
