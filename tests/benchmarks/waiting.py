"""Callback tasks waiting at scale: callbacks, deadlines and listings with 100,000 tasks waiting.

    python tests/benchmarks/waiting.py [--tasks 100000] [--spread-seconds 600] [--rate 500]
                                       [--seed-rate N] [--listing-seconds 30]
                                       [--listing-rate 20]

Run on demand, never by pytest. The issue's targets, with N callback tasks waiting at once and
their deadlines spread evenly over ten minutes: callbacks posted for half of them at 500/s are
answered with a p99 under 50 ms, the other half time out at most 2 s after their deadlines, and
`GET /tasks?state=waiting` answers with a p99 under 50 ms (first page and a deep page), beside a
bare aiohttp handler's p99 measured in the same run, by the same client, at the same rate.

How, in phases on one timeline (wall clock, which on this host is the database's):

1. Seeding. One real `python -m worker worker` and one `python -m worker api` (which serves the
   callbacks and sweeps deadlines too, as every API process does) share a queue prefix and a
   schema unique to the run. The tasks invoke a local endpoint that answers at once and keeps
   each task's AuthToken (tests/benchmarks/callbacks.py's). 500 warm-up tasks, which time out at
   once, give the worker's pace; the N tasks are then queued at 75% of it (or `--seed-rate`),
   held back while the worker is more than a second behind. The worker counts a deadline from
   its claim, in whole seconds: each task's timeoutSeconds is chosen when it is queued, so that
   its deadline falls in its place after the moment all are planned to wait. When the worker
   slows down, that moment moves later for the tasks not yet queued, which go out in reverse
   order of their deadlines: the move packs deadlines closer (the report gives the busiest
   second) rather than letting one fall before all tasks wait. The run gives up (exit 2) if the
   seeding ends too late for the listing phase.
2. Listing, for `--listing-seconds` once all N wait (less if the seeding ended late): open-loop
   requests at `--listing-rate` per second each to the API's first page and a deep page (the
   middle of the waiting tasks) of `GET /tasks?state=waiting`, and to a bare aiohttp handler in
   a process of its own (the throughput benchmark's target), interleaved. The worker's CPU
   meanwhile is its idle cost: it sweeps, and nothing is due.
3. Callbacks and deadlines. TaskCompleted is posted for every other task (in the order of their
   deadlines) at `--rate` per second, open loop, each with its token, to `POST
   /plans/{planId}/events`; the deadlines of all N are spread evenly over `--spread-seconds`,
   starting 2 s after the first callback (timeouts are whole seconds: no task may time out
   before its callback is sent). Response time is each callback's, as the client sees it.
4. Once the callbacks are answered, only deadlines remain: the CPU of the worker, of the API and
   of the run's PostgreSQL backends (application_name) from then until 2.5 s past the last
   deadline, divided by the tasks that timed out meanwhile, is what sweeping costs. The worker's
   CPU while nothing is due (the listing phase) is shown beside it.

Lateness is completed_at minus deadline, both written by the database (its now()). Checks: every
task ends with exactly one result (succeeded by its callback, or failed `timed out waiting for
callback`), every callback is answered 200, and every task's TaskCompleted event is published
(counted on the run's events exchange; repeats are reported). Queues, exchange and schema are
removed after the run. Exit status: 0 when every target is met, 1 when one is missed or a check
fails, 2 when the run could not be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
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
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage  # noqa: E402

from tests.benchmarks.callbacks import (  # noqa: E402
    AMQP_URL,
    DATABASE_URL,
    HUB,
    PLAN,
    START_TIMEOUT,
    BenchmarkError,
    Child,
    Setting,
    answers,
    endpoint,
    free_port,
    remove_topology,
    start,
    until,
)
from tests.benchmarks.throughput import (  # noqa: E402
    cpu_ticks,
    event_loop,
    host_ticks,
    start_target,
    stop,
    ticks_to_ms,
)
from worker.contract.models import Names  # noqa: E402
from worker.topology import declare_topology  # noqa: E402

CALLBACK_P99_MS: Final = 50.0
LATENESS_MAX_S: Final = 2.0
LISTING_P99_MS: Final = 50.0
ROWS_PER_PAGE: Final = 50
# The first deadline comes this long after the first callback: timeouts are whole seconds, and a
# task's claim comes a moment after its publish, so a deadline may fall up to about a second
# before its planned place.
DEADLINE_LEAD: Final = 2.0
# Past the last deadline, the lateness target and a sweep: the end of the CPU window.
SETTLE: Final = LATENESS_MAX_S + 0.5
# The tasks are queued at this share of the pace the worker showed on the warm-up tasks, and
# are planned to wait SEED_SLACK after the last is queued.
PACE_SHARE: Final = 0.75
PACE_SECONDS: Final = 10.0
SEED_SLACK: Final = 5.0
# Tasks that time out during the seeding, run first to give the worker's pace.
WARM_UP: Final = 500
# Tasks brought to waiting per second below which the run is given up as too slow to measure.
SLOWEST_SEEDING: Final = 50
PUBLISH_CHUNK: Final = 50
# A client that starts a request this late is no longer open loop.
CLIENT_LAG_LIMIT: Final = 0.05
# Open connections at most: open-loop requests beyond it wait for one, and that wait counts.
CONNECTIONS: Final = 512
# Repeats of an event are legal (at least once); the last ones are given this long to arrive.
EVENTS_TIMEOUT: Final = 15.0


# --- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scale:
    tasks: int
    spread: float
    rate: float
    listing_seconds: float
    listing_rate: float
    # Tasks queued per second while seeding; None: from the worker's pace on the warm-up.
    seed_rate: float | None

    @property
    def deep_page(self) -> int:
        """The page in the middle of the waiting tasks."""
        return max(2, self.tasks // 2 // ROWS_PER_PAGE)

    def offset(self, index: int) -> float:
        """Where task `index`'s deadline falls, in seconds after the moment all tasks wait."""
        return self.listing_seconds + DEADLINE_LEAD + (index + 0.5) * self.spread / self.tasks


