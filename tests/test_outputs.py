"""Named outputs (SPEC §4 `outputs`) in every mode: JMESPath over the final response, returned
in TaskCompleted and GET /tasks/{id}; in callback mode merged with the service's variables."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio
from aio_pika.abc import AbstractChannel

from tests.callbacks import post, waiting
from tests.conftest import Api, Dead, Events, Target, publish, task_message
from tests.poll_target import JobService, detail, poll_task
from tests.task_api import call


@pytest_asyncio.fixture
async def jobs() -> AsyncIterator[JobService]:
    async with JobService().serving() as service:
        yield service


async def test_outputs_of_an_api_response_task(api: Api, events: Events, target: Target) -> None:
    task = task_message(
        target,
        taskId="out-api",
        query="&status=201&say=tagged",
        outputs={
            "status": "body.status",
            "code": "statusCode",
            "type": 'headers."content-type"',
            "method": "body.method",
            "absent": "body.nothing.here",
            "both": "[statusCode, body.status]",
        },
    )
    assert (await call("POST", f"{api.url}/tasks", task))[0] == 202
    event = await events.completed("out-api")
    expected = {
        "status": "tagged",
        "code": 201,
        "type": "application/json; charset=utf-8",
        "method": "POST",
        "absent": None,
        "both": [201, "tagged"],
    }
    assert event["result"] == "succeeded"
    assert event["outputs"] == expected
    assert (await detail(api, "out-api"))["outputs"] == expected


async def test_outputs_of_a_failed_task_are_evaluated_on_its_response(
    api: Api, events: Events, target: Target
) -> None:
    task = task_message(
        target, taskId="out-fail", query="&status=500", outputs={"code": "statusCode"}
    )
    assert (await call("POST", f"{api.url}/tasks", task))[0] == 202
    event = await events.completed("out-fail")
    assert (event["result"], event["outputs"]) == ("failed", {"code": 500})


async def test_callback_outputs_merge_with_the_services_variables_which_win(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    outputs = {"method": "body.method", "who": "body.status", "code": "statusCode"}
    task, headers = await waiting(
        api, channel, events, target, projectId="proj", query="&say=worker", outputs=outputs
    )
    task_id = task["taskId"]
    # Evaluated on the invocation's response as soon as the task waits.
    waited = await detail(api, task_id)
    assert waited["outputs"] == {"method": "POST", "who": "worker", "code": 200}
    records = (
        f"{api.url}/proj/_apis/distributedtask/hubs/build/plans/plan-1/timelines/"
        f"{headers['TimelineId']}/records"
    )
    variables = {"who": {"value": "service"}, "extra": {"value": "x"}}
    auth = {"Authorization": f"Bearer {headers['AuthToken']}"}
    async with (
        aiohttp.ClientSession(headers=auth) as session,
        session.patch(records, json={"value": [{"variables": variables}]}) as answer,
    ):
        assert answer.status == 200
    completed = {"name": "TaskCompleted", "taskId": task_id, "result": "succeeded"}
    assert (await post(f"{api.url}/plans/plan-1/events", completed, headers["AuthToken"]))[0] == 200
    event = await events.completed(task_id)
    expected = {"method": "POST", "who": "service", "code": 200, "extra": "x"}
    assert event["outputs"] == expected
    assert (await detail(api, task_id))["outputs"] == expected


async def test_poll_outputs_come_from_the_final_poll(
    api: Api, channel: AbstractChannel, events: Events, jobs: JobService
) -> None:
    outputs = {"jobId": "body.id", "status": "statusCode", "size": "body.result.size"}
    await publish(
        channel, api.settings, poll_task(jobs, "out", script="running,done", outputs=outputs)
    )
    event = await events.completed("poll-out")
    expected = {"jobId": "out", "status": 200, "size": 42}
    assert (event["result"], event["outputs"]) == ("succeeded", expected)
    assert (await detail(api, "poll-out"))["outputs"] == expected

    poll = {"intervalSeconds": 1, "failureCriteria": "body.state == 'failed'"}
    outputs = {"error": "body.error", "poll": "body.poll"}
    task = poll_task(jobs, "out-broke", script="failed", poll=poll, outputs=outputs)
    await publish(channel, api.settings, task)
    event = await events.completed("poll-out-broke")
    assert (event["result"], event["outputs"]) == (
        "failed",
        {"error": "the job broke", "poll": 1},
    )


async def test_a_bad_output_is_refused_naming_it(
    api: Api, channel: AbstractChannel, target: Target, dead: Dead
) -> None:
    task = task_message(target, taskId="out-bad", outputs={"good": "body.a", "broken": "body.["})
    status, problem, _ = await call("POST", f"{api.url}/tasks", task)
    assert status == 400, problem
    fields = {error["field"] for error in problem["errors"]}
    assert fields == {"outputs.broken"}, problem
    for name in ("has space", "x" * 129, ""):
        bad_name = task_message(target, outputs={name: "body.a"})
        status, problem, _ = await call("POST", f"{api.url}/tasks", bad_name)
        assert status == 400, (name, problem)
        assert any(str(e["field"]).startswith("outputs") for e in problem["errors"]), problem
    # The same task over AMQP: dead-lettered, with the reason naming the output.
    await publish(channel, api.settings, task, message_id="out-bad")
    reason, message = await dead.next()
    assert message.message_id == "out-bad"
    assert "outputs.broken" in reason, reason
    assert (await call("GET", f"{api.url}/tasks/out-bad"))[0] == 404
