"""A three-node RabbitMQ cluster losing one node in the middle of 2,000 tasks: the node leading
the task queue killed with SIGKILL, a follower killed, a node partitioned from the others and
healed. Three workers and two APIs list the three nodes; tasks come both ways an orchestrator
sends them, published with publisher confirms and POSTed to the APIs. Each time nothing is lost,
no task has two results, and every process carries on by itself: ready, and taking tasks again.

Where the processes are: each connects to the first node of its list that answers, so all of
them are on the same node until they lose it. The task queue's leader is on the node its
topology was first declared on. The leader's node killed is the one they are all on; so is the
follower's (their list starts with it); and so is the node partitioned, which leads the queue.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from itertools import pairwise

import aio_pika
import aiohttp
import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiohttp import web

from tests.conftest import SESSION, publish
from tests.faults.deployment import Deployment, deployed, mixed_task, results_by_task
from tests.faults.outages import Service, completed_in_database, served
from tests.rabbit_cluster import RabbitCluster
from tests.rabbit_node import RabbitNode
from worker.amqp import BROKER_ERRORS
from worker.contract.models import Names
from worker.contract.settings import Settings, split_amqp_urls
from worker.topology import declare_topology, quorum_group_size

pytestmark = pytest.mark.xdist_group("clusters")

TOTAL = 2000
# The tasks after the fault that show every worker and API taking tasks again.
AFTERWARDS = 90
WORKERS = 3
APIS = 2
# The fault comes once this many tasks have completed.
FAULT_AT = TOTAL // 4
SUBMITTERS = 16
# About what the deployment completes on this machine, so that tasks are still being submitted
# when the fault comes and after it.
SUBMITTED_PER_SECOND = 150
COMPLETED = "SELECT count(*) FROM tasks WHERE state = 'completed'"


class CountingService(Service):
    """outages.Service, counting each task's invocations (its id is in the URL's path)."""

    def __init__(self) -> None:
        super().__init__()
        self.invocations: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.Response:
        self.invocations[request.path.split("/")[2]] += 1
        return await super().handle(request)


class Orchestrator:
    """Submits tasks the two ways an orchestrator would: published to the task queue with
    publisher confirms (on the loss of its node, on the next node of the list), and POSTed to
    the APIs (again, to the other API, on a 503 or a connection error)."""

    def __init__(self, settings: Settings, api_urls: list[str]) -> None:
        self.settings = settings
        self.nodes = split_amqp_urls(settings.amqp_url)
        self.api_urls = api_urls
        self.retries: Counter[str] = Counter()
        # Tasks each API accepted.
        self.accepted: Counter[str] = Counter()
        self._node = 0
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))

    async def close(self) -> None:
        await self._session.close()
        await self._drop()

    async def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await asyncio.gather(asyncio.wait_for(connection.close(), 5), return_exceptions=True)

    async def _confirming(self) -> AbstractChannel:
        async with self._lock:
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            await self._drop()
            for _ in self.nodes:
                try:
                    self._connection = await aio_pika.connect(
                        self.nodes[self._node],
                        timeout=5,
                        client_properties={"connection_name": f"agentless tests {SESSION}"},
                    )
                    self._channel = await self._connection.channel(publisher_confirms=True)
                except BROKER_ERRORS:
                    await self._drop()
                    self._node = (self._node + 1) % len(self.nodes)
                else:
                    return self._channel
            raise ConnectionError("no node of the cluster answers")

    async def _lost(self, channel: AbstractChannel | None) -> None:
        """Give up the node of `channel` (unless another caller did already): the next one."""
        async with self._lock:
            if channel is not None and channel is self._channel:
                await self._drop()
                self._node = (self._node + 1) % len(self.nodes)

    async def publish(self, task: dict[str, object]) -> None:
        async with asyncio.timeout(120):
            while True:
                channel = None
                try:
                    channel = await self._confirming()
                    # A node cut off from the others confirms nothing until it is paused.
                    await asyncio.wait_for(publish(channel, self.settings, task), 10)
                except (*BROKER_ERRORS, asyncio.CancelledError) as exc:
                    # aiormq cancels the confirm a closing connection will never get.
                    if isinstance(exc, asyncio.CancelledError) and _cancelled():
                        raise
                    self.retries["publish"] += 1
                    await self._lost(channel)
                    await asyncio.sleep(0.2)
                else:
                    return

    async def post(self, task: dict[str, object], first: int) -> None:
        async with asyncio.timeout(120):
            for attempt in range(first, first + 10_000):
                api = self.api_urls[attempt % len(self.api_urls)]
                try:
                    async with self._session.post(f"{api}/tasks", json=task) as response:
                        if response.status == 202:
                            self.accepted[api] += 1
                            return
                        assert response.status == 503, await response.text()
                except (aiohttp.ClientError, TimeoutError):
                    pass
                self.retries["post"] += 1
                await asyncio.sleep(0.2)

    async def submit(
        self, url: str, ids: list[str], *, offset: int = 0, per_second: float | None = None
    ) -> None:
        """Every task of `ids`: a quarter each of apiResponse and callback tasks published, and
        of each POSTed, several at a time, no more than `per_second` if given."""
        pending = list(enumerate(ids))
        began = time.monotonic()

        async def submitter() -> None:
            while pending:
                n, task_id = pending.pop(0)
                if per_second is not None:
                    await asyncio.sleep(began + n / per_second - time.monotonic())
                i = offset + n
                task = mixed_task(f"{url}/t/{task_id}", task_id, i)
                if i % 4 < 2:
                    await self.publish(task)
                else:
                    await self.post(task, i // 4)

        await asyncio.gather(*(submitter() for _ in range(SUBMITTERS)))


def _cancelled() -> bool:
    """Whether the running task itself is being cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[AbstractChannel]:
    """A confirming channel on the node at `url`."""
    connection = await aio_pika.connect(
        url, client_properties={"connection_name": f"agentless tests {SESSION}"}
    )
    async with connection:
        yield await connection.channel(publisher_confirms=True)


