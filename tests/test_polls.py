"""Poll mode end to end (SPEC §5 poll): the start request, then the polls of the job it began,
what they show, their requests and macros, a cancel, retries, and a thousand at once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import pytest_asyncio
from aio_pika.abc import AbstractChannel

from tests.barriers import swept
from tests.callbacks import post
from tests.conftest import Api, Events, Target, first_message, publish, published_again
from tests.poll_target import JobService, detail, detail_when, poll_task
from tests.task_api import call
from worker.contract.settings import Settings
from worker.service import running_worker


@pytest_asyncio.fixture
async def jobs() -> AsyncIterator[JobService]:
    async with JobService().serving() as service:
        yield service


async def test_202_location_and_retry_after_are_followed_to_completion(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService, db: asyncpg.Connection
) -> None:
    # The start asks for 2 s before the first poll, the first poll for 3 s before the next; the
    # interval is 1 s. The start's own body would satisfy no criteria: they are for the polls.
    task = poll_task(
        jobs,
        "follow",
        script="running,done",
        query={"startretryafter": 2, "retryafter": 3},
        start={
            "headers": {"X-Trace": "abc", "Content-Type": "application/json"},
            "body": {"what": "build"},
        },
        outputs={"artifact": "body.result.artifact", "code": "statusCode"},
    )
    await publish(channel, api.settings, task)
    event = await events.completed("poll-follow")
    assert (event["result"], event["reason"]) == (
        "succeeded",
        "poll 2: HTTP 200; successCriteria true",
    )
    response: Any = event["response"]
    assert response["statusCode"] == 200
    assert response["body"]["state"] == "done"
    assert response["body"]["poll"] == 2
    assert event["outputs"] == {"artifact": "/artifacts/follow", "code": 200}
    assert event["attempts"] == 1

    job = jobs.job("follow")
    assert (job.starts, len(job.polls)) == (1, 2)
    # The default poll: GET of the Location, resolved against the start URL, with the start
    # request's headers but neither its body nor the headers that describe that body.
    for poll in job.polls:
        assert (poll.method, poll.path, poll.body) == ("GET", "/jobs/follow", b"")
        assert poll.headers["X-Trace"] == "abc"
        assert "Content-Type" not in poll.headers
    # Retry-After honoured: lower bounds only, what each answer asked for.
    assert job.polls[0].at - job.started_at >= 2 - 0.05
    assert job.polls[1].at - job.answered_at[0] >= 3 - 0.05

    names = [e["name"] for e in events.received if e.get("taskId") == "poll-follow"]
    assert names == ["TaskStarted", "TaskWaiting", "TaskCompleted"]
    waiting = events.named("TaskWaiting", "poll-follow")[0]
    assert waiting["response"]["statusCode"] == 202  # type: ignore[index]
    assert "task.waiting.build" in events.routing_keys
    row = await db.fetchrow("SELECT mode, polls FROM tasks WHERE task_id = 'poll-follow'")
    assert row is not None
    assert (row["mode"], row["polls"]) == ("poll", 2)


async def test_what_get_task_and_the_queue_show_of_a_polling_task(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    # The first poll is held open by the service: until it is answered, the task shows its
    # start response and no recorded poll.
    task = poll_task(jobs, "shown", script="hang,done")
    await publish(channel, api.settings, task)
    job = await jobs.until("shown", 1)
    found = await detail(api, "poll-shown")
    assert (found["mode"], found["state"], found["polls"]) == ("poll", "polling", 0)
    assert found["response"]["statusCode"] == 202
    assert found["response"]["body"]["state"] == "queued"
    queue = (await call("GET", f"{api.url}/queue"))[1]
    assert (queue["polling"], queue["waiting"], queue["running"]) == (1, 0, 0)

    job.release.set()
    found = await detail_when(api, "poll-shown", lambda d: d["polls"] >= 1)
    assert found["state"] == "polling"
    assert found["response"]["statusCode"] == 200
    assert found["response"]["body"] == {"id": "shown", "poll": 1, "state": "running"}
    assert found["reason"] == "poll 1: HTTP 200; successCriteria false"
    assert found["nextPollAt"] is not None
    next_poll = datetime.fromisoformat(found["nextPollAt"]).timestamp()
    assert next_poll >= job.answered_at[0] + 1 - 0.05

    event = await events.completed("poll-shown")
    assert event["reason"] == "poll 2: HTTP 200; successCriteria true"
    found = await detail(api, "poll-shown")
    assert (found["state"], found["result"], found["polls"]) == ("completed", "succeeded", 2)
    assert found["nextPollAt"] is None
    assert found["response"]["body"]["state"] == "done"
    assert (await call("GET", f"{api.url}/queue"))[1]["polling"] == 0


async def test_a_poll_task_published_again_while_it_polls_replies_to_the_new_caller(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    jobs: JobService,
    db: asyncpg.Connection,
) -> None:
    """As for a waiting callback task: its job is not started again, and its result goes to the
    reply address of the message published while it polls."""
    task = poll_task(jobs, "again", script="hang,done")
    await publish(channel, api.settings, task)
    job = await jobs.until("again", 1)
    replies = await published_again(channel, api.settings, db, task)
    job.release.set()
    message = await first_message(replies)
    event = orjson.loads(message.body)
    assert (message.correlation_id, event["taskId"], event["result"]) == (
        "again",
        "poll-again",
        "succeeded",
    )
    assert job.starts == 1


async def test_retry_after_is_capped_at_ten_intervals(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    task = poll_task(jobs, "capped", script="running", query={"retryafter": 3600})
    await publish(channel, api.settings, task)
    found = await detail_when(api, "poll-capped", lambda d: d["polls"] >= 1)
    answered = jobs.job("capped").answered_at[0]
    next_poll = datetime.fromisoformat(found["nextPollAt"]).timestamp()
    # 10 x 1 s after the answer (and nowhere near the hour asked for).
    assert answered + 10 - 0.05 <= next_poll <= answered + 10 + 5
    assert (await call("POST", f"{api.url}/tasks/poll-capped/cancel"))[0] == 200
    await events.completed("poll-capped")


async def test_poll_request_with_response_macros(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    poll = {
        "intervalSeconds": 1,
        "request": {
            "method": "POST",
            "url": f"{jobs.url}/jobs/$(response.body.id)?code=$(response.statusCode)",
            "headers": {"X-Token": "$(response.headers.X-JOB-TOKEN)"},
            "body": {"ref": "$(response.body.links[0].rel)", "job": "$(response.body.id)"},
        },
    }
    await publish(channel, api.settings, poll_task(jobs, "macros", script="done", poll=poll))
    event = await events.completed("poll-macros")
    assert (event["result"], event["reason"]) == (
        "succeeded",
        "poll 1: HTTP 200; successCriteria true",
    )
    (seen,) = jobs.job("macros").polls
    assert (seen.method, seen.path, seen.query) == ("POST", "/jobs/macros", {"code": "202"})
    assert seen.headers["X-Token"] == "tok-macros"
    assert orjson.loads(seen.body) == {"ref": "self", "job": "macros"}


async def test_an_unresolvable_macro_fails_the_task_naming_it(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    for name, url, macro in [
        ("nobody", f"{jobs.url}/jobs/$(response.body.job.id)", "$(response.body.job.id)"),
        ("noindex", f"{jobs.url}/jobs/$(response.body.links[3].href)", "links[3]"),
    ]:
        poll = {"request": {"method": "GET", "url": url}}
        await publish(channel, api.settings, poll_task(jobs, name, poll=poll))
        event = await events.completed(f"poll-{name}")
        assert event["result"] == "failed"
        assert macro in str(event["reason"]), event["reason"]
        assert jobs.job(name).polls == []
    headed = {"url": f"{jobs.url}/jobs/x", "headers": {"A": "$(response.headers.nope)"}}
    await publish(channel, api.settings, poll_task(jobs, "nohead", poll={"request": headed}))
    event = await events.completed("poll-nohead")
    assert event["result"] == "failed"
    assert "$(response.headers.nope)" in str(event["reason"]), event["reason"]


async def test_a_200_start_without_location_is_polled_at_its_own_url(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    # Without successCriteria a 202 poll answer means "still in progress"; any other 2xx is done.
    task = poll_task(jobs, "self", script="accepted,done", query={"startstatus": 200})
    del task["successCriteria"]
    await publish(channel, api.settings, task)
    event = await events.completed("poll-self")
    assert (event["result"], event["reason"]) == ("succeeded", "poll 2: HTTP 200")
    polls = jobs.job("self").polls
    assert [(p.method, p.path, p.query["id"]) for p in polls] == [("GET", "/jobs", "self")] * 2


async def test_a_polling_task_is_cancelled_at_once_and_its_cancel_request_made_once(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService, target: Target
) -> None:
    cancel = {"method": "POST", "url": f"{jobs.url}/jobs/stop/cancel"}
    task = poll_task(jobs, "stop", script="running", cancelRequest=cancel)
    await publish(channel, api.settings, task)
    await detail_when(api, "poll-stop", lambda d: d["polls"] >= 1)
    status, body, _ = await call("POST", f"{api.url}/tasks/poll-stop/cancel")
    assert (status, body) == (
        200,
        {"taskId": "poll-stop", "state": "completed", "result": "canceled"},
    )
    event = await events.completed("poll-stop")
    assert event["result"] == "canceled"
    polls_at_cancel = len(jobs.job("stop").polls)
    await jobs.until_cancelled("stop")
    # Any sweep that could make the cancelRequest again has run by now.
    await swept(channel, api.settings, events, target)
    job = jobs.job("stop")
    assert job.cancels == 1
    # At most the poll already in flight when the cancel came.
    assert len(job.polls) <= polls_at_cancel + 1
    assert len(events.named("TaskCompleted", "poll-stop")) == 1
    assert (await call("POST", f"{api.url}/tasks/poll-stop/cancel"))[0] == 409


async def test_retries_apply_to_the_start_request_only(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    task = poll_task(
        jobs,
        "retried",
        script="503",
        query={"startfail": 1},
        retry={"attempts": 3, "delaySeconds": 0},
    )
    await publish(channel, api.settings, task)
    event = await events.completed("poll-retried")
    assert (event["result"], event["reason"], event["attempts"]) == (
        "failed",
        "poll 1: HTTP 503",
        2,
    )
    job = jobs.job("retried")
    assert (job.starts, len(job.polls)) == (2, 1)


async def test_callbacks_for_a_poll_task_are_refused(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    await publish(channel, api.settings, poll_task(jobs, "nocb", script="hang,done"))
    job = await jobs.until("nocb", 1)
    # A valid token for the task: the refusal must be for its mode, not its credentials.
    token = api.worker.signer.issue("poll-nocb", "plan-poll", time.time() + 60)
    completed = {"name": "TaskCompleted", "taskId": "poll-nocb", "result": "succeeded"}
    status, problem, _ = await post(f"{api.url}/plans/plan-poll/events", completed, token)
    assert status == 409, problem
    job.release.set()
    assert (await events.completed("poll-nocb"))["result"] == "succeeded"


async def test_a_thousand_tasks_poll_at_once(
    settings: Settings,
    channel: AbstractChannel,
    events: Events,
    jobs: JobService,
    db: asyncpg.Connection,
) -> None:
    # No job says done until every job has started: all thousand poll at the same time. One
    # worker with the default concurrency (the tests' 32 would pace the starts to a crawl).
    total = 1000
    jobs.done_once_started = total
    scripts = ["done", "running,done", "running,running,done"]
    async with running_worker(settings.model_copy(update={"concurrency": 256})):
        for i in range(total):
            await publish(channel, settings, poll_task(jobs, f"many-{i}", script=scripts[i % 3]))
        done = await events.completed_count(total, timeout=40)
    assert len(done) == total
    rows = await db.fetch("SELECT task_id, result, polls FROM tasks")
    assert len(rows) == total
    assert {r["result"] for r in rows} == {"succeeded"}
    # Every poll the service answered was counted, once.
    for row in rows:
        job = jobs.job(row["task_id"].removeprefix("poll-"))
        assert row["polls"] == len(job.polls) >= 1
