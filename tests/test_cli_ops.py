"""`agentless status`, `tasks` and `dead` as an operator runs them, and the pure helpers behind
their tables."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import aio_pika
import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractChannel

from tests import processes
from tests.conftest import Dead, Events, Target, publish, task_message
from worker.cli.dead import reason_of
from worker.cli.tables import Column, render
from worker.contract.errors import InvalidTask
from worker.contract.models import REASON_HEADER, Names, parse_task
from worker.contract.settings import Settings
from worker.service import Worker, running_worker
from worker.text import duration, one_line, shorten


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
        "completed": 2,
        "oldestWaitingAgeSeconds": None,
        "completedLastMinute": 2,
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
    assert lines[4].split() == ["dead", "letters", "1", "completed", "1"]
    assert lines[5].split() == ["oldest", "waiting", "-"]
    assert " ".join(lines[8].split()) == "WORKER HOST PID VERSION IN FLIGHT STARTED LAST SEEN"
    row = lines[9].split()
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


# --- dead list ----------------------------------------------------------------------------------


async def _depth(channel: AbstractChannel, queue: str) -> int:
    # Not channel.declare_queue: a robust channel answers a passive declaration from its cache.
    declared = await (await channel.get_underlay_channel()).queue_declare(queue, passive=True)
    return declared.message_count or 0


async def _wait_depth(channel: AbstractChannel, queue: str, depth: int) -> None:
    async with asyncio.timeout(10):
        while await _depth(channel, queue) != depth:
            await asyncio.sleep(0.05)


async def _publish_dead(
    channel: AbstractChannel, settings: Settings, body: bytes, **properties: object
) -> None:
    """A message put on the dead-letter queue as a worker or the broker would have put it."""
    message = aio_pika.Message(
        body,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        **properties,  # type: ignore[arg-type]
    )
    await channel.default_exchange.publish(message, routing_key=Names(settings.prefix).dead)


def _invalid(body: bytes) -> str:
    """The reason the worker gives for dead-lettering `body`."""
    with pytest.raises(InvalidTask) as caught:
        parse_task(body)
    return str(caught.value)


async def test_dead_list_shows_reasons_and_leaves_the_queue_as_it_was(
    worker: Worker, settings: Settings, channel: AbstractChannel
) -> None:
    names = Names(settings.prefix)
    not_json = b"not json at all\n\x1b[31m"
    no_request = orjson.dumps({"taskId": "bad-schema", "planId": "p"})
    await publish(channel, settings, not_json, message_id="bad-json")
    await _wait_depth(channel, names.dead, 1)
    await publish(channel, settings, no_request, message_id="bad-schema")
    await _wait_depth(channel, names.dead, 2)
    await _publish_dead(
        channel,
        settings,
        b"{}",
        message_id="by-broker",
        headers={"x-death": [{"reason": "delivery_limit", "queue": names.tasks, "count": 1}]},
    )

    code, out, err = await processes.run(settings, "dead", "list", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert listed == [
        {"messageId": "bad-json", "reason": _invalid(not_json), "excerpt": not_json.decode()},
        {"messageId": "bad-schema", "reason": _invalid(no_request), "excerpt": no_request.decode()},
        {
            "messageId": "by-broker",
            "reason": f"RabbitMQ dead-lettered it from {names.tasks}: delivered too many times "
            "without being acknowledged",
            "excerpt": "{}",
        },
    ]
    await _wait_depth(channel, names.dead, 3)

    code, out, err = await processes.run(settings, "dead", "list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["MESSAGE", "ID", "REASON", "BODY"]
    assert [line.split()[0] for line in lines[1:]] == ["bad-json", "bad-schema", "by-broker"]
    # A body never breaks the table's lines nor reaches the terminal raw.
    assert lines[1].endswith("not json at all\\n\\x1b[31m")
    assert "message is not JSON" in lines[1]

    # Listing only the first letter must not rotate the queue: the next listing sees the same.
    code, out, err = await processes.run(settings, "dead", "list", "--limit", "1")
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["bad-json"]
    assert err.strip() == "1 of 3 dead letters shown; --limit shows more"
    code, out, err = await processes.run(settings, "dead", "list", "--json")
    assert code == 0, err
    assert json.loads(out) == listed
    await _wait_depth(channel, names.dead, 3)


async def test_dead_list_of_an_empty_queue(settings: Settings, channel: AbstractChannel) -> None:
    code, out, err = await processes.run(settings, "dead", "list")
    assert (code, out) == (0, "")
    assert err.strip() == f"no dead letters in {Names(settings.prefix).dead}"


# --- dead requeue -------------------------------------------------------------------------------


async def test_requeue_restores_the_original_message(
    settings: Settings, channel: AbstractChannel, dead: Dead, target: Target
) -> None:
    names = Names(settings.prefix)
    body = orjson.dumps(task_message(target, taskId="rq-1"))
    await _publish_dead(
        channel,
        settings,
        body,
        content_type="application/json",
        message_id="rq-1",
        correlation_id="corr-1",
        reply_to="replies",
        headers={
            REASON_HEADER: "database unavailable",
            "x-death": [{"reason": "rejected", "queue": names.tasks, "count": 1}],
            "x-delivery-count": 3,
            "trace": "kept",
        },
    )
    await _publish_dead(channel, settings, b"{", message_id="other", headers={REASON_HEADER: "x"})

    code, out, err = await processes.run(settings, "dead", "requeue", "rq-1")
    assert code == 0, err
    assert out.splitlines()[0] == f"moved 1 dead letter(s) back to {names.tasks}:"
    assert out.splitlines()[2].split()[:3] == ["rq-1", "database", "unavailable"]

    tasks = await channel.get_queue(names.tasks, ensure=False)
    async with asyncio.timeout(10):
        while (moved := await tasks.get(fail=False, no_ack=True)) is None:
            await asyncio.sleep(0.05)
    headers = dict(moved.headers or {})
    # The task queue counts deliveries afresh; the dead letter's stale count is gone.
    assert headers.pop("x-delivery-count", 0) == 0
    assert (
        moved.body,
        moved.content_type,
        moved.message_id,
        moved.correlation_id,
        moved.reply_to,
        moved.delivery_mode,
        headers,
    ) == (
        body,
        "application/json",
        "rq-1",
        "corr-1",
        "replies",
        aio_pika.DeliveryMode.PERSISTENT,
        {"trace": "kept"},
    )
    reason, left = await dead.next()
    assert (left.message_id, reason) == ("other", "x")
    assert await _depth(channel, names.dead) == 0


async def test_requeued_task_is_run_by_the_worker(
    worker: Worker,
    settings: Settings,
    channel: AbstractChannel,
    events: Events,
    target: Target,
) -> None:
    names = Names(settings.prefix)
    # Dead-lettered for a cause that has passed: the body itself is a valid task.
    await _publish_dead(
        channel,
        settings,
        orjson.dumps(task_message(target, taskId="again-1")),
        content_type="application/json",
        message_id="again-1",
        headers={REASON_HEADER: "the endpoint's certificate had expired"},
    )
    await _publish_dead(channel, settings, b"[]", message_id="stays")

    code, _, err = await processes.run(settings, "dead", "requeue", "again-1")
    assert code == 0, err
    assert (await events.completed("again-1"))["result"] == "succeeded"
    code, out, err = await processes.run(settings, "dead", "list", "--json")
    assert code == 0, err
    assert [d["messageId"] for d in json.loads(out)] == ["stays"]
    await _wait_depth(channel, names.dead, 1)


async def test_requeue_all(settings: Settings, channel: AbstractChannel) -> None:
    names = Names(settings.prefix)
    for task_id in ("all-1", "all-2", "all-3"):
        await _publish_dead(channel, settings, b"{}", message_id=task_id)

    code, out, err = await processes.run(settings, "dead", "requeue", "--all")
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["all-1", "all-2", "all-3"]
    await _wait_depth(channel, names.tasks, 3)
    assert await _depth(channel, names.dead) == 0

    code, out, err = await processes.run(settings, "dead", "requeue", "--all")
    assert (code, out, err.strip()) == (0, "", "no dead letters to move")


async def test_requeue_names_the_ids_it_did_not_find(
    settings: Settings, channel: AbstractChannel
) -> None:
    names = Names(settings.prefix)
    await _publish_dead(channel, settings, b"{}", message_id="known")

    code, out, err = await processes.run(settings, "dead", "requeue", "known", "ghost-1", "ghost-2")
    assert code == 1
    assert out.splitlines()[2].split()[0] == "known"
    assert err.strip() == "agentless: no dead letter has the message id ghost-1, ghost-2"
    await _wait_depth(channel, names.tasks, 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give the message ids to requeue, or --all"),
        (["x", "--all"], "give the message ids to requeue or --all, not both"),
    ],
)
async def test_requeue_wants_ids_or_all(settings: Settings, args: list[str], message: str) -> None:
    code, _, err = await processes.run(settings, "dead", "requeue", *args)
    assert (code, err.strip()) == (2, f"agentless: {message}")


async def test_dead_refuses_an_unreachable_broker(settings: Settings) -> None:
    code, _, err = await processes.run(
        settings, "dead", "list", AGENTLESS_AMQP_URL="amqp://guest:guest@127.0.0.1:1/"
    )
    assert code == 2
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in err
    assert "Traceback" not in err


# --- the pure parts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({REASON_HEADER: "message is not JSON"}, "message is not JSON"),
        ({REASON_HEADER: b"as bytes"}, "as bytes"),
        (
            {REASON_HEADER: "ours", "x-death": [{"reason": "rejected", "queue": "q"}]},
            "ours",
        ),
        (
            {"x-death": [{"reason": "expired", "queue": "q2"}, {"reason": "rejected"}]},
            "RabbitMQ dead-lettered it from q2: its time-to-live ran out",
        ),
        (
            {"x-death": [{"reason": "something_new", "queue": "q"}]},
            "RabbitMQ dead-lettered it from q: something_new",
        ),
        (
            {"x-first-death-reason": "maxlen"},
            "RabbitMQ dead-lettered it: the queue was over its length limit",
        ),
        ({}, "no reason recorded"),
    ],
)
def test_reason_of(headers: dict[str, object], reason: str) -> None:
    assert reason_of(headers) == reason


@pytest.mark.parametrize(
    ("width", "expected"),
    [
        (
            None,
            [
                "ID   N  REASON                          BODY",
                'a    1  a long reason here, it goes on  {"x": 1, "y": [1, 2, 3]}',
                "bb  22  short",
            ],
        ),
        (
            50,
            [
                "ID   N  REASON                        BODY",
                'a    1  a long reason here, it goes…  {"x": 1, "y…',
                "bb  22  short",
            ],
        ),
        (
            20,
            [
                "ID   N  REASON        BODY",
                'a    1  a long reas…  {"x": 1, "y…',
                "bb  22  short",
            ],
        ),
    ],
    ids=["unbounded", "last-column-gives-way-first", "floor"],
)
def test_render(width: int | None, expected: list[str]) -> None:
    columns = [
        Column("ID"),
        Column("N", right=True),
        Column("REASON", squeeze=True),
        Column("BODY", squeeze=True),
    ]
    rows = [
        ("a", "1", "a long reason here, it goes on", '{"x": 1, "y": [1, 2, 3]}'),
        ("bb", "22", "short", ""),
    ]
    assert render(columns, rows, width=width).splitlines() == expected


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [("abc", 3, "abc"), ("abcd", 3, "ab…"), ("abcd", 1, "…"), ("", 0, "")],
)
def test_shorten(text: str, limit: int, expected: str) -> None:
    assert shorten(text, limit) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("plain text", "plain text"), ("a\nb\tc", "a\\nb\\tc"), ("\x1b[2J", "\\x1b[2J"), ("é", "é")],
)
def test_one_line(text: str, expected: str) -> None:
    assert one_line(text) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(-1, "0s"), (0.9, "0s"), (42, "42s"), (307, "5m07s"), (12_000, "3h20m"), (187_200, "2d04h")],
)
def test_duration(seconds: float, expected: str) -> None:
    assert duration(seconds) == expected
