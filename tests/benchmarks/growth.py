"""Cost as the tasks table grows: one worker through many rounds of apiResponse tasks.

    python tests/benchmarks/growth.py [--tasks 1000000] [--round 100000] [--retention on|off]
                                      [--concurrency 256] [--baseline-tasks 10000]
                                      [--store private|shared] [--json]

Run on demand, never by pytest. One real worker (`python -m worker worker`, AGENTLESS_CONCURRENCY
as given) runs N apiResponse tasks against the throughput benchmark's local target (0 ms delay),
on a private schema and queue prefix, in rounds. The store is by default a private PostgreSQL
cluster made for the run (tests/pg_cluster.py) with PostgreSQL's default settings, autovacuum on
as in any deployment, which no other client shares: its CPU is then the run's alone, counted
whole from /proc (the postmaster, its children, and the children that ended). `--store shared`
uses AGENTLESS_DATABASE_URL's server instead, whose settings may differ (with autovacuum off,
no deleted row's space is ever reused). Each round's tasks are published to the task
queue while the worker is already taking them; the round is timed from the moment its last
publish is confirmed to its last completion, so that the publisher's CPU never falls inside the
measured interval while the queue holds the rest of the round, and the worker never waits for
work. After each round the database's size is read (the schema's tables, and the tasks table with
its indexes and TOAST), with the tasks table's live and dead tuples as PostgreSQL's statistics
count them.

The baseline is the first round of the same run: the last round's tasks/s must be at least 90%
of the first's, each taken at the host's speed. A shared host's speed moves by 10-25% from one
round to the next (two runs of the same code: the last round at 86% and at 125% of the first),
and the worker's, PostgreSQL's and RabbitMQ's CPU per task move with it. RabbitMQ does the same
work for every task in every round (a delivery, an ack, an event published with a confirm), so
its CPU per task gauges how fast the host ran each round: a round's rate at the host's speed is
its tasks/s times its RabbitMQ CPU ms per task, against the first round's (92-101% in every
round of those two runs). The rates as measured are printed beside it, and decide when RabbitMQ's
CPU cannot be read. Beside them, throughput.py's bare baseline (no validation, no database) runs
`--baseline-tasks` tasks before the worker starts, on the same target, for scale, and once more
after the worker and the API have stopped: its second rate against its first is the host's
drift over the whole run.

With `--retention on`, an `agentless api` process (same schema and prefix) is started after the
first round with AGENTLESS_RETENTION set to twice that round's duration (from its first publish
to its last completion), so that its purge deletes completed tasks while the rounds go on. The
table then holds about two rounds of tasks, and purged_tasks two rounds of their tombstones:
from the sixth round on, the database's size must stay within 10% of its smallest, and the
tasks/s target holds as before. The purge looks for work once a minute: rounds much shorter than
that make the table's size swing with the purge's rounds rather than settle.

Exits 1 when a target is missed or the run went wrong; the processes' logs are kept then.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

# Run as a script, Python puts this file's directory on sys.path, not the repository's root; an
# installed copy of the package must not be measured in place of this checkout.
SELF: Final = Path(__file__).resolve()
ROOT: Final = SELF.parents[2]
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402
import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import orjson  # noqa: E402
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage  # noqa: E402

from tests.benchmarks.throughput import (  # noqa: E402
    AMQP_URL,
    DISTURBED_PERCENT,
    EVENT_KEYS,
    STALL_TIMEOUT,
    START_TIMEOUT,
    WORKER_COMMAND,
    Context,
    Snapshot,
    at_least,
    cpu_ticks,
    dead_letters,
    delete_broker_objects,
    free_port,
    log_problems,
    measure_baseline,
    number,
    prepublish,
    service_delta,
    start_target,
    stop,
    store_url,
    take_snapshot,
    task_messages,
    ticks_to_ms,
    worker_environment,
)
from worker.contract.models import Names  # noqa: E402
from worker.topology import declare_topology  # noqa: E402

# The last round's tasks/s as a share of the first's, at the least.
HOLD_TARGET: Final = 0.90
# With retention: the largest database size of the settled rounds over their smallest, at most.
FLAT_TARGET: Final = 1.10
# The first round whose size the retention has settled. A task is purged two rounds after it
# completed, and the tombstone it leaves (purged_tasks) two rounds after that: the purge's first
# deletions come in the third round (the API starts after the first), the first tombstones go in
# the fifth, and from the sixth new rows take the space these deletions freed.
SETTLED_FROM: Final = 6
MB: Final = 1024 * 1024
STORES: Final = {
    "private": "a private PostgreSQL cluster with PostgreSQL's default settings",
    "shared": "AGENTLESS_DATABASE_URL's PostgreSQL, shared with its other clients",
}


# --- /proc ---------------------------------------------------------------------------------


def cluster_ticks(postmaster: int) -> int:
    """CPU ticks of a whole PostgreSQL cluster: its postmaster's, its live children's (backends,
    autovacuum workers, checkpointer, WAL writer), and those of the children that have ended,
    which the kernel adds to the postmaster's cutime and cstime once it has reaped them."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        # A process may exit between listing /proc and reading it.
        with contextlib.suppress(OSError, ValueError, IndexError):
            data = (entry / "stat").read_bytes()
            # After the command name: state, ppid, ...; utime, stime, cutime, cstime are the
            # 12th to 15th fields.
            fields = data[data.rindex(b")") + 2 :].split()
            if int(entry.name) == postmaster:
                total += sum(int(value) for value in fields[11:15])
            elif int(fields[1]) == postmaster:
                total += int(fields[11]) + int(fields[12])
    return total