@dataclass(frozen=True, slots=True)
class Phases:
    """When each phase begins, in wall-clock seconds, from the deadlines the tasks were given."""

    all_waiting: float
    listing_begin: float
    callbacks_begin: float
    last_deadline: float

    @property
    def listing_seconds(self) -> float:
        return self.callbacks_begin - self.listing_begin


def called_back(index: int) -> bool:
    """Every other task, so that both halves' deadlines spread over the whole window."""
    return index % 2 == 0


def task_id_of(index: int) -> str:
    return f"t-{index:07d}"


# --- measuring ---------------------------------------------------------------------------------


def percentile(values: list[float], share: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


@dataclass
class Requests:
    """One kind of request's response times, as the client saw them."""

    name: str
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    first_error: str | None = None

    async def send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        token: str | None = None,
    ) -> None:
        headers = {} if body is None else {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        began = time.perf_counter()
        try:
            async with session.request(method, url, data=body, headers=headers) as answer:
                text = await answer.read()
                status = answer.status
        except aiohttp.ClientError as exc:
            status, text = 0, repr(exc).encode()
        self.latencies_ms.append((time.perf_counter() - began) * 1000)
        self.statuses[status] += 1
        if status != 200 and self.first_error is None:
            self.first_error = f"HTTP {status}: {text[:300].decode(errors='replace')}"

    def figures(self) -> str:
        ms = self.latencies_ms
        if not ms:
            return f"{self.name:<44} no requests"
        return (
            f"{self.name:<44} {len(ms):>7,} {percentile(ms, 0.5):>8.1f} "
            f"{percentile(ms, 0.99):>8.1f} {max(ms):>8.1f}"
        )


async def paced(
    count: int, rate: float, begin_at: float, fire: Callable[[int], Coroutine[Any, Any, None]]
) -> float:
    """Start `fire(k)` at `begin_at + k / rate` (wall clock) for each k, whether or not earlier
    ones have answered (open loop); the latest any was started, in seconds."""
    running: set[asyncio.Task[None]] = set()
    lag = 0.0
    for k in range(count):
        delay = begin_at + k / rate - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lag = max(lag, -delay)
        task = asyncio.create_task(fire(k))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.gather(*running)
    return lag


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.time()))


class Backends:
    """CPU ticks of the PostgreSQL backends serving the run's processes (by application_name),
    sampled every second, so that a pool connection closed within the window loses a second of
    its ticks at most; the client's own connections are not among them."""

    def __init__(self, conn: asyncpg.Connection, application: str) -> None:
        self._conn = conn
        self._application = application
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}

    async def sample(self, *, opening: bool = False) -> None:
        rows = await self._conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", self._application
        )
        for row in rows:
            pid = row["pid"]
            # A backend gone between the query and the read is lost (a second of its ticks).
            with contextlib.suppress(OSError, ValueError, IndexError):
                ticks = cpu_ticks(pid)
                # One that appears after the opening sample started within the window.
                self._first.setdefault(pid, ticks if opening else 0)
                self._last[pid] = ticks

    def ticks(self) -> int:
        return sum(last - self._first[pid] for pid, last in self._last.items())

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[None]:
        await self.sample(opening=True)

        async def every_second() -> None:
            while True:
                await asyncio.sleep(1.0)
                await self.sample()

        sampler = asyncio.create_task(every_second())
        try:
            yield
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            await self.sample()


