"""Opt-in retries (SPEC §4 `retry`): which failures are tried again, when, how each attempt is
recorded, and that a waiting retry holds nothing and survives its worker."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractChannel

from tests.callbacks import callback_task, post, waiting
from tests.conftest import (
    Api,
    Dead,
    Events,
    Target,
    free_port,
    publish,
    task_message,
    task_record,
)
from tests.task_api import call
from worker.contract import retries
from worker.contract.models import HttpResponse, Names, Outcome, Result, State
from worker.contract.requests import RetryPolicy
from worker.contract.settings import Settings
from worker.runner import MAX_ATTEMPTS, _retry_recorded
from worker.service import running_worker
from worker.store.changes import Claimed

POLICY = RetryPolicy(attempts=3, delay_seconds=2, backoff=3)


def answered(status: int, **headers: str) -> Outcome:
    response = HttpResponse(status_code=status, headers=headers, body="", elapsed_ms=1)
    return Outcome(Result.FAILED, f"HTTP {status}", response)


@pytest.mark.parametrize(
    ("outcome", "retries_done", "planned"),
    [
        (answered(503), 0, retries.Retry(1, 2)),
        (answered(429), 1, retries.Retry(2, 6)),
        (answered(503, **{"retry-after": "30"}), 0, retries.Retry(1, 30)),
        # The policy's delay when it is the longer of the two.
        (answered(503, **{"retry-after": "1"}), 1, retries.Retry(2, 6)),
        (Outcome(Result.FAILED, "cannot connect", transient=True), 0, retries.Retry(1, 2)),
        (answered(503), 2, retries.NoRetry("HTTP 503; gave up after 3 attempts")),
        (
            answered(429, **{"retry-after": "7200"}),
            0,
            retries.NoRetry("HTTP 429; Retry-After asks for 7200 s, beyond the 3600-s limit"),
        ),
        # The endpoint's verdicts, and failures that no retry cures.
        (answered(404), 0, None),
        (answered(500), 0, None),
        (Outcome(Result.FAILED, "egress refused"), 0, None),
        (Outcome(Result.SUCCEEDED, "HTTP 200"), 0, None),
    ],
)
def test_which_failures_are_retried_and_when(
    outcome: Outcome, retries_done: int, planned: retries.Retry | retries.NoRetry | None
) -> None:
    got = retries.plan(POLICY, outcome, retries_done)
    if isinstance(planned, retries.NoRetry):
        assert isinstance(got, retries.NoRetry)
        assert got.reason.startswith(planned.reason)
    else:
        assert got == planned


def test_no_policy_no_retry() -> None:
    assert retries.plan(None, answered(503), 0) is None


def test_retry_after_as_a_date_or_seconds() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert retries.retry_after("120", now) == 120
    assert retries.retry_after("Tue, 01 Dec 2026 12:01:30 GMT", now) == 90
    assert retries.retry_after("Tue, 01 Dec 2026 11:00:00 GMT", now) == 0
    assert retries.retry_after("soon", now) is None
    assert retries.retry_after(None, now) is None


def test_a_retry_after_date_counts_from_the_response_date_not_this_clock() -> None:
    # The endpoint's clock is an hour off ours: its own Date says when "90 s from now" is.
    headers = {
        "date": "Tue, 01 Dec 2026 13:00:00 GMT",
        "retry-after": "Tue, 01 Dec 2026 13:01:30 GMT",
    }
    assert [
        retries.asked_delay(headers),
        retries.asked_delay({"retry-after": "30"}),
        retries.asked_delay({"date": "not a date", "retry-after": "Tue, 01 Dec 2026 11:00:00 GMT"}),
        retries.asked_delay({}),
    ] == [90, 30, 0, None]


def test_delays_share_a_few_queues() -> None:
    assert [retries.bucket(s) for s in (0, 0.2, 1, 99.5, 101, 1234, 3600)] == [
        0,
        1,
        1,
        100,
        110,
        1300,
        3600,
    ]


def test_a_retry_recorded_by_a_statement_whose_answer_was_lost_is_recognised() -> None:
    now = datetime.now(UTC)
    claimed = Claimed(attempts=2, retries=1, queued_at=now, started_at=now)
    record = task_record(reason="HTTP 503", attempts=2, started_at=now, retries=2)
    assert _retry_recorded(record, claimed)
    # A newer attempt took the task, or it completed: this attempt's retry is not the record's.
    assert not _retry_recorded(replace(record, attempts=3), claimed)
    assert not _retry_recorded(replace(record, state=State.COMPLETED), claimed)
    assert not _retry_recorded(replace(record, retries=1), claimed)


def test_backoff_is_capped() -> None:
    assert RetryPolicy(attempts=50, delay_seconds=60, backoff=10).delay(40) == 3600


async def test_a_task_is_retried_until_it_succeeds(
    api: Api, events: Events, target: Target
) -> None:
    task = task_message(
        target,
        taskId="retry-ok",
        query="&fail=2",
        retry={"attempts": 3, "delaySeconds": 1, "backoff": 1},
    )
    assert (await call("POST", f"{api.url}/tasks", task))[0] == 202
    completed = await events.completed("retry-ok", timeout=20)
    assert (completed["result"], completed["attempts"]) == ("succeeded", 3)
    assert target.calls["retry-ok"] == 3
    # One TaskCompleted; a TaskStarted per attempt.
    assert len(events.named("TaskCompleted", "retry-ok")) == 1
    assert len(events.named("TaskStarted", "retry-ok")) == 3

    detail = (await call("GET", f"{api.url}/tasks/retry-ok"))[1]
    assert (detail["retries"], detail["retryAt"]) == (2, None)
    history = detail["history"]
    assert [(h["attempt"], h["statusCode"], h["reason"]) for h in history] == [
        (1, 503, "HTTP 503"),
        (2, 503, "HTTP 503"),
    ]
    for h in history:
        assert h["startedAt"] <= h["endedAt"] < h["retryAt"]


async def test_a_callback_tasks_invocation_is_retried_and_then_it_waits(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task, headers = await waiting(
        api, channel, events, target, query="&fail=1", retry={"attempts": 2, "delaySeconds": 0}
    )
    token = headers["AuthToken"]
    status, _, _ = await post(
        f"{api.url}/plans/plan-1/events",
        {"name": "TaskCompleted", "taskId": task["taskId"], "result": "succeeded"},
        token,
    )
    assert status == 200
    completed = await events.completed(str(task["taskId"]))
    assert (completed["result"], completed["attempts"]) == ("succeeded", 2)
    # Each attempt had a token of its own.
    assert target.calls[str(task["taskId"])] == 2


async def test_a_callback_that_comes_while_a_retry_waits_completes_the_task(
    api: Api, channel: AbstractChannel, events: Events, target: Target, db: asyncpg.Connection
) -> None:
    # The first call fails (on its way back, as far as the worker can tell), but the service got
    # its token and reports the task done before the retry is due.
    task = callback_task(target, query="&fail=1", retry={"attempts": 2, "delaySeconds": 3})
    task_id = str(task["taskId"])
    await publish(channel, api.settings, task)
    async with asyncio.timeout(10):
        while await queued_for_retry(db, task_id) is None:
            await asyncio.sleep(0.05)
    token = target.headers[task_id][0]["AuthToken"]
    body = {"name": "TaskCompleted", "taskId": task_id, "result": "succeeded"}
    status, _, _ = await post(f"{api.url}/plans/plan-1/events", body, token)
    assert status == 200
    completed = await events.completed(task_id)
    assert completed["result"] == "succeeded"
    # The retry, when due, finds the task completed and calls nobody.
    async with asyncio.timeout(10), events.changed:
        await events.changed.wait_for(lambda: len(events.named("TaskCompleted", task_id)) > 1)
    assert target.calls[task_id] == 1
    assert await db.fetchval("SELECT attempts FROM tasks WHERE task_id = $1", task_id) == 1


async def test_retry_after_is_honoured(api: Api, events: Events, target: Target) -> None:
    task = task_message(
        target,
        taskId="retry-after",
        query="&fail=1&failstatus=429&retryafter=2",
        retry={"attempts": 2, "delaySeconds": 0},
    )
    assert (await call("POST", f"{api.url}/tasks", task))[0] == 202
    assert (await events.completed("retry-after", timeout=20))["result"] == "succeeded"
    (attempt,) = (await call("GET", f"{api.url}/tasks/retry-after"))[1]["history"]
    waited = datetime.fromisoformat(attempt["retryAt"]) - datetime.fromisoformat(attempt["endedAt"])
    assert attempt["statusCode"] == 429
    assert waited >= timedelta(seconds=2)


async def test_other_client_errors_are_never_retried(
    api: Api, events: Events, target: Target
) -> None:
    task = task_message(target, taskId="retry-404", query="&status=404", retry={"attempts": 5})
    assert (await call("POST", f"{api.url}/tasks", task))[0] == 202
    completed = await events.completed("retry-404")
    assert (completed["result"], completed["reason"], completed["attempts"]) == (
        "failed",
        "HTTP 404",
        1,
    )
    assert target.calls["retry-404"] == 1


async def test_retries_are_not_taken_for_a_dying_worker(api: Api, events: Events) -> None:
    # More attempts than a task whose workers die may have: each one ended, so none is poison.
    attempts = MAX_ATTEMPTS + 2
    task = {
        "taskId": "retry-refused",
        "planId": "plan-1",
        "request": {"url": f"http://127.0.0.1:{free_port()}/nobody-listens"},
        "retry": {"attempts": attempts, "delaySeconds": 0},
    }
    assert (await call("POST", f"{api.url}/tasks", task))[0] == 202
    completed = await events.completed("retry-refused", timeout=20)
    assert completed["result"] == "failed"
    assert str(completed["reason"]).startswith("cannot connect to 127.0.0.1:")
    assert str(completed["reason"]).endswith(f"; gave up after {attempts} attempts")
    detail = (await call("GET", f"{api.url}/tasks/retry-refused"))[1]
    assert detail["attempts"] == attempts
    assert [h["statusCode"] for h in detail["history"]] == [None] * (attempts - 1)


async def test_a_waiting_retry_holds_nothing_and_outlives_its_worker(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
) -> None:
    task = task_message(
        target, taskId="retry-restart", query="&fail=1", retry={"attempts": 2, "delaySeconds": 3}
    )
    async with running_worker(settings) as first:
        await asyncio.wait_for(first.consumer.consuming.wait(), 10)
        await publish(channel, settings, task, message_id="retry-restart")
        async with asyncio.timeout(10):
            while await queued_for_retry(db, "retry-restart") is None:
                await asyncio.sleep(0.05)
        # Nothing unacknowledged: the task waits in a delay queue, not in a worker.
        tasks = await channel.declare_queue(Names(settings.prefix).tasks, passive=True)
        assert tasks.declaration_result.message_count == 0
    # The first worker is gone before the retry is due; another one runs it.
    async with running_worker(settings) as second:
        await asyncio.wait_for(second.consumer.consuming.wait(), 10)
        completed = await events.completed("retry-restart", timeout=20)
    assert (completed["result"], completed["attempts"]) == ("succeeded", 2)
    assert target.calls["retry-restart"] == 2


async def queued_for_retry(db: asyncpg.Connection, task_id: str) -> Any:
    return await db.fetchval(
        "SELECT history FROM tasks WHERE task_id = $1 AND state = 'queued'", task_id
    )


async def test_a_bad_retry_policy_is_dead_lettered(
    settings: Settings, channel: AbstractChannel, dead: Dead, target: Target, api: Api
) -> None:
    task = task_message(target, retry={"attempts": 0})
    await publish(channel, settings, task)
    reason, _ = await dead.next()
    assert "retry.attempts" in reason
