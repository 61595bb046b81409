"""Callback tasks in tests: queue one, wait until it waits, post to the callback API."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import orjson
from aio_pika.abc import AbstractChannel

from tests.conftest import Api, Events, Target, publish, task_message

# The headers Azure's server tasks send, which a callback task's request carries.
CALLBACK_HEADERS = (
    "PlanUrl",
    "ProjectId",
    "HubName",
    "PlanId",
    "JobId",
    "TimelineId",
    "TaskInstanceId",
    "AuthToken",
)


def callback_task(target: Target, **fields: object) -> dict[str, Any]:
    fields.setdefault("waitForCompletion", "callback")
    return task_message(target, **fields)


async def waiting(
    api: Api, channel: AbstractChannel, events: Events, target: Target, **fields: object
) -> tuple[dict[str, Any], dict[str, str]]:
    """Queue a callback task and wait until it waits: the task and the headers its endpoint got."""
    task = callback_task(target, **fields)
    await publish(channel, api.settings, task)
    async with asyncio.timeout(10), events.changed:
        await events.changed.wait_for(lambda: bool(events.named("TaskWaiting", task["taskId"])))
    return task, target.headers[task["taskId"]][-1]


async def post(
    url: str, body: object, token: str | None = None, *, basic: bool = False
) -> tuple[int, dict[str, Any], str]:
    headers = {}
    if token is not None:
        if basic:
            headers["Authorization"] = "Basic " + base64.b64encode(f":{token}".encode()).decode()
        else:
            headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=data, headers=headers) as response,
    ):
        text = await response.text()
        parsed = orjson.loads(text) if text else {}
        return response.status, parsed, response.content_type