@dataclass
class Window:
    """CPU of the run's processes over an interval."""

    seconds: float = 0.0
    worker_ticks: int = 0
    api_ticks: int = 0
    postgres_ticks: int = 0
    host_busy: float = 0.0
    timed_out: int = 0


@dataclass
class Events:
    """TaskCompleted events seen on the run's exchange, by task."""

    seen: Counter[str] = field(default_factory=Counter)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        event = orjson.loads(message.body)
        if event.get("name") == "TaskCompleted" and event["taskId"].startswith("t-"):
            self.seen[str(event["taskId"])] += 1


@dataclass
class Outcome:
    """What the database says of the run's tasks once all completed."""

    lateness_s: list[float] = field(default_factory=list)
    wrong: Counter[str] = field(default_factory=Counter)
    first_wrong: str | None = None
    earliest_deadline: float = 0.0
    latest_deadline: float = 0.0
    # The most deadlines of timed-out tasks within one second: how evenly they are spread.
    busiest_second: int = 0


@dataclass
class Result:
    scale: Scale
    phases: Phases
    seeded_in: float
    # The called-back tasks, in the order of their deadlines.
    called: list[str]
    callbacks: Requests = field(default_factory=lambda: Requests("callbacks (POST …/events)"))
    listings: list[Requests] = field(default_factory=list)
    idle_worker_ms_per_s: float = 0.0
    # Shares of a core (the API's, the client's) and of the host's CPUs while calling back.
    callback_cpu: tuple[float, float, float] = (0.0, 0.0, 0.0)
    callback_lag: float = 0.0
    listing_lag: float = 0.0
    window: Window = field(default_factory=Window)
    outcome: Outcome = field(default_factory=Outcome)
    events_missing: int = 0
    events_repeated: int = 0
    load: tuple[float, float] = (0.0, 0.0)


# --- seeding -----------------------------------------------------------------------------------


def task_body(task_id: str, url: str, timeout: int) -> bytes:
    return orjson.dumps(
        {
            "taskId": task_id,
            "planId": PLAN,
            "hubName": HUB,
            "request": {"method": "POST", "url": url},
            "waitForCompletion": "callback",
            "timeoutSeconds": timeout,
        }
    )


async def publish(channel: AbstractChannel, names: Names, bodies: dict[str, bytes]) -> None:
    await asyncio.gather(
        *(
            channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=task_id,
                ),
                routing_key=names.tasks,
            )
            for task_id, body in bodies.items()
        )
    )


async def warm_up(
    channel: AbstractChannel, names: Names, url: str, tokens: dict[str, str], worker: Child
) -> float:
    """The worker's pace, in tasks invoked per second, over tasks that time out at once."""
    await publish(
        channel,
        names,
        {f"warmup-{n:04d}": task_body(f"warmup-{n:04d}", url, 1) for n in range(WARM_UP)},
    )
    first = None
    while len(tokens) < WARM_UP:
        worker.check_alive()
        if first is None and tokens:
            first = (time.monotonic(), len(tokens))
        await asyncio.sleep(0.02)
    if first is None:
        first = (time.monotonic() - 1, 0)
    return (WARM_UP - first[1]) / max(time.monotonic() - first[0], 1e-3)


class Pace:
    """The worker's rate of invocations (the endpoint's tokens) over the last PACE_SECONDS."""

    def __init__(self, tokens: dict[str, str], rate: float) -> None:
        """Starting from `rate`, as if measured over the last second."""
        self._tokens = tokens
        self._samples: deque[tuple[float, int]] = deque(
            [(time.monotonic() - 1, len(tokens) - round(rate))]
        )

    def rate(self) -> float:
        now, count = time.monotonic(), len(self._tokens)
        self._samples.append((now, count))
        while now - self._samples[0][0] > PACE_SECONDS and len(self._samples) > 2:
            self._samples.popleft()
        then, before = self._samples[0]
        return max(1.0, (count - before) / max(now - then, 1e-3))


