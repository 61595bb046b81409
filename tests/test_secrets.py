"""Secrets never leak: credentials and tokens appear in no log line, stored row, event, metric,
API answer or error body."""

from __future__ import annotations

import asyncio
import base64
import signal
from pathlib import Path

import aiohttp
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel

from tests import processes
from tests.conftest import Events, Target, free_port, publish, task_message
from tests.processes import wait_until_ready
from worker.contract.settings import Settings

HEADER_SECRET = "hdr-secret-2f9c"
CONNECTION_PASSWORD = "conn-secret-71ab"
API_TOKEN = "api-token-5d03"
FORGED = "forged-secret-e610"


async def everything_stored(db: asyncpg.Connection) -> str:
    """Every row of every table of the test's schema, as text."""
    tables = await db.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    )
    dumps: list[str] = []
    for table in tables:
        rows = await db.fetch(f'SELECT row_to_json(t)::text AS r FROM "{table[0]}" t')
        dumps.extend(row["r"] for row in rows)
    return "\n".join(dumps)


async def test_no_secret_is_kept_logged_published_or_answered(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
    tmp_path: Path,
) -> None:
    connections = tmp_path / "connections.json"
    connections.write_text(
        orjson.dumps(
            {
                "ci": {
                    "url": f"{target.url}/ci",
                    "auth": {"type": "basic", "username": "bot", "password": CONNECTION_PASSWORD},
                }
            }
        ).decode()
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    child = await processes.start(
        settings,
        "--log-level",
        "debug",
        "run",
        AGENTLESS_API_PORT=str(port),
        AGENTLESS_PUBLIC_URL=url,
        AGENTLESS_API_TOKENS=API_TOKEN,
        AGENTLESS_CONNECTIONS=str(connections),
    )
    answers: list[str] = []
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    try:
        await wait_until_ready(f"{url}/readyz", child)
        header_task = task_message(
            target,
            query="&quiet=1",
            request={
                "url": f"{target.url}/hook?quiet=1&key=h",
                "headers": {"Authorization": f"Bearer {HEADER_SECRET}", "X-Api-Key": HEADER_SECRET},
                "body": {"token": "$(system.AccessToken)"},
            },
        )
        connection_task = task_message(
            target, request={"connection": "ci", "urlSuffix": "tags?quiet=1&key=c"}
        )
        callback_task = task_message(
            target,
            waitForCompletion="callback",
            request={"url": f"{target.url}/hook?quiet=1&key=cb"},
            cancelRequest={
                "url": f"{target.url}/stop?quiet=1",
                "headers": {"Authorization": f"Bearer {HEADER_SECRET}"},
            },
        )
        # A poll task's credentials outlive its message: they are kept only sealed.
        poll_task = task_message(
            target,
            waitForCompletion="poll",
            request={
                "url": f"{target.url}/jobs?quiet=1&key=ps",
                "headers": {"Authorization": f"Bearer {HEADER_SECRET}"},
            },
            poll={
                "intervalSeconds": 1,
                "request": {
                    "method": "GET",
                    "url": f"{target.url}/jobs/1?quiet=1&key=pp",
                    "headers": {"Authorization": f"Bearer {HEADER_SECRET}"},
                },
            },
        )
        for task in (header_task, connection_task, poll_task):
            await publish(channel, settings, task)
            await events.completed(str(task["taskId"]))
        await publish(channel, settings, callback_task)
        async with asyncio.timeout(10), events.changed:
            await events.changed.wait_for(
                lambda: bool(events.named("TaskWaiting", str(callback_task["taskId"])))
            )
        token = target.headers["cb"][-1]["AuthToken"]
        assert target.headers["c"][-1]["Authorization"].startswith("Basic ")

        async with aiohttp.ClientSession() as session:
            events_url = f"{url}/plans/plan-1/events"
            completed = {"name": "TaskCompleted", "taskId": callback_task["taskId"]}
            for headers, body in [
                ({"Authorization": f"Bearer {FORGED}"}, {**completed, "result": "succeeded"}),
                ({"Authorization": f"Bearer {token}"}, {**completed, "result": "nope"}),
                ({"Authorization": f"Bearer {token}"}, {**completed, "result": "succeeded"}),
                ({"Authorization": f"Bearer {token}"}, {**completed, "result": "failed"}),
            ]:
                async with session.post(events_url, json=body, headers=headers) as response:
                    answers.append(await response.text())
            for path in (
                f"/tasks/{header_task['taskId']}",
                f"/tasks/{callback_task['taskId']}",
                "/tasks",
                "/queue",
                "/workers",
                "/metrics",
                "/",
            ):
                async with session.get(url + path, headers=auth) as response:
                    assert response.status == 200, path
                    answers.append(await response.text())
            async with session.get(
                f"{url}/tasks", headers={"Authorization": f"Bearer {FORGED}"}
            ) as r:
                answers.append(await r.text())
        await events.completed(str(callback_task["taskId"]))
    finally:
        child.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(child.process.wait(), 30) == 0, child.logs()

    basic = base64.b64encode(f"bot:{CONNECTION_PASSWORD}".encode()).decode()
    places = {
        "logs": child.logs(),
        "database": await everything_stored(db),
        "events": "\n".join(orjson.dumps(e).decode() for e in events.received),
        "answers": "\n".join(answers),
    }
    secrets = {
        "header": HEADER_SECRET,
        "connection password": CONNECTION_PASSWORD,
        "basic credentials": basic,
        "callback token": token,
        "API token": API_TOKEN,
        "forged token": FORGED,
    }
    leaks = [
        f"{secret} in {place}"
        for place, text in places.items()
        for secret, value in secrets.items()
        if value in text
    ]
    assert leaks == []
    # The search would have found them: the endpoint did receive each one.
    assert target.headers["h"][-1]["X-Api-Key"] == HEADER_SECRET
    assert target.headers["pp"][-1]["Authorization"] == f"Bearer {HEADER_SECRET}"
    assert "task completed" in places["logs"]  # the logs were written, and were searched