async def drained(channel: AbstractChannel, name: str, expected: set[str]) -> list[bytes]:
    """Every TaskCompleted in the observer queue `name`, consumed until each expected task has
    one and the queue is empty, or a minute has passed (deployment.drain_events takes one
    message per round trip: seconds for thousands on a cluster)."""
    bodies: list[bytes] = []

    async def take(message: AbstractIncomingMessage) -> None:
        bodies.append(message.body)

    await channel.set_qos(prefetch_count=1000)
    queue = await channel.declare_queue(name, passive=True)
    tag = await queue.consume(take, no_ack=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        seen = {str(orjson.loads(body)["taskId"]) for body in bodies}
        left = await channel.declare_queue(name, passive=True)
        if expected <= seen and not left.declaration_result.message_count:
            break
    await queue.cancel(tag)
    return bodies


@dataclass
class Run:
    """What a run found, and what it printed."""

    completed: int = 0
    succeeded: int = 0
    conflicting: int = 0
    # Tasks with no TaskCompleted event at all.
    unannounced: int = 0
    lines: list[str] = field(default_factory=list)


async def tasks_received(session: aiohttp.ClientSession, worker_url: str) -> float:
    async with session.get(f"{worker_url}/metrics") as response:
        text = await response.text()
    found = re.search(r"^agentless_tasks_received_total (\S+)$", text, re.MULTILINE)
    assert found is not None, text[:2000]
    return float(found.group(1))


async def every_process_working(
    deployment: Deployment, orchestrator: Orchestrator, url: str, settings: Settings, run: str
) -> str:
    """Every process still running and ready, and each worker and API taking some of
    AFTERWARDS more tasks; what each took."""
    for child in deployment.children:
        assert child.process.returncode is None, child.logs()[-5000:]
    async with aiohttp.ClientSession() as session:
        for base, child in zip(
            deployment.api_urls + deployment.worker_urls, deployment.children, strict=True
        ):
            async with session.get(f"{base}/readyz") as response:
                assert response.status == 200, (await response.text(), child.logs()[-5000:])
        before = [await tasks_received(session, w) for w in deployment.worker_urls]
        accepted = orchestrator.accepted.copy()
        ids = [f"after-{run}-{i}" for i in range(AFTERWARDS)]
        await orchestrator.submit(url, ids, offset=TOTAL)
        await completed_in_database(settings, TOTAL + AFTERWARDS, timeout=60)
        after = [await tasks_received(session, w) for w in deployment.worker_urls]
    took = [int(b - a) for a, b in zip(before, after, strict=True)]
    by_api = [orchestrator.accepted[api] - accepted[api] for api in deployment.api_urls]
    assert all(took), f"a worker took none of {AFTERWARDS} tasks after the fault: {took}"
    assert all(by_api), f"an API accepted none of the tasks after the fault: {by_api}"
    return f"{AFTERWARDS} tasks after it: workers took {took}, APIs accepted {by_api}"


async def run_with_fault(
    cluster: RabbitCluster,
    settings: Settings,
    db: asyncpg.Connection,
    *,
    declared_on: RabbitNode,
    fault: Callable[[RabbitNode], Awaitable[str]],
) -> Run:
    """TOTAL tasks through three workers and two APIs on the cluster; `fault(the task queue's
    leader)` once FAULT_AT have completed (it returns what it did, and has healed the cluster by
    its end); then AFTERWARDS more. The figures, printed."""
    names = Names(settings.prefix)
    run = uuid.uuid4().hex[:6]
    ids = [f"k-{run}-{i}" for i in range(TOTAL)]
    async with (
        served(CountingService()) as (url, service),
        connected(declared_on.amqp_url) as channel,
    ):
        await declare_topology(channel, names, quorum_group_size(len(cluster.nodes)))
        laps = [time.monotonic()]
        async with deployed(settings, channel, workers=WORKERS, apis=APIS) as deployment:
            orchestrator = Orchestrator(settings, deployment.api_urls)
            try:
                before, leader = await asyncio.gather(
                    asyncio.to_thread(cluster.connections, settings.prefix),
                    asyncio.to_thread(cluster.leader, names.tasks),
                )
                laps.append(time.monotonic())
                submitting = asyncio.create_task(
                    orchestrator.submit(url, ids, per_second=SUBMITTED_PER_SECOND)
                )
                async with asyncio.timeout(180), counted(db) as completed:
                    while not completed or completed[-1] < FAULT_AT:
                        if submitting.done():
                            submitting.result()
                        await asyncio.sleep(0.2)
                    faulted = len(completed)
                    what, _ = await asyncio.gather(fault(leader), submitting)
                    rows = await completed_in_database(settings, TOTAL, timeout=150)
                laps.append(time.monotonic())
                await asyncio.to_thread(
                    cluster.wait_in_sync, [names.tasks, names.dead, deployment.observer]
                )
                after = await asyncio.to_thread(cluster.connections, settings.prefix)
                laps.append(time.monotonic())
                afterwards = await every_process_working(
                    deployment, orchestrator, url, settings, run
                )
                laps.append(time.monotonic())
                async with connected(cluster.nodes[-1].amqp_url) as reader:
                    bodies = await drained(reader, deployment.observer, set(ids))
                    for queue in (names.tasks, names.dead, deployment.observer):
                        await reader.queue_delete(queue)
                laps.append(time.monotonic())
            except BaseException:
                show_logs(deployment)
                raise
            finally:
                await orchestrator.close()
        laps.append(time.monotonic())
    results = results_by_task(bodies)
    mine = [row for row in rows if row["task_id"] in set(ids)]
    found = Run(
        completed=sum(1 for row in mine if row["state"] == "completed"),
        succeeded=sum(1 for row in mine if row["result"] == "succeeded"),
        conflicting=sum(1 for results_of in results.values() if len(results_of) > 1),
        unannounced=len(set(ids) - set(results)),
    )
    found.lines = [
        what,
        f"the task queue's leader {leader.name}; the deployment's connections by node before: "
        f"{before}, after: {after}",
        f"fault {faulted} s into the run; tasks completed every 2 s from the start: "
        f"{completed[::2]}; submissions retried: {dict(orchestrator.retries)}",
        f"submitted {TOTAL} / completed {found.completed} / lost {TOTAL - found.completed} / "
        f"with two results {found.conflicting} / TaskCompleted events {len(bodies)} for "
        f"{len(results)} tasks ({len(bodies) - len(results)} duplicates, "
        f"{found.unannounced} tasks without one) / endpoint invoked twice "
        f"{sum(1 for task_id in ids if service.invocations[task_id] > 1)} / attempts > 1: "
        f"{sum(1 for row in mine if row['attempts'] > 1)}",
        afterwards,
        "seconds to start the processes, run, see the queues in sync, run the tasks after, "
        f"drain the events, stop the processes: {[round(b - a, 1) for a, b in pairwise(laps)]}",
    ]
    print("\n" + "\n".join(found.lines))
    return found


@asynccontextmanager
async def counted(db: asyncpg.Connection) -> AsyncIterator[list[int]]:
    """The tasks completed, counted every second while in the block."""
    completed: list[int] = []
    stop = asyncio.Event()

    async def count() -> None:
        # Stopped between queries, never in one: `db` is the test's to use after.
        while not stop.is_set():
            completed.append(await db.fetchval(COMPLETED))
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1)

    counting = asyncio.create_task(count())
    try:
        yield completed
    finally:
        stop.set()
        await counting


