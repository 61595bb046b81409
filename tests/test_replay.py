"""Replayed callbacks: a captured TaskCompleted sent again after its task completed is answered 200
only when it asks for what was done, 409 otherwise; a captured token sent against another plan or
task is 403 on every route; once its task has completed, a token changes nothing more (409 on
every route that writes), though the task's record may still be read."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractChannel

from tests.barriers import api_caught_up, events_arrived
from tests.callbacks import waiting
from tests.conftest import Api, Events, Target

Json = dict[str, Any]
# The Azure-compatible routes' prefix, for the task's own plan.
AZURE = "/proj/_apis/distributedtask/hubs/build/plans/{plan}"


async def call(
    method: str,
    url: str,
    token: str,
    *,
    json: object = None,
    text: str | None = None,
    basic: bool = False,
) -> tuple[int, Json]:
    """One request with the callback token; its status and JSON answer."""
    # Basic with no user name and the token as password, as Azure's helper library sends it.
    credentials = base64.b64encode(f":{token}".encode()).decode()
    headers = {"Authorization": f"Basic {credentials}" if basic else f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.request(
            method,
            url,
            data=None if json is not None else text,
            json=json,
        ) as response,
    ):
        body = await response.read()
        return response.status, orjson.loads(body) if body else {}


def problem(status: int, detail: str, *, result: str | None = None, azure: bool = False) -> Json:
    """An RFC 9457 answer as the API gives it: a 409 names the completed task's result, and
    Azure's routes add what Azure's clients read."""
    titles = {403: "Forbidden", 409: "Conflict"}
    answer: Json = {"type": "about:blank", "title": titles[status], "status": status}
    answer["detail"] = detail
    if result is not None:
        answer |= {"state": "completed", "result": result}
    if azure:
        types = {403: "AccessCheckException", 409: "InvalidOperationException"}
        answer |= {"message": detail, "typeKey": types[status]}
    return answer


def completed(task_id: str, result: str = "succeeded", **fields: str) -> Json:
    return {"name": "TaskCompleted", "taskId": task_id, "result": result, **fields}


async def test_a_repeated_task_completed_is_200_only_when_it_asks_for_what_was_done(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task, headers = await waiting(api, channel, events, target, projectId="proj")
    task_id, token = task["taskId"], headers["AuthToken"]
    plain = f"{api.url}/plans/plan-1/events"
    azure = f"{api.url}{AZURE.format(plan='plan-1')}/events?api-version=2.0-preview.1"
    first = completed(task_id, jobId=headers["JobId"])
    done = {"taskId": task_id, "state": "completed", "result": "succeeded"}
    assert await call("POST", plain, token, json=first) == (200, done)

    replays: list[tuple[str, str, Json, bool, tuple[int, Json]]] = [
        ("the same request", plain, first, False, (200, done)),
        (
            "on Azure's path, Basic auth, other case",
            azure,
            {**first, "name": "taskcompleted", "result": "SUCCEEDED"},
            True,
            (200, done),
        ),
        # The token, not the jobId, names the task: a jobId is not compared.
        ("without its jobId", plain, completed(task_id), False, (200, done)),
        (
            "another result",
            plain,
            completed(task_id, "failed"),
            False,
            (
                409,
                problem(
                    409,
                    f"task {task_id!r} already completed with result succeeded, not failed",
                    result="succeeded",
                ),
            ),
        ),
        (
            "another result, on Azure's path",
            azure,
            completed(task_id, "succeededWithIssues"),
            True,
            (
                409,
                problem(
                    409,
                    f"task {task_id!r} already completed with result succeeded, not "
                    "succeededWithIssues",
                    azure=True,
                    result="succeeded",
                ),
            ),
        ),
    ]
    answers = {
        name: await call("POST", url, token, json=body, basic=basic)
        for name, url, body, basic, _ in replays
    }
    assert answers == {name: expected for name, _, _, _, expected in replays}
    # A TaskCompleted that any answer published would come before this API's next one.
    await api_caught_up(api.url, api, channel, events, target)
    assert [e["result"] for e in events.named("TaskCompleted", task_id)] == ["succeeded"]


@pytest.mark.parametrize("ending", ["deadline", "cancel"])
async def test_the_result_a_task_has_is_not_repeatable_when_no_task_completed_gave_it(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
    ending: str,
) -> None:
    task, headers = await waiting(api, channel, events, target, timeoutSeconds=1)
    task_id = task["taskId"]
    if ending == "cancel":
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{api.url}/tasks/{task_id}/cancel") as response,
        ):
            assert response.status == 200
    event = await events.completed(task_id)
    when = await db.fetchval("SELECT completed_at FROM tasks WHERE task_id = $1", task_id)
    # The very result the task has, posted as a service would: not a repeat of anything.
    answer = await call(
        "POST",
        f"{api.url}/plans/plan-1/events",
        headers["AuthToken"],
        json=completed(task_id, str(event["result"])),
    )
    detail = {
        "deadline": f"task {task_id!r} timed out waiting for callback at {when.isoformat()}",
        "cancel": f"task {task_id!r} was canceled at {when.isoformat()}",
    }[ending]
    result = {"deadline": "failed", "cancel": "canceled"}[ending]
    assert answer == (409, problem(409, detail, result=result))


async def test_a_token_replayed_against_another_plan_or_task_is_403_on_every_route(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
) -> None:
    mine, headers = await waiting(api, channel, events, target, projectId="proj")
    token = headers["AuthToken"]
    neighbour, _ = await waiting(api, channel, events, target, projectId="proj")
    elsewhere, _ = await waiting(api, channel, events, target, projectId="proj", planId="plan-2")
    mine_id, neighbour_id, elsewhere_id = mine["taskId"], neighbour["taskId"], elsewhere["taskId"]
    other_plan = "this token is for plan 'plan-1', not plan 'plan-2'"
    other_task = f"this token is for task {mine_id!r}, not {neighbour_id!r}"
    theirs = f"{api.url}{AZURE.format(plan='plan-2')}"
    records = f"{theirs}/timelines/plan-2/records"
    variables = {"value": [{"id": elsewhere_id, "variables": {"v": {"value": "x"}}}]}
    routes: list[tuple[str, str, Json | None, str | None, str, bool]] = [
        (
            "POST",
            f"{api.url}/plans/plan-2/events",
            completed(elsewhere_id),
            None,
            other_plan,
            False,
        ),
        ("POST", f"{api.url}/plans/plan-2/events", completed(mine_id), None, other_plan, False),
        (
            "POST",
            f"{api.url}/plans/plan-1/events",
            completed(neighbour_id),
            None,
            other_task,
            False,
        ),
        ("POST", f"{theirs}/events", completed(elsewhere_id), None, other_plan, True),
        ("POST", f"{api.url}/plans/plan-2/tasks/{mine_id}/logs", None, "x", other_plan, False),
        ("POST", f"{api.url}/plans/plan-1/tasks/{neighbour_id}/logs", None, "x", other_task, False),
        (
            "POST",
            f"{theirs}/timelines/plan-2/records/plan-2/feed",
            {"value": ["x"]},
            None,
            other_plan,
            True,
        ),
        ("POST", f"{theirs}/logs", {"path": "x"}, None, other_plan, True),
        ("POST", f"{theirs}/logs/1", None, "x", other_plan, True),
        ("GET", records, None, None, other_plan, True),
        ("PATCH", records, variables, None, other_plan, True),
    ]
    for method, url, body, text, detail, azure in routes:
        answer = await call(method, url, token, json=body, text=text)
        assert answer == (403, problem(403, detail, azure=azure)), (method, url)

    # None of it touched any task.
    rows = await db.fetch(
        "SELECT task_id, state, outputs::text AS outputs, logs_created,"
        " (SELECT count(*) FROM task_logs l WHERE l.task_id = t.task_id) AS lines"
        " FROM tasks t ORDER BY task_id"
    )
    untouched = ("waiting", "{}", 0, 0)
    assert {row["task_id"]: tuple(row)[1:] for row in rows} == dict.fromkeys(
        (mine_id, neighbour_id, elsewhere_id), untouched
    )
    await events_arrived(channel, api.settings, events)
    tasks = (mine_id, neighbour_id, elsewhere_id)
    assert sorted(str(e["eventId"]) for e in events.received if e["taskId"] in tasks) == sorted(
        f"{task_id}:{event}" for task_id in tasks for event in ("started", "waiting")
    )


async def test_a_completed_tasks_token_changes_nothing_more(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
) -> None:
    task, headers = await waiting(api, channel, events, target, projectId="proj")
    task_id, token = task["taskId"], headers["AuthToken"]
    logs = f"{api.url}/plans/plan-1/tasks/{task_id}/logs"
    azure = f"{api.url}{AZURE.format(plan='plan-1')}"
    feed = f"{azure}/timelines/plan-1/records/plan-1/feed"
    records = f"{azure}/timelines/plan-1/records"
    events_url = f"{api.url}/plans/plan-1/events"
    # While it waits, every route writes.
    assert (await call("POST", logs, token, text="before"))[0] == 200
    assert (await call("POST", f"{azure}/logs", token, json={"path": "a"}))[0] == 200
    variables = {"value": [{"id": task_id, "variables": {"v": {"value": "1"}}}]}
    assert (await call("PATCH", records, token, json=variables))[0] == 200
    assert (await call("POST", events_url, token, json=completed(task_id)))[0] == 200
    event = await events.completed(task_id)
    when = await db.fetchval("SELECT completed_at FROM tasks WHERE task_id = $1", task_id)

    log_final = f"task {task_id!r} already completed; its log is final"
    record_final = f"task {task_id!r} already completed; its record and output variables are final"
    started = (
        f"task {task_id!r} already completed at {when.isoformat()}: "
        "TaskCompleted from the external service: succeeded"
    )
    progress = {"value": [{"id": task_id, "state": "completed", "percentComplete": 100}]}
    after: list[tuple[str, str, Json | None, str | None, str, bool]] = [
        ("POST", logs, None, "after", log_final, False),
        ("POST", logs, None, "", log_final, False),
        ("POST", logs, {"value": ["after"]}, None, log_final, False),
        ("POST", feed, {"value": ["after"]}, None, log_final, True),
        ("POST", f"{azure}/logs", {"path": "b"}, None, log_final, True),
        ("POST", f"{azure}/logs/1", None, "after", log_final, True),
        (
            "PATCH",
            records,
            {"value": [{"variables": {"v": {"value": "2"}}}]},
            None,
            record_final,
            True,
        ),
        ("PATCH", records, progress, None, record_final, True),
        ("POST", events_url, {"name": "TaskStarted", "taskId": task_id}, None, started, False),
        (
            "POST",
            f"{azure}/events",
            {"name": "TaskAssigned", "taskId": task_id},
            None,
            started,
            True,
        ),
    ]
    for method, url, body, text, detail, azure_route in after:
        answer = await call(method, url, token, json=body, text=text)
        expected = problem(409, detail, result="succeeded", azure=azure_route)
        assert answer == (409, expected), (method, url, body, text)

    # Reading still answers.
    status, read = await call("GET", records, token)
    assert (status, [(r["state"], r["result"], r["variables"]) for r in read["value"]]) == (
        200,
        [("completed", "succeeded", {"v": {"value": "1", "isSecret": False}})],
    )
    row = await db.fetchrow(
        "SELECT outputs::text AS outputs, logs_created,"
        " array(SELECT line FROM task_logs WHERE task_id = $1 ORDER BY seq) AS lines"
        " FROM tasks WHERE task_id = $1",
        task_id,
    )
    assert row is not None
    assert (orjson.loads(row["outputs"]), row["logs_created"], row["lines"]) == (
        {"v": "1"},
        1,
        ["before"],
    )
    assert event["outputs"] == {"v": "1"}
    await events_arrived(channel, api.settings, events)
    assert [e["eventId"] for e in events.received if e["taskId"] == task_id] == [
        f"{task_id}:started",
        f"{task_id}:waiting",
        f"{task_id}:completed",
    ]


async def test_log_lines_racing_the_completion_are_kept_or_refused_never_lost(
    api: Api, channel: AbstractChannel, events: Events, target: Target, db: asyncpg.Connection
) -> None:
    task, headers = await waiting(api, channel, events, target)
    task_id, token = task["taskId"], headers["AuthToken"]
    logs = f"{api.url}/plans/plan-1/tasks/{task_id}/logs"
    lines = [f"line {n}" for n in range(60)]
    answers = await asyncio.gather(
        *(call("POST", logs, token, text=line) for line in lines[:30]),
        call("POST", f"{api.url}/plans/plan-1/events", token, json=completed(task_id)),
        *(call("POST", logs, token, text=line) for line in lines[30:]),
    )
    log_answers = answers[:30] + answers[31:]
    assert answers[30][0] == 200
    assert {status for status, _ in log_answers} <= {200, 409}
    kept = await db.fetchval(
        "SELECT array(SELECT line FROM task_logs WHERE task_id = $1 ORDER BY seq)", task_id
    )
    # Every line answered 200 is kept; none answered 409 is.
    accepted = [line for line, (status, _) in zip(lines, log_answers, strict=True) if status == 200]
    assert sorted(kept) == sorted(accepted)
    statuses = [status for status, _ in log_answers]
    print(f"racing log posts: {statuses.count(200)} kept, {statuses.count(409)} refused")
    assert (await call("POST", logs, token, text="late"))[0] == 409
