"""Callback mode end to end: the worker hands out a token and waits; the service reports back."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractChannel

from callback_api import events as callback_events
from tests import processes
from tests.barriers import api_caught_up
from tests.callbacks import CALLBACK_HEADERS, callback_task, post, waiting
from tests.conftest import (
    Api,
    Events,
    Target,
    first_message,
    free_port,
    publish,
    published_again,
    task_message,
)
from tests.processes import wait_until_ready
from worker.contract.settings import Settings


async def test_callback_task_waits_then_completes_with_the_services_result(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
) -> None:
    task, headers = await waiting(
        api, channel, events, target, planId="plan-cb", hubName="release", projectId="proj"
    )
    task_id = task["taskId"]
    assert {name: headers[name] for name in CALLBACK_HEADERS if name != "AuthToken"} == {
        "PlanUrl": api.url,
        "ProjectId": "proj",
        "HubName": "release",
        "PlanId": "plan-cb",
        "JobId": "plan-cb",
        "TimelineId": "plan-cb",
        "TaskInstanceId": task_id,
    }
    row = await db.fetchrow(
        "SELECT state, deadline, message::text FROM tasks WHERE task_id = $1", task_id
    )
    assert row is not None
    assert row["state"] == "waiting"
    assert row["deadline"] is not None
    assert headers["AuthToken"] not in row["message"]

    url = f"{api.url}/plans/plan-cb/events"
    completed = {"name": "TaskCompleted", "taskId": task_id, "result": "succeeded"}
    status, body, _ = await post(url, completed, headers["AuthToken"])
    assert (status, body) == (200, {"taskId": task_id, "state": "completed", "result": "succeeded"})
    event = await events.completed(task_id)
    assert (event["result"], event["reason"]) == (
        "succeeded",
        "TaskCompleted from the external service: succeeded",
    )
    assert event["hubName"] == "release"

    # An exact repeat changes nothing; a different result conflicts.
    assert (await post(url, completed, headers["AuthToken"]))[0] == 200
    status, problem, content_type = await post(
        url, {**completed, "result": "failed"}, headers["AuthToken"]
    )
    assert (status, content_type) == (409, "application/problem+json")
    assert problem["detail"] == (
        f"task {task_id!r} already completed with result succeeded, not failed"
    )
    # A TaskCompleted that either answer published would come before this API's next one.
    await api_caught_up(api.url, api, channel, events, target)
    assert len(events.named("TaskCompleted", task_id)) == 1


async def test_azure_path_with_basic_auth_and_any_case(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task, headers = await waiting(api, channel, events, target, projectId="proj", hubName="build")
    url = (
        f"{headers['PlanUrl']}/{headers['ProjectId']}/_apis/distributedtask/hubs/"
        f"{headers['HubName']}/plans/{headers['PlanId']}/events?api-version=2.0-preview.1"
    )
    body = {
        "name": "taskcompleted",
        "taskId": task["taskId"],
        "jobId": headers["JobId"],
        "result": "SucceededWithIssues",
    }
    status, answer, _ = await post(url, body, headers["AuthToken"], basic=True)
    assert (status, answer["result"]) == (200, "succeededWithIssues")
    assert (await events.completed(str(task["taskId"])))["result"] == "succeededWithIssues"


async def test_bad_callbacks_get_the_status_that_says_why(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task, headers = await waiting(api, channel, events, target)
    task_id, token = task["taskId"], headers["AuthToken"]
    signer = api.worker.signer
    url = f"{api.url}/plans/plan-1/events"
    good = {"name": "TaskCompleted", "taskId": task_id, "result": "succeeded"}
    other_task = signer.issue("another-task", "plan-1", time.time() + 60)
    other_plan = signer.issue(task_id, "plan-2", time.time() + 60)
    expired = signer.issue(task_id, "plan-1", time.time() - 1)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    cases: list[tuple[object, str | None, int, str]] = [
        (good, None, 401, "send the task's AuthToken"),
        (good, "not-a-token", 401, "the token is malformed"),
        (good, forged, 401, "the token's signature is not valid"),
        (good, expired, 401, "the token has expired"),
        (good, other_task, 403, "this token is for task 'another-task'"),
        (b"{not json", token, 400, "the body is not JSON"),
        ({**good, "name": "TaskExploded"}, token, 400, "'TaskExploded' is not a known event name"),
        ({**good, "result": "great"}, token, 400, "'great' is not a known result"),
        ({"name": "TaskCompleted", "result": "succeeded"}, token, 400, "taskId: Field required"),
        ({"name": "TaskCompleted", "taskId": task_id}, token, 400, "needs a result"),
        (b"x" * (64 * 1024 + 1), token, 413, "over the 65536-byte limit"),
    ]
    for body, credential, status, detail in cases:
        got, problem, content_type = await post(url, body, credential)
        assert (got, content_type) == (status, "application/problem+json"), (body, problem)
        assert detail in problem["detail"], problem
        assert problem["status"] == status
    # A valid token for another plan, on the other plan's path.
    got, problem, _ = await post(f"{api.url}/plans/plan-2/events", good, other_plan)
    assert (got, problem["detail"]) == (404, f"plan 'plan-2' has no task {task_id!r}")
    got, problem, _ = await post(f"{api.url}/plans/plan-2/events", good, token)
    assert (got, problem["detail"]) == (403, "this token is for plan 'plan-1', not plan 'plan-2'")
    # Nothing above changed the task.
    assert (await post(url, good, token))[0] == 200


async def test_callback_for_an_api_response_task_conflicts(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task = task_message(target)
    await publish(channel, api.settings, task)
    await events.completed(str(task["taskId"]))
    token = api.worker.signer.issue(str(task["taskId"]), "plan-1", time.time() + 60)
    body = {"name": "TaskCompleted", "taskId": task["taskId"], "result": "failed"}
    status, problem, _ = await post(f"{api.url}/plans/plan-1/events", body, token)
    assert status == 409
    assert "is not a callback task" in problem["detail"]


async def test_failed_invocation_fails_a_callback_task_at_once(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task = callback_task(target, query="&status=503")
    await publish(channel, api.settings, task)
    event = await events.completed(task["taskId"])
    assert (event["result"], event["reason"]) == ("failed", "HTTP 503")
    assert not events.named("TaskWaiting", task["taskId"])


@pytest.mark.parametrize("result", ["succeeded", "failed"])
async def test_a_callback_before_the_invocations_response_is_kept(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
    result: str,
) -> None:
    task = callback_task(target, query=f"&early={result}")
    await publish(channel, api.settings, task)
    event = await events.completed(task["taskId"])
    assert event["result"] == result
    async with asyncio.timeout(10):
        while api.worker.consumer.in_flight:
            await asyncio.sleep(0.05)
    row = await db.fetchrow(
        "SELECT state, result, completed_by FROM tasks WHERE task_id = $1", task["taskId"]
    )
    assert dict(row or {}) == {"state": "completed", "result": result, "completed_by": "callback"}
    assert len(events.named("TaskCompleted", task["taskId"])) == 1
    assert not events.named("TaskWaiting", task["taskId"])


async def test_cancel_completes_a_waiting_task_canceled(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task, headers = await waiting(
        api,
        channel,
        events,
        target,
        cancelRequest={"method": "POST", "url": f"{target.url}/stop?key=cancel-op"},
    )
    url = f"{api.url}/tasks/{task['taskId']}/cancel"
    status, body, _ = await post(url, {})
    assert (status, body["result"]) == (200, "canceled")
    assert (await events.completed(task["taskId"]))["result"] == "canceled"
    status, problem, _ = await post(url, {})
    assert (status, problem["detail"]) == (
        409,
        f"task {task['taskId']!r} already completed with result canceled",
    )
    status, problem, _ = await post(f"{api.url}/tasks/nope/cancel", {})
    assert status == 404
    completed = {"name": "TaskCompleted", "taskId": task["taskId"], "result": "succeeded"}
    status, problem, _ = await post(
        f"{api.url}/plans/plan-1/events", completed, headers["AuthToken"]
    )
    assert status == 409
    assert "was canceled at" in problem["detail"]
    async with asyncio.timeout(5):
        while not target.calls["cancel-op"]:
            await asyncio.sleep(0.05)


async def test_a_task_published_again_while_it_waits_replies_to_the_new_caller(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
) -> None:
    """`submit --wait` run again for a task that waits (the first one gave up): the task is not
    invoked again, and its result goes to the caller waiting now."""
    task, headers = await waiting(api, channel, events, target)
    task_id = task["taskId"]
    replies = await published_again(channel, api.settings, db, task)
    assert target.calls[task_id] == 1

    completed = {"name": "TaskCompleted", "taskId": task_id, "result": "succeeded"}
    assert (await post(f"{api.url}/plans/plan-1/events", completed, headers["AuthToken"]))[0] == 200
    message = await first_message(replies)
    event = orjson.loads(message.body)
    assert (message.correlation_id, event["name"], event["taskId"], event["result"]) == (
        "again",
        "TaskCompleted",
        task_id,
        "succeeded",
    )


async def test_log_lines_in_order_on_both_paths(
    api: Api, channel: AbstractChannel, events: Events, target: Target, settings: Settings
) -> None:
    task, headers = await waiting(api, channel, events, target, projectId="proj")
    token, task_id = headers["AuthToken"], task["taskId"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.post(
            f"{api.url}/plans/plan-1/tasks/{task_id}/logs", data="one\ntwo\n"
        ) as response:
            assert response.status == 200
        feed = (
            f"{api.url}/proj/_apis/distributedtask/hubs/build/plans/plan-1/timelines/"
            f"{headers['TimelineId']}/records/{headers['JobId']}/feed"
        )
        async with session.post(feed, json={"value": ["three", "four"], "count": 2}) as response:
            assert response.status == 200
        async with session.post(
            f"{api.url}/plans/plan-1/tasks/someone-else/logs", data="x"
        ) as response:
            assert response.status == 403
        async with session.get(f"{api.url}/tasks/{task_id}/logs") as response:
            logs = await response.json()
    assert [line["line"] for line in logs["lines"]] == ["one", "two", "three", "four"]
    assert logs["droppedLines"] == 0


async def test_concurrent_callbacks_across_two_api_processes_complete_once(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    """50 TaskCompleted posts for one task, half to this process's API and half to an `agentless
    api` process: one result, one TaskCompleted event, every post answered 200 or 409."""
    port = free_port()
    second = await processes.start(
        api.settings,
        "api",
        AGENTLESS_API_PORT=str(port),
        AGENTLESS_PUBLIC_URL=f"http://127.0.0.1:{port}",
    )
    try:
        await wait_until_ready(f"http://127.0.0.1:{port}/readyz", second)
        task, headers = await waiting(api, channel, events, target)
        results = ["succeeded", "failed"]
        posts = [
            post(
                f"{base}/plans/plan-1/events",
                {"name": "TaskCompleted", "taskId": task["taskId"], "result": results[i % 2]},
                headers["AuthToken"],
            )
            for i, base in enumerate([api.url, f"http://127.0.0.1:{port}"] * 25)
        ]
        answers = await asyncio.gather(*posts)
        event = await events.completed(task["taskId"])
        winner = event["result"]
        assert {(status, body.get("result", winner)) for status, body, _ in answers} <= {
            (200, winner),
            (409, winner),
        }
        assert all(
            status == 200
            for (status, _, _), i in zip(answers, range(50), strict=True)
            if results[i % 2] == winner
        )
        # A second TaskCompleted from either process would come before that process's next one.
        for base in (api.url, f"http://127.0.0.1:{port}"):
            await api_caught_up(base, api, channel, events, target)
        assert len(events.named("TaskCompleted", task["taskId"])) == 1
    finally:
        second.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.process.wait(), 20) == 0, second.logs()


async def test_log_lines_past_the_cap_drop_the_oldest_and_say_so(
    monkeypatch: pytest.MonkeyPatch,
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
) -> None:
    monkeypatch.setattr(callback_events, "LOG_LINES_CAP", 5)
    task, headers = await waiting(api, channel, events, target)
    url = f"{api.url}/plans/plan-1/tasks/{task['taskId']}/logs"
    auth = {"Authorization": f"Bearer {headers['AuthToken']}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        for batch in ("1\n2\n3\n", "4\n5\n6\n7\n", "8"):
            async with session.post(url, data=batch) as response:
                assert response.status == 200
        async with session.post(url, data=b"\xff\xfe") as response:
            assert response.status == 400
        async with session.post(url, json={"value": [1, 2]}) as response:
            assert response.status == 400
        async with session.get(f"{api.url}/tasks/{task['taskId']}/logs") as response:
            logs = await response.json()
    assert [line["line"] for line in logs["lines"]] == ["4", "5", "6", "7", "8"]
    assert logs["droppedLines"] == 3


async def test_a_variable_made_secret_loses_its_clear_value(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task, headers = await waiting(api, channel, events, target, projectId="proj")
    records = (
        f"{api.url}/proj/_apis/distributedtask/hubs/build/plans/plan-1/timelines/"
        f"{headers['TimelineId']}/records"
    )
    auth = {"Authorization": f"Bearer {headers['AuthToken']}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        for variables in (
            {"pw": {"value": "in-clear"}, "keep": {"value": "1"}},
            {"pw": {"value": "now-secret", "isSecret": True}},
        ):
            async with session.patch(records, json={"value": [{"variables": variables}]}) as r:
                assert r.status == 200
    completed = {"name": "TaskCompleted", "taskId": task["taskId"], "result": "succeeded"}
    assert (await post(f"{api.url}/plans/plan-1/events", completed, headers["AuthToken"]))[0] == 200
    assert (await events.completed(task["taskId"]))["outputs"] == {"keep": "1"}
