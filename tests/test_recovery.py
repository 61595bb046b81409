"""Processes die, connections drop, consumers are cancelled: nothing is lost, nothing runs twice."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import defaultdict

import asyncpg
import pytest
from aio_pika.abc import AbstractChannel

from tests import processes
from tests.conftest import Events, Target, publish, task_message
from worker import consumer
from worker.contract.models import Names
from worker.contract.settings import Settings
from worker.service import Worker
from worker.topology import tasks_queue_arguments


async def publish_many(
    channel: AbstractChannel, settings: Settings, tasks: list[dict[str, object]]
) -> None:
    for start in range(0, len(tasks), 100):
        await asyncio.gather(*(publish(channel, settings, t) for t in tasks[start : start + 100]))


async def test_sigkill_during_a_run_loses_nothing_and_records_one_result_each(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
) -> None:
    total = 1000
    run = uuid.uuid4().hex[:6]
    tasks = [
        task_message(target, taskId=f"kill-{run}-{i}", query="&delay=0.05") for i in range(total)
    ]
    first = await processes.start(settings, "worker")
    await publish_many(channel, settings, tasks)
    await events.completed_count(total // 4, timeout=60)
    first.process.kill()
    await first.process.wait()
    completed_before_restart = len({e["taskId"] for e in events.named("TaskCompleted")})

    second = await processes.start(settings, "worker")
    try:
        await events.completed_count(total, timeout=120)
    finally:
        second.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.process.wait(), 30) == 0

    rows = await db.fetch("SELECT task_id, state, result, attempts FROM tasks")
    results: dict[str, set[object]] = defaultdict(set)
    for event in events.named("TaskCompleted"):
        results[str(event["taskId"])].add(event["result"])
    attempts = {r["task_id"]: r["attempts"] for r in rows}
    rerun = sum(1 for a in attempts.values() if a > 1)
    duplicate_events = len(events.named("TaskCompleted")) - len(results)
    print(
        f"\nsubmitted {total} / completed {len(results)} / lost {total - len(results)} / "
        f"completed before kill {completed_before_restart} / re-run after kill {rerun} / "
        f"duplicate events {duplicate_events}"
    )
    assert len(rows) == total
    assert {(r["state"], r["result"]) for r in rows} == {("completed", "succeeded")}
    assert all(len(found) == 1 for found in results.values())
    assert len(results) == total
    # Invoked at most once per attempt.
    assert all(target.calls[task_id] <= attempts[task_id] for task_id in attempts)


async def test_sigterm_finishes_in_flight_tasks_then_exits_0(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
) -> None:
    child = await processes.start(settings, "worker")
    tasks = [task_message(target, query="&delay=1.5") for _ in range(5)]
    await publish_many(channel, settings, tasks)
    async with asyncio.timeout(20), events.changed:
        await events.changed.wait_for(lambda: len(events.named("TaskStarted")) == 5)
    child.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(child.process.wait(), 20) == 0, child.logs()
    completed = {e["taskId"] for e in events.named("TaskCompleted")}
    assert completed == {t["taskId"] for t in tasks}
    states = await db.fetch("SELECT state, result FROM tasks")
    assert {(r["state"], r["result"]) for r in states} == {("completed", "succeeded")}


async def test_worker_consumes_again_after_its_connection_is_closed_by_the_broker(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
) -> None:
    subscriptions = worker.consumer.subscriptions
    name = f"agentless worker {settings.prefix} "
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        "list_connections",
        "pid",
        "client_properties",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    pids = [line.split("\t", 1)[0] for line in out.decode().splitlines() if name in line]
    assert pids
    for pid in pids:
        closer = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "-q", "close_connection", pid, "test: broker closes the connection"
        )
        await closer.wait()
    async with asyncio.timeout(20):
        while worker.consumer.subscriptions == subscriptions:
            await asyncio.sleep(0.1)
    task = task_message(target)
    await publish(channel, settings, task)
    assert (await events.completed(str(task["taskId"])))["result"] == "succeeded"


async def test_worker_consumes_again_after_its_queue_is_deleted_and_declared_again(
    monkeypatch: pytest.MonkeyPatch,
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
) -> None:
    """The broker cancels the consumer, or (a race in quorum queues) hands the next message to a
    consumer it no longer serves; either way the worker must take the task published afterwards."""
    monkeypatch.setattr(consumer, "IDLE_RENEW_SECONDS", 3.0)
    names = Names(settings.prefix)
    await channel.queue_delete(names.tasks)
    await channel.declare_queue(names.tasks, durable=True, arguments=tasks_queue_arguments(names))
    task = task_message(target)
    await publish(channel, settings, task)
    assert (await events.completed(str(task["taskId"]), timeout=20))["result"] == "succeeded"


async def test_worker_consumes_again_after_the_broker_cancels_its_consumer(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
) -> None:
    names = Names(settings.prefix)
    subscriptions = worker.consumer.subscriptions
    await channel.queue_delete(names.tasks)
    async with asyncio.timeout(20):
        while worker.consumer.subscriptions == subscriptions:
            await asyncio.sleep(0.1)
    task = task_message(target)
    await publish(channel, settings, task)
    assert (await events.completed(str(task["taskId"])))["result"] == "succeeded"