def show_logs(deployment: Deployment) -> None:
    """The last lines each process logged, as evidence of what went wrong."""
    for name, child in zip(
        [f"api {u}" for u in deployment.api_urls] + [f"worker {u}" for u in deployment.worker_urls],
        deployment.children,
        strict=True,
    ):
        code = child.process.returncode
        state = "running" if code is None else f"exited {code}"
        print(f"\n--- {name} ({state}), last lines of {child.log}:")
        print("\n".join(child.logs().splitlines()[-40:]))


def assert_nothing_lost_nor_doubled(found: Run) -> None:
    assert found.completed == TOTAL
    assert found.succeeded == TOTAL
    assert found.conflicting == 0
    assert found.unannounced == 0


async def killed_and_restarted(cluster: RabbitCluster, node: RabbitNode, role: str) -> str:
    """kill -9 of `node`, started again at once; what happened, as the test prints it."""
    began = time.monotonic()
    await asyncio.to_thread(cluster.kill, node)
    back = await asyncio.to_thread(cluster.restart, node)
    return (
        f"killed the {role} {node.name} with SIGKILL; started again, and the cluster "
        f"whole, {time.monotonic() - began:.1f} s later (restart {back:.1f} s)"
    )


async def test_quorum_leader_killed_with_sigkill_mid_run(
    rabbit_cluster: RabbitCluster, settings: Settings, db: asyncpg.Connection
) -> None:
    """The node leading the task queue, which every process is connected to, killed with kill
    -9 a quarter of the way in, and started again at once (on its data) while the run goes on."""
    cluster = rabbit_cluster
    first = cluster.nodes[0]
    settings = settings.model_copy(update={"amqp_url": cluster.amqp_url_from(first)})

    async def kill_the_leader(leader: RabbitNode) -> str:
        assert leader is first
        return await killed_and_restarted(cluster, leader, "leader")

    found = await run_with_fault(cluster, settings, db, declared_on=first, fault=kill_the_leader)
    assert_nothing_lost_nor_doubled(found)