async def seed(
    channel: AbstractChannel,
    names: Names,
    scale: Scale,
    url: str,
    tokens: dict[str, str],
    worker: Child,
) -> float:
    """Queue every task, each with the timeout that puts its deadline in its place; the moment
    all tasks are planned to wait.

    The deadlines are counted from that moment, which the pace of the seeding sets: the tasks
    are queued at `scale.seed_rate` per second, or by default at a share of the pace the worker
    showed on warm-up tasks, each held back while the worker is more than a second behind. A
    task's timeout is chosen when it goes out. When the worker slows down (others load the
    machine), the plan moves later, for the tasks not yet queued: these go out in reverse order
    of their deadlines, so that a move packs the deadlines closer rather than letting an early
    one fall before all tasks wait."""
    warm_up_rate = await warm_up(channel, names, url, tokens, worker)
    rate = scale.seed_rate or warm_up_rate * PACE_SHARE
    pace = Pace(tokens, warm_up_rate)
    began = time.time()
    planned = began + scale.tasks / rate + SEED_SLACK
    print(
        f"warm-up: the worker invoked {warm_up_rate:.0f} tasks/s; seeding {scale.tasks:,} at "
        f"{rate:.0f}/s at most",
        file=sys.stderr,
        flush=True,
    )
    for sent, end in enumerate(range(scale.tasks, 0, -PUBLISH_CHUNK)):
        await sleep_until(began + sent * PUBLISH_CHUNK / rate)
        while sent * PUBLISH_CHUNK + WARM_UP - len(tokens) > max(2 * PUBLISH_CHUNK, rate):
            worker.check_alive()
            await asyncio.sleep(0.05)
        now = time.time()
        behind = end + sent * PUBLISH_CHUNK + WARM_UP - len(tokens)
        planned = max(planned, now + behind / min(rate, pace.rate()) + SEED_SLACK)
        await publish(
            channel,
            names,
            {
                task_id_of(index): task_body(
                    task_id_of(index), url, max(1, round(planned + scale.offset(index) - now))
                )
                for index in range(max(0, end - PUBLISH_CHUNK), end)
            },
        )
    return planned


async def waiting_count(conn: asyncpg.Connection) -> tuple[int, int]:
    """(waiting, completed) tasks of the run, the warm-up's aside."""
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE state = 'waiting') AS waiting,"
        " count(*) FILTER (WHERE state = 'completed') AS completed FROM tasks"
        " WHERE task_id LIKE 't-%'"
    )
    assert row is not None
    return row["waiting"], row["completed"]


async def all_waiting(
    conn: asyncpg.Connection, scale: Scale, worker: Child, planned: float
) -> Result:
    """Once every task waits: the phases, from the deadlines the tasks were given."""
    try:
        async with asyncio.timeout(max(0.0, planned - time.time()) + scale.listing_seconds / 2):
            while True:
                worker.check_alive()
                waiting, completed = await waiting_count(conn)
                if completed:
                    raise BenchmarkError(
                        f"{completed} tasks completed while seeding; see {worker.log}"
                    )
                if waiting == scale.tasks:
                    break
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise BenchmarkError(
            f"the seeding fell behind its plan ({waiting:,} of {scale.tasks:,} waiting); lower "
            "--seed-rate"
        ) from None
    now = time.time()
    rows = await conn.fetch(
        "SELECT task_id, extract(epoch FROM deadline)::float8 AS deadline FROM tasks"
        " WHERE task_id LIKE 't-%' ORDER BY deadline, task_id"
    )
    callbacks_begin = rows[0]["deadline"] - DEADLINE_LEAD
    listing = min(scale.listing_seconds, callbacks_begin - now - 1)
    if listing < scale.listing_seconds / 2:
        raise BenchmarkError(
            f"the seeding took longer than planned: the first deadline is "
            f"{rows[0]['deadline'] - now:.1f} s after all tasks waited; lower --seed-rate"
        )
    phases = Phases(now, callbacks_begin - listing, callbacks_begin, rows[-1]["deadline"])
    called = [row["task_id"] for row in rows if called_back(int(row["task_id"][2:]))]
    return Result(scale, phases, 0.0, called)


async def worker_consumes(channel: AbstractChannel, names: Names, worker: Child) -> None:
    async def consuming() -> bool:
        queue = await channel.declare_queue(names.tasks, passive=True)
        return bool(queue.declaration_result.consumer_count)

    await until(consuming, worker, START_TIMEOUT)


