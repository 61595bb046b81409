"""RabbitMQ killed with SIGKILL (no goodbye, nothing flushed that was not already on disk) in the
middle of 2,000 tasks, then started again on its data, on a private node: nothing is lost, no task
has two results, and every publish that was confirmed before the crash is there after it: the
task messages still queued or unacknowledged, and the TaskCompleted events."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import asyncpg
from pamqp.common import FieldTable

from tests.conftest import SESSION, publish
from tests.faults.deployment import deployed, drain_events, mixed_task, results_by_task
from tests.faults.outages import Service, completed_in_database
from tests.rabbit_node import RabbitNode
from worker.contract.models import Names
from worker.contract.settings import Settings
from worker.topology import declare_topology

TOTAL = 2000
WORKERS = 2
# Few at a time, so that most task messages are still queued when the node dies.
CONCURRENCY = 8


async def test_rabbitmq_killed_with_sigkill_in_the_middle_of_2000_tasks(
    private_rabbit: RabbitNode,
    private_settings: Settings,
    db: asyncpg.Connection,
    endpoint: tuple[str, Service],
) -> None:
    settings = private_settings.model_copy(update={"concurrency": CONCURRENCY})
    node, (url, _) = private_rabbit, endpoint
    names = Names(settings.prefix)
    run = uuid.uuid4().hex[:6]
    ids = [f"c-{run}-{i}" for i in range(TOTAL)]
    name: FieldTable = {"connection_name": f"agentless tests {SESSION}"}
    before = await aio_pika.connect(settings.amqp_url, client_properties=name)
    channel = await before.channel(publisher_confirms=True)
    await declare_topology(channel, names)
    async with deployed(settings, channel, workers=WORKERS) as deployment:
        # Every task, each confirmed by the broker, before the crash.
        for i, task_id in enumerate(ids):
            await publish(channel, settings, mixed_task(url, task_id, i))
        pid = await asyncio.to_thread(node.os_pid)
        async with asyncio.timeout(60):
            while await db.fetchval("SELECT count(*) FROM tasks") < TOTAL // 10:
                await asyncio.sleep(0.05)
        # Every TaskCompleted whose confirm the database records by now was confirmed before
        # the crash: the broker had it on disk.
        confirmed = {
            r["task_id"]
            for r in await db.fetch(
                "SELECT task_id FROM tasks t WHERE state = 'completed' "
                "AND NOT EXISTS (SELECT FROM event_outbox o WHERE o.task_id = t.task_id)"
            )
        }
        await asyncio.to_thread(node.kill, pid)
        killed = time.monotonic()
        queued = TOTAL - await db.fetchval("SELECT count(*) FROM tasks")
        restart_seconds = await asyncio.to_thread(node.start)
        after = await aio_pika.connect(settings.amqp_url, client_properties=name)
        async with after:
            channel = await after.channel(publisher_confirms=True)
            rows = await completed_in_database(settings, TOTAL, timeout=150)
            took = time.monotonic() - killed
            bodies = await drain_events(channel, deployment.observer, set(ids))
            pending = await db.fetchval("SELECT count(*) FROM event_outbox")
    await asyncio.gather(before.close(), return_exceptions=True)

    results = results_by_task(bodies)
    conflicting = sum(1 for found in results.values() if len(found) > 1)
    rerun = sum(1 for r in rows if r["attempts"] > 1)
    print(
        f"\nkilled with {queued} task messages not yet taken and {len(confirmed)} TaskCompleted "
        f"confirmed; node back in "
        f"{restart_seconds:.1f} s; every task completed {took:.1f} s after the kill\n"
        f"submitted {TOTAL} / completed {len(rows)} / lost {TOTAL - len(rows)} / "
        f"conflicting results {conflicting} / confirmed before the crash and missing after it "
        f"{len(confirmed - set(results))} / TaskCompleted events {len(bodies)} "
        f"({len(bodies) - len(results)} duplicates) / attempts > 1: {rerun}"
    )
    assert confirmed
    assert queued > 0
    assert confirmed <= set(results)
    assert len(rows) == TOTAL
    assert {(r["state"], r["result"]) for r in rows} == {("completed", "succeeded")}
    assert set(results) == set(ids)
    assert conflicting == 0
    assert pending == 0
