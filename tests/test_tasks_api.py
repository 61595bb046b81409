"""The task and ops API over HTTP: submit, follow, list, and see the queue."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel

from tests.barriers import worker_caught_up
from tests.conftest import Api, Events, Target, free_port, task_message
from tests.task_api import call


async def test_submit_then_follow_a_task(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task = task_message(target, taskId="http-1", query="&status=201")
    status, body, headers = await call("POST", f"{api.url}/tasks", task)
    assert (status, body) == (
        202,
        {"taskId": "http-1", "state": "queued", "location": "/tasks/http-1"},
    )
    assert headers["Location"] == "/tasks/http-1"
    await events.completed("http-1")
    status, detail, _ = await call("GET", f"{api.url}/tasks/http-1")
    assert status == 200
    assert (detail["state"], detail["result"], detail["attempts"]) == ("completed", "succeeded", 1)
    assert detail["response"]["statusCode"] == 201
    assert detail["request"]["url"] == task["request"]["url"]  # type: ignore[index]
    assert detail["queuedAt"] <= detail["startedAt"] <= detail["completedAt"]

    # The same task again is the same task; another body under its id is a conflict.
    assert (await call("POST", f"{api.url}/tasks", task))[0] == 202
    status, problem, _ = await call("POST", f"{api.url}/tasks", {**task, "name": "other"})
    assert status == 409
    assert "already belongs to a different task" in problem["detail"]
    # Had either submission queued the task again, the worker has handled that message by now.
    await worker_caught_up(api, channel, events, target)
    assert len(events.named("TaskCompleted", "http-1")) == 1
    assert target.calls["http-1"] == 1


async def test_submit_lists_every_invalid_field(api: Api) -> None:
    bad = {
        "taskId": "no spaces allowed",
        "request": {"url": "ftp://x", "method": "BREW"},
        "successCriteria": "body.[",
        "timeoutSeconds": -1,
    }
    status, problem, headers = await call("POST", f"{api.url}/tasks", bad)
    assert status == 400
    assert headers["Content-Type"] == "application/problem+json"
    fields = {error["field"] for error in problem["errors"]}
    assert fields == {
        "taskId",
        "planId",
        "request.method",
        "request.url",
        "successCriteria",
        "timeoutSeconds",
    }
    for body, detail in [
        (b"{", "the task is not valid"),
        (b"[]", "the task is not valid"),
        (
            b'{"taskId": "t", "planId": "p", "request": {"url": "http://x", "body": "\\u0000"}}',
            "NUL character",
        ),
    ]:
        status, problem, _ = await call("POST", f"{api.url}/tasks", body)
        assert (status, detail in problem["detail"]) == (400, True), problem
    status, problem, _ = await call("POST", f"{api.url}/tasks", b"x" * (1024 * 1024 + 1))
    assert status == 413


async def test_unknown_task_is_404_problem(api: Api) -> None:
    status, problem, headers = await call("GET", f"{api.url}/tasks/nope")
    assert (status, headers["Content-Type"]) == (404, "application/problem+json")
    assert problem["detail"] == "there is no task 'nope'"


async def seed(db: asyncpg.Connection, count: int) -> None:
    """`count` completed and waiting tasks straight into the table, as a busy system has them."""
    await db.execute(
        """INSERT INTO tasks (task_id, plan_id, job_id, hub_name, mode, state, result, attempts,
                              digest, message, queued_at, started_at, completed_at)
           SELECT 'seed-' || lpad(i::text, 6, '0'), 'Plan-' || (i % 100), 'job',
                  CASE WHEN i % 2 = 0 THEN 'Release' ELSE 'build' END,
                  'apiResponse',
                  CASE WHEN i % 10 = 0 THEN 'waiting' ELSE 'completed' END,
                  CASE WHEN i % 10 = 0 THEN NULL WHEN i % 3 = 0 THEN 'failed' ELSE 'succeeded' END,
                  1, '\\x00', '{"request": {}}',
                  now() - make_interval(secs => $1 - i), now() - make_interval(secs => $1 - i),
                  CASE WHEN i % 10 = 0 THEN NULL ELSE now() END
           FROM generate_series(1, $1) AS i""",
        count,
    )
    await db.execute("ANALYZE tasks")


async def test_listing_filters_pages_and_orders(api: Api, db: asyncpg.Connection) -> None:
    await seed(db, 1000)
    url = f"{api.url}/tasks"
    status, page, _ = await call("GET", f"{url}?planId=plan-7&hubName=BUILD&rowsPerPage=3")
    assert status == 200
    assert page["total"] == 10  # plan-7: i = 7, 107, …, 907; all odd, so all 'build'
    assert [t["taskId"] for t in page["tasks"]] == ["seed-000907", "seed-000807", "seed-000707"]
    _, second, _ = await call("GET", f"{url}?planId=plan-7&rowsPerPage=3&pageNumber=2")
    assert [t["taskId"] for t in second["tasks"]] == ["seed-000607", "seed-000507", "seed-000407"]
    _, waiting, _ = await call("GET", f"{url}?state=WAITING&orderField=taskId&sortType=asc")
    assert waiting["total"] == 100
    assert waiting["tasks"][0]["taskId"] == "seed-000010"
    _, failed, _ = await call("GET", f"{url}?result=Failed&rowsPerPage=1")
    assert failed["tasks"][0]["result"] == "failed"

    status, ranged, headers = await call("GET", url, headers={"Range": "items=0-9"})
    assert (status, headers["Content-Range"], len(ranged["tasks"])) == (206, "items 0-9/1000", 10)
    status, _, headers = await call("GET", url, headers={"Range": "items=995-2000"})
    assert (status, headers["Content-Range"]) == (206, "items 995-999/1000")
    status, problem, headers = await call("GET", url, headers={"Range": "items=1000-1010"})
    assert (status, headers["Content-Range"]) == (416, "items */1000")
    assert problem["detail"] == "the range starts past the last of 1000 tasks"


@pytest.mark.parametrize(
    ("query", "headers", "detail"),
    [
        ("?orderField=secret", {}, "orderField 'secret' is not one of"),
        ("?sortType=sideways", {}, "sortType must be asc or desc"),
        ("?state=sleeping", {}, "state 'sleeping' is not one of"),
        ("?result=meh", {}, "result 'meh' is not one of"),
        ("?rowsPerPage=0", {}, "rowsPerPage must be a whole number from 1 to 1000"),
        ("?pageNumber=x", {}, "pageNumber must be a whole number"),
        ("?planid=x", {}, "unknown query parameters: planid"),
        ("", {"Range": "items=9-1"}, "Range must be 'items=FIRST-LAST'"),
        ("", {"Range": "bytes=0-1"}, "Range must be 'items=FIRST-LAST'"),
    ],
)
async def test_bad_listing_requests_are_400(
    api: Api, query: str, headers: dict[str, str], detail: str
) -> None:
    status, problem, _ = await call("GET", f"{api.url}/tasks{query}", headers=headers)
    assert status == 400
    assert detail in problem["detail"]


async def test_totals_past_ten_thousand_are_estimates(api: Api, db: asyncpg.Connection) -> None:
    """Past 10,000 matching tasks the total is the database's estimate, and says so: JSON's
    totalExact, and Content-Range's unknown complete length (RFC 9110)."""
    await seed(db, 10_050)
    url = f"{api.url}/tasks"
    _, page, _ = await call("GET", url)
    assert page["totalExact"] is False
    assert 9_000 < page["total"] < 11_000
    status, _, headers = await call("GET", url, headers={"Range": "items=0-9"})
    assert (status, headers["Content-Range"]) == (206, "items 0-9/*")
    # Past the end, the answer counts them: a 416 names the complete length.
    status, _, headers = await call("GET", url, headers={"Range": "items=20000-20009"})
    assert (status, headers["Content-Range"]) == (416, "items */10050")
    _, waiting, _ = await call("GET", f"{url}?state=waiting")
    assert (waiting["total"], waiting["totalExact"]) == (1_005, True)


