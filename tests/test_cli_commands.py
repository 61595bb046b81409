"""`agentless task`, `cancel`, `logs`, `check` and `openapi` as an operator runs them."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel
from aiohttp import web

from callback_api.openapi import document
from callback_api.routes import ROUTES
from tests import processes
from tests.callbacks import post, waiting
from tests.conftest import Api, Events, Target, free_port
from worker.contract.settings import Settings


@pytest.mark.parametrize(
    "command", [["events"], ["task"], ["cancel"], ["logs"], ["check"], ["openapi"]]
)
async def test_help(settings: Settings, command: list[str]) -> None:
    code, out, _ = await processes.run(settings, *command, "--help")
    assert code == 0
    assert f"usage: agentless {command[0]}" in out


async def test_help_lists_the_exit_codes(settings: Settings) -> None:
    code, out, _ = await processes.run(settings, "--help")
    assert code == 0
    codes = out[out.index("exit codes:") :].splitlines()[1:]
    assert [line.split()[0] for line in codes] == ["0", "1", "2", "3", "4"]
    assert "unavailable: try again later" in codes[4]


# --- task, cancel, logs -------------------------------------------------------------------------


async def test_task_logs_and_cancel_of_a_waiting_task(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task, headers = await waiting(api, channel, events, target, taskId="cmd-1", name="deploy")
    logs_url = f"{api.url}/plans/plan-1/tasks/cmd-1/logs"
    status, _, _ = await post(logs_url, b"one\ntwo\n", headers["AuthToken"])
    assert status == 200

    code, out, err = await processes.run(api.settings, "logs", "cmd-1")
    assert (code, out, err) == (0, "one\ntwo\n", "")

    code, out, err = await processes.run(api.settings, "task", "cmd-1")
    assert code == 0, err
    shown = dict(line.split(maxsplit=1) for line in out.splitlines())
    assert {k: shown[k] for k in ("task", "name", "mode", "state", "attempts")} == {
        "task": "cmd-1",
        "name": "deploy",
        "mode": "callback",
        "state": "waiting",
        "attempts": "1",
    }
    assert shown["request"] == f"POST {task['request']['url']}"

    code, out, err = await processes.run(api.settings, "cancel", "cmd-1")
    assert (code, out, err) == (0, "task cmd-1 canceled\n", "")
    completed = await events.completed("cmd-1")
    assert (completed["result"], completed["reason"]) == ("canceled", "canceled by request")

    code, out, err = await processes.run(api.settings, "cancel", "cmd-1")
    assert (code, out) == (1, "")
    assert (
        err == "agentless: task 'cmd-1' already completed with result canceled; nothing to cancel\n"
    )

    # The detail is GET /tasks/{taskId}'s.
    code, out, err = await processes.run(api.settings, "task", "cmd-1", "--json")
    assert code == 0, err
    async with aiohttp.ClientSession() as session, session.get(f"{api.url}/tasks/cmd-1") as answer:
        assert json.loads(out) == await answer.json()


async def test_logs_follow_until_the_task_completes(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    _, headers = await waiting(api, channel, events, target, taskId="cmd-2")
    token = headers["AuthToken"]
    logs_url = f"{api.url}/plans/plan-1/tasks/cmd-2/logs"
    assert (await post(logs_url, b"first\n", token))[0] == 200
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "logs",
        "cmd-2",
        "--follow",
        cwd=processes.ROOT,
        env=processes.environment(api.settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert follower.stdout is not None
    assert await asyncio.wait_for(follower.stdout.readline(), 15) == b"first\n"
    assert (await post(logs_url, b"second\nthird\n", token))[0] == 200
    assert await asyncio.wait_for(follower.stdout.readline(), 15) == b"second\n"
    assert await asyncio.wait_for(follower.stdout.readline(), 15) == b"third\n"
    assert (await post(logs_url, b"last\n", token))[0] == 200
    completed = {"name": "TaskCompleted", "taskId": "cmd-2", "result": "succeeded"}
    assert (await post(f"{api.url}/plans/plan-1/events", completed, token))[0] == 200
    out, err = await asyncio.wait_for(follower.communicate(), 15)
    assert (follower.returncode, out, err) == (0, b"last\n", b"")


@pytest.mark.parametrize("command", ["task", "cancel", "logs"])
async def test_a_task_that_does_not_exist(api: Api, command: str) -> None:
    code, out, err = await processes.run(api.settings, command, "nope")
    assert (code, out) == (1, "")
    assert err.startswith("agentless: there is no task 'nope'")

    code, _, err = await processes.run(api.settings, command, "no pe")
    assert code == 2
    assert "'no pe' is not a task id" in err


# --- check --------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def unready() -> AsyncIterator[int]:
    """A port where /readyz answers 503, as a process whose broker is out of reach does."""

    async def readyz(_: web.Request) -> web.Response:
        return web.json_response(
            {"status": "not ready", "reason": "the database is out of reach"}, status=503
        )

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


async def test_check_a_ready_worker_whose_log_level_is_set_from_the_environment(
    settings: Settings, channel: AbstractChannel, db: asyncpg.Connection
) -> None:
    port, closed = free_port(), free_port()
    child = await processes.start(
        settings, "worker", AGENTLESS_WORKER_PORT=str(port), AGENTLESS_LOG_LEVEL="warning"
    )
    try:
        await processes.wait_until_ready(f"http://127.0.0.1:{port}/readyz", child)
        code, out, err = await processes.run(
            settings,
            "check",
            AGENTLESS_WORKER_PORT=str(port),
            AGENTLESS_WORKER_HOST="0.0.0.0",
            AGENTLESS_API_PORT=str(closed),
        )
        assert (code, err) == (0, ""), out
        assert out.splitlines() == [
            f"worker http://127.0.0.1:{port}/readyz: ready",
            f"api http://127.0.0.1:{closed}/readyz: not listening",
        ]
    finally:
        child.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(child.process.wait(), 30) == 0
    # AGENTLESS_LOG_LEVEL=warning: the worker's info lines ("worker started"…) are left out.
    assert [json.loads(line)["level"] for line in child.logs().splitlines()] == []


async def test_check_is_not_ready_when_one_answers_503(settings: Settings, unready: int) -> None:
    code, out, err = await processes.run(
        settings, "check", AGENTLESS_WORKER_PORT=str(free_port()), AGENTLESS_API_PORT=str(unready)
    )
    assert (code, err) == (1, "")
    assert out.splitlines()[1] == (
        f"api http://127.0.0.1:{unready}/readyz: not ready (HTTP 503: the database is out of reach)"
    )


async def test_check_exits_4_when_nothing_listens_and_2_when_both_ports_are_off(
    settings: Settings,
) -> None:
    worker_port, api_port = free_port(), free_port()
    code, _, err = await processes.run(
        settings, "check", AGENTLESS_WORKER_PORT=str(worker_port), AGENTLESS_API_PORT=str(api_port)
    )
    assert code == 4
    assert err == (
        f"agentless: nothing answers at http://127.0.0.1:{worker_port}/readyz "
        f"(AGENTLESS_WORKER_PORT) or http://127.0.0.1:{api_port}/readyz (AGENTLESS_API_PORT): "
        "is agentless running here?\n"
    )
    code, _, err = await processes.run(
        settings, "check", AGENTLESS_WORKER_PORT="0", AGENTLESS_API_PORT="0"
    )
    assert code == 2
    assert "both 0" in err


# --- openapi ------------------------------------------------------------------------------------


async def test_openapi_prints_the_document_without_broker_or_database(settings: Settings) -> None:
    code, out, err = await processes.run(
        settings,
        "openapi",
        AGENTLESS_AMQP_URL="amqp://guest:guest@127.0.0.1:1/",
        AGENTLESS_DATABASE_URL="postgresql://postgres@127.0.0.1:1/postgres",
    )
    assert (code, err) == (0, "")
    assert json.loads(out) == orjson.loads(orjson.dumps(document(settings, ROUTES)))
