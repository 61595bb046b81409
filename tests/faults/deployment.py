"""An API and workers as child processes, with an observer of their TaskCompleted events, for the
runs that hurt the broker under them."""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import orjson
from aio_pika.abc import AbstractChannel
from yarl import URL

from tests import processes
from tests.conftest import free_port
from tests.processes import wait_until_ready
from worker.contract.models import Names
from worker.contract.settings import Settings


@dataclass
class Deployment:
    # Each API's base URL; the first is `api_url`.
    api_urls: list[str]
    # Each worker's probe server (/readyz, /metrics).
    worker_urls: list[str]
    # The APIs first, then the workers.
    children: list[processes.Child]
    # A durable quorum queue of the test's own, bound to every TaskCompleted.
    observer: str

    @property
    def api_url(self) -> str:
        return self.api_urls[0]


@asynccontextmanager
async def deployed(
    settings: Settings, channel: AbstractChannel, *, workers: int = 1, apis: int = 1
) -> AsyncIterator[Deployment]:
    """`apis` times `agentless api` and `workers` times `agentless worker`, ready; stopped with
    SIGTERM after. Worker i hands its callback tasks' services API i % apis as their PlanUrl."""
    names = Names(settings.prefix)
    observer = await channel.declare_queue(
        f"{settings.prefix}.observer", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await observer.bind(names.events, "task.completed.#")
    api_urls = [f"http://127.0.0.1:{free_port()}" for _ in range(apis)]
    children = [
        await processes.start(
            settings, "api", AGENTLESS_API_PORT=str(URL(url).port), AGENTLESS_PUBLIC_URL=url
        )
        for url in api_urls
    ]
    worker_urls = []
    for i in range(workers):
        worker_port = free_port()
        children.append(
            await processes.start(
                settings,
                "worker",
                AGENTLESS_WORKER_PORT=str(worker_port),
                AGENTLESS_PUBLIC_URL=api_urls[i % apis],
            )
        )
        worker_urls.append(f"http://127.0.0.1:{worker_port}")
    try:
        for url, child in zip(api_urls + worker_urls, children, strict=True):
            await wait_until_ready(f"{url}/readyz", child)
        yield Deployment(api_urls, worker_urls, children, observer.name)
    finally:
        for child in children:
            if child.process.returncode is None:
                child.process.send_signal(signal.SIGTERM)
        for child in children:
            await asyncio.wait_for(child.process.wait(), 60)


def mixed_task(url: str, task_id: str, i: int) -> dict[str, object]:
    """apiResponse and callback tasks in turn, against outages.Service."""
    return {
        "taskId": task_id,
        "planId": "plan-b",
        "waitForCompletion": "callback" if i % 2 else "apiResponse",
        "request": {"url": f"{url}/work"},
    }


async def readiness(
    session: aiohttp.ClientSession,
    url: str,
    until: Callable[[int, dict[str, object]], bool],
    timeout: float = 30,
) -> tuple[int, dict[str, object]]:
    """GET `url` (a /readyz) until its status and body satisfy `until`; them."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with session.get(url) as response:
                    answer = (response.status, orjson.loads(await response.read()))
                if until(*answer):
                    return answer
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)


def results_by_task(bodies: list[bytes]) -> dict[str, set[object]]:
    """The results each task's TaskCompleted events gave."""
    results: dict[str, set[object]] = defaultdict(set)
    for body in bodies:
        event = orjson.loads(body)
        results[str(event["taskId"])].add(event["result"])
    return results


async def drain_events(
    channel: AbstractChannel, queue_name: str, expected: set[str], timeout: float = 60
) -> list[bytes]:
    """Every TaskCompleted in the observer queue, read until each expected task has one (events
    may trail the database by the relay's delay) and the queue is empty."""
    bodies: list[bytes] = []
    seen: set[str] = set()
    queue = await channel.declare_queue(queue_name, passive=True)
    async with asyncio.timeout(timeout):
        while True:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                bodies.append(message.body)
                seen.add(str(orjson.loads(message.body)["taskId"]))
            elif expected <= seen:
                return bodies
            else:
                await asyncio.sleep(0.2)
