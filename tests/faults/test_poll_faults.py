"""Poll tasks across worker deaths and restarts (issue 12, line 4): nothing is held between
polls, a poll in flight when its worker dies is made again by another, and it counts once."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio
from aio_pika.abc import AbstractChannel

from tests import processes
from tests.barriers import events_arrived
from tests.conftest import Api, Events, publish
from tests.poll_target import JobService, detail_when, poll_task
from tests.task_api import call
from worker.contract.models import Result
from worker.contract.settings import Settings
from worker.store.changes import PollAnswer


@pytest_asyncio.fixture
async def jobs() -> AsyncIterator[JobService]:
    async with JobService().serving() as service:
        yield service


async def stop(*children: processes.Child) -> None:
    for child in children:
        if child.process.returncode is None:
            child.process.send_signal(signal.SIGTERM)
    for child in children:
        await asyncio.wait_for(child.process.wait(), 30)


async def test_a_worker_killed_mid_poll_is_taken_over_and_the_poll_counted_once(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    jobs: JobService,
) -> None:
    # Poll 2 is held open by the service until its worker is dead; made again, it says done.
    task = poll_task(jobs, "killed", script="running,hang,done", poll={"maxAttempts": 2})
    first = await processes.start(settings, "worker")
    second: processes.Child | None = None
    try:
        await publish(channel, settings, task)
        await jobs.until("killed", 2, timeout=30)
        # The survivor starts before the death, so that it must notice the death, not merely
        # find the poll due when it starts.
        second = await processes.start(settings, "worker")
        first.process.kill()
        await first.process.wait()
        event = await events.completed("poll-killed", timeout=30)
        await events_arrived(channel, settings, events)
    finally:
        await stop(first, *([] if second is None else [second]))
    # maxAttempts 2 would have failed the task had the lost poll been counted.
    assert (event["result"], event["reason"]) == (
        "succeeded",
        "poll 2: HTTP 200; successCriteria true",
    )
    assert len(events.named("TaskCompleted", "poll-killed")) == 1
    assert await db.fetchval("SELECT polls FROM tasks WHERE task_id = 'poll-killed'") == 2
    job = jobs.job("killed")
    # The first poll, the one cut off by the kill, and the same poll made again.
    assert (job.starts, len(job.polls)) == (1, 3)


async def test_every_worker_restarted_between_polls_loses_no_poll_task(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    jobs: JobService,
) -> None:
    task = poll_task(jobs, "restarted", script="running,running,done")
    first = await processes.start(settings, "worker")
    second: processes.Child | None = None
    try:
        await publish(channel, settings, task)
        await jobs.until_answered("restarted", 1, timeout=30)
        await stop(first)
        # No worker runs now: the task is only its row.
        assert (
            await db.fetchval("SELECT state FROM tasks WHERE task_id = 'poll-restarted'")
            == "polling"
        )
        second = await processes.start(settings, "worker")
        event = await events.completed("poll-restarted", timeout=30)
    finally:
        await stop(first, *([] if second is None else [second]))
    assert (event["result"], event["reason"]) == (
        "succeeded",
        "poll 3: HTTP 200; successCriteria true",
    )
    job = jobs.job("restarted")
    assert (job.starts, len(job.polls)) == (1, 3)


async def test_a_superseded_poll_records_nothing(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService, db: asyncpg.Connection
) -> None:
    """The count of recorded polls fences each answer, as the attempt count fences a result: a
    poll taken at an older count (its worker presumed dead, the poll made again and recorded),
    or one whose task was cancelled meanwhile, changes nothing."""
    await publish(channel, api.settings, poll_task(jobs, "fenced", script="running"))
    await detail_when(api, "poll-fenced", lambda d: d["polls"] >= 2)
    polls = await db.fetchval("SELECT polls FROM tasks WHERE task_id = 'poll-fenced'")
    stale = PollAnswer("poll-fenced", polls - 1, "stale", None, result=Result.SUCCEEDED)
    assert not await api.worker.store.polls.record(stale)
    assert (await call("POST", f"{api.url}/tasks/poll-fenced/cancel"))[0] == 200
    polls = await db.fetchval("SELECT polls FROM tasks WHERE task_id = 'poll-fenced'")
    late = PollAnswer("poll-fenced", polls, "late", None, result=Result.SUCCEEDED)
    assert not await api.worker.store.polls.record(late)
    going_on = PollAnswer("poll-fenced", polls, "late", None, delay=1)
    assert not await api.worker.store.polls.record(going_on)
    event = await events.completed("poll-fenced")
    assert (event["result"], event["reason"]) == ("canceled", "canceled by request")
    row = await db.fetchrow("SELECT result, reason, polls FROM tasks WHERE task_id = 'poll-fenced'")
    assert row is not None
    assert (row["result"], row["reason"], row["polls"]) == (
        "canceled",
        "canceled by request",
        polls,
    )