async def test_queue_workers_and_metrics(api: Api, events: Events, target: Target) -> None:
    task = task_message(target, query="&status=500")
    await call("POST", f"{api.url}/tasks", task)
    await events.completed(str(task["taskId"]))
    status, queue, _ = await call("GET", f"{api.url}/queue")
    assert status == 200
    assert queue["consumers"] == 1
    assert queue["completed"] == 1
    assert queue["completedLastMinute"] == 1
    assert set(queue) >= {"ready", "unacknowledged", "deadLetters", "running", "waiting"}
    status, workers, _ = await call("GET", f"{api.url}/workers")
    assert status == 200
    assert [w["workerId"] for w in workers] == [api.worker.worker_id]
    async with aiohttp.ClientSession() as session, session.get(f"{api.url}/metrics") as response:
        assert response.status == 200
        metrics = await response.text()
    for line in (
        "agentless_tasks_received_total 1.0",
        "agentless_tasks_completed_total"
        '{completed_by="worker",mode="apiResponse",result="failed"} 1.0',
        "agentless_invocation_duration_seconds_count 1.0",
        'agentless_task_duration_seconds_count{mode="apiResponse"} 1.0',
        "agentless_tasks_in_flight 0.0",
        'agentless_tasks{state="waiting"} 0.0',
    ):
        assert line in metrics, line


async def test_queue_without_a_broker_is_a_503_not_a_wait(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = api.worker.broker
    # The broker goes away and cannot be reached again until the test lets it.
    monkeypatch.setattr(broker, "_urls", (f"amqp://guest:guest@127.0.0.1:{free_port()}/",))
    broker.connection_lost()
    status, problem, headers = await call("GET", f"{api.url}/queue")
    assert status == 503
    assert "is not reachable right now" in problem["detail"]
    assert headers["Retry-After"] == "1"
    monkeypatch.undo()
    async with asyncio.timeout(20):
        while not broker.is_ready:
            await asyncio.sleep(0.1)
    assert (await call("GET", f"{api.url}/queue"))[0] == 200