def parent_pid(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rindex(b")") + 2 :].split()[1])


@dataclass(frozen=True, slots=True)
class Reading:
    snapshot: Snapshot
    cluster_ticks: int
    api_ticks: int


@dataclass
class Probe:
    """The processes a round's readings cover."""

    target_pid: int
    worker_pid: int = 0
    postmaster_pid: int = 0
    api_pid: int | None = None

    def read(self) -> Reading:
        return Reading(
            take_snapshot(self.worker_pid, self.target_pid),
            cluster_ticks(self.postmaster_pid),
            0 if self.api_pid is None else cpu_ticks(self.api_pid),
        )


# --- following the completions --------------------------------------------------------------


class Rounds:
    """Completion events, counted for the round under way; the processes' /proc readings when
    the round's last task completes."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.prefix = ""
        self.expected = 0
        self.seen: set[str] = set()
        self.failed = 0
        self.duplicates = 0
        self.last: Reading | None = None
        self._progressed = asyncio.Event()

    def begin(self, prefix: str, expected: int) -> None:
        self.prefix, self.expected = prefix, expected
        # One round's ids at a time: a million would cost this process its share of the cores.
        self.seen = set()
        self.last = None

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        event: dict[str, Any] = orjson.loads(message.body)
        if event.get("name") != "TaskCompleted":
            return
        task_id = str(event["taskId"])
        if not task_id.startswith(self.prefix) or task_id in self.seen:
            # Delivery is at least once: a repeat is legal, but not a completion.
            self.duplicates += 1
            return
        self.seen.add(task_id)
        if event.get("result") != "succeeded":
            self.failed += 1
        if len(self.seen) == self.expected:
            self.last = self.probe.read()
        self._progressed.set()

    async def wait(self, process: asyncio.subprocess.Process, first_limit: float) -> None:
        """Until the round's last completion; BenchmarkError if the worker stalls or exits."""
        exited = asyncio.ensure_future(process.wait())
        try:
            limit = first_limit
            while self.last is None:
                self._progressed.clear()
                progressed = asyncio.ensure_future(self._progressed.wait())
                done, _ = await asyncio.wait(
                    {progressed, exited}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
                )
                progressed.cancel()
                count = f"{len(self.seen)} of {self.expected} completed"
                if exited in done:
                    raise BenchmarkError(f"the worker exited with {process.returncode}; {count}")
                if not done:
                    raise BenchmarkError(f"no completion for {limit:.0f} s; {count}")
                limit = STALL_TIMEOUT
        finally:
            exited.cancel()


class BenchmarkError(Exception):
    """The run cannot give a valid measurement; the message says why."""


# --- the database's size --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Size:
    schema_bytes: int
    tasks_bytes: int
    tasks_index_bytes: int
    live_tuples: int
    dead_tuples: int
    autovacuums: int
    indexes: dict[str, int]
    # Tuples each index of tasks has returned so far, and "(seq)" those its sequential scans read.
    reads: dict[str, int]


