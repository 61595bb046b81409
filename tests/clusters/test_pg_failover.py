"""The PostgreSQL primary stopped hard in the middle of 2,000 tasks, and its streaming replica
promoted a few seconds later, as a failover manager would: three workers and two APIs, on the
libpq multi-host URL, find the new primary by themselves. Nothing is lost, no task has two
results, and the fencing holds across the failover: a worker whose liveness lock vanished with
the old primary claims nothing until it holds a new one.

Run with synchronous replication, where a commit is acknowledged once the replica has it, and
asynchronous, where the last commits acknowledged may not have reached the replica. Those that
were results announced before the stop (their TaskCompleted seen) are counted as missing, and
what becomes of each task is printed; the old primary, started again alone once the processes
have stopped, tells every commit the promotion lost, which is what may explain a task that
does not complete."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp
import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiohttp import web

from tests.clusters.pg_fixtures import pg_pair, replicated, replicated_settings
from tests.conftest import publish
from tests.faults.deployment import Deployment, deployed, mixed_task
from tests.faults.outages import Service, served
from tests.pg_replica import ReplicatedPg
from tests.proxy import Proxy
from worker.contract.settings import Settings

__all__ = ["pg_pair", "replicated", "replicated_settings"]

TOTAL = 2000
WORKERS = 3
APIS = 2
# The primary is stopped once this many tasks have completed: most of the run is still to come.
STOP_AFTER = 600
# Between the primary's loss and the replica's promotion: a failover manager's (or an
# operator's) time to notice.
DETECTION_SECONDS = 2
# The replica streams through the test proxy, which holds each chunk (up to 64 KB) this long,
# one chunk after the other (so at most about 3 MB/s): a replica some way from the primary,
# tens to hundreds of KB behind it in this run, rather than beside it on this machine, where
# asynchronous replication's window is too short for a run to fall into.
LINK_LATENCY = 0.02
# Tasks queued once every process is back, which each worker must take some of.
FURTHER = 90
# Every task the failover left recoverable completes within this of the promotion.
RECOVERY_TIMEOUT = 30
PUBLISH_CHUNK = 200
LOST_SESSION = "worker lost its database session"
RELOCKED = "worker lock re-acquired"

Rows = dict[str, asyncpg.Record]


class CountingService(Service):
    """outages.Service, counting the invocations each task's endpoint gets."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.Response:
        if "task" in request.query:
            self.calls[request.query["task"]] += 1
        return await super().handle(request)


@dataclass
class Observed:
    """The TaskCompleted events of the deployment's observer queue, as they arrive."""

    events: list[dict[str, object]] = field(default_factory=list)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.events.append(orjson.loads(message.body))

    def tasks(self) -> set[str]:
        return {str(e["taskId"]) for e in self.events}

    async def until(self, expected: set[str], timeout: float) -> None:
        """Until each expected task has an event, or `timeout` has passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not expected <= self.tasks():
                    await asyncio.sleep(0.05)

    async def until_count(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(self.tasks()) < count:
                await asyncio.sleep(0.05)


def task_for(url: str, task_id: str, i: int) -> dict[str, object]:
    task = mixed_task(url, task_id, i)
    # The task's id in its URL, so that the service counts its invocations.
    task["request"] = {"url": f"{url}/work?task={task_id}"}
    return task


async def publish_all(
    channel: AbstractChannel, settings: Settings, tasks: list[dict[str, object]]
) -> None:
    """Every task queued, a chunk's confirms awaited together."""
    for start in range(0, len(tasks), PUBLISH_CHUNK):
        chunk = tasks[start : start + PUBLISH_CHUNK]
        await asyncio.gather(*(publish(channel, settings, task) for task in chunk))


async def fetch_rows(url: str, task_ids: Iterable[str]) -> Rows:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT task_id, state, result, attempts, worker_id, lease_until, started_at,"
            " completed_by FROM tasks WHERE task_id = ANY($1::text[])",
            list(task_ids),
        )
    finally:
        await conn.close()
    return {r["task_id"]: r for r in rows}


