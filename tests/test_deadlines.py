"""A callback task's deadlines: the task fails when its service does not report back in time, its
cancelRequest is invoked once, and deadlines hold across restarts and several sweeping workers."""

from __future__ import annotations

import asyncio
import time

import asyncpg
from aio_pika.abc import AbstractChannel

from tests.barriers import swept
from tests.callbacks import callback_task, post, waiting
from tests.conftest import Api, Events, Target, publish
from worker.contract.settings import Settings
from worker.service import running_worker


async def test_deadline_fails_the_task_and_invokes_its_cancel_request_once(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task, headers = await waiting(
        api,
        channel,
        events,
        target,
        timeoutSeconds=1,
        cancelRequest={"method": "DELETE", "url": f"{target.url}/jobs?key=cancel-deadline"},
    )
    started = time.monotonic()
    event = await events.completed(task["taskId"])
    assert (event["result"], event["reason"]) == ("failed", "timed out waiting for callback")
    assert time.monotonic() - started < 3
    body = {"name": "TaskCompleted", "taskId": task["taskId"], "result": "succeeded"}
    status, problem, _ = await post(f"{api.url}/plans/plan-1/events", body, headers["AuthToken"])
    assert status == 409
    assert "timed out waiting for callback at" in problem["detail"]
    async with asyncio.timeout(5):
        while not target.calls["cancel-deadline"]:
            await asyncio.sleep(0.05)
    # The sweep after the one that sent it, which would send it again, has run to its end.
    await swept(channel, api.settings, events, target)
    assert target.calls["cancel-deadline"] == 1


async def test_a_service_that_never_starts_fails_fast(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    quiet, _ = await waiting(api, channel, events, target, startedTimeoutSeconds=1)
    started, headers = await waiting(api, channel, events, target, startedTimeoutSeconds=1)
    status, _, _ = await post(
        f"{api.url}/plans/plan-1/events",
        {"name": "TaskStarted", "taskId": started["taskId"]},
        headers["AuthToken"],
    )
    assert status == 200
    event = await events.completed(quiet["taskId"])
    assert (event["result"], event["reason"]) == ("failed", "external service did not start")
    # Its started deadline is less than a second away: the sweep that would fail it has run.
    await swept(channel, api.settings, events, target)
    assert not events.named("TaskCompleted", started["taskId"])
    assert [e["eventId"] for e in events.named("TaskStarted", started["taskId"])] == [
        f"{started['taskId']}:started",
        f"{started['taskId']}:started:external",
    ]


async def test_deadlines_survive_a_restart(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
) -> None:
    """A task left waiting by a worker that is gone is failed at its deadline by the next one."""
    async with running_worker(settings) as first:
        await asyncio.wait_for(first.consumer.consuming.wait(), 10)
        task = callback_task(target, timeoutSeconds=2)
        await publish(channel, settings, task)
        async with asyncio.timeout(10), events.changed:
            await events.changed.wait_for(lambda: bool(events.named("TaskWaiting", task["taskId"])))
    assert not events.named("TaskCompleted", task["taskId"])
    async with running_worker(settings):
        event = await events.completed(task["taskId"])
    assert (event["result"], event["reason"]) == ("failed", "timed out waiting for callback")
    row = await db.fetchrow(
        "SELECT completed_at - deadline AS late FROM tasks WHERE task_id = $1", task["taskId"]
    )
    assert row is not None
    assert row["late"].total_seconds() < 2


async def test_deadlines_fire_once_while_several_workers_sweep(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
) -> None:
    async with (
        running_worker(settings) as first,
        running_worker(settings) as second,
        running_worker(settings) as third,
    ):
        for worker in (first, second, third):
            await asyncio.wait_for(worker.consumer.consuming.wait(), 10)
        tasks = [callback_task(target, timeoutSeconds=1) for _ in range(30)]
        for task in tasks:
            await publish(channel, settings, task)
        await events.completed_count(len(tasks), timeout=20)
        # A second timeout of a task would come from a sweep under way beside the first; such
        # sweeps have ended once a later one has run (strictly so for the worker that ran it; the
        # others' sweeps are one statement and a few publishes each).
        await swept(channel, settings, events, target)
    ids = {t["taskId"] for t in tasks}
    completions = [e for e in events.named("TaskCompleted") if e["taskId"] in ids]
    assert sorted(str(e["taskId"]) for e in completions) == sorted(ids)
    assert {e["reason"] for e in completions} == {"timed out waiting for callback"}