# --- the phases --------------------------------------------------------------------------------


async def listing_phase(
    session: aiohttp.ClientSession, result: Result, api_url: str, bare_url: str, worker: Child
) -> None:
    scale = result.scale
    first = Requests("GET /tasks?state=waiting (first page)")
    deep = Requests(f"GET /tasks?state=waiting&pageNumber={scale.deep_page} (deep)")
    bare = Requests("bare aiohttp handler (baseline)")
    result.listings = [bare, first, deep]
    listed = f"{api_url}/tasks?state=waiting&rowsPerPage={ROWS_PER_PAGE}"
    urls = [
        (bare, f"{bare_url}/bare"),
        (first, listed),
        (deep, f"{listed}&pageNumber={scale.deep_page}"),
    ]

    async def fire(k: int) -> None:
        requests, url = urls[k % len(urls)]
        await requests.send(session, "GET", url)

    worker_before = cpu_ticks(worker.process.pid)
    began = time.monotonic()
    phases = result.phases
    count = int(phases.listing_seconds * scale.listing_rate) * len(urls)
    result.listing_lag = await paced(
        count, scale.listing_rate * len(urls), phases.listing_begin, fire
    )
    result.idle_worker_ms_per_s = ticks_to_ms(cpu_ticks(worker.process.pid) - worker_before) / (
        time.monotonic() - began
    )


async def callback_phase(
    session: aiohttp.ClientSession,
    result: Result,
    api_url: str,
    tokens: dict[str, str],
    api: Child,
) -> None:
    called = result.called
    url = f"{api_url}/plans/{PLAN}/events"

    async def fire(k: int) -> None:
        task_id = called[k]
        body = orjson.dumps({"name": "TaskCompleted", "taskId": task_id, "result": "succeeded"})
        await result.callbacks.send(session, "POST", url, body=body, token=tokens[task_id])

    await sleep_until(result.phases.callbacks_begin)
    began, api_before, own_before = (
        time.monotonic(),
        cpu_ticks(api.process.pid),
        cpu_ticks(os.getpid()),
    )
    host_before = host_ticks()
    result.callback_lag = await paced(
        len(called), result.scale.rate, result.phases.callbacks_begin, fire
    )
    seconds = time.monotonic() - began
    host_after = host_ticks()
    # Whether the API, the client or the host ran out of CPU, if the callbacks were slow.
    result.callback_cpu = (
        ticks_to_ms(cpu_ticks(api.process.pid) - api_before) / 1000 / seconds,
        ticks_to_ms(cpu_ticks(os.getpid()) - own_before) / 1000 / seconds,
        (host_after[0] - host_before[0]) / max(1, host_after[1] - host_before[1]),
    )


async def deadline_phase(
    conn: asyncpg.Connection, result: Result, worker: Child, api: Child, application: str
) -> None:
    """From the last callback's answer to just past the last deadline: sweeping only."""
    backends = Backends(conn, application)
    began_db = await conn.fetchval("SELECT now()")
    began, host_before = time.monotonic(), host_ticks()
    worker_before, api_before = cpu_ticks(worker.process.pid), cpu_ticks(api.process.pid)
    async with backends.sampling():
        await sleep_until(result.phases.last_deadline + SETTLE)
    window = result.window
    window.seconds = time.monotonic() - began
    window.worker_ticks = cpu_ticks(worker.process.pid) - worker_before
    window.api_ticks = cpu_ticks(api.process.pid) - api_before
    window.postgres_ticks = backends.ticks()
    host_after = host_ticks()
    window.host_busy = (host_after[0] - host_before[0]) / max(1, host_after[1] - host_before[1])
    window.timed_out = await conn.fetchval(
        "SELECT count(*) FROM tasks WHERE completed_by = 'timeout'"
        " AND completed_at > $1 AND completed_at <= now()",
        began_db,
    )


async def all_completed(conn: asyncpg.Connection, worker: Child, api: Child) -> None:
    async def done() -> bool:
        api.check_alive()
        waiting, _ = await waiting_count(conn)
        return waiting == 0

    await until(done, worker, 60)