async def completed(url: str, task_ids: set[str], timeout: float) -> Rows:
    """The rows of `task_ids`, once each is completed, or as they are when `timeout` ends."""
    rows: Rows = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                try:
                    rows = await fetch_rows(url, task_ids)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    pass
                else:
                    if sum(r["state"] == "completed" for r in rows.values()) == len(task_ids):
                        return rows
                await asyncio.sleep(0.3)
    return rows


async def back_to_work(deployment: Deployment, since: float, timeout: float) -> list[float | None]:
    """Seconds from `since` until each process answered /readyz 200 and, for a worker, logged
    that it holds its lock again (None if not within `timeout`): the APIs first, then the
    workers, as `deployment` lists them."""
    back: list[float | None] = [None] * len(deployment.children)
    urls = deployment.api_urls + deployment.worker_urls
    relocks = [child.logs().count(RELOCKED) for child in deployment.children]
    ready = [False] * len(urls)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
            while None in back:
                for i, (url, child) in enumerate(zip(urls, deployment.children, strict=True)):
                    if back[i] is not None:
                        continue
                    if not ready[i]:
                        try:
                            async with session.get(f"{url}/readyz") as response:
                                ready[i] = response.status == 200
                        except aiohttp.ClientConnectionError:
                            pass
                    worker = i >= len(deployment.api_urls)
                    if ready[i] and (not worker or child.logs().count(RELOCKED) > relocks[i]):
                        back[i] = time.monotonic() - since
                await asyncio.sleep(0.1)
    return back


async def on_lost_primary(pair: ReplicatedPg, schema: str, task_ids: list[str]) -> Rows:
    """The tasks' rows as the lost primary had them when it stopped: started again alone (no
    process uses it now) on its own data, read, and stopped."""
    lost = pair.lost
    assert lost is not None
    await asyncio.to_thread(lost.ctl, "start")
    try:
        return await fetch_rows(f"{lost.url}?search_path={schema}", task_ids)
    finally:
        await asyncio.to_thread(lost.ctl, "stop")


def lockless_windows(log: str) -> list[tuple[datetime, datetime | None]]:
    """When the worker whose log this is held no lock: from each lost session to the next
    re-acquired lock (None if it never was)."""
    windows: list[tuple[datetime, datetime | None]] = []
    lost: datetime | None = None
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        entry = orjson.loads(line)
        event, at = str(entry.get("event", "")), datetime.fromisoformat(str(entry["time"]))
        if event.startswith(LOST_SESSION) and lost is None:
            lost = at
        elif event == RELOCKED and lost is not None:
            windows.append((lost, at))
            lost = None
    if lost is not None:
        windows.append((lost, None))
    return windows


def state(row: asyncpg.Record | None) -> str:
    return "absent" if row is None else str(row["state"])


def describe(row: asyncpg.Record | None, now: datetime) -> str:
    if row is None or row["state"] not in ("running", "completed"):
        return state(row)
    if row["state"] == "running":
        expired = row["lease_until"] is not None and row["lease_until"] < now
        return f"running, lease {'expired' if expired else 'unexpired'}"
    return f"completed {row['result']} by {row['completed_by']}"


def progress(row: asyncpg.Record | None) -> tuple[object, ...] | None:
    return None if row is None else (row["state"], row["attempts"], row["result"])


def seconds(values: list[float | None]) -> str:
    return ", ".join("never" if v is None else f"{v:.1f}" for v in values)


