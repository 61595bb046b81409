"""`agentless dead list` and `agentless dead requeue` as an operator runs them, and how a dead
letter's reason is read."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel

from tests import processes
from tests.conftest import Dead, Events, Target, publish, task_message
from worker.cli.dead import reason_of
from worker.contract.errors import InvalidTask
from worker.contract.models import REASON_HEADER, Names, parse_task
from worker.contract.settings import Settings
from worker.service import Worker

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
    # Unavailable, to be tried again later (SPEC §8).
    assert code == 4
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in err
    assert "Traceback" not in err


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