async def read_outcome(conn: asyncpg.Connection, result: Result) -> None:
    rows = await conn.fetch(
        "SELECT task_id, state, result, completed_by, reason,"
        " extract(epoch FROM completed_at - deadline)::float8 AS late,"
        " extract(epoch FROM deadline)::float8 AS deadline FROM tasks WHERE task_id LIKE 't-%'"
    )
    outcome = result.outcome
    expected = {task_id_of(i): called_back(i) for i in range(result.scale.tasks)}
    deadlines = []
    for row in rows:
        back = expected.pop(row["task_id"], None)
        if back is None:
            kind = "unknown task"
        elif back and (row["result"], row["completed_by"]) == ("succeeded", "callback"):
            continue
        elif not back and (row["result"], row["completed_by"], row["reason"]) == (
            "failed",
            "timeout",
            "timed out waiting for callback",
        ):
            outcome.lateness_s.append(row["late"])
            deadlines.append(row["deadline"])
            continue
        else:
            kind = "called back, not succeeded" if back else "not called back, not timed out"
        outcome.wrong[kind] += 1
        if outcome.first_wrong is None:
            outcome.first_wrong = f"{row['task_id']}: {dict(row)}"
    outcome.wrong["never recorded"] += len(expected)
    outcome.wrong = +outcome.wrong
    if deadlines:
        outcome.earliest_deadline, outcome.latest_deadline = min(deadlines), max(deadlines)
        outcome.busiest_second = max(Counter(int(d) for d in deadlines).values())


# --- the run -----------------------------------------------------------------------------------


def new_setting(logs: Path) -> tuple[Setting, str]:
    """The run's names, and the application_name its processes' database sessions carry."""
    run = uuid.uuid4().hex[:10]
    schema = f"bench_waiting_{run}"
    application = f"agentless-bench-waiting-{run}"
    joiner = "&" if "?" in DATABASE_URL else "?"
    setting = Setting(
        names=Names(f"agentless-bench.waiting.{run}"),
        schema=schema,
        database_url=f"{DATABASE_URL}{joiner}search_path={schema}&application_name={application}",
        signing_key=secrets.token_urlsafe(32),
        logs=logs,
    )
    return setting, application


@contextlib.asynccontextmanager
async def events_counted(channel: AbstractChannel, names: Names) -> AsyncIterator[Events]:
    events = Events()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(names.events, "task.completed.#")
    tag = await queue.consume(events.on_message, no_ack=True)
    try:
        yield events
    finally:
        await queue.cancel(tag)


async def check_events(events: Events, result: Result) -> None:
    deadline = time.monotonic() + EVENTS_TIMEOUT
    while len(events.seen) < result.scale.tasks and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    result.events_missing = result.scale.tasks - len(events.seen)
    result.events_repeated = sum(n - 1 for n in events.seen.values())


async def bench(scale: Scale, logs: Path) -> Result:
    setting, application = new_setting(logs)
    plain_url = setting.database_url.replace(f"&application_name={application}", "")
    api_port = free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    children: list[Child] = []
    target, bare_url = await start_target(logs)
    connection = await aio_pika.connect(
        AMQP_URL, client_properties={"connection_name": "agentless waiting benchmark"}
    )
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, setting.names)
        api = await start(
            "api", ["-m", "worker", "api"], setting.env(AGENTLESS_API_PORT=str(api_port)), logs
        )
        children.append(api)
        await until(lambda: answers(f"{api_url}/readyz"), api, START_TIMEOUT)
        async with (
            endpoint() as (url, tokens),
            events_counted(channel, setting.names) as events,
        ):
            worker = await start(
                "worker",
                ["-m", "worker", "worker"],
                setting.env(AGENTLESS_PUBLIC_URL=api_url),
                logs,
            )
            children.append(worker)
            await worker_consumes(channel, setting.names, worker)
            conn = await asyncpg.connect(plain_url)
            try:
                result = await measure(
                    scale,
                    conn,
                    channel,
                    setting,
                    application,
                    (worker, api),
                    (api_url, bare_url, url),
                    tokens,
                )
                await all_completed(conn, worker, api)
                await read_outcome(conn, result)
                await check_events(events, result)
            finally:
                await conn.close()
    finally:
        for child in reversed(children):
            await child.stop()
        await stop(target)
        with contextlib.suppress(aio_pika.exceptions.AMQPError):
            await connection.close()
        await remove_topology(setting.names)
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{setting.schema}" CASCADE')
        finally:
            await conn.close()
    return result


