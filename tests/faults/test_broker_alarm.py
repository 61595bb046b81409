"""RabbitMQ's memory alarm in the middle of 2,000 tasks, on a private node: while the broker blocks
every publishing connection, the worker stops taking tasks and says why, the API refuses new ones
at once (503, Retry-After) instead of hanging, `agentless status` and `submit` name the alarm;
once it clears, everything resumes by itself, nothing is lost, run twice or counted twice."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import aiohttp
import asyncpg
import orjson
import pytest

from tests import processes
from tests.conftest import SESSION, publish
from tests.faults.deployment import (
    deployed,
    drain_events,
    mixed_task,
    readiness,
    results_by_task,
)
from tests.faults.outages import Service, completed_in_database
from tests.rabbit_node import RabbitNode
from worker.contract.models import Names
from worker.contract.settings import Settings
from worker.topology import declare_topology

TOTAL = 2000
# Longer than a publish's confirm bound (worker/connection.py: 30 s), which must not run while the
# broker blocks, and than aiormq's three missed heartbeats (33 s).
ALARM_SECONDS = 40
# The deliveries of a blocked worker are counted over this long, and must not grow.
STILL_SECONDS = 5
CONCURRENCY = 8
# The broker's reason for a memory alarm.
LOW_ON_MEMORY = "low on memory"


async def post_task(
    session: aiohttp.ClientSession, api_url: str, task: dict[str, object]
) -> tuple[int, dict[str, str], dict[str, object], float]:
    """POST /tasks: status, headers, body and the seconds it took to answer."""
    began = time.monotonic()
    async with session.post(f"{api_url}/tasks", json=task) as response:
        body = orjson.loads(await response.read())
        return response.status, dict(response.headers), body, time.monotonic() - began


# The alarm alone lasts ALARM_SECONDS, and the private node may take half a minute to start.
@pytest.mark.timeout(300)
async def test_a_memory_alarm_in_the_middle_of_2000_tasks(
    private_rabbit: RabbitNode,
    private_settings: Settings,
    db: asyncpg.Connection,
    endpoint: tuple[str, Service],
) -> None:
    # Few at a time, so that the run lasts long enough for the alarm to fall in its middle.
    settings = private_settings.model_copy(update={"concurrency": CONCURRENCY})
    node, (url, _) = private_rabbit, endpoint
    names = Names(settings.prefix)
    run = uuid.uuid4().hex[:6]
    ids = [f"m-{run}-{i}" for i in range(TOTAL)]
    connection = await aio_pika.connect(
        settings.amqp_url, client_properties={"connection_name": f"agentless tests {SESSION}"}
    )
    async with connection, aiohttp.ClientSession() as http:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, names)
        async with deployed(settings, channel) as deployment:
            api, (worker,) = deployment.api_url, deployment.worker_urls
            # All queued before the alarm: the test's own connection would be blocked too.
            for i, task_id in enumerate(ids):
                await publish(channel, settings, mixed_task(url, task_id, i))
            async with asyncio.timeout(60):
                while await db.fetchval("SELECT count(*) FROM tasks") < TOTAL // 10:
                    await asyncio.sleep(0.05)

            await asyncio.to_thread(node.set_memory_alarm, on=True)
            raised = time.monotonic()
            try:
                # The worker learns of the block from its next publish, and says so.
                worker_answer = await readiness(
                    http, f"{worker}/readyz", lambda _, body: "reason" in body
                )
                at_block = await db.fetchval("SELECT count(*) FROM tasks")
                # The first submission waits for its confirm for a few seconds at most; by then
                # the API knows of the block, and refuses the next at once.
                first = await post_task(http, api, mixed_task(url, f"m-{run}-first", 0))
                second = await post_task(http, api, mixed_task(url, f"m-{run}-second", 1))
                api_answer = await readiness(http, f"{api}/readyz", lambda *_: True)
                async with http.get(f"{api}/queue") as response:
                    queue_answer = (response.status, orjson.loads(await response.read()))
                code, out, err = await processes.run(settings, "status", "--json")
                assert code == 0, err
                status = orjson.loads(out)
                code, text, err = await processes.run(settings, "status")
                assert code == 0, err
                cli_task = f"m-{run}-cli"
                submit = await processes.run(
                    settings, "submit", "--url", f"{url}/work", "--task-id", cli_task
                )
                # Nothing taken while blocked: no new task row (a worker's claim makes it) and
                # the ready messages stay where they are.
                started = await db.fetchval("SELECT count(*) FROM tasks")
                ready = (await channel.declare_queue(names.tasks, passive=True)).declaration_result
                await asyncio.sleep(STILL_SECONDS)
                still = await db.fetchval("SELECT count(*) FROM tasks")
                ready_after = (
                    await channel.declare_queue(names.tasks, passive=True)
                ).declaration_result
                checked_in = time.monotonic() - raised
                await asyncio.sleep(max(0.0, ALARM_SECONDS - checked_in))
            finally:
                await asyncio.to_thread(node.set_memory_alarm, on=False)
            cleared = time.monotonic()
            alarm_seconds = cleared - raised

            worker_after = await readiness(
                http, f"{worker}/readyz", lambda status, _: status == 200
            )
            resumed = time.monotonic() - cleared
            # Refused during the alarm, sent again after it: accepted, as the same task.
            retried = [
                await post_task(http, api, mixed_task(url, f"m-{run}-first", 0)),
                await post_task(http, api, mixed_task(url, f"m-{run}-second", 1)),
            ]
            code, _, err = await processes.run(
                settings, "submit", "--url", f"{url}/work", "--task-id", cli_task
            )
            assert code == 0, err
            everything = [*ids, f"m-{run}-first", f"m-{run}-second", cli_task]
            rows = await completed_in_database(settings, len(everything), timeout=120)
            bodies = await drain_events(channel, deployment.observer, set(everything))
            # Blocked is not lost: no connection was dropped and opened again.
            dropped = [c.log.name for c in deployment.children if "connection lost" in c.logs()]

    results = results_by_task(bodies)
    lost = len(everything) - len(rows)
    conflicting = sum(1 for found in results.values() if len(found) > 1)
    print(
        f"\nalarm raised with {at_block} of {TOTAL} tasks taken, for {alarm_seconds:.1f} s "
        f"(checks made in {checked_in:.1f} s); tasks taken while blocked: {still - started}; "
        f"POST /tasks refused in {first[3]:.2f} s, then in {second[3]:.3f} s; "
        f"worker ready again {resumed:.2f} s after the alarm cleared\n"
        f"submitted {len(everything)} / completed {len(rows)} / lost {lost} / "
        f"conflicting results {conflicting} / TaskCompleted events {len(bodies)} "
        f"({len(bodies) - len(results)} duplicates) / attempts > 1: "
        f"{sum(1 for r in rows if r['attempts'] > 1)}"
    )
    # While blocked.
    assert worker_answer == (
        503,
        {
            "status": "not ready",
            "reason": f"RabbitMQ is blocking publishes ({LOW_ON_MEMORY}): no new task is taken "
            "until it stops",
        },
    )
    refusal = (
        f"RabbitMQ is blocking publishes ({LOW_ON_MEMORY}) until its alarm clears; "
        "send the request again in 5 s"
    )
    for status_code, headers, body, _ in (first, second):
        assert (status_code, headers["Retry-After"], body["detail"]) == (503, "5", refusal)
    assert first[3] < 4
    assert second[3] < 1
    assert api_answer == (
        200,
        {
            "status": "ready",
            "reason": f"RabbitMQ is blocking publishes ({LOW_ON_MEMORY}): POST /tasks is "
            "answered 503",
        },
    )
    # Counted on a connection of the API's own that publishes nothing, so not blocked.
    assert (queue_answer[0], queue_answer[1]["brokerBlocked"]) == (200, LOW_ON_MEMORY)
    assert status["brokerBlocked"] == LOW_ON_MEMORY
    assert f"RabbitMQ is blocking publishes ({LOW_ON_MEMORY})" in text
    assert submit[0] == 4
    assert submit[2].strip() == (
        f"agentless: RabbitMQ is blocking publishes ({LOW_ON_MEMORY}) until its resource alarm "
        f"clears; task {cli_task} may not be queued: submit it again later with the same "
        "--task-id (it runs once however often it is sent)"
    )
    assert still == started
    # (Its consumer is cancelled; a quorum queue counts it until its deliveries are settled.)
    assert ready_after.message_count == ready.message_count
    # After.
    assert dropped == []
    assert worker_after == (200, {"status": "ready"})
    assert [(r[0], r[2]["taskId"]) for r in retried] == [
        (202, f"m-{run}-first"),
        (202, f"m-{run}-second"),
    ]
    assert lost == 0
    assert {(r["state"], r["result"], r["attempts"]) for r in rows} == {
        ("completed", "succeeded", 1)
    }
    assert set(results) == set(everything)
    assert conflicting == 0
