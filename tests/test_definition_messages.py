"""Task messages that name a definition instead of a request (SPEC §4, §9), through a worker in
this process against the real broker and database."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
from aio_pika.abc import AbstractChannel

from tests.conftest import Dead, Events, Target, publish
from worker.contract.definitions import DefinitionSpec
from worker.contract.settings import Settings
from worker.service import Worker

COLUMNS = "definition_id, definition_version, execution_index, tags, comments, source, attempts"


async def define(worker: Worker, target: Target, name: str, **fields: object) -> str:
    data: dict[str, object] = {
        "name": name,
        "request": {"url": f"{target.url}/hook?key=$(variables.key)$(variables.query)"},
        "variables": {"key": "default", "query": "", "kept": 1},
    }
    [created] = await worker.store.definitions.create(
        [DefinitionSpec.model_validate(data | fields)]
    )
    return created.id


async def recorded(db: asyncpg.Connection, task_id: str) -> dict[str, Any]:
    row = await db.fetchrow(f"SELECT {COLUMNS} FROM tasks WHERE task_id = $1", task_id)
    assert row is not None
    return dict(row)


async def test_a_message_naming_a_definition_runs_its_task(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
) -> None:
    key = uuid.uuid4().hex
    definition_id = await define(worker, target, "Tag-Build", successCriteria="body.status")
    # The version current when the worker takes the message is the one executed.
    await worker.store.definitions.patch(definition_id, {"hubName": "release"})
    message: dict[str, object] = {
        "definition": "tag-build",
        "input": {"key": key},
        "taskId": "dm-1",
        "planId": "p-1",
        "tags": ["nightly"],
        "comments": "from the scheduler",
        "source": "cron",
    }
    await publish(channel, settings, message)
    completed = await events.completed("dm-1")
    assert (completed["result"], completed["planId"], completed["hubName"]) == (
        "succeeded",
        "p-1",
        "release",
    )
    assert completed["variables"] == {"key": key, "query": "", "kept": 1}
    assert target.calls[key] == 1
    assert await recorded(db, "dm-1") == {
        "definition_id": definition_id,
        "definition_version": 2,
        "execution_index": 1,
        "tags": ["nightly"],
        "comments": "from the scheduler",
        "source": "cron",
        "attempts": 1,
    }


async def test_a_message_naming_no_known_definition_is_dead_lettered(
    worker: Worker, channel: AbstractChannel, settings: Settings, dead: Dead, target: Target
) -> None:
    await define(worker, target, "known")
    body = b'{"definition": "unknown", "input": {}}'
    await publish(channel, settings, body, message_id="dm-2")
    reason, message = await dead.next()
    assert reason == "no task definition is named 'unknown' (nor has that id)"
    assert (message.body, message.message_id) == (body, "dm-2")
    await publish(channel, settings, b'{"definition": "known", "input": [1]}')
    reason, _ = await dead.next()
    assert reason.endswith("source): input: Input should be a valid dictionary")


async def test_a_redelivered_message_is_the_same_execution(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
) -> None:
    key = uuid.uuid4().hex
    definition_id = await define(worker, target, "again")
    # No taskId: the message's id is the execution's.
    body = f'{{"definition": "again", "input": {{"key": "{key}"}}}}'.encode()
    await publish(channel, settings, body, message_id="dm-3")
    first = await events.completed("dm-3")
    await publish(channel, settings, body, message_id="dm-3")
    async with asyncio.timeout(10), events.changed:
        await events.changed.wait_for(lambda: len(events.named("TaskCompleted", "dm-3")) == 2)
    assert events.named("TaskCompleted", "dm-3")[1] == first
    assert target.calls[key] == 1
    listed = await worker.store.definitions.executions(definition_id)
    assert [(e.execution_id, e.execution_index) for e in listed.executions] == [("dm-3", 1)]


async def test_a_retry_is_the_same_execution(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
) -> None:
    key = uuid.uuid4().hex
    definition_id = await define(worker, target, "flaky", retry={"attempts": 2, "delaySeconds": 0})
    await publish(
        channel,
        settings,
        {"definition": definition_id, "taskId": "dm-4", "input": {"key": key, "query": "&fail=1"}},
    )
    completed = await events.completed("dm-4")
    assert (completed["result"], completed["attempts"]) == ("succeeded", 2)
    assert target.calls[key] == 2
    assert (await recorded(db, "dm-4"))["execution_index"] == 1
    assert (await worker.store.definitions.executions(definition_id)).total == 1
