"""The `agentless` command as a user runs it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import asyncpg
import pytest
from aio_pika.abc import AbstractChannel

from tests import processes
from tests.conftest import Api, Events, Target, free_port
from worker.contract.settings import Settings
from worker.service import Worker


@pytest.mark.parametrize("command", [[], ["worker"], ["run"], ["submit"]])
async def test_help(settings: Settings, command: list[str]) -> None:
    code, out, _ = await processes.run(settings, *command, "--help")
    assert code == 0
    assert "usage: agentless" in out


async def test_submit_wait_prints_the_result(
    worker: Worker, settings: Settings, target: Target
) -> None:
    code, out, err = await processes.run(
        settings,
        "submit",
        "--url",
        f"{target.url}/hook?status=201",
        "--json",
        '{"commit": "abc"}',
        "--criteria",
        "body.status == 'created'",
        "--task-id",
        "cli-1",
        "--var",
        "release=7",
        "--wait",
    )
    assert code == 0, err
    event = json.loads(out)
    assert (event["name"], event["taskId"], event["result"]) == (
        "TaskCompleted",
        "cli-1",
        "succeeded",
    )
    assert event["variables"] == {"release": "7"}


async def test_submit_wait_exits_1_when_the_task_fails(
    worker: Worker, settings: Settings, target: Target
) -> None:
    code, out, _ = await processes.run(
        settings, "submit", "--url", f"{target.url}/hook?status=503", "--wait"
    )
    assert code == 1
    assert json.loads(out)["reason"] == "HTTP 503"


async def test_submit_again_under_the_same_task_id_gets_the_same_result(
    worker: Worker, settings: Settings, target: Target
) -> None:
    """Without --plan-id the task sent again is the same message (its planId is its taskId): the
    second `submit --wait` gets the first one's result, and the endpoint is not called again."""
    task = ("submit", "--url", f"{target.url}/hook?key=cli-again", "--task-id", "cli-again")
    first = await processes.run(settings, *task, "--wait")
    second = await processes.run(settings, *task, "--wait")
    assert (first[0], second[0]) == (0, 0), second[2]
    assert json.loads(first[1]) == json.loads(second[1])
    assert json.loads(first[1])["planId"] == "cli-again"
    assert target.calls["cli-again"] == 1


async def test_submit_wait_says_at_once_that_the_task_was_dead_lettered(
    worker: Worker, settings: Settings, target: Target
) -> None:
    """A different task sent under a taskId already taken: the worker dead-letters it, and
    `submit --wait` says why instead of waiting out its timeout."""
    task = ("submit", "--url", f"{target.url}/hook", "--task-id", "cli-twice", "--wait")
    assert (await processes.run(settings, *task, "--plan-id", "first"))[0] == 0
    code, out, err = await processes.run(
        settings, *task, "--plan-id", "second", "--wait-timeout", "120"
    )
    assert (code, out, err.strip()) == (
        2,
        "",
        "agentless: task cli-twice was dead-lettered: "
        "taskId 'cli-twice' already belongs to a different task",
    )


async def test_submit_with_retries(worker: Worker, settings: Settings, target: Target) -> None:
    code, out, err = await processes.run(
        settings,
        "submit",
        "--url",
        f"{target.url}/hook?key=cli-retry&fail=1",
        "--task-id",
        "cli-retry",
        "--retry",
        "2",
        "--retry-delay",
        "0",
        "--wait",
    )
    assert code == 0, err
    completed = json.loads(out)
    assert (completed["result"], completed["attempts"]) == ("succeeded", 2)


