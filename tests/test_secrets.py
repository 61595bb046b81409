"""Secrets never leak: credentials and tokens appear in no log line, stored row, event, metric,
API answer or error body."""

from __future__ import annotations

import asyncio
import base64
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel
from aiohttp import web
from aiohttp.test_utils import TestServer

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


RESPONSE_SECRET = "resp-secret-9e4a"
ECHOED_TOKEN = "ci-token-3b7d"
# What each secret response header is kept as.
KEPT_HEADERS = {
    "set-cookie": "***",
    "authorization": "***",
    "x-api-key": "***",
    "authentication-info": "***",
    "www-authenticate": 'Negotiate ***, Bearer realm="api", error="invalid_token"',
    "proxy-authenticate": 'Digest realm="proxy", nonce="***", qop="auth"',
}


async def _secretive(request: web.Request) -> web.Response:
    """Answers with credentials in its headers, and echoes the connection's own header; a job
    started with ?start=1 is found done at its Location."""
    request.app[SEEN].append(dict(request.headers))
    response = web.json_response(
        {"status": "accepted" if "start" in request.query else "done"},
        status=202 if "start" in request.query else 200,
    )
    if "start" in request.query:
        response.headers["Location"] = "/secretive?done=1"
    headers = response.headers
    headers.add("Set-Cookie", f"session={RESPONSE_SECRET}; Path=/; HttpOnly")
    headers.add("Set-Cookie", f"refresh={RESPONSE_SECRET}")
    headers["Authorization"] = f"Bearer {RESPONSE_SECRET}"
    headers["X-Api-Key"] = RESPONSE_SECRET
    headers["Authentication-Info"] = f'rspauth="{RESPONSE_SECRET}"'
    headers["WWW-Authenticate"] = (
        f'Negotiate {RESPONSE_SECRET}==, Bearer realm="api", error="invalid_token"'
    )
    headers["Proxy-Authenticate"] = f'Digest realm="proxy", nonce="{RESPONSE_SECRET}", qop="auth"'
    if "X-Ci-Token" in request.headers:
        headers["X-Ci-Token"] = request.headers["X-Ci-Token"]
    return response


SEEN = web.AppKey("seen", list[dict[str, str]])


async def test_no_secret_a_response_carries_is_kept_published_or_answered(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    tmp_path: Path,
) -> None:
    app = web.Application()
    app[SEEN] = []
    app.router.add_route("*", "/secretive", _secretive)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    endpoint = f"http://127.0.0.1:{server.port}/secretive"
    connections = tmp_path / "connections.json"
    connections.write_text(
        orjson.dumps(
            {
                "ci": {
                    "url": endpoint,
                    "auth": {"type": "header", "name": "X-Ci-Token", "value": ECHOED_TOKEN},
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
        AGENTLESS_CONNECTIONS=str(connections),
    )
    # Criteria and outputs see what is kept: whether a secret header came, never its value.
    judged: dict[str, Any] = {
        "successCriteria": "headers.\"set-cookie\" == '***'",
        "outputs": {"cookie": 'headers."set-cookie"', "challenge": 'headers."www-authenticate"'},
    }
    outputs = {"cookie": "***", "challenge": KEPT_HEADERS["www-authenticate"]}
    tasks: dict[str, dict[str, Any]] = {
        "apiResponse": {"request": {"url": endpoint}, **judged},
        "connection": {"request": {"connection": "ci"}, **judged},
        "callback": {"request": {"url": endpoint}, "waitForCompletion": "callback", **judged},
        "poll": {
            "request": {"url": f"{endpoint}?start=1"},
            "waitForCompletion": "poll",
            "poll": {"intervalSeconds": 1},
            **judged,
        },
        "poll handed a secret": {
            "request": {"url": f"{endpoint}?start=1"},
            "waitForCompletion": "poll",
            "poll": {
                "request": {
                    "url": f"{endpoint}?done=1",
                    "headers": {"Cookie": "$(response.headers.Set-Cookie)"},
                }
            },
        },
    }
    ids = {mode: uuid.uuid4().hex for mode in tasks}
    answers: list[str] = []
    try:
        await wait_until_ready(f"{url}/readyz", child)
        for mode, fields in tasks.items():
            await publish(channel, settings, {"taskId": ids[mode], "planId": "plan-1", **fields})
        async with asyncio.timeout(15), events.changed:
            await events.changed.wait_for(
                lambda: bool(events.named("TaskWaiting", ids["callback"]))
            )
        token = next(seen["AuthToken"] for seen in app[SEEN] if "AuthToken" in seen)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{url}/plans/plan-1/events",
                json={"name": "TaskCompleted", "taskId": ids["callback"], "result": "succeeded"},
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                assert response.status == 200, await response.text()
            completed = {mode: await events.completed(task_id) for mode, task_id in ids.items()}
            for path in [*(f"/tasks/{task_id}" for task_id in ids.values()), "/tasks", "/"]:
                async with session.get(url + path) as response:
                    assert response.status == 200, path
                    answers.append(await response.text())
    finally:
        child.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(child.process.wait(), 30) == 0, child.logs()
        await server.close()

    def headers(mode: str) -> dict[str, str]:
        kept: dict[str, Any] = completed[mode]["response"]  # type: ignore[assignment]
        return dict(kept["headers"])

    assert {mode: (e["result"], e["outputs"]) for mode, e in completed.items()} == {
        "apiResponse": ("succeeded", outputs),
        "connection": ("succeeded", outputs),
        "callback": ("succeeded", outputs),
        "poll": ("succeeded", outputs),
        "poll handed a secret": ("failed", {}),
    }
    assert completed["poll handed a secret"]["reason"] == (
        "poll request: $(response.headers.Set-Cookie): the start response's Set-Cookie header is "
        "secret, and is not passed on; give the poll request its own credentials, or a service "
        "connection"
    )
    for mode in ("apiResponse", "connection", "poll", "poll handed a secret"):
        assert {name: headers(mode)[name] for name in KEPT_HEADERS} == KEPT_HEADERS, mode
    assert headers("connection")["x-ci-token"] == "***"
    places = {
        "logs": child.logs(),
        "database": await everything_stored(db),
        "events": "\n".join(orjson.dumps(e).decode() for e in events.received),
        "answers": "\n".join(answers),
    }
    leaks = [
        f"{secret} in {place}"
        for place, text in places.items()
        for secret in (RESPONSE_SECRET, ECHOED_TOKEN)
        if secret in text
    ]
    assert leaks == []
    # The search would have found them: the endpoint was called in each mode, and the
    # connection's token went out to be echoed.
    assert len(app[SEEN]) >= len(tasks) + 1
    assert any(seen.get("X-Ci-Token") == ECHOED_TOKEN for seen in app[SEEN])