@pytest.mark.xdist_group("clusters")
@pytest.mark.parametrize("replicated", ["sync", "async"], indirect=True)
async def test_primary_stopped_hard_and_replica_promoted_mid_run(
    replicated: ReplicatedPg, replicated_settings: Settings, channel: AbstractChannel
) -> None:
    pair, settings = replicated, replicated_settings
    assert pair.replica is not None
    url, replica = settings.database_url, pair.replica
    schema = url.rsplit("search_path=", 1)[1]
    mode = pair.replication()
    run = uuid.uuid4().hex[:6]
    ids = [f"pg-{run}-{i}" for i in range(TOTAL)]
    further = [f"pg-{run}-more-{i}" for i in range(FURTHER)]
    observed = Observed()
    began = time.monotonic()
    async with (
        Proxy("127.0.0.1", pair.primary.port) as link,
        served(CountingService()) as (service_url, service),
        deployed(settings, channel, workers=WORKERS, apis=APIS) as deployment,
    ):
        link.latency = LINK_LATENCY
        await asyncio.to_thread(pair.stream_from, link.port)
        ready = time.monotonic()
        observer = await channel.declare_queue(deployment.observer, passive=True)
        consuming = await observer.consume(observed.on_message, no_ack=True)
        tasks = [task_for(service_url, t, i) for i, t in enumerate(ids)]
        publishing = asyncio.create_task(publish_all(channel, settings, tasks))
        await observed.until_count(STOP_AFTER, timeout=60)
        lag = await asyncio.to_thread(pair.lag_bytes)
        # The primary's host lost, its network with it: what the link still held never lands.
        link.black_hole()
        await asyncio.to_thread(pair.stop_primary_hard)
        link.cut()
        stopped = time.monotonic()
        await asyncio.sleep(DETECTION_SECONDS)
        # Events are published after their commit, and no commit could be made since the stop:
        # each of these is a result the old primary committed.
        announced = observed.tasks()
        await publishing
        # The tasks as the promotion will find them, read on the replica before it: once
        # promoted, processes reach it at once.
        await asyncio.to_thread(pair.wait_replayed)
        at_promotion = await fetch_rows(f"{replica.url}?search_path={schema}", ids)
        await asyncio.to_thread(pair.promote)
        promoted = time.monotonic()
        now = datetime.now().astimezone()
        missing = {
            t: describe(at_promotion.get(t), now)
            for t in announced
            if state(at_promotion.get(t)) != "completed"
        }
        back = await back_to_work(deployment, promoted, timeout=RECOVERY_TIMEOUT)
        await completed(url, set(ids) - set(missing), RECOVERY_TIMEOUT)
        finished = time.monotonic()
        more_tasks = [task_for(service_url, t, i) for i, t in enumerate(further)]
        await publish_all(channel, settings, more_tasks)
        more = await completed(url, set(further), 30)
        await observed.until(set(ids) - set(missing) | set(further), timeout=30)
        # Late duplicates (a relay's republication) have a moment to arrive.
        await asyncio.sleep(1)
        final = await fetch_rows(url, ids)
        conn = await asyncpg.connect(url)
        try:
            workers_table = await conn.fetch("SELECT worker_id, pid FROM workers")
        finally:
            await conn.close()
        answers = []
        async with aiohttp.ClientSession() as session:
            for api in deployment.api_urls:
                async with session.get(f"{api}/tasks/{ids[0]}") as response:
                    answers.append(response.status)
        alive = [child.process.returncode is None for child in deployment.children]
        workers = deployment.children[APIS:]
        logs = [child.logs() for child in workers]
        await observer.cancel(consuming)
        await channel.queue_delete(deployment.observer)
    ended = time.monotonic()
    on_old = await on_lost_primary(pair, schema, ids)

    # Every commit the promotion lost: the task's row on the old primary as it stopped, unlike
    # its row on the new one as the promotion found it (nothing was committed in between).
    lost_commits = {
        t: f"{state(on_old.get(t))} -> {state(at_promotion.get(t))}"
        for t in ids
        if progress(on_old.get(t)) != progress(at_promotion.get(t))
    }
    results: dict[str, set[object]] = defaultdict(set)
    attempts: dict[str, set[object]] = defaultdict(set)
    for event in observed.events:
        results[str(event["taskId"])].add(event["result"])
        attempts[str(event["taskId"])].add(event["attempts"])
    rest = [t for t in ids if t not in missing]
    lost = [t for t in rest if state(final.get(t)) != "completed"]
    conflicting = [t for t in ids if len(results[t]) > 1]
    # An event naming an attempt other than the one the task's row ends with: an attempt
    # recorded over, or beside, a newer one.
    unfenced = [t for t in rest if t in final and attempts[t] - {final[t]["attempts"]}]
    twice = [t for t, n in service.calls.items() if n > 1]
    pids = {r["worker_id"]: r["pid"] for r in workers_table}
    by_worker = Counter(pids.get(r["worker_id"]) for r in more.values())
    windows = [lockless_windows(log) for log in logs]
    # A task whose attempt a worker claimed while it held no lock.
    claimed_lockless = [
        t
        for t, row in final.items()
        for worker, held in zip(workers, windows, strict=True)
        if pids.get(row["worker_id"]) == worker.process.pid
        for lost_at, relocked_at in held
        if lost_at < row["started_at"] and (relocked_at is None or row["started_at"] < relocked_at)
    ]
    slowest = None if None in back else max(b for b in back if b is not None)
    now = datetime.now().astimezone()
    print(
        f"\n{mode} replication: primary stopped after {len(announced)} TaskCompleted "
        f"({lag} bytes of WAL not yet flushed on the replica), replica promoted "
        f"{promoted - stopped:.1f} s later; every process back {seconds([slowest])} s after the "
        f"promotion (APIs {seconds(back[:APIS])} s, workers {seconds(back[APIS:])} s); every "
        f"task completed {finished - promoted:.1f} s after it\n"
        f"seconds from the start: processes ready {ready - began:.1f}, primary stopped "
        f"{stopped - began:.1f}, promoted {promoted - began:.1f}, every task completed "
        f"{finished - began:.1f}, processes stopped {ended - began:.1f}\n"
        f"submitted {TOTAL} / completed {sum(state(r) == 'completed' for r in final.values())} "
        f"/ lost {len(lost)} / conflicting results {len(conflicting)} / TaskCompleted events "
        f"{len(observed.events)} ({len(observed.events) - len(results)} duplicates) / endpoint "
        f"invoked twice {len(twice)} / attempts > 1: "
        f"{sum(r['attempts'] > 1 for r in final.values())} / superseded attempts "
        f"{sum(log.count('attempt superseded') for log in logs)} / handling failures "
        f"{sum(log.count('task handling failed') for log in logs)}\n"
        f"commits the promotion lost: {len(lost_commits)} tasks "
        f"{dict(Counter(lost_commits.values()))}\n"
        f"results committed and announced before the stop, missing on the new primary: "
        f"{len(missing)} (at the promotion: {dict(Counter(missing.values()))}; at the end: "
        f"{dict(Counter(describe(final.get(t), now) for t in missing))}; with two results: "
        f"{sum(len(results[t]) > 1 for t in missing)}; endpoint invoked twice: "
        f"{sum(service.calls[t] > 1 for t in missing)})\n"
        f"lost tasks: {dict(Counter(lost_commits.get(t, 'no commit lost') for t in lost))}\n"
        f"further {FURTHER} tasks by worker process: {sorted(by_worker.values())}"
    )
    if mode == "sync":
        # Every commit acknowledged was on the replica: what the promotion lost, no process had
        # been told of.
        assert not missing
        assert not lost, lost[:5]
        assert not conflicting, conflicting[:5]
    else:
        # Asynchronous replication loses the last commits acknowledged: a task may then not
        # complete, or (its result announced, then lost) complete again differently; but only
        # a task whose commit was lost.
        assert set(lost) <= set(lost_commits), [t for t in lost if t not in lost_commits][:5]
        assert set(conflicting) <= set(missing), conflicting[:5]
    assert not unfenced, unfenced[:5]
    assert all(alive)
    assert slowest is not None, back
    assert answers == [200] * APIS
    assert [state(r) for r in more.values()] == ["completed"] * FURTHER
    assert set(by_worker) == {w.process.pid for w in workers}
    # Each worker lost its lock with the old primary, held it again on the new one, and claimed
    # nothing in between.
    assert all(held and held[-1][1] is not None for held in windows), windows
    assert not claimed_lockless, claimed_lockless[:5]
