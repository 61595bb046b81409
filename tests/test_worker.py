"""A worker in this process against the real broker and database: the task's whole life."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractChannel

from tests.conftest import Dead, Events, Target, first_message, publish, task_message
from worker.contract.errors import ConfigError
from worker.contract.models import MAX_TASK_BYTES
from worker.contract.requests import UNSTORABLE
from worker.contract.settings import Settings, load_connections
from worker.service import Worker, running_worker


async def row(db: asyncpg.Connection, task_id: str) -> dict[str, Any]:
    record = await db.fetchrow("SELECT * FROM tasks WHERE task_id = $1", task_id)
    assert record is not None
    return dict(record)


async def test_task_succeeds_end_to_end(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
) -> None:
    task = task_message(
        target,
        taskId="e2e-1",
        planId="p-7",
        hubName="release",
        successCriteria="body.status == 'created'",
        variables={"anything": ["returned", 1]},
        request={
            "method": "POST",
            "url": f"{target.url}/hook?key=e2e-1&status=201",
            "headers": {"Authorization": "Bearer s3cret", "X-Trace": "$(system.PlanId)"},
            "body": {"commit": "abc123"},
        },
    )
    await publish(channel, settings, task)
    completed = await events.completed("e2e-1")

    assert completed["result"] == "succeeded"
    assert completed["reason"] == "HTTP 201; successCriteria true"
    assert completed["eventId"] == "e2e-1:completed"
    assert completed["hubName"] == "release"
    assert completed["jobId"] == "p-7"
    assert completed["attempts"] == 1
    assert completed["variables"] == {"anything": ["returned", 1]}
    response = completed["response"]
    assert isinstance(response, dict)
    assert response["statusCode"] == 201
    assert response["body"]["headers"]["X-Trace"] == "p-7"
    assert orjson.loads(response["body"]["body"]) == {"commit": "abc123"}
    started = events.named("TaskStarted", "e2e-1")
    assert [e["eventId"] for e in started] == ["e2e-1:started"]
    assert "task.started.release" in events.routing_keys
    assert "task.completed.release" in events.routing_keys

    stored = await row(db, "e2e-1")
    assert (stored["state"], stored["result"], stored["attempts"]) == ("completed", "succeeded", 1)
    message = orjson.loads(stored["message"])
    assert message["request"]["headers"]["Authorization"] == "***"
    assert "s3cret" not in stored["message"]
    assert orjson.loads(stored["response"])["statusCode"] == 201
    assert stored["queued_at"] <= stored["started_at"] <= stored["completed_at"]


@pytest.mark.parametrize(
    ("query", "criteria", "reason"),
    [
        ("&status=500", None, "HTTP 500"),
        ("&status=404", "body.status == 'created'", "HTTP 404"),
        ("&say=nope", "body.status == 'created'", "HTTP 200; successCriteria false"),
        ("", "statusCode < `200`", "HTTP 200; successCriteria false"),
        ("", "body.missing", "HTTP 200; successCriteria false"),
    ],
)
async def test_task_fails_on_status_or_criteria(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
    query: str,
    criteria: str | None,
    reason: str,
) -> None:
    task = task_message(target, query=query, successCriteria=criteria)
    await publish(channel, settings, task)
    completed = await events.completed(str(task["taskId"]))
    assert (completed["result"], completed["reason"]) == ("failed", reason)


async def test_completion_also_goes_to_reply_to(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    target: Target,
) -> None:
    replies = await channel.declare_queue(exclusive=True, auto_delete=True)
    task = task_message(target)
    await publish(channel, settings, task, reply_to=replies.name, correlation_id="corr-9")
    message = await first_message(replies)
    assert message.correlation_id == "corr-9"
    assert orjson.loads(message.body)["taskId"] == task["taskId"]
    assert orjson.loads(message.body)["name"] == "TaskCompleted"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "message is not JSON: expected ident at line 1 column 2"),
        (b"[1, 2]", "message is not a JSON object"),
        (
            b'{"planId": "p", "request": {"url": "http://x"}}',
            "message does not fit the task schema: taskId: Field required",
        ),
        (
            b'{"taskId": "a b", "planId": "p", "request": {"url": "ftp://x"}}',
            "message does not fit the task schema: taskId: String should match pattern "
            "'^[A-Za-z0-9._:-]{1,128}$'; request.url: must be an absolute http:// or https:// URL",
        ),
        (
            b'{"taskId": "t", "planId": "p", "request": {"url": "http://x"}, '
            b'"succesCriteria": "a"}',
            "message does not fit the task schema: succesCriteria: Extra inputs are not permitted",
        ),
        (
            b'{"taskId": "t", "planId": "p", "request": {"url": "http://x"}, '
            b'"successCriteria": "body.["}',
            "message does not fit the task schema: successCriteria: not a valid JMESPath "
            "expression: Invalid jmespath expression: Incomplete expression at position 6",
        ),
        (
            b'{"taskId": "t", "planId": "p", "request": {"url": "http://x", "body": "\\u0000"}}',
            "message contains a NUL character (\\u0000), which cannot be stored",
        ),
        (
            b'{"taskId": "t", "planId": "p", "request": {"url": "http://x"}, "x": "'
            + b"a" * MAX_TASK_BYTES
            + b'"}',
            f"message is {MAX_TASK_BYTES + 71} bytes, over the {MAX_TASK_BYTES}-byte limit",
        ),
        (
            b'{"taskId": "t", "planId": "p", "request": {"url": "http://x", "body": [1]}, '
            b'"variables": {"n": 18446744073709551616}}',
            f"message does not fit the task schema: variables: {UNSTORABLE}",
        ),
        (
            b'{"taskId": "t", "planId": "p", "request": {"url": "http://x", '
            b'"body": {"n": -9223372036854775809}}}',
            f"message does not fit the task schema: request.body: {UNSTORABLE}",
        ),
    ],
    ids=[
        "not-json",
        "not-object",
        "missing",
        "bad-fields",
        "typo",
        "criteria",
        "nul",
        "large",
        "huge-variable",
        "huge-body",
    ],
)
async def test_invalid_messages_are_dead_lettered_with_reason(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    dead: Dead,
    target: Target,
    body: bytes,
    reason: str,
) -> None:
    await publish(channel, settings, body, message_id="bad-1")
    got, message = await dead.next()
    assert got == reason
    assert message.body == body
    assert message.message_id == "bad-1"
    # The worker goes on with the next task.
    task = task_message(target)
    await publish(channel, settings, task)
    assert (await events.completed(str(task["taskId"])))["result"] == "succeeded"


async def test_redelivered_completed_task_is_not_invoked_again(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
) -> None:
    task = task_message(target)
    task_id = str(task["taskId"])
    await publish(channel, settings, task)
    first = await events.completed(task_id)
    await publish(channel, settings, task)
    async with asyncio.timeout(10), events.changed:
        await events.changed.wait_for(lambda: len(events.named("TaskCompleted", task_id)) == 2)
    second = events.named("TaskCompleted", task_id)[1]
    assert second == first
    assert target.calls[task_id] == 1


async def test_same_task_id_with_another_body_is_dead_lettered(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    dead: Dead,
    target: Target,
) -> None:
    task = task_message(target)
    await publish(channel, settings, task)
    await events.completed(str(task["taskId"]))
    await publish(channel, settings, {**task, "name": "something else"})
    reason, _ = await dead.next()
    assert reason == f"taskId {task['taskId']!r} already belongs to a different task"


async def test_task_of_a_dead_worker_is_run_again(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
) -> None:
    """A row left `running` by a worker that holds no lock (it died) is taken over at once."""
    task = task_message(target)
    task_id = str(task["taskId"])
    body = orjson.dumps(task)
    await db.execute(
        """INSERT INTO tasks (task_id, plan_id, job_id, hub_name, mode, state, attempts, digest,
                              message, worker_id, lease_until, queued_at, started_at)
           VALUES ($1, 'plan-1', 'plan-1', 'build', 'apiResponse', 'running', 1, sha256($2),
                   $3::jsonb, 999999, now() + interval '1 hour', now(), now())""",
        task_id,
        body,
        body.decode(),
    )
    await publish(channel, settings, body)
    completed = await events.completed(task_id)
    assert (completed["result"], completed["attempts"]) == ("succeeded", 2)
    assert target.calls[task_id] == 1


@pytest.mark.parametrize(
    ("before", "recorded"),
    [
        ("queued", "result"),
        ("running", "result"),
        ("queued", "retry"),
        ("running", "wait"),
        ("queued", "poll"),
    ],
)
async def test_what_a_failover_lost_the_claim_of_is_recorded_under_a_new_claim(
    before: str,
    recorded: str,
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
) -> None:
    """While the endpoint answers, the task's row is put back as it was before the claim (queued,
    submitted over HTTP; or running, an attempt of a worker that died), as a replica promoted
    before the claim's commit reached it has it: the result, the retry it calls for, the wait for
    a callback or the polling is recorded under a new claim, and the endpoint is not called
    again for it."""
    if recorded == "retry":
        task = task_message(
            target, query="&delay=1&fail=1", retry={"attempts": 2, "delaySeconds": 0}
        )
    elif recorded == "wait":
        task = task_message(target, query="&delay=1", waitForCompletion="callback")
    elif recorded == "poll":
        # Polled at the start's own URL, whose answers never meet the criteria.
        task = task_message(
            target,
            query="&delay=1",
            waitForCompletion="poll",
            successCriteria="body.status == 'done'",
            poll={"intervalSeconds": 30},
        )
    else:
        task = task_message(target, query="&delay=1")
    task_id = str(task["taskId"])
    await publish(channel, settings, task)
    async with asyncio.timeout(10):
        while (await db.fetchval("SELECT state FROM tasks WHERE task_id = $1", task_id)) is None:
            await asyncio.sleep(0.05)
    await db.execute(
        """UPDATE tasks SET state = $2, attempts = 0, started_at = NULL, lease_until = NULL,
                            worker_id = CASE WHEN $2 = 'running' THEN 999999 END
           WHERE task_id = $1""",
        task_id,
        before,
    )
    if recorded in ("wait", "poll"):
        async with asyncio.timeout(10), events.changed:
            await events.changed.wait_for(lambda: bool(events.named("TaskWaiting", task_id)))
        assert events.named("TaskWaiting", task_id)[0]["attempts"] == 1
        assert (await row(db, task_id))["state"] == ("waiting" if recorded == "wait" else "polling")
        assert target.calls[task_id] == 1
        return
    completed = await events.completed(task_id)
    calls = 2 if recorded == "retry" else 1
    assert (completed["result"], completed["attempts"]) == ("succeeded", calls)
    assert (await row(db, task_id))["state"] == "completed"
    assert target.calls[task_id] == calls


async def test_service_connection_from_a_toml_file(
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    connections = tmp_path / "connections.toml"
    connections.write_text(
        f'[ci]\nurl = "{target.url}/api"\n[ci.auth]\ntype = "bearer"\ntoken = "tok-123"\n'
    )
    configured = settings.model_copy(update={"connections": connections})
    async with running_worker(configured) as running:
        await asyncio.wait_for(running.consumer.consuming.wait(), 10)
        task = task_message(target, request={"connection": "ci", "urlSuffix": "tags?key=c1"})
        await publish(channel, settings, task)
        completed = await events.completed(str(task["taskId"]))
    response = completed["response"]
    assert isinstance(response, dict)
    assert response["body"]["path"] == "/api/tags"
    assert response["body"]["headers"]["Authorization"] == "Bearer tok-123"
    assert "tok-123" not in (await row(db, str(task["taskId"])))["message"]


@pytest.mark.parametrize(
    ("content", "suffix", "error"),
    [
        ("{", ".json", "is not valid"),
        ('{"ci": {"url": "ftp://x"}}', ".json", "ci.url: must be an absolute http(s) URL"),
        ('{"ci": {"url": "http://x", "auth": {"type": "magic"}}}', ".json", "ci.auth"),
        ("[ci]\nurl = 3\n", ".toml", "ci.url"),
    ],
)
def test_connections_file_errors_say_what_to_fix(
    tmp_path: Path, content: str, suffix: str, error: str
) -> None:
    path = tmp_path / f"connections{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_connections(path)
    assert error in str(caught.value)


def test_the_example_connections_file_is_valid() -> None:
    example = Path(__file__).parent.parent / "deploy" / "connections.toml.example"
    assert set(load_connections(example)) == {"ci", "tickets"}
