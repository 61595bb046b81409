"""A service written the way Azure's server-task helper library works (tests/azure_standin.py),
run as a real local aiohttp server against a live `agentless run`; Microsoft's own client is
tested in tests/test_azure_client.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import orjson
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel

from tests.azure_standin import (
    EXPECTED_CALLS,
    FEED_LINES,
    LOG_LINES,
    AzureService,
    Json,
    ServiceError,
    assert_secret_not_kept,
    azure_task,
    lines_of,
    serving,
    task_logs,
    until,
)
from tests.conftest import Api, Events, publish


@pytest_asyncio.fixture
async def azure() -> AsyncIterator[AzureService]:
    async with serving() as service:
        yield service


@pytest.mark.parametrize(
    ("fields", "project"),
    [
        pytest.param({"projectId": "proj-7", "hubName": "release"}, "proj-7", id="project"),
        # Azure always has a project: without one the worker sends "default", as a place holder
        # that the service builds its URLs with.
        pytest.param({"waitForCompletion": True}, "default", id="no-project"),
    ],
)
async def test_a_service_written_for_azure_reports_back_unchanged(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    azure: AzureService,
    db: asyncpg.Connection,
    fields: Json,
    project: str,
) -> None:
    task = azure_task(azure, **fields)
    task_id = task["taskId"]
    hub = fields.get("hubName", "build")
    await publish(channel, api.settings, task)

    report = await azure.finished(task_id)
    assert report.error is None
    assert report.plan is not None
    assert (report.plan.project_id, report.plan.hub_name, report.plan.timeline_id) == (
        project,
        hub,
        "job-az",
    )
    assert report.calls == EXPECTED_CALLS

    event = await events.completed(task_id)
    assert {key: event[key] for key in ("result", "reason", "outputs", "hubName")} == {
        "result": "succeeded",
        "reason": "TaskCompleted from the external service: succeeded",
        "outputs": {"buildNumber": "42"},
        "hubName": hub,
    }
    assert b"hunter2" not in orjson.dumps(event)
    await assert_secret_not_kept(db, task_id)

    # The record the service read before it completed the task: still in progress.
    record = report.records["value"][0]
    assert isinstance(datetime.fromisoformat(record["startTime"]), datetime)
    assert {**report.records, "value": [{**record, "startTime": "…"}]} == {
        "count": 1,
        "value": [
            {
                "id": task_id,
                "type": "Task",
                "state": "inProgress",
                "result": None,
                "startTime": "…",
                "finishTime": None,
                "variables": {"buildNumber": {"value": "42", "isSecret": False}},
            }
        ],
    }

    # The service's own TaskStarted is told apart from the worker's.
    await until(events, lambda: len(events.named("TaskStarted", task_id)) == 2)
    started = {
        str(e["eventId"]): (e["planId"], e["jobId"], e["hubName"])
        for e in events.named("TaskStarted", task_id)
    }
    assert started == {
        f"{task_id}:started": ("plan-az", "job-az", hub),
        f"{task_id}:started:external": ("plan-az", "job-az", hub),
    }

    assert lines_of(await task_logs(api, task_id)) == {
        "taskId": task_id,
        "droppedLines": 0,
        "lines": LOG_LINES + FEED_LINES,
    }


async def test_a_service_that_completes_before_it_answers(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    azure: AzureService,
    db: asyncpg.Connection,
) -> None:
    # The callback's result differs from what the invocation's 200 alone would give, so the
    # event says whose word counted.
    task = azure_task(azure, "?early=1&result=succeededWithIssues", waitForCompletion=True)
    task_id = task["taskId"]
    await publish(channel, api.settings, task)

    report = await azure.finished(task_id)
    assert (report.error, report.calls) == (None, EXPECTED_CALLS)
    # Read while the invocation was still unanswered: the task was running, not yet waiting.
    assert report.records["value"][0]["state"] == "inProgress"

    event = await events.completed(task_id)
    assert (event["result"], event["reason"], event["outputs"]) == (
        "succeededWithIssues",
        "TaskCompleted from the external service: succeededWithIssues",
        {"buildNumber": "42"},
    )
    # The worker is done with the task once it has settled its message.
    async with asyncio.timeout(10):
        while api.worker.consumer.in_flight:
            await asyncio.sleep(0.05)
    row = await db.fetchrow(
        "SELECT state, result, completed_by FROM tasks WHERE task_id = $1", task_id
    )
    assert dict(row or {}) == {
        "state": "completed",
        "result": "succeededWithIssues",
        "completed_by": "callback",
    }
    assert [e["eventId"] for e in events.named("TaskCompleted", task_id)] == [
        f"{task_id}:completed"
    ]
    assert not events.named("TaskWaiting", task_id)
    await assert_secret_not_kept(db, task_id)
    assert lines_of(await task_logs(api, task_id))["lines"] == LOG_LINES + FEED_LINES


async def test_a_log_line_that_is_a_json_object_is_kept_as_text(
    api: Api, channel: AbstractChannel, events: Events, azure: AzureService
) -> None:
    task = azure_task(azure, "?idle=1")
    await publish(channel, api.settings, task)
    client = azure.client(await azure.finished(task["taskId"]))
    # Services that log structured lines send them as text, as TaskLogger sends every line.
    lines = ['{"step": "deploy", "progress": 50}', '{"step": "swap", "progress": 100}']
    await client.append_log(await client.create_log("logs\\structured"), lines)
    assert lines_of(await task_logs(api, task["taskId"]))["lines"] == lines


async def test_outputs_are_fixed_once_the_task_has_completed(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    azure: AzureService,
    db: asyncpg.Connection,
) -> None:
    task = azure_task(azure, "?idle=1")
    task_id = task["taskId"]
    await publish(channel, api.settings, task)
    client = azure.client(await azure.finished(task_id))
    await until(events, lambda: bool(events.named("TaskWaiting", task_id)))
    await client.update_records({"buildNumber": {"value": "42", "isSecret": False}})
    await client.complete("succeeded")
    event = await events.completed(task_id)
    # Refusing the late update (4xx) and ignoring it are both fine; changing history is not.
    with contextlib.suppress(ServiceError):
        await client.update_records({"buildNumber": {"value": "43", "isSecret": False}})
    outputs = await db.fetchval("SELECT outputs::text FROM tasks WHERE task_id = $1", task_id)
    assert (event["outputs"], orjson.loads(outputs)) == ({"buildNumber": "42"},) * 2
