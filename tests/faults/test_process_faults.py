"""Process faults: workers killed at random while a mixed load runs. Nothing is lost, nothing
completes twice, and the survivors (and the restarted) carry on by themselves."""

from __future__ import annotations

import asyncio
import random
import signal
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest_asyncio
from aio_pika.abc import AbstractChannel
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests import processes
from tests.conftest import Events, free_port, publish
from tests.test_serve import wait_until_ready
from worker.settings import Settings

TOTAL = 2000
WORKERS = 3


class Service:
    """An endpoint for both modes: answers after 0 to 200 ms; for a callback task it then reports
    TaskCompleted, retrying as a real service would until the API says 200 or 409."""

    def __init__(self) -> None:
        self.background: set[asyncio.Task[None]] = set()
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        await asyncio.sleep(random.uniform(0, 0.2))
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
                pass
            await asyncio.sleep(0.2)


@pytest_asyncio.fixture
async def service() -> AsyncIterator[tuple[str, Service]]:
    endpoint = Service()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", endpoint.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        endpoint.session = session
        yield str(server.make_url("/")).rstrip("/"), endpoint
        for task in list(endpoint.background):
            task.cancel()
    await server.close()


async def test_random_sigkills_of_three_workers_lose_nothing(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    service: tuple[str, Service],
) -> None:
    url, _ = service
    port = free_port()
    api_env = {"AGENTLESS_API_PORT": str(port), "AGENTLESS_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    api = await processes.start(settings, "api", **api_env)
    workers = [await processes.start(settings, "worker", **api_env) for _ in range(WORKERS)]
    run = uuid.uuid4().hex[:6]
    kills = 0

    async def killer() -> None:
        nonlocal kills
        while True:
            await asyncio.sleep(random.uniform(0.5, 1.5))
            victim = random.randrange(WORKERS)
            workers[victim].process.kill()
            await workers[victim].process.wait()
            kills += 1
            workers[victim] = await processes.start(settings, "worker", **api_env)

    try:
        await wait_until_ready(f"http://127.0.0.1:{port}/readyz", api)
        chaos = asyncio.create_task(killer())
        try:
            # Queued over several seconds, so that the kills fall in the middle of the load.
            for i in range(TOTAL):
                mode = "callback" if i % 2 else "apiResponse"
                task: dict[str, object] = {
                    "taskId": f"k-{run}-{i}",
                    "planId": "plan-k",
                    "waitForCompletion": mode,
                    "request": {"url": f"{url}/work"},
                }
                await publish(channel, settings, task)
                if i % 100 == 99:
                    await asyncio.sleep(0.4)
            await events.completed_count(TOTAL, timeout=150)
        finally:
            chaos.cancel()
            await asyncio.gather(chaos, return_exceptions=True)
    finally:
        for child in [*workers, api]:
            child.process.send_signal(signal.SIGTERM)
        for child in [*workers, api]:
            await asyncio.wait_for(child.process.wait(), 30)

    rows = await db.fetch("SELECT task_id, state, result, attempts FROM tasks")
    results: dict[str, set[object]] = defaultdict(set)
    for event in events.named("TaskCompleted"):
        results[str(event["taskId"])].add(event["result"])
    duplicates = len(events.named("TaskCompleted")) - len(results)
    conflicting = sum(1 for found in results.values() if len(found) > 1)
    rerun = sum(1 for r in rows if r["attempts"] > 1)
    print(
        f"\nsubmitted {TOTAL} / completed {len(results)} / lost {TOTAL - len(results)} / "
        f"duplicate results {conflicting} / duplicate events {duplicates} / "
        f"workers killed {kills} / attempts re-run {rerun}"
    )
    assert len(rows) == TOTAL
    assert {(r["state"], r["result"]) for r in rows} == {("completed", "succeeded")}
    assert conflicting == 0
    assert kills >= 1
