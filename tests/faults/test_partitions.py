"""Partitions with a healthy peer: two workers, A and B, share the queue and the database, and A
alone is cut off, from RabbitMQ or from PostgreSQL, through a TCP proxy, for longer than its
lease. Every task gets one result; an endpoint is called twice for a task only where a second
attempt was due by the README's rule; and A, while cut off, holds no more messages than its
prefetch, and calls no endpoint for a task it could no longer record."""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel
from aiohttp import web
from yarl import URL

from tests import processes
from tests.conftest import Events, free_port, publish
from tests.faults.outages import Service, served
from tests.processes import Child, wait_until_ready
from tests.proxy import Proxy
from tests.test_store import poll_started
from worker.contract.models import Outcome, Result, State
from worker.contract.records import TaskRecord
from worker.contract.settings import Settings
from worker.runner import LEASE_GRACE_SECONDS
from worker.store import registry
from worker.store.changes import Claimed, ClaimRequest
from worker.store.database import Store
from worker.store.errors import NotLive
from worker.store.registry import (
    HEARTBEAT_SECONDS,
    HEARTBEAT_TIMEOUT,
    SESSION_KEEPALIVES,
    registered_worker,
)

RESPONSE_TIMEOUT = 2
LEASE = RESPONSE_TIMEOUT + LEASE_GRACE_SECONDS
# A's AMQP heartbeat: the broker drops A's silent connection, and hands its unacknowledged
# messages to B, within a few seconds of the cut.
HEARTBEAT = 1
CONCURRENCY = 16
# When PostgreSQL would end the sessions of a worker it cannot reach: its keepalives' idle time,
# then their probes, and a margin.
SEVER_AFTER = (
    int(SESSION_KEEPALIVES["tcp_keepalives_idle"])
    + int(SESSION_KEEPALIVES["tcp_keepalives_interval"])
    * int(SESSION_KEEPALIVES["tcp_keepalives_count"])
    + 2
)
# Tasks queued over the run, half of them callback tasks, at a pace that keeps both workers busy
# before, during and after the cut.
TOTAL = 600
PER_SECOND = 20
# Each invocation is answered after this long (and up to 200 ms more), so that A has tasks in
# flight when it is cut off.
ANSWER_SECONDS = 0.5


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"response_timeout": RESPONSE_TIMEOUT, "concurrency": CONCURRENCY}
    )


