"""How a poll task ends (SPEC §5 poll): a start that fails, failure criteria, maxAttempts and the
deadline used up, and poll failures ignored or not."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio
from aio_pika.abc import AbstractChannel

from tests.conftest import Api, Events, free_port, publish
from tests.poll_target import JobService, detail_when, poll_task


@pytest_asyncio.fixture
async def jobs() -> AsyncIterator[JobService]:
    async with JobService().serving() as service:
        yield service


async def test_a_non_2xx_start_fails_at_once(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    task = poll_task(jobs, "nostart", query={"startstatus": 500})
    await publish(channel, api.settings, task)
    event = await events.completed("poll-nostart")
    assert (event["result"], event["reason"], event["attempts"]) == ("failed", "HTTP 500", 1)
    assert jobs.job("nostart").polls == []
    assert events.named("TaskWaiting", "poll-nostart") == []


async def test_failure_criteria_fail_the_task(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    poll = {"intervalSeconds": 1, "failureCriteria": "body.state == 'failed'"}
    task = poll_task(jobs, "broke", script="running,failed,done", poll=poll)
    await publish(channel, api.settings, task)
    event = await events.completed("poll-broke")
    assert (event["result"], event["reason"]) == (
        "failed",
        "poll 2: HTTP 200; failureCriteria true",
    )
    assert event["response"]["body"]["error"] == "the job broke"  # type: ignore[index]
    assert len(jobs.job("broke").polls) == 2


async def test_max_attempts_exhausted(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService, db: asyncpg.Connection
) -> None:
    poll = {"intervalSeconds": 1, "maxAttempts": 3}
    await publish(channel, api.settings, poll_task(jobs, "max", script="running", poll=poll))
    event = await events.completed("poll-max")
    assert event["result"] == "failed"
    assert str(event["reason"]).startswith("poll criteria not met after 3 polls (maxAttempts 3)")
    # The third poll's answer completed the task: no fourth can be taken.
    assert len(jobs.job("max").polls) == 3
    assert await db.fetchval("SELECT polls FROM tasks WHERE task_id = 'poll-max'") == 3


async def test_timeout_seconds_exhausted(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService, db: asyncpg.Connection
) -> None:
    task = poll_task(jobs, "late", script="running", timeoutSeconds=3)
    await publish(channel, api.settings, task)
    event = await events.completed("poll-late")
    assert event["result"] == "failed"
    match = re.fullmatch(
        r"poll criteria not met after (\d+) polls?: timed out after 3 s", str(event["reason"])
    )
    assert match, event["reason"]
    recorded = await db.fetchval("SELECT polls FROM tasks WHERE task_id = 'poll-late'")
    assert int(match[1]) == recorded >= 1
    # A poll in flight at the deadline is made but not recorded.
    assert len(jobs.job("late").polls) in (recorded, recorded + 1)


async def test_ignored_failures_count_as_polls_and_polling_goes_on(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    # 503, 429 and no answer within the response timeout (3 s in tests) are each one poll.
    poll = {"intervalSeconds": 1, "ignoreFailures": True}
    task = poll_task(jobs, "bumpy", script="503,429,hang,done", poll=poll)
    await publish(channel, api.settings, task)
    event = await events.completed("poll-bumpy", timeout=30)
    assert (event["result"], event["reason"]) == (
        "succeeded",
        "poll 4: HTTP 200; successCriteria true",
    )
    assert len(jobs.job("bumpy").polls) == 4


async def test_ignored_connection_refused_counts_and_polling_goes_on(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    port = free_port()
    poll = {
        "intervalSeconds": 1,
        "ignoreFailures": True,
        "request": {"method": "GET", "url": f"http://127.0.0.1:{port}/jobs/$(response.body.id)"},
    }
    await publish(channel, api.settings, poll_task(jobs, "refused", script="done", poll=poll))
    found = await detail_when(api, "poll-refused", lambda d: d["polls"] >= 1)
    assert found["state"] == "polling"
    assert found["reason"] == (
        f"poll 1: cannot connect to 127.0.0.1:{port}: connection refused; ignored"
    )
    await jobs.listen_also(port)
    event = await events.completed("poll-refused")
    assert event["result"] == "succeeded"
    match = re.fullmatch(r"poll (\d+): HTTP 200; successCriteria true", str(event["reason"]))
    assert match, event["reason"]
    # Every refused connection was a poll; the service saw only the last.
    assert int(match[1]) >= 2
    assert len(jobs.job("refused").polls) == 1


async def test_failures_not_ignored_fail_the_task_with_the_polls_reason(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    await publish(channel, api.settings, poll_task(jobs, "busy", script="running,503"))
    port = free_port()
    down = {"intervalSeconds": 1, "request": {"method": "GET", "url": f"http://127.0.0.1:{port}/x"}}
    await publish(channel, api.settings, poll_task(jobs, "down", poll=down))
    slow = {"intervalSeconds": 1, "ignoreFailures": False}
    await publish(channel, api.settings, poll_task(jobs, "slow", script="hang", poll=slow))
    assert (await events.completed("poll-busy"))["reason"] == "poll 2: HTTP 503"
    assert (await events.completed("poll-down"))["reason"] == (
        f"poll 1: cannot connect to 127.0.0.1:{port}: connection refused"
    )
    assert (await events.completed("poll-slow"))["reason"] == (
        "poll 1: no complete response within 3 s"
    )
    for name in ("busy", "down", "slow"):
        assert events.named("TaskCompleted", f"poll-{name}")[0]["result"] == "failed"


async def test_a_404_fails_the_task_even_when_failures_are_ignored(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    for name, answer in [("gone", "404"), ("bad", "400")]:
        poll = {"intervalSeconds": 1, "ignoreFailures": True}
        await publish(
            channel, api.settings, poll_task(jobs, name, script=f"running,{answer}", poll=poll)
        )
        event = await events.completed(f"poll-{name}")
        assert (event["result"], event["reason"]) == ("failed", f"poll 2: HTTP {answer}")