# Every table of the schema, with its indexes and TOAST; the tasks table's own figures.
SIZES: Final = """
SELECT (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'm', 'p')) AS schema_bytes,
       pg_total_relation_size(s.relid) AS tasks_bytes,
       pg_indexes_size(s.relid) AS tasks_index_bytes,
       s.n_live_tup, s.n_dead_tup, s.autovacuum_count, s.seq_tup_read
  FROM pg_stat_user_tables s
 WHERE s.schemaname = $1 AND s.relname = 'tasks'
"""
INDEXES: Final = """
SELECT indexrelname, pg_relation_size(indexrelid), idx_tup_read
  FROM pg_stat_user_indexes WHERE schemaname = $1 AND relname = 'tasks'
"""


async def read_size(conn: asyncpg.Connection, schema: str) -> Size:
    # The statistics reach the shared view when a backend's transaction ends or within a second
    # of it: the round's last updates are in by the time this reads them.
    await asyncio.sleep(1)
    row = await conn.fetchrow(SIZES, schema)
    if row is None:
        raise BenchmarkError(f"no tasks table in schema {schema}")
    indexes = await conn.fetch(INDEXES, schema)
    return Size(
        row["schema_bytes"],
        row["tasks_bytes"],
        row["tasks_index_bytes"],
        row["n_live_tup"],
        row["n_dead_tup"],
        row["autovacuum_count"],
        {name: size for name, size, _ in indexes},
        {"(seq)": row["seq_tup_read"]} | {name: read for name, _, read in indexes},
    )


# --- one round ------------------------------------------------------------------------------


@dataclass
class Round:
    number: int
    tasks: int
    # Completions within the timed interval: from the round's last confirmed publish to its last
    # completion.
    timed: int = 0
    seconds: float = 0.0
    # From the round's first publish to its last completion.
    wall_seconds: float = 0.0
    publish_seconds: float = 0.0
    tasks_per_s: float = 0.0
    worker_cpu_ms: float = 0.0
    # The backends of the worker's and the API's connections; the whole cluster's processes
    # (with autovacuum, checkpoints, WAL, and, on a shared cluster, other clients' backends).
    postgres_cpu_ms: float = 0.0
    postgres_all_cpu_ms: float = 0.0
    rabbitmq_cpu_ms: float = 0.0
    api_cpu_ms: float | None = None
    host_busy_percent: float | None = None
    other_busy_percent: float | None = None
    schema_mb: float = 0.0
    tasks_mb: float = 0.0
    tasks_index_mb: float = 0.0
    live_tuples: int = 0
    dead_tuples: int = 0
    autovacuums: int = 0
    indexes_mb: dict[str, float] = field(default_factory=dict)
    # Tuples read from tasks over the whole round, per task: what grows when a plan scans.
    rows_read: float = 0.0
    rows_read_by: dict[str, float] = field(default_factory=dict)

    def record(self, first: Reading, last: Reading, timed: int, backends: set[int]) -> None:
        self.timed = timed
        begin, end = first.snapshot, last.snapshot
        self.seconds = end.at - begin.at
        self.tasks_per_s = timed / self.seconds if self.seconds > 0 else 0.0
        before, after = begin.services["postgres"], end.services["postgres"]
        own = sum(after[pid] - before.get(pid, 0) for pid in backends if pid in after)
        cluster = last.cluster_ticks - first.cluster_ticks
        rabbitmq = service_delta(begin, end, "beam.smp")
        worker = end.cpu_ticks - begin.cpu_ticks
        api = last.api_ticks - first.api_ticks
        self.worker_cpu_ms = ticks_to_ms(worker) / timed
        self.postgres_cpu_ms = ticks_to_ms(own) / timed
        self.postgres_all_cpu_ms = ticks_to_ms(cluster) / timed
        self.rabbitmq_cpu_ms = ticks_to_ms(rabbitmq) / timed
        if last.api_ticks:
            self.api_cpu_ms = ticks_to_ms(api) / timed
        busy, total = (b - a for a, b in zip(begin.host, end.host, strict=True))
        if total:
            ours = worker + cluster + rabbitmq + api + end.own_ticks - begin.own_ticks
            self.host_busy_percent = 100 * busy / total
            self.other_busy_percent = max(0.0, 100 * (busy - ours) / total)

    def sized(self, size: Size, before: dict[str, int]) -> None:
        self.schema_mb = size.schema_bytes / MB
        self.tasks_mb = size.tasks_bytes / MB
        self.tasks_index_mb = size.tasks_index_bytes / MB
        self.live_tuples = size.live_tuples
        self.dead_tuples = size.dead_tuples
        self.autovacuums = size.autovacuums
        self.indexes_mb = {name: value / MB for name, value in size.indexes.items()}
        self.rows_read_by = {
            name: (read - before.get(name, 0)) / self.tasks for name, read in size.reads.items()
        }
        self.rows_read = sum(self.rows_read_by.values())