class CountingService(Service):
    """The fault suite's service for both modes, counting the invocations of each task."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.Response:
        self.calls[request.query["key"]] += 1
        await asyncio.sleep(float(request.query.get("delay", "0")))
        return await super().handle(request)


@pytest_asyncio.fixture
async def service() -> AsyncIterator[tuple[str, CountingService]]:
    async with served(CountingService()) as found:
        yield found


@dataclass
class Cluster:
    """The API and workers A and B, as processes; A's connections to RabbitMQ go through
    `broker`, and to PostgreSQL through `database`."""

    api: Child
    a: Child
    b: Child
    a_port: int
    broker: Proxy
    database: Proxy
    in_flight: list[float] = field(default_factory=list)

    async def a_in_flight(self, session: aiohttp.ClientSession) -> float | None:
        """The tasks A's handlers hold now, by its own metrics (which need no database)."""
        try:
            async with session.get(f"http://127.0.0.1:{self.a_port}/metrics") as response:
                text = await response.text()
        except aiohttp.ClientError:
            return None
        found = re.search(r"^agentless_tasks_in_flight (\S+)$", text, re.MULTILINE)
        return None if found is None else float(found.group(1))

    async def watch_a(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                seen = await self.a_in_flight(session)
                if seen is not None:
                    self.in_flight.append(seen)
                await asyncio.sleep(0.25)


@dataclass(frozen=True)
class Tally:
    submitted: int
    completed: int
    conflicting: int
    invoked_twice: int
    rerun: int
    # Tasks invoked more often than they had attempts: an attempt that called its endpoint twice.
    over_invoked: int


def tally(
    scenario: str,
    rows: list[asyncpg.Record],
    events: Events,
    calls: Counter[str],
    **more: object,
) -> Tally:
    results: dict[str, set[object]] = {}
    for event in events.named("TaskCompleted"):
        results.setdefault(str(event["taskId"]), set()).add(event["result"])
    figures = Tally(
        submitted=len(rows),
        completed=sum(1 for r in rows if r["state"] == "completed"),
        conflicting=sum(1 for found in results.values() if len(found) > 1),
        invoked_twice=sum(1 for r in rows if calls[r["task_id"]] > 1),
        rerun=sum(1 for r in rows if r["attempts"] > 1),
        over_invoked=sum(1 for r in rows if calls[r["task_id"]] > r["attempts"]),
    )
    extra = "".join(f" / {name.replace('_', ' ')} {value}" for name, value in more.items())
    print(
        f"\n{scenario}: submitted {figures.submitted} / completed {figures.completed} / "
        f"conflicting results {figures.conflicting} / invoked twice {figures.invoked_twice} / "
        f"attempts re-run {figures.rerun}{extra}"
    )
    return figures


Fault = Callable[[Cluster], Awaitable[str]]


async def run_with_a_partitioned(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    url: str,
    fault: Fault,
) -> tuple[list[asyncpg.Record], str, Cluster]:
    """Run TOTAL tasks on A and B, A's connections through proxies; `fault` once a tenth have
    completed. The rows once every task has completed."""
    amqp, database = URL(settings.amqp_url), URL(settings.database_url)
    assert amqp.host is not None
    assert amqp.port is not None
    assert database.host is not None
    assert database.port is not None
    port = free_port()
    env = {"AGENTLESS_API_PORT": str(port), "AGENTLESS_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    run = uuid.uuid4().hex[:6]
    async with (
        Proxy(amqp.host, amqp.port) as broker,
        Proxy(database.host, database.port) as database_proxy,
    ):
        api = await processes.start(settings, "api", **env)
        b = await processes.start(settings, "worker", **env)
        a_port = free_port()
        a = await processes.start(
            settings,
            "worker",
            **env,
            AGENTLESS_WORKER_PORT=str(a_port),
            AGENTLESS_AMQP_URL=str(
                amqp.with_host(broker.host).with_port(broker.port).update_query(heartbeat=HEARTBEAT)
            ),
            AGENTLESS_DATABASE_URL=str(
                database.with_host(database_proxy.host).with_port(database_proxy.port)
            ),
        )
        cluster = Cluster(api, a, b, a_port, broker, database_proxy)
        watching = asyncio.create_task(cluster.watch_a())
        try:
            await wait_until_ready(f"http://127.0.0.1:{port}/readyz", api)
            await wait_until_ready(f"http://127.0.0.1:{a_port}/readyz", a)

            async def submit() -> None:
                for i in range(TOTAL):
                    task_id = f"p-{run}-{i}"
                    task: dict[str, object] = {
                        "taskId": task_id,
                        "planId": "plan-p",
                        "waitForCompletion": "callback" if i % 2 else "apiResponse",
                        "request": {"url": f"{url}/work?key={task_id}&delay={ANSWER_SECONDS}"},
                    }
                    await publish(channel, settings, task)
                    await asyncio.sleep(1 / PER_SECOND)

            submitting = asyncio.create_task(submit())
            await events.completed_count(TOTAL // 10, timeout=60)
            what = await fault(cluster)
            await submitting
            await events.completed_count(TOTAL, timeout=120)
        finally:
            watching.cancel()
            for child in (a, b, api):
                child.process.send_signal(signal.SIGTERM)
            for child in (a, b, api):
                await asyncio.wait_for(child.process.wait(), 30)
    rows = await db.fetch(
        "SELECT task_id, mode, state, result, reason, attempts FROM tasks ORDER BY task_id"
    )
    return list(rows), what, cluster


def worker_logs(child: Child) -> str:
    return child.logs()[-4000:]


async def test_a_worker_cut_from_the_broker_past_its_lease(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    service: tuple[str, CountingService],
) -> None:
    """A's broker path is black-holed for longer than its lease, then heals. The broker drops
    A's connection at its heartbeat and hands the messages A held to B; A's attempts in flight
    still record their results (its database is fine), so B finds them done or running under a
    live worker, and no attempt is made twice."""
    url, endpoint = service

    async def black_hole(cluster: Cluster) -> str:
        # First A's claims are held up for a moment, so that A holds a full prefetch of
        # messages whose claims land after its broker path is gone: their TaskStarted cannot
        # be confirmed until it heals, past their lease.
        cluster.database.black_hole()
        await asyncio.sleep(1)
        cluster.broker.black_hole()
        started = time.monotonic()
        await asyncio.sleep(0.5)
        cluster.database.lift()
        try:
            await asyncio.sleep(LEASE + 4)
        finally:
            cluster.broker.lift()
        return f"A cut from RabbitMQ for {time.monotonic() - started:.0f} s (lease {LEASE} s)"

    rows, what, cluster = await run_with_a_partitioned(
        settings, channel, db, events, url, black_hole
    )
    figures = tally(
        "A cut from the broker",
        rows,
        events,
        endpoint.calls,
        fault=what,
        most_tasks_A_held=f"{max(cluster.in_flight):g}",
    )
    assert len(rows) == TOTAL, worker_logs(cluster.a)
    assert {(r["state"], r["result"]) for r in rows} == {("completed", "succeeded")}, [
        dict(r) for r in rows if r["result"] != "succeeded"
    ]
    assert figures.conflicting == 0
    assert figures.over_invoked == 0
    assert figures.invoked_twice == 0, worker_logs(cluster.a)
    # Taken over at the end of their lease, and called once, by B: callback tasks that A claimed
    # as it was cut off, whose TaskStarted (confirmed before the call) A could not publish. A
    # found them taken over when the path healed, and did not call their endpoints.
    assert {r["mode"] for r in rows if r["attempts"] > 1} <= {"callback"}
    assert max(cluster.in_flight) <= CONCURRENCY


async def test_a_worker_cut_from_postgresql_past_its_lease(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    service: tuple[str, CountingService],
) -> None:
    """A's database path is black-holed for longer than its lease. A takes its session for lost
    at its next heartbeat and claims nothing more; PostgreSQL ends A's sessions (here, when the
    proxy severs them, as its TCP keepalives would), and A's lock with them; the messages A holds
    stay A's (its broker connection is fine), at most its prefetch of them, and their attempts
    are recorded once the path heals. B runs everything else meanwhile."""
    url, endpoint = service
    noticed: list[float] = []

    async def black_hole(cluster: Cluster) -> str:
        cluster.database.black_hole()
        started = time.monotonic()
        try:
            async with asyncio.timeout(HEARTBEAT_SECONDS + HEARTBEAT_TIMEOUT + 5):
                while "worker lost its database session" not in cluster.a.logs():
                    await asyncio.sleep(0.1)
            noticed.append(time.monotonic() - started)
            await asyncio.sleep(SEVER_AFTER - (time.monotonic() - started))
            severed = cluster.database.sever()
            # The server has no session of A's left, and no lock: any worker may take A's
            # running attempts over from here (B only could if it had their messages).
            async with asyncio.timeout(5):
                while await a_locks(settings, db, cluster.a):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(LEASE + 4 - (time.monotonic() - started))
        finally:
            cluster.database.lift()
        return (
            f"A cut from PostgreSQL for {time.monotonic() - started:.0f} s (lease {LEASE} s), "
            f"{severed} sessions ended by the server at {SEVER_AFTER} s"
        )

    rows, what, cluster = await run_with_a_partitioned(
        settings, channel, db, events, url, black_hole
    )
    figures = tally(
        "A cut from PostgreSQL",
        rows,
        events,
        endpoint.calls,
        fault=what,
        A_noticed_after=f"{noticed[0]:.1f} s",
        most_tasks_A_held=f"{max(cluster.in_flight):g}",
    )
    logs = cluster.a.logs()
    assert len(rows) == TOTAL, worker_logs(cluster.a)
    assert {(r["state"], r["result"]) for r in rows} == {("completed", "succeeded")}, [
        dict(r) for r in rows if r["result"] != "succeeded"
    ]
    assert figures.conflicting == 0
    assert figures.over_invoked == 0
    # A's messages stayed A's: no task was called twice. A task may still have a second attempt,
    # called once: one whose claim A made just as the path went, and whose answer was lost; A
    # claims it again once healed, finds it running under a live worker (itself: it cannot tell
    # a redelivery beside its own attempt from a lost answer), and takes it at the lease's end.
    assert figures.invoked_twice == 0, worker_logs(cluster.a)
    assert max(cluster.in_flight) <= CONCURRENCY
    # Well before the server's keepalives could end A's sessions and free its tasks.
    assert noticed[0] <= HEARTBEAT_SECONDS + HEARTBEAT_TIMEOUT + 2
    assert "worker lock re-acquired" in logs


async def a_locks(settings: Settings, db: asyncpg.Connection, a: Child) -> int:
    """How many liveness locks the worker process `a` holds, by the server's word."""
    schema = settings.database_url.rsplit("search_path=", 1)[1]
    count: int = await db.fetchval(
        """SELECT count(*) FROM pg_locks l JOIN workers w ON l.objid::bigint = w.worker_id
           WHERE l.locktype = 'advisory' AND l.classid::bigint = $1 AND l.objsubid = 2
             AND l.granted AND w.pid = $2""",
        zlib.crc32(schema.encode()) & 0x7FFF_FFFF,
        a.process.pid,
    )
    return count


async def test_a_worker_whose_liveness_session_ends_claims_nothing_until_it_locks_again(
    settings: Settings, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL ends the session that holds A's lock while A's pool still works (an operator's
    pg_terminate_backend, an idle-session timeout, the server's keepalives on that session alone).
    From that moment another worker may take A's running attempt over: A claims nothing, and
    renews no lease and records nothing, until it holds its lock again; and the attempt that was
    taken over can no longer record its result."""
    async with (
        Store.open(settings.database_url) as a,
        registered_worker(a, settings.database_url, lambda: 0),
        Store.open(settings.database_url) as b,
        registered_worker(b, settings.database_url, lambda: 0),
    ):
        first = await a.claim(claim_request("lv-1"))
        assert isinstance(first, Claimed)
        # Long enough a pause before A takes its lock again for what follows to happen first,
        # however slow the machine.
        monkeypatch.setattr(registry, "RELOCK_PAUSE_SECONDS", 3)
        assert await end_lock_session(db, a)
        lost = time.monotonic()
        # Seen at once, not at the next heartbeat.
        await asyncio.wait_for(until_cleared(a), 2)
        seen = time.monotonic() - lost
        with pytest.raises(NotLive):
            await a.claim(claim_request("lv-2"))
        with pytest.raises(NotLive):
            await a.renew_lease("lv-1", 1, 60)

        # B takes A's attempt over at once: A's lock is gone.
        taken = await b.claim(claim_request("lv-1"))
        assert isinstance(taken, Claimed)
        assert taken.attempts == 2
        # Nor does A record anything while it holds no lock.
        with pytest.raises(NotLive):
            await a.complete("lv-1", 1, Outcome(Result.SUCCEEDED, "HTTP 200"))
        with pytest.raises(NotLive):
            await a.retry("lv-1", 1, Outcome(Result.FAILED, "HTTP 503"), 5)
        with pytest.raises(NotLive):
            await a.wait("lv-1", 1, None, datetime.now(UTC) + timedelta(minutes=5), None)
        with pytest.raises(NotLive):
            await a.start_polling(poll_started("lv-1"))

        # A's heartbeat takes a new lock; then A claims again, and its old attempt stays fenced.
        monkeypatch.undo()
        await asyncio.wait_for(a.live.wait(), 10)
        assert isinstance(await a.claim(claim_request("lv-2")), Claimed)
        late = await a.complete("lv-1", 1, Outcome(Result.SUCCEEDED, "HTTP 200"))
        assert isinstance(late, TaskRecord)
        assert (late.state, late.attempts, late.result) == (State.RUNNING, 2, None)
        superseded = await a.renew_lease("lv-1", 1, 60)
        assert isinstance(superseded, TaskRecord)
        assert superseded.attempts == 2
        assert not isinstance(
            await b.complete("lv-1", 2, Outcome(Result.SUCCEEDED, "HTTP 200")), TaskRecord
        )

        # How soon A holds its lock again, at its own pace.
        assert await end_lock_session(db, a)
        lost = time.monotonic()
        await asyncio.wait_for(until_cleared(a), 2)
        await asyncio.wait_for(a.live.wait(), HEARTBEAT_SECONDS + HEARTBEAT_TIMEOUT)
        back = time.monotonic() - lost
        assert isinstance(await a.claim(claim_request("lv-3")), Claimed)
    print(
        f"\nliveness session ended: claims refused after {seen * 1000:.0f} ms, "
        f"lock held again after {back:.1f} s"
    )


async def test_a_worker_takes_its_lock_again_past_its_own_writes_checking_it(
    settings: Settings, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's writes check that it is alive by trying its key in shared mode, which holds the
    key for an instant: a worker taking its lock again in that instant tries again at once,
    rather than take the key for its lost session's and wait a whole heartbeat."""
    async with (
        Store.open(settings.database_url) as a,
        registered_worker(a, settings.database_url, lambda: 0),
    ):
        monkeypatch.setattr(registry, "RELOCK_PAUSE_SECONDS", 0)
        async with db.transaction():
            assert await end_lock_session(db, a)
            # As a write of A's that does not hold the lock would, for a little longer; as soon
            # as the ended session's backend has gone, and with it the lock (terminating it only
            # signals the backend), which is before A can have opened a new session.
            async with asyncio.timeout(2):
                while not await db.fetchval(
                    "SELECT pg_try_advisory_xact_lock_shared($1, $2)",
                    a.lock_namespace,
                    a.worker_id,
                ):
                    await asyncio.sleep(0.001)
            await asyncio.wait_for(until_cleared(a), 2)
            await asyncio.sleep(0.1)
        await asyncio.wait_for(a.live.wait(), HEARTBEAT_SECONDS - 1)
        assert isinstance(await a.claim(claim_request("rl-1")), Claimed)


async def test_a_worker_that_locks_again_records_again_what_a_failover_lost(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """The lock's session ends as it does when the primary is lost; the new primary (here the
    same one, its last commits undone by hand) lacks the worker's last result. Once the worker
    holds its lock again, the result is back."""
    async with (
        Store.open(settings.database_url) as store,
        registered_worker(store, settings.database_url, lambda: 0),
    ):
        assert isinstance(await store.claim(claim_request("rw-1")), Claimed)
        await store.complete("rw-1", 1, Outcome(Result.SUCCEEDED, "HTTP 200"))
        assert await end_lock_session(db, store)
        await asyncio.wait_for(until_cleared(store), 2)
        await db.execute(
            "UPDATE tasks SET state = 'running', result = NULL, completed_at = NULL"
            " WHERE task_id = 'rw-1'"
        )
        await asyncio.wait_for(store.live.wait(), HEARTBEAT_SECONDS + HEARTBEAT_TIMEOUT)
        async with asyncio.timeout(5):
            while await db.fetchval("SELECT state FROM tasks WHERE task_id = 'rw-1'") != (
                "completed"
            ):
                await asyncio.sleep(0.05)
        assert await db.fetchval("SELECT result FROM tasks WHERE task_id = 'rw-1'") == "succeeded"


async def end_lock_session(db: asyncpg.Connection, store: Store) -> bool:
    """End the session that holds `store`'s worker's lock, as PostgreSQL would."""
    ended: bool = await db.fetchval(
        """SELECT pg_terminate_backend(l.pid) FROM pg_locks l
           WHERE l.locktype = 'advisory' AND l.classid::bigint = $1
             AND l.objid::bigint = $2 AND l.objsubid = 2 AND l.granted""",
        store.lock_namespace,
        store.worker_id,
    )
    return ended


async def until_cleared(store: Store) -> None:
    while store.live.is_set():
        await asyncio.sleep(0.01)


def claim_request(task_id: str) -> ClaimRequest:
    return ClaimRequest(
        task_id=task_id,
        plan_id="p",
        job_id="p",
        hub_name="build",
        project_id=None,
        name=None,
        mode="apiResponse",
        digest=hashlib.sha256(b"{}").digest(),
        message="{}",
        queued_at=None,
        lease_seconds=60,
        reply_to=None,
        correlation_id=None,
    )
