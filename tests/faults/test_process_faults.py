"""Process faults: workers killed at random while a mixed load runs. Nothing is lost, nothing
completes twice, and the survivors (and the restarted) carry on by themselves."""

from __future__ import annotations

import asyncio
import random
import signal
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests import processes
from tests.conftest import Dead, Events, free_port, publish
from tests.faults.outages import (
    Service,
    completed_in_database,
    drain_completions,
    publish_patiently,
    publish_to,
)
from tests.pg_cluster import PgCluster
from tests.processes import wait_until_ready
from tests.rabbit_node import RabbitNode
from worker.cli.dead import reason_of
from worker.contract.models import Names
from worker.contract.settings import Settings
from worker.runner import MAX_ATTEMPTS
from worker.topology import DELIVERY_LIMIT, declare_topology

TOTAL = 2000
WORKERS = 3


async def test_random_sigkills_of_three_workers_lose_nothing(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    endpoint: tuple[str, Service],
) -> None:
    url, _ = endpoint
    port = free_port()
    api_env = {"AGENTLESS_API_PORT": str(port), "AGENTLESS_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    api = await processes.start(settings, "api", **api_env)
    workers = [await processes.start(settings, "worker", **api_env) for _ in range(WORKERS)]
    run = uuid.uuid4().hex[:6]
    kills = 0

    async def killer() -> None:
        nonlocal kills
        while True:
            await asyncio.sleep(random.uniform(0.5, 1.5))
            victim = random.randrange(WORKERS)
            workers[victim].process.kill()
            await workers[victim].process.wait()
            kills += 1
            workers[victim] = await processes.start(settings, "worker", **api_env)

    try:
        await wait_until_ready(f"http://127.0.0.1:{port}/readyz", api)
        chaos = asyncio.create_task(killer())
        try:
            # Queued over several seconds, so that the kills fall in the middle of the load.
            for i in range(TOTAL):
                mode = "callback" if i % 2 else "apiResponse"
                task: dict[str, object] = {
                    "taskId": f"k-{run}-{i}",
                    "planId": "plan-k",
                    "waitForCompletion": mode,
                    "request": {"url": f"{url}/work"},
                }
                await publish(channel, settings, task)
                if i % 100 == 99:
                    await asyncio.sleep(0.4)
            await events.completed_count(TOTAL, timeout=150)
        finally:
            chaos.cancel()
            await asyncio.gather(chaos, return_exceptions=True)
    finally:
        for child in [*workers, api]:
            child.process.send_signal(signal.SIGTERM)
        for child in [*workers, api]:
            await asyncio.wait_for(child.process.wait(), 30)

    rows = await db.fetch("SELECT task_id, state, result, attempts FROM tasks")
    results: dict[str, set[object]] = defaultdict(set)
    for event in events.named("TaskCompleted"):
        results[str(event["taskId"])].add(event["result"])
    duplicates = len(events.named("TaskCompleted")) - len(results)
    conflicting = sum(1 for found in results.values() if len(found) > 1)
    rerun = sum(1 for r in rows if r["attempts"] > 1)
    print(
        f"\nsubmitted {TOTAL} / completed {len(results)} / lost {TOTAL - len(results)} / "
        f"duplicate results {conflicting} / duplicate events {duplicates} / "
        f"workers killed {kills} / attempts re-run {rerun}"
    )
    assert len(rows) == TOTAL
    assert {(r["state"], r["result"]) for r in rows} == {("completed", "succeeded")}
    assert conflicting == 0
    assert kills >= 1


async def run_through(
    settings: Settings,
    channel: AbstractChannel,
    url: str,
    fault: Callable[[list[processes.Child], dict[str, str]], Awaitable[None]],
    total: int = TOTAL,
) -> list[asyncpg.Record]:
    """Queue `total` mixed tasks to an API and three workers, apply `fault` in the middle, and
    return the rows once every task has completed; every task must have a TaskCompleted event.

    Events are gathered in a durable queue of the test's own, which keeps them across a broker
    restart as a real consumer's would."""
    names = Names(settings.prefix)
    observer = await channel.declare_queue(
        f"{settings.prefix}.observer", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await observer.bind(names.events, "task.completed.#")
    port = free_port()
    env = {"AGENTLESS_API_PORT": str(port), "AGENTLESS_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    children = [await processes.start(settings, "api", **env)]
    children += [await processes.start(settings, "worker", **env) for _ in range(WORKERS)]
    run = uuid.uuid4().hex[:6]
    try:
        await wait_until_ready(f"http://127.0.0.1:{port}/readyz", children[0])
        for i in range(total):
            task_id = f"f-{run}-{i}"
            task: dict[str, object] = {
                "taskId": task_id,
                "planId": "plan-f",
                "waitForCompletion": "callback" if i % 2 else "apiResponse",
                "request": {"url": f"{url}/work"},
            }
            if i % 5 == 0:
                # Refused at first, then retried: some wait in a delay queue through the fault.
                task["request"] = {"url": f"{url}/flaky?key={task_id}"}
                task["retry"] = {"attempts": 3, "delaySeconds": 2}
            await publish_patiently(channel, settings, task)
            if i == total // 2:
                await fault(children, env)
        rows = await completed_in_database(settings, total, timeout=120)
        # While the processes still run: an event whose publisher was killed comes from a relay.
        completions = await drain_completions(channel, observer.name, {r["task_id"] for r in rows})
    except BaseException:
        for child in children:
            print(child.complaints())
        raise
    finally:
        for child in children:
            child.process.send_signal(signal.SIGTERM)
        for child in children:
            await asyncio.wait_for(child.process.wait(), 30)
    lost = total - len(rows)
    duplicates = sum(completions.values()) - len(completions)
    retried = [r for r in rows if r["retries"]]
    print(
        f"\nsubmitted {total} / completed {len(rows)} / lost {lost} / "
        f"TaskCompleted events {sum(completions.values())} ({duplicates} duplicates) / "
        f"retried after a 503 {len(retried)}"
    )
    assert len(rows) == total
    assert {(r["state"], r["result"]) for r in rows} == {("completed", "succeeded")}
    assert len(retried) == len(range(0, total, 5))
    assert set(completions) == {r["task_id"] for r in rows}
    return rows


async def test_the_api_killed_while_callbacks_arrive(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    endpoint: tuple[str, Service],
) -> None:
    service = endpoint[1]

    async def kill_the_api(children: list[processes.Child], env: dict[str, str]) -> None:
        children[0].process.kill()
        await children[0].process.wait()
        # Down until callbacks have come to find it gone, not for a while in which they may.
        service.unreachable.clear()
        await asyncio.wait_for(service.unreachable.wait(), 30)
        children[0] = await processes.start(settings, "api", **env)

    await run_through(settings, channel, endpoint[0], kill_the_api)


async def test_postgresql_restarted_mid_run(
    private_database: Settings,
    pg_cluster: PgCluster,
    channel: AbstractChannel,
    endpoint: tuple[str, Service],
) -> None:
    """On a private PostgreSQL cluster, so that tests running beside this one keep theirs."""

    async def restart_postgresql(_: list[processes.Child], __: dict[str, str]) -> None:
        await asyncio.to_thread(pg_cluster.restart)

    await run_through(private_database, channel, endpoint[0], restart_postgresql)


async def test_rabbitmq_restarted_mid_run(
    private_settings: Settings,
    private_rabbit: RabbitNode,
    db: asyncpg.Connection,
    endpoint: tuple[str, Service],
) -> None:
    """On a private RabbitMQ node, so that tests running beside this one keep theirs."""

    async def restart_rabbitmq(_: list[processes.Child], __: dict[str, str]) -> None:
        try:
            await asyncio.to_thread(private_rabbit.ctl, "stop_app")
        finally:
            await asyncio.to_thread(private_rabbit.ctl, "start_app")

    connection = await aio_pika.connect_robust(
        private_settings.amqp_url,
        client_properties={"connection_name": "test_rabbitmq_restarted_mid_run"},
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, Names(private_settings.prefix))
        await run_through(private_settings, channel, endpoint[0], restart_rabbitmq)


def started(events: Events, attempt: int) -> bool:
    return any(e["attempts"] == attempt for e in events.named("TaskStarted"))


async def test_a_task_whose_worker_dies_every_time_ends_abandoned(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
) -> None:
    """A poison task (here: one whose call never ends, its worker killed each time) is not handed
    from worker to worker forever: after MAX_ATTEMPTS it completes `abandoned`, once."""
    calls = 0

    async def never_answers(_: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3600)
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", never_answers)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("/"))
        task: dict[str, object] = {"taskId": "poison-1", "planId": "p", "request": {"url": url}}
        await publish(channel, settings, task)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            worker = await processes.start(settings, "worker", AGENTLESS_RESPONSE_TIMEOUT="60")
            async with asyncio.timeout(20), events.changed:
                await events.changed.wait_for(partial(started, events, attempt))
            # Killed in the middle of its call, not between its TaskStarted and the call.
            async with asyncio.timeout(20):
                while calls < attempt:
                    await asyncio.sleep(0.01)
            worker.process.kill()
            await worker.process.wait()
        survivor = await processes.start(settings, "worker")
        try:
            event = await events.completed("poison-1", timeout=20)
        finally:
            survivor.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(survivor.process.wait(), 30)
    finally:
        await server.close()
    assert (event["result"], event["attempts"]) == ("abandoned", MAX_ATTEMPTS + 1)
    assert str(event["reason"]).startswith(f"abandoned after {MAX_ATTEMPTS} attempts")
    assert len(events.named("TaskCompleted", "poison-1")) == 1
    assert calls == MAX_ATTEMPTS


async def test_a_message_that_kills_every_worker_before_it_is_read_is_dead_lettered(
    settings: Settings, channel: AbstractChannel, dead: Dead
) -> None:
    """A message that takes down whatever worker reads it, before the worker can even parse it,
    is not redelivered forever: the task queue's delivery limit sends it to the dead-letter queue,
    where `agentless dead list` says why. RabbitMQ sees a worker die only as its connection
    ending with the message unacknowledged; each round here is exactly that."""
    names = Names(settings.prefix)
    await publish(channel, settings, b'{"taskId": "killer"}', message_id="killer")
    deliveries = 0
    while True:
        connection = await aio_pika.connect(settings.amqp_url)
        stand_in = await connection.channel()
        queue = await stand_in.declare_queue(names.tasks, passive=True)
        message = await queue.get(no_ack=False, fail=False, timeout=5)
        await connection.close()
        if message is None:
            break
        deliveries += 1
        assert deliveries <= DELIVERY_LIMIT + 1

    _, message = await dead.next()
    print(f"\ndelivered {deliveries} times, then dead-lettered: {reason_of(message.headers)}")
    assert deliveries == DELIVERY_LIMIT + 1
    assert message.message_id == "killer"
    assert message.body == b'{"taskId": "killer"}'
    # Back where it was, for the operator's tool to read.
    await publish_to(channel, names.dead, message)
    code, out, err = await processes.run(settings, "dead", "list", "--json")
    assert code == 0, err
    (listed,) = orjson.loads(out)
    assert listed["messageId"] == "killer"
    assert listed["reason"] == (
        f"RabbitMQ dead-lettered it from {names.tasks}: "
        "delivered too many times without being acknowledged"
    )