@dataclass
class Setting:
    """One run's names and processes."""

    connection: AbstractConnection
    names: Names
    schema: str
    database_url: str
    target_url: str
    run_id: str
    logs: Path
    rounds: Rounds
    db: asyncpg.Connection
    worker: asyncio.subprocess.Process | None = None
    api: asyncio.subprocess.Process | None = None

    @property
    def application(self) -> str:
        """The application_name of the worker's and the API's connections, which tells their
        backends from other clients' in pg_stat_activity."""
        return f"agentless-growth-{self.run_id}"

    async def backends(self) -> set[int]:
        rows = await self.db.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", self.application
        )
        return {row["pid"] for row in rows}


async def run_round(setting: Setting, nth: int, size: int, first_limit: float) -> Round:
    """Publish `size` tasks while the worker takes them, and time the rest of the round."""
    assert setting.worker is not None
    prefix = f"{setting.run_id}.{nth}-"
    tasks = task_messages(f"{setting.run_id}.{nth}", setting.target_url, 0, size)
    result = Round(nth, size)
    setting.rounds.begin(prefix, size)
    began = time.monotonic()
    await prepublish(setting.connection, setting.names.tasks, tasks)
    first = setting.rounds.probe.read()
    done_before = len(setting.rounds.seen)
    result.publish_seconds = first.snapshot.at - began
    del tasks
    await setting.rounds.wait(setting.worker, first_limit)
    last = setting.rounds.last
    assert last is not None
    if size - done_before < 2:
        raise BenchmarkError(
            f"round {nth}: the worker finished the round while it was being published; "
            "make the rounds larger"
        )
    result.wall_seconds = last.snapshot.at - began
    result.record(first, last, size - done_before, await setting.backends())
    return result


# --- the processes --------------------------------------------------------------------------

API_COMMAND: Final = (sys.executable, "-m", "worker", "api")


def process_env(setting: Setting, concurrency: int, **extra: str) -> dict[str, str]:
    # asyncpg passes the URL's parameters on as the session's settings.
    joiner = "&" if "?" in setting.database_url else "?"
    named = f"{setting.database_url}{joiner}application_name={setting.application}"
    env: dict[str, str] = worker_environment(
        named, setting.schema, setting.names.prefix, concurrency
    )
    env.update(extra)
    return env


