"""`criteriaSyntax: "azure"`: success criteria written as Azure Pipelines conditions over the
response body, judged by a real worker, refused at submission and dead-lettered when invalid."""

from __future__ import annotations

import pytest
from aio_pika.abc import AbstractChannel

from tests.conftest import Api, Dead, Events, Target, publish, task_message
from tests.task_api import call
from worker.contract.settings import Settings
from worker.service import Worker


@pytest.mark.parametrize(
    ("criteria", "result", "reason"),
    [
        ("eq(root['status'], 'CREATED')", "succeeded", "HTTP 200; successCriteria true"),
        (
            "and(eq(root.status, 'created'), startsWith(root['path'], '/HOOK'))",
            "succeeded",
            "HTTP 200; successCriteria true",
        ),
        ("in(root['method'], 'PUT', 'POST')", "succeeded", "HTTP 200; successCriteria true"),
        ("ne(root['status'], 'created')", "failed", "HTTP 200; successCriteria false"),
        ("eq(root['missing']['deeper'], 'x')", "failed", "HTTP 200; successCriteria false"),
    ],
    ids=["eq-any-case", "and-startsWith", "in", "ne", "missing"],
)
async def test_azure_criteria_judge_the_response_body(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
    criteria: str,
    result: str,
    reason: str,
) -> None:
    task = task_message(target, criteriaSyntax="azure", successCriteria=criteria)
    await publish(channel, settings, task)
    completed = await events.completed(str(task["taskId"]))
    assert (completed["result"], completed["reason"]) == (result, reason)


async def test_an_invalid_azure_condition_is_dead_lettered_with_its_position(
    worker: Worker, channel: AbstractChannel, settings: Settings, dead: Dead, target: Target
) -> None:
    task = task_message(target, criteriaSyntax="Azure", successCriteria="equals(root, 1)")
    await publish(channel, settings, task)
    reason, _ = await dead.next()
    assert reason.startswith(
        "message does not fit the task schema: successCriteria: not a valid Azure condition: "
    )
    assert "'equals'" in reason
    assert "column 1" in reason


async def test_submission_names_the_invalid_criteria(api: Api) -> None:
    base = {"taskId": "az-1", "planId": "p", "request": {"url": "http://127.0.0.1:9/x"}}
    status, problem, _ = await call(
        "POST",
        f"{api.url}/tasks",
        {**base, "criteriaSyntax": "azure", "successCriteria": "and(eq(root['a'], 1)"},
    )
    assert status == 400
    [error] = problem["errors"]
    assert error["field"] == "successCriteria"
    assert error["message"].startswith("not a valid Azure condition: ")
    assert "column" in error["message"]

    # An unknown syntax is refused on its own: the criterion is not judged by a syntax it lacks.
    status, problem, _ = await call(
        "POST",
        f"{api.url}/tasks",
        {**base, "criteriaSyntax": "cel", "successCriteria": "eq(root['a'], 1)"},
    )
    assert status == 400
    assert [e["field"] for e in problem["errors"]] == ["criteriaSyntax"]