async def test_follower_node_killed_with_sigkill_mid_run(
    rabbit_cluster: RabbitCluster, settings: Settings, db: asyncpg.Connection
) -> None:
    """A node following the task queue's leader, which every process is connected to, killed
    with kill -9 a quarter of the way in, and started again at once while the run goes on."""
    cluster = rabbit_cluster
    leader, follower, _ = cluster.nodes
    settings = settings.model_copy(update={"amqp_url": cluster.amqp_url_from(follower)})

    async def kill_a_follower(found: RabbitNode) -> str:
        assert found is leader
        return await killed_and_restarted(cluster, follower, "follower")

    found = await run_with_fault(cluster, settings, db, declared_on=leader, fault=kill_a_follower)
    assert_nothing_lost_nor_doubled(found)


async def test_node_partitioned_from_the_others_and_healed_mid_run(
    rabbit_cluster: RabbitCluster, settings: Settings, db: asyncpg.Connection
) -> None:
    """The node leading the task queue, which every process is connected to, cut off from the
    other two (its distribution traffic black-holed) a quarter of the way in: the others see it
    down and it pauses itself (pause_minority); healed once it has, it rejoins."""
    cluster = rabbit_cluster
    node = cluster.nodes[0]
    settings = settings.model_copy(update={"amqp_url": cluster.amqp_url_from(node)})

    async def partition(leader: RabbitNode) -> str:
        assert leader is node
        began = time.monotonic()
        await asyncio.to_thread(cluster.partition, node)
        seen = await asyncio.to_thread(cluster.wait_partitioned, node)
        held = await asyncio.to_thread(cluster.heal, node)
        whole = await asyncio.to_thread(cluster.wait_whole)
        return (
            f"partitioned {node.name}: seen down by the others and paused after {seen:.1f} s; "
            f"healed ({held} connections held), cluster whole {whole:.1f} s later "
            f"({time.monotonic() - began:.1f} s in all)"
        )

    found = await run_with_fault(cluster, settings, db, declared_on=node, fault=partition)
    assert_nothing_lost_nor_doubled(found)