async def spawn(args: Sequence[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as sink:
        return await asyncio.create_subprocess_exec(
            *args,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )


def retention_setting(seconds: float) -> str:
    return f"{math.ceil(seconds)}s"


async def start_api(setting: Setting, concurrency: int, retention_s: float) -> None:
    port = free_port()
    env = process_env(
        setting,
        concurrency,
        AGENTLESS_API_HOST="127.0.0.1",
        AGENTLESS_API_PORT=str(port),
        AGENTLESS_PUBLIC_URL=f"http://127.0.0.1:{port}",
        AGENTLESS_RETENTION=retention_setting(retention_s),
    )
    setting.api = await spawn(API_COMMAND, env, setting.logs / "api.log")
    setting.rounds.probe.api_pid = setting.api.pid
    url = f"http://127.0.0.1:{port}/readyz"
    async with asyncio.timeout(START_TIMEOUT), aiohttp.ClientSession() as session:
        while True:
            if setting.api.returncode is not None:
                raise BenchmarkError(f"the API exited with {setting.api.returncode} at start")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)


# --- the run --------------------------------------------------------------------------------


@dataclass
class Outcome:
    tasks: int
    round_size: int
    concurrency: int
    retention: bool
    store: str
    retention_s: float | None = None
    baseline_tasks: int = 0
    baseline_tasks_per_s: float | None = None
    baseline_cpu_ms: float | None = None
    baseline_after_tasks_per_s: float | None = None
    rounds: list[Round] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    duplicates: int = 0


async def bench(outcome: Outcome, database_url: str, logs: Path) -> None:
    target, target_url = await start_target(logs)
    try:
        connection = await aio_pika.connect(
            AMQP_URL, timeout=10, client_properties={"connection_name": "agentless growth bench"}
        )
        async with connection:
            if outcome.baseline_tasks:
                context = Context(
                    connection,
                    target_url,
                    target.pid,
                    outcome.baseline_tasks,
                    outcome.concurrency,
                    logs,
                    ROOT,
                    database_url,
                )
                baseline = await measure_baseline(context, 0)
                outcome.baseline_tasks_per_s = baseline.tasks_per_s
                outcome.baseline_cpu_ms = baseline.cpu_ms_per_task
                outcome.problems += [f"baseline: {p}" for p in baseline.problems]
                progress(f"baseline: {number(baseline.tasks_per_s, 1)} tasks/s")
            await run_worker(connection, database_url, target_url, target.pid, outcome, logs)
            if outcome.baseline_tasks:
                # Once more when the worker and the API are gone: the host's speed drifts over
                # a run this long, and the bare baseline's two rates show how far.
                after = await measure_baseline(context, 0)
                outcome.baseline_after_tasks_per_s = after.tasks_per_s
                outcome.problems += [f"baseline after the rounds: {p}" for p in after.problems]
                progress(f"baseline after the rounds: {number(after.tasks_per_s, 1)} tasks/s")
    finally:
        await stop(target)


async def run_worker(
    connection: AbstractConnection,
    database_url: str,
    target_url: str,
    target_pid: int,
    outcome: Outcome,
    logs: Path,
) -> None:
    run_id = f"g{uuid.uuid4().hex[:10]}"
    names = Names(f"agentless-bench.{run_id}")
    channel = await connection.channel()
    try:
        await declare_topology(channel, names)
    finally:
        await channel.close()
    observer = await connection.channel()
    db = await asyncpg.connect(database_url, timeout=10)
    # The postmaster, whose children are every process of the cluster.
    probe = Probe(
        target_pid, postmaster_pid=parent_pid(await db.fetchval("SELECT pg_backend_pid()"))
    )
    setting = Setting(
        connection,
        names,
        f"bench_growth_{run_id}",
        database_url,
        target_url,
        run_id,
        logs,
        Rounds(probe),
        db,
    )
    try:
        observed = await observer.declare_queue(exclusive=True, auto_delete=True)
        await observed.bind(names.events, EVENT_KEYS)
        await observed.consume(setting.rounds.on_message, no_ack=True)
        await run_rounds(setting, outcome)
    except BenchmarkError as exc:
        outcome.problems.append(str(exc))
    finally:
        outcome.duplicates = setting.rounds.duplicates
        for name, process in (("api", setting.api), ("worker", setting.worker)):
            if process is not None:
                code = await stop(process)
                if code != 0:
                    outcome.problems.append(f"{name} exit code after SIGTERM was {code}, not 0")
                outcome.problems += [
                    p.replace("worker logged", f"{name} logged")
                    for p in log_problems(logs / f"{name}.log")
                ]
        await observer.close()
        with contextlib.suppress(aio_pika.exceptions.AMQPError):
            dead = await dead_letters(connection, names.dead)
            if dead:
                outcome.problems.append(f"{dead} messages dead-lettered")
        await delete_broker_objects(connection, [names.tasks, names.dead], [names.events])
        try:
            if not outcome.retention and not outcome.problems:
                outcome.problems += await check_count(setting, outcome.tasks)
        finally:
            await db.execute(f'DROP SCHEMA IF EXISTS "{setting.schema}" CASCADE')
            await db.close()


async def run_rounds(setting: Setting, outcome: Outcome) -> None:
    setting.worker = await spawn(
        WORKER_COMMAND,
        process_env(setting, outcome.concurrency),
        setting.logs / "worker.log",
    )
    setting.rounds.probe.worker_pid = setting.worker.pid
    # One task through first: the worker has started, migrated and is consuming before the
    # first round is published, so that its start-up falls in no round.
    await run_warmup(setting)
    reads = (await read_size(setting.db, setting.schema)).reads
    left = outcome.tasks
    while left > 0:
        nth = len(outcome.rounds) + 1
        size = min(outcome.round_size, left)
        left -= size
        if outcome.retention and nth == 2:
            outcome.retention_s = 2 * outcome.rounds[0].wall_seconds
            await start_api(setting, outcome.concurrency, outcome.retention_s)
            progress(f"api started, AGENTLESS_RETENTION={retention_setting(outcome.retention_s)}")
        done = await run_round(setting, nth, size, START_TIMEOUT)
        size_now = await read_size(setting.db, setting.schema)
        done.sized(size_now, reads)
        reads = size_now.reads
        outcome.rounds.append(done)
        progress(
            f"round {nth}: {done.tasks_per_s:.1f} tasks/s, worker {done.worker_cpu_ms:.3f} "
            f"ms/task, PostgreSQL {done.postgres_cpu_ms:.3f} ms/task (all processes "
            f"{done.postgres_all_cpu_ms:.3f}), schema {done.schema_mb:.1f} MB, dead tuples "
            f"{done.dead_tuples}, rows read/task {done.rows_read:.1f}"
        )
    if setting.rounds.failed:
        outcome.problems.append(f"{setting.rounds.failed} tasks did not succeed")


async def check_count(setting: Setting, tasks: int) -> list[str]:
    succeeded = await setting.db.fetchval(
        f'SELECT count(*) FROM "{setting.schema}".tasks '
        "WHERE state = 'completed' AND result = 'succeeded'"
    )
    # The warm-up's task besides the rounds'.
    if succeeded != tasks + 1:
        return [f"the database records {succeeded} succeeded tasks, not {tasks + 1}"]
    return []


async def run_warmup(setting: Setting) -> None:
    assert setting.worker is not None
    prefix = f"{setting.run_id}.warmup-"
    setting.rounds.begin(prefix, 1)
    await prepublish(
        setting.connection,
        setting.names.tasks,
        task_messages(f"{setting.run_id}.warmup", setting.target_url, 0, 1),
    )
    await setting.rounds.wait(setting.worker, START_TIMEOUT)


def progress(text: str) -> None:
    # On stderr, so that stdout holds only the results.
    print(text, file=sys.stderr, flush=True)


# --- verdicts and the report ----------------------------------------------------------------


def at_host_speed(r: Round, first: Round) -> float | None:
    """The round's tasks/s as a share of the first's, each scaled by RabbitMQ's CPU per task.

    The broker does the same work for every task in every round (a delivery, an ack, an event
    published with a confirm), so its CPU per task moves only with the host's own speed: what
    other tenants take of the cores and caches under it. On a shared host that moves by 10-25%
    from one round to the next, and the worker's and PostgreSQL's CPU per task move with it."""
    if not first.tasks_per_s or not first.rabbitmq_cpu_ms:
        return None
    return (r.tasks_per_s * r.rabbitmq_cpu_ms) / (first.tasks_per_s * first.rabbitmq_cpu_ms)


def host_drift(outcome: Outcome) -> float | None:
    """The bare baseline's rate after the rounds as a share of its rate before them."""
    before, after = outcome.baseline_tasks_per_s, outcome.baseline_after_tasks_per_s
    if not before or after is None:
        return None
    return after / before


def share_down(share: float) -> str:
    """A share in %, rounded down: one shown as 90.0% must not be one that fails a 90% target."""
    return f"{math.floor(share * 1000) / 10:.1f}%"


@dataclass(frozen=True, slots=True)
class Verdict:
    what: str
    value: str
    target: str
    passed: bool
    # False for a figure shown beside the targets that decides nothing.
    counts: bool = True


def verdicts(outcome: Outcome) -> list[Verdict]:
    found: list[Verdict] = []
    rounds = outcome.rounds
    expected = math.ceil(outcome.tasks / outcome.round_size)
    if len(rounds) < 2 or len(rounds) < expected:
        found.append(
            Verdict("rounds run", f"{len(rounds)} of {expected}", ">= 2, all", passed=False)
        )
        return found
    first, last = rounds[0], rounds[-1]
    ratio = last.tasks_per_s / first.tasks_per_s if first.tasks_per_s else 0.0
    steady = at_host_speed(last, first)
    if steady is not None:
        found.append(
            Verdict(
                "last/first round tasks/s, at host speed",
                share_down(steady),
                f">= {HOLD_TARGET:.0%}",
                steady >= HOLD_TARGET,
            )
        )
    found.append(
        Verdict(
            "last/first round tasks/s" + (", as measured" if steady is not None else ""),
            share_down(ratio),
            f">= {HOLD_TARGET:.0%}" if steady is None else "-",
            ratio >= HOLD_TARGET,
            counts=steady is None,
        )
    )
    if outcome.retention:
        settled = rounds[SETTLED_FROM - 1 :]
        if len(settled) < 2:
            found.append(
                Verdict(
                    f"settled rounds (from round {SETTLED_FROM})",
                    str(len(settled)),
                    ">= 2",
                    passed=False,
                )
            )
        else:
            sizes = [r.schema_mb for r in settled]
            spread = max(sizes) / min(sizes) if min(sizes) else math.inf
            found.append(
                Verdict(
                    f"database size, rounds {SETTLED_FROM}-{len(rounds)}: max/min",
                    f"{math.ceil(spread * 1000) / 1000:.3f}",
                    f"<= {FLAT_TARGET:.2f}",
                    spread <= FLAT_TARGET,
                )
            )
    return found


def verdict_word(v: Verdict) -> str:
    if not v.counts:
        return "(shown)"
    return "PASS" if v.passed else "FAIL"


def report(outcome: Outcome, found: list[Verdict]) -> str:
    retention = (
        f"AGENTLESS_RETENTION {retention_setting(outcome.retention_s)} (twice round 1) from round 2"
        if outcome.retention and outcome.retention_s is not None
        else "no retention"
    )
    lines = [
        f"agentless growth: {outcome.tasks} apiResponse tasks in rounds of {outcome.round_size} "
        f"through one worker, concurrency {outcome.concurrency}, 0 ms target; {retention}; "
        f"store: {STORES[outcome.store]}",
        "tasks/s: completions from the round's last confirmed publish to its last completion,",
        "  over that time (the queue holds the rest of the round throughout). CPU ms/task: the",
        "  worker process's utime+stime over that interval / those completions; PG: the backends",
        "  of the worker's and the API's connections; PG all: every process of the cluster, and",
        "  those that ended (autovacuum, checkpoints, WAL; on a shared cluster, other clients');",
        "  MQ: RabbitMQ; at MQ: tasks/s as a share of the first round's, each scaled by MQ ms,",
        "  which gauges the host's speed (the broker's work per task is the same every round);",
        "  api: the API process (its purge duty). busy: all CPUs; other: busy time not spent",
        "  by these nor by this benchmark and its target. read/task: rows of tasks read by",
        "  index and sequential scans over the whole round, per task (pg_stat_user_indexes and",
        "  _tables).",
        "  Sizes after the round: every table of the schema with indexes and TOAST; the tasks",
        "  table likewise, and its indexes alone; live/dead tuples and autovacuums of tasks as",
        "  pg_stat_user_tables counts them.",
    ]
    if outcome.baseline_tasks_per_s is not None:
        lines.append(
            f"bare baseline (throughput.py, {outcome.baseline_tasks} tasks, same target): "
            f"{outcome.baseline_tasks_per_s:.1f} tasks/s, "
            f"{number(outcome.baseline_cpu_ms, 3)} CPU ms/task"
        )
    drift = host_drift(outcome)
    if drift is not None:
        lines.append(
            f"bare baseline again after the rounds: {outcome.baseline_after_tasks_per_s:.1f} "
            f"tasks/s, {100 * drift:.0f}% of its first rate: the host's own drift over the run, "
            "which the last round's share of the first includes"
        )
    lines += [
        "",
        f"{'round':>5}  {'done':>8}  {'tasks/s':>8}  {'of 1st':>6}  {'at MQ':>5}  "
        f"{'worker ms':>9}  "
        f"{'PG ms':>6}  {'PG all':>6}  {'MQ ms':>6}  {'api ms':>6}  {'busy%':>5}  {'other%':>6}  "
        f"{'schema MB':>9}  {'tasks MB':>8}  {'idx MB':>7}  {'live':>9}  {'dead':>8}  {'av':>3}  "
        f"{'read/task':>9}",
    ]
    done = 0
    first = outcome.rounds[0].tasks_per_s if outcome.rounds else 0.0
    for r in outcome.rounds:
        done += r.tasks
        share = f"{100 * r.tasks_per_s / first:.0f}%" if first else "-"
        steady = at_host_speed(r, outcome.rounds[0])
        gauged = f"{100 * steady:.0f}%" if steady is not None else "-"
        lines.append(
            f"{r.number:>5}  {done:>8}  {r.tasks_per_s:>8.1f}  {share:>6}  {gauged:>5}  "
            f"{r.worker_cpu_ms:>9.3f}  {r.postgres_cpu_ms:>6.3f}  {r.postgres_all_cpu_ms:>6.3f}  "
            f"{r.rabbitmq_cpu_ms:>6.3f}  "
            f"{number(r.api_cpu_ms, 3):>6}  {number(r.host_busy_percent, 0):>5}  "
            f"{number(r.other_busy_percent, 0):>6}  {r.schema_mb:>9.1f}  {r.tasks_mb:>8.1f}  "
            f"{r.tasks_index_mb:>7.1f}  {r.live_tuples:>9}  {r.dead_tuples:>8}  "
            f"{r.autovacuums:>3}  {r.rows_read:>9.1f}"
        )
    if outcome.rounds:
        last = outcome.rounds[-1]
        lines.append(
            "tasks indexes after the last round: "
            + ", ".join(f"{name} {mb:.1f} MB" for name, mb in sorted(last.indexes_mb.items()))
        )
        for r in (outcome.rounds[0], last):
            lines.append(
                f"rows of tasks read per task in round {r.number}, by index: "
                + ", ".join(
                    f"{name} {read:.1f}"
                    for name, read in sorted(r.rows_read_by.items(), key=lambda kv: -kv[1])
                    if read >= 0.05
                )
            )
    lines += ["", f"{'target':<40}  {'measured':>9}  {'wanted':>8}  verdict"]
    lines += [f"{v.what:<40}  {v.value:>9}  {v.target:>8}  {verdict_word(v)}" for v in found]
    disturbed = [
        str(r.number)
        for r in outcome.rounds
        if r.other_busy_percent is not None and r.other_busy_percent > DISTURBED_PERCENT
    ]
    if disturbed:
        lines.append(
            f"note: other processes took over {DISTURBED_PERCENT:g}% of the host's CPU in rounds "
            f"{', '.join(disturbed)}; compare those rounds' CPU ms/task rather than their tasks/s, "
            "or run again on a quiet host."
        )
    if outcome.duplicates:
        lines.append(f"note: {outcome.duplicates} completion events repeated (at least once)")
    lines += [f"problem: {p}" for p in outcome.problems]
    return "\n".join(lines)


def run_benchmark(outcome: Outcome, as_json: bool) -> int:
    logs = Path(tempfile.mkdtemp(prefix="agentless-growth-"))
    # A private cluster has PostgreSQL's default configuration, autovacuum on, as a deployment's.
    with store_url("none" if outcome.store == "private" else None) as database_url:
        asyncio.run(bench(outcome, database_url, logs))
    found = verdicts(outcome)
    print(report(outcome, found))
    if as_json:
        results = {**asdict(outcome), "verdicts": [asdict(v) for v in found]}
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    passed = all(v.passed for v in found if v.counts) and not outcome.problems
    if passed:
        shutil.rmtree(logs)
    else:
        print(f"logs kept in {logs}", file=sys.stderr)
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Tasks/s, CPU per task and database size of one worker as tasks accumulate."
    )
    parser.add_argument(
        "--tasks", type=at_least(2), default=1_000_000, help="in all (default 1000000)"
    )
    parser.add_argument(
        "--round", type=at_least(2), default=100_000, help="tasks per round (default 100000)"
    )
    parser.add_argument(
        "--retention",
        choices=["on", "off"],
        default="off",
        help="on: an API process purges completed tasks older than two rounds (default off)",
    )
    parser.add_argument("--concurrency", type=at_least(1), default=256, help="default 256")
    parser.add_argument(
        "--baseline-tasks",
        type=at_least(0),
        default=10_000,
        help="tasks of the bare baseline run once before the worker's (0: none; default 10000)",
    )
    parser.add_argument(
        "--store",
        choices=["private", "shared"],
        default="private",
        help="private: a PostgreSQL cluster made for the run, with PostgreSQL's default settings "
        "(autovacuum on) and no other clients; shared: AGENTLESS_DATABASE_URL's (default private)",
    )
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    if not Path("/proc/self/stat").exists():
        parser.error("this benchmark reads CPU from /proc: it runs on Linux only")
    if args.baseline_tasks == 1:
        parser.error("--baseline-tasks: 0, or at least 2")
    outcome = Outcome(
        args.tasks,
        args.round,
        args.concurrency,
        args.retention == "on",
        args.store,
        baseline_tasks=args.baseline_tasks,
    )
    return run_benchmark(outcome, args.json)


if __name__ == "__main__":
    sys.exit(main())