async def test_submit_from_a_file(
    worker: Worker, settings: Settings, target: Target, tmp_path: Path, events: Events
) -> None:
    task = tmp_path / "task.json"
    task.write_text(
        json.dumps({"taskId": "file-1", "planId": "p", "request": {"url": f"{target.url}/x"}})
    )
    code, out, err = await processes.run(settings, "submit", str(task))
    assert code == 0, err
    assert json.loads(out) == {"taskId": "file-1", "planId": "p"}
    assert (await events.completed("file-1"))["result"] == "succeeded"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit"], "request: give exactly one of request.url or request.connection"),
        (
            ["submit", "--url", "ftp://x"],
            "request.url: must be an absolute http:// or https:// URL",
        ),
        (["submit", "--url", "http://x", "--criteria", "a =="], "not a valid JMESPath expression"),
        (["submit", "--url", "http://x", "-H", "nocolon"], "is not of the form 'Name: value'"),
        (["submit", "/nonexistent.json"], "cannot read /nonexistent.json"),
        (["submit", "--url", "http://x", "--retry", "0"], "retry.attempts: Input should be"),
    ],
)
async def test_submit_rejects_bad_input_before_queueing(
    settings: Settings, args: list[str], message: str
) -> None:
    code, _, err = await processes.run(settings, *args)
    assert code == 2
    assert message in err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"AGENTLESS_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"},
            "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/",
        ),
        (
            {"AGENTLESS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres"},
            "cannot reach PostgreSQL at postgresql://postgres@127.0.0.1:1/postgres",
        ),
        (
            {"AGENTLESS_CONCURRENCY": "lots"},
            "AGENTLESS_CONCURRENCY: Input should be a valid integer",
        ),
        ({"AGENTLESS_AMQP_URL": "http://x"}, "AGENTLESS_AMQP_URL: Value error, must be an amqp://"),
        ({"AGENTLESS_EGRESS_DENY": "10.0.0.0/33"}, "AGENTLESS_EGRESS_DENY"),
        ({"AGENTLESS_CONNECTIONS": "/nonexistent.json"}, "AGENTLESS_CONNECTIONS: cannot read"),
    ],
    ids=["broker", "database", "concurrency", "amqp-scheme", "cidr", "connections"],
)
async def test_worker_refuses_to_start_with_an_actionable_message(
    settings: Settings, db: asyncpg.Connection, env: dict[str, str], message: str
) -> None:
    code, _, err = await processes.run(settings, "worker", timeout=60, **env)
    # An address that does not answer is worth trying again later (4); the rest is to fix (2).
    assert code == (4 if message.startswith("cannot reach") else 2)
    assert message in err
    assert "Traceback" not in err


async def test_config_file_supplies_settings_the_environment_lacks(
    settings: Settings, tmp_path: Path
) -> None:
    config = tmp_path / "agentless.env"
    config.write_text("AGENTLESS_CALLBACK_TIMEOUT=nope\nAGENTLESS_CONCURRENCY=nope\n")
    code, _, err = await processes.run(settings, "--config", str(config), "worker")
    assert code == 2
    # The file's bad value is read; the environment's good one wins over the file's other one.
    assert "AGENTLESS_CALLBACK_TIMEOUT" in err
    assert "AGENTLESS_CONCURRENCY" not in err
    code, _, err = await processes.run(settings, "--config", str(tmp_path / "missing"), "worker")
    assert code == 2
    assert "is not a readable file" in err


async def test_logs_are_json_lines_with_task_and_plan_ids(
    settings: Settings, channel: AbstractChannel, db: asyncpg.Connection, target: Target
) -> None:
    child = await processes.start(settings, "worker")
    code, _, err = await processes.run(
        settings,
        "submit",
        "--url",
        f"{target.url}/x",
        "--task-id",
        "log-1",
        "--plan-id",
        "plan-log",
        "--wait",
    )
    assert code == 0, err
    child.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(child.process.wait(), 30) == 0
    lines = [json.loads(line) for line in child.logs().splitlines()]
    completed = [line for line in lines if line["event"] == "task completed"]
    assert completed
    assert (completed[0]["taskId"], completed[0]["planId"]) == ("log-1", "plan-log")
    assert completed[0]["result"] == "succeeded"


async def test_readme_callback_walkthrough(api: Api, settings: Settings) -> None:
    """The README's walk-through, as a newcomer pastes it: the example service prints a curl
    command, and running it completes the task that `submit --callback --wait` waits for."""
    port = free_port()
    service = await asyncio.create_subprocess_exec(
        sys.executable,
        str(processes.ROOT / "deploy" / "examples" / "callback_service.py"),
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        submit = asyncio.create_task(
            processes.run(
                api.settings,
                "submit",
                "--url",
                f"http://127.0.0.1:{port}/jobs",
                "--callback",
                "--wait",
                "--wait-timeout",
                "30",
            )
        )
        assert service.stdout is not None
        async with asyncio.timeout(30):
            while "curl" not in (line := (await service.stdout.readline()).decode()):
                assert line or service.returncode is None
            command = line.strip().rstrip("\\")
            while (line := (await service.stdout.readline()).decode()).strip():
                command += " " + line.strip().rstrip("\\")
        curl = await asyncio.create_subprocess_shell(command, stdout=asyncio.subprocess.PIPE)
        out, _ = await curl.communicate()
        assert json.loads(out)["result"] == "succeeded"
        code, printed, err = await submit
        assert code == 0, err
        assert json.loads(printed)["reason"] == "TaskCompleted from the external service: succeeded"
    finally:
        service.kill()
        await service.wait()
