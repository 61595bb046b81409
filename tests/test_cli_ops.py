"""`agentless status` and `agentless tasks` as an operator runs them."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import asyncpg
import pytest
from aio_pika.abc import AbstractChannel

from tests import processes
from tests.conftest import Events, Target, publish, task_message
from worker.contract.settings import Settings
from worker.service import Worker, running_worker


@pytest.mark.parametrize(
    "command", [["status"], ["tasks"], ["dead"], ["dead", "list"], ["dead", "requeue"]]
)
async def test_help(settings: Settings, command: list[str]) -> None:
    code, out, _ = await processes.run(settings, *command, "--help")
    assert code == 0
    assert f"usage: agentless {' '.join(command)}" in out


# --- status -------------------------------------------------------------------------------------


async def test_status_json_is_what_get_queue_shows(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
) -> None:
    # The worker is gone before `status` runs, so that no heartbeat can be caught mid-task.
    async with running_worker(settings) as worker:
        await asyncio.wait_for(worker.consumer.consuming.wait(), 10)
        await publish(channel, settings, task_message(target, taskId="s-ok"))
        await publish(channel, settings, task_message(target, taskId="s-bad", query="&status=500"))
        await events.completed("s-ok")
        await events.completed("s-bad")
    await publish(channel, settings, b"not json")  # no worker: it stays ready

    code, out, err = await processes.run(settings, "status", "--json")
    assert code == 0, err
    assert json.loads(out) == {
        "ready": 1,
        "unacknowledged": 0,
        "consumers": 0,
        "deadLetters": 0,
        "queued": 0,
        "running": 0,
        "waiting": 0,
        "polling": 0,
        "completed": 2,
        "estimated": [],
        "oldestWaitingAgeSeconds": None,
        "completedLastMinute": 2,
        "brokerBlocked": None,
    }


async def test_status_table_shows_counts_and_live_workers(
    worker: Worker, settings: Settings, channel: AbstractChannel, events: Events, target: Target
) -> None:
    await publish(channel, settings, task_message(target, taskId="st-1"))
    await publish(channel, settings, b"{")
    await events.completed("st-1")

    code, out, err = await processes.run(settings, "status")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["QUEUE", "TASKS"]
    assert lines[1].split() == ["ready", "0", "queued", "0"]
    assert lines[3].split() == ["consumers", "1", "waiting", "0"]
    assert lines[4].split() == ["dead", "letters", "1", "polling", "0"]
    assert lines[5].split() == ["completed", "1"]
    assert lines[6].split() == ["oldest", "waiting", "-"]
    assert " ".join(lines[9].split()) == "WORKER HOST PID VERSION IN FLIGHT STARTED LAST SEEN"
    row = lines[10].split()
    assert row[:3] == [str(worker.worker_id), socket.gethostname(), str(os.getpid())]


# --- tasks --------------------------------------------------------------------------------------


async def _three_tasks(
    channel: AbstractChannel, settings: Settings, target: Target, events: Events
) -> None:
    """Three completed tasks, queued one after another: two succeeded, one failed."""
    for fields in (
        {"taskId": "a-1", "hubName": "release"},
        {"taskId": "c-2", "query": "&status=503"},
        {"taskId": "b-3", "planId": "plan-9"},
    ):
        task_id = str(fields["taskId"])
        await publish(channel, settings, task_message(target, **fields))
        await events.completed(task_id)


async def test_tasks_table_lists_newest_first(
    worker: Worker, settings: Settings, channel: AbstractChannel, events: Events, target: Target
) -> None:
    await _three_tasks(channel, settings, target, events)
    code, out, err = await processes.run(settings, "tasks")
    assert code == 0, err
    assert " ".join(out.splitlines()[0].split()) == "TASK ID STATE RESULT ATTEMPTS AGE REASON"
    rows = [line.split(maxsplit=5) for line in out.splitlines()]
    assert [row[:4] for row in rows[1:]] == [
        ["b-3", "completed", "succeeded", "1"],
        ["c-2", "completed", "failed", "1"],
        ["a-1", "completed", "succeeded", "1"],
    ]
    assert rows[2][5] == "HTTP 503"
    assert err == ""


async def test_tasks_filters_order_limit_and_json(
    worker: Worker, settings: Settings, channel: AbstractChannel, events: Events, target: Target
) -> None:
    await _three_tasks(channel, settings, target, events)

    code, out, err = await processes.run(settings, "tasks", "--result", "FAILED", "--json")
    assert code == 0, err
    summaries = json.loads(out)
    assert [
        {k: s[k] for k in ("taskId", "planId", "hubName", "state", "result", "reason", "attempts")}
        for s in summaries
    ] == [
        {
            "taskId": "c-2",
            "planId": "plan-1",
            "hubName": "build",
            "state": "completed",
            "result": "failed",
            "reason": "HTTP 503",
            "attempts": 1,
        }
    ]
    assert summaries[0]["completedAt"] is not None

    code, out, err = await processes.run(
        settings, "tasks", "--hub", "RELEASE", "--state", "completed", "--json"
    )
    assert code == 0, err
    assert [s["taskId"] for s in json.loads(out)] == ["a-1"]

    code, out, err = await processes.run(settings, "tasks", "--plan-id", "plan-9", "--json")
    assert code == 0, err
    assert [s["taskId"] for s in json.loads(out)] == ["b-3"]

    code, out, err = await processes.run(
        settings, "tasks", "--order", "taskId", "--asc", "--limit", "2"
    )
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["a-1", "b-3"]
    assert err.strip() == "2 of 3 tasks shown; --limit shows more"

    code, out, err = await processes.run(settings, "tasks", "--state", "running")
    assert (code, out, err.strip()) == (0, "", "no tasks match")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--state", "done"], "argument --state: invalid choice: 'done'"),
        (["--result", "ok"], "argument --result: invalid choice: 'ok'"),
        (["--order", "reason"], "argument --order: invalid choice: 'reason'"),
        (["--limit", "0"], "argument --limit: must be a whole number from 1 to 1000"),
    ],
)
async def test_tasks_refuses_bad_choices(settings: Settings, args: list[str], message: str) -> None:
    code, _, err = await processes.run(settings, "tasks", *args)
    assert code == 2
    assert message in err