async def measure(
    scale: Scale,
    conn: asyncpg.Connection,
    channel: AbstractChannel,
    setting: Setting,
    application: str,
    processes: tuple[Child, Child],
    urls: tuple[str, str, str],
    tokens: dict[str, str],
) -> Result:
    worker, api = processes
    api_url, bare_url, endpoint_url = urls
    began = time.time()
    planned = await seed(channel, setting.names, scale, endpoint_url, tokens, worker)
    result = await all_waiting(conn, scale, worker, planned)
    result.seeded_in = result.phases.all_waiting - began
    print(
        f"{scale.tasks:,} tasks waiting after {result.seeded_in:.0f} s; listing for "
        f"{result.phases.listing_seconds:.0f} s, callbacks in "
        f"{result.phases.callbacks_begin - time.time():.0f} s",
        file=sys.stderr,
        flush=True,
    )
    # The client's own collector pauses would count as the server's latency.
    gc.collect()
    gc.freeze()
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:
        await listing_phase(session, result, api_url, bare_url, worker)
        print("listing sampled; callbacks and deadlines", file=sys.stderr, flush=True)
        await callback_phase(session, result, api_url, tokens, api)
    worker.check_alive()
    api.check_alive()
    print("callbacks answered; deadlines only", file=sys.stderr, flush=True)
    await deadline_phase(conn, result, worker, api, application)
    return result


