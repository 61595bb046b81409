"""What the process-fault runs need around them: a service for both modes, waits that outlast
restarts of the database and the broker."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import aio_pika
import aiohttp
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel, AbstractMessage
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import publish
from worker.contract.settings import Settings


class Service:
    """An endpoint for both modes: answers after 0 to 200 ms; for a callback task it then reports
    TaskCompleted, retrying as a real service would until the API says 200 or 409."""

    def __init__(self) -> None:
        self.background: set[asyncio.Task[None]] = set()
        self.session: aiohttp.ClientSession | None = None
        self.refused: set[str] = set()
        # Set whenever a report finds the API unreachable.
        self.unreachable = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        await asyncio.sleep(random.uniform(0, 0.2))
        if request.path == "/flaky" and request.query["key"] not in self.refused:
            # Busy at the first call of each task that asks for retries.
            self.refused.add(request.query["key"])
            return web.json_response({"status": "busy"}, status=503)
        if "AuthToken" in request.headers:
            task = asyncio.create_task(self.report(dict(request.headers)))
            self.background.add(task)
            task.add_done_callback(self.background.discard)
        return web.json_response({"status": "created"})

    async def report(self, headers: dict[str, str]) -> None:
        assert self.session is not None
        url = f"{headers['PlanUrl']}/plans/{headers['PlanId']}/events"
        body = {"name": "TaskCompleted", "taskId": headers["TaskInstanceId"], "result": "succeeded"}
        auth = {"Authorization": f"Bearer {headers['AuthToken']}"}
        await asyncio.sleep(random.uniform(0, 0.2))
        for _ in range(100):
            try:
                async with self.session.post(url, json=body, headers=auth) as response:
                    if response.status in (200, 409):
                        return
            except aiohttp.ClientError:
                self.unreachable.set()
            await asyncio.sleep(0.2)


S = TypeVar("S", bound=Service)


@asynccontextmanager
async def served(service: S) -> AsyncIterator[tuple[str, S]]:
    """`service` served locally, with a client session for its reports: its URL and itself."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", service.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            service.session = session
            yield str(server.make_url("/")).rstrip("/"), service
            for task in list(service.background):
                task.cancel()
            await asyncio.gather(*service.background, return_exceptions=True)
    finally:
        await server.close()


async def completed_in_database(
    settings: Settings, total: int, timeout: float
) -> list[asyncpg.Record]:
    """Poll the task table (on fresh connections: the database may restart) until `total` tasks
    are completed; their rows. Past `timeout`, fail saying where the tasks are."""
    rows: list[asyncpg.Record] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    conn = await asyncpg.connect(settings.database_url)
                    try:
                        rows = await conn.fetch(
                            "SELECT task_id, state, result, attempts,"
                            " jsonb_array_length(history) AS retries FROM tasks"
                        )
                    finally:
                        await conn.close()
                    if sum(1 for r in rows if r["state"] == "completed") >= total:
                        return rows
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    pass
                await asyncio.sleep(0.5)
    except TimeoutError:
        states = Counter((r["state"], r["result"], r["attempts"]) for r in rows)
        unfinished = [r["task_id"] for r in rows if r["state"] != "completed"][:10]
        raise AssertionError(
            f"{total} tasks not all completed within {timeout} s: {len(rows)} rows, by (state, "
            f"result, attempts) {dict(states)}; some unfinished: {unfinished}"
        ) from None


async def drain_completions(
    channel: AbstractChannel, queue_name: str, expected: set[str]
) -> Counter[str]:
    """TaskCompleted events per task from the observer queue, until every expected task has one
    (events may trail the database by the relay's delay)."""
    seen: Counter[str] = Counter()
    async with asyncio.timeout(60):
        while not expected <= set(seen):
            queue = await channel.declare_queue(queue_name, passive=True)
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.2)
                continue
            seen[orjson.loads(message.body)["taskId"]] += 1
    await channel.queue_delete(queue_name)
    return seen


async def publish_patiently(
    channel: AbstractChannel, settings: Settings, task: dict[str, object]
) -> None:
    """Publish, waiting out the test's own reconnection after a broker restart."""
    async with asyncio.timeout(60):
        while True:
            try:
                await publish(channel, settings, task)
            except (aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError):
                await asyncio.sleep(0.5)
            else:
                return


async def publish_to(channel: AbstractChannel, queue: str, message: AbstractMessage) -> None:
    copy = aio_pika.Message(message.body, headers=message.headers, message_id=message.message_id)
    await channel.default_exchange.publish(copy, routing_key=queue)