# --- the report --------------------------------------------------------------------------------


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def report(result: Result) -> tuple[str, bool]:
    scale, window, outcome = result.scale, result.window, result.outcome
    lines = [
        f"waiting: {scale.tasks:,} callback tasks waiting at once (seeded through RabbitMQ by one "
        f"worker in {result.seeded_in:.0f} s), deadlines spread over {scale.spread:g} s; "
        f"callbacks for half at {scale.rate:g}/s (open loop)",
        f"machine: {os.cpu_count()} CPUs; load average {result.load[0]:.2f} before, "
        f"{result.load[1]:.2f} after; host busy {window.host_busy:.0%} in the deadline window",
        "",
        f"{'requests':<44} {'count':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    lines += [r.figures() for r in [result.callbacks, *result.listings]]
    lines.append(
        f"  (open loop; the client started requests at most {result.callback_lag * 1000:.1f} ms "
        f"late for callbacks, {result.listing_lag * 1000:.1f} ms for listings; listings at "
        f"{scale.listing_rate:g}/s each over {result.phases.listing_seconds:.0f} s, interleaved)"
    )
    lines.append(
        f"  (while calling back: the API used {result.callback_cpu[0]:.0%} of a core, the client "
        f"{result.callback_cpu[1]:.0%}, the host's CPUs were {result.callback_cpu[2]:.0%} busy)"
    )
    late = outcome.lateness_s
    lines += [
        "",
        f"deadline lateness (completed_at - deadline, database clock), {len(late):,} timed out:",
    ]
    if late:
        lines.append(
            f"  p50 {percentile(late, 0.5) * 1000:.0f} ms, p99 {percentile(late, 0.99) * 1000:.0f}"
            f" ms, max {max(late) * 1000:.0f} ms, min {min(late) * 1000:.0f} ms; deadlines from "
            f"{outcome.earliest_deadline - result.phases.all_waiting:+.1f} s to "
            f"{outcome.latest_deadline - result.phases.all_waiting:+.1f} s of all waiting, "
            f"{len(late) / max(1.0, outcome.latest_deadline - outcome.earliest_deadline):.0f}/s "
            f"on average, {outcome.busiest_second} in the busiest second"
        )
    per = max(1, window.timed_out)
    lines += [
        "",
        f"sweeping: {window.timed_out:,} timed out in the {window.seconds:.0f} s after the last "
        f"callback; CPU per timed-out task (share of a core):",
    ]
    for name, ticks in (
        ("worker", window.worker_ticks),
        ("API", window.api_ticks),
        ("PostgreSQL (the run's backends)", window.postgres_ticks),
    ):
        ms = ticks_to_ms(ticks)
        lines.append(
            f"  {name:<32} {ms / per:6.2f} ms  ({ms / 1000 / max(window.seconds, 1e-9):.1%})"
        )
    lines.append(
        f"  worker idle with {scale.tasks:,} waiting, nothing due: "
        f"{result.idle_worker_ms_per_s:.1f} ms CPU per second"
    )
    callback_p99 = (
        percentile(result.callbacks.latencies_ms, 0.99)
        if result.callbacks.latencies_ms
        else math.inf
    )
    listing_p99 = [
        (r.name, percentile(r.latencies_ms, 0.99) if r.latencies_ms else math.inf)
        for r in result.listings[1:]
    ]
    lateness_max = max(late) if late else math.inf
    targets = [
        (
            f"callback p99 < {CALLBACK_P99_MS:g} ms",
            f"{callback_p99:.1f} ms",
            callback_p99 < CALLBACK_P99_MS,
        ),
        (
            f"lateness max < {LATENESS_MAX_S:g} s",
            f"{lateness_max:.3f} s",
            lateness_max < LATENESS_MAX_S,
        ),
    ]
    targets += [
        (
            f"{name.split(' (')[0][:40]} p99 < {LISTING_P99_MS:g} ms",
            f"{p99:.1f} ms",
            p99 < LISTING_P99_MS,
        )
        for name, p99 in listing_p99
    ]
    lines += ["", f"{'target':<56} {'measured':>10}  verdict"]
    lines += [f"{what:<56} {value:>10}  {verdict(ok)}" for what, value, ok in targets]
    checks = check_lines(result)
    lines += ["", "checks:", *[f"  {text}: {verdict(ok)}" for text, ok in checks]]
    passed = all(ok for _, _, ok in targets) and all(ok for _, ok in checks)
    return "\n".join(lines), passed


def check_lines(result: Result) -> list[tuple[str, bool]]:
    outcome = result.outcome
    requests = [result.callbacks, *result.listings]
    answered = "; ".join(
        f"{r.name.split(' (')[0]}: "
        + ", ".join(f"{n:,} x {status}" for status, n in sorted(r.statuses.items()))
        for r in requests
    )
    ends = ", ".join(f"{n:,} {kind}" for kind, n in outcome.wrong.items()) or "none"
    found = [
        (
            f"every request answered 200 ({answered})",
            all(set(r.statuses) <= {200} for r in requests),
        ),
        (
            f"every task ended with its one expected result (wrong: {ends})"
            + (f"; first: {outcome.first_wrong}" if outcome.first_wrong else ""),
            not outcome.wrong,
        ),
        (
            f"every TaskCompleted published ({result.events_missing:,} missing, "
            f"{result.events_repeated:,} repeated)",
            result.events_missing == 0,
        ),
        (
            f"the client kept its pace (started at most {CLIENT_LAG_LIMIT * 1000:g} ms late)",
            max(result.callback_lag, result.listing_lag) <= CLIENT_LAG_LIMIT,
        ),
        (
            "every deadline fell after all tasks waited",
            not result.outcome.lateness_s or outcome.earliest_deadline > result.phases.all_waiting,
        ),
    ]
    found.extend(
        (f"{r.name}: first error {r.first_error}", False) for r in requests if r.first_error
    )
    return found


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be above 0")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Callbacks, deadlines and listings with many callback tasks waiting."
    )
    parser.add_argument("--tasks", type=positive(int), default=100_000, help="default 100000")
    parser.add_argument(
        "--spread-seconds", type=positive(float), default=600.0, help="deadlines over (600)"
    )
    parser.add_argument("--rate", type=positive(float), default=500.0, help="callbacks/s (500)")
    parser.add_argument(
        "--seed-rate",
        type=positive(float),
        help="tasks queued per second while seeding (default: 75%% of the worker's pace)",
    )
    parser.add_argument("--listing-seconds", type=positive(float), default=30.0, help="30")
    parser.add_argument(
        "--listing-rate", type=positive(float), default=20.0, help="per kind, per second (20)"
    )
    args = parser.parse_args(argv)
    scale = Scale(
        int(args.tasks),
        args.spread_seconds,
        args.rate,
        args.listing_seconds,
        args.listing_rate,
        args.seed_rate,
    )
    if scale.tasks / 2 / scale.rate > scale.spread / 2:
        parser.error("the callbacks must take at most half of the deadlines' spread")
    if not Path("/proc/self/stat").exists():
        parser.error("this benchmark reads CPU time from /proc: it runs on Linux only")
    logs = Path(tempfile.mkdtemp(prefix="agentless-waiting-"))
    total = scale.tasks / SLOWEST_SEEDING + SEED_SLACK + scale.listing_seconds + scale.spread
    load_before = os.getloadavg()[0]

    async def bounded() -> Result:
        async with asyncio.timeout(total + 300):
            return await bench(scale, logs)

    try:
        with asyncio.Runner(loop_factory=event_loop) as runner:
            result = runner.run(bounded())
    except (BenchmarkError, TimeoutError) as exc:
        print(f"benchmark failed: {exc or 'timed out'}; logs in {logs}", file=sys.stderr)
        return 2
    result.load = (load_before, os.getloadavg()[0])
    text, passed = report(result)
    print(text)
    print(f"\nprocess logs: {logs}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
