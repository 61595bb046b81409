"""Memory under load: 256 tasks at once, each answered a body at the 5 MiB cap, stay within a
bound; and a worker killed with tasks in flight (as the kernel's OOM killer kills) costs each of
them one attempt, never the task."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest_asyncio
from aio_pika.abc import AbstractChannel
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests import processes
from tests.conftest import publish
from tests.faults.big_bodies import Endpoints, Kind, body, peak_rss_mb
from worker.contract.models import Names
from worker.contract.settings import Settings
from worker.invoke import BODY_BUDGET
from worker.runner import MAX_ATTEMPTS

CAP = 5 * 1024 * 1024
TASKS = 256
PEAK_RSS_LIMIT_MIB = 1024
# The kinds of body, by task number: the dearest to parse are few, since PostgreSQL takes
# longest to store them.
KINDS = [Kind.STRINGS] * 8 + [Kind.INTEGERS] * 8 + [Kind.TEXT] * 16
KINDS += [Kind.STRING] * (TASKS - len(KINDS))


def _size_in_database(kind: Kind) -> tuple[str, int]:
    """How the stored body of `kind` measures: its JSON type, and its elements or characters."""
    if kind is Kind.STRINGS:
        return "array", (CAP - 2) // 5
    if kind is Kind.INTEGERS:
        return "array", (CAP - 2) // 6
    if kind is Kind.STRING:
        return "string", CAP - 2
    return "string", CAP


async def _recorded(
    db: asyncpg.Connection, states: tuple[str, ...], total: int, child: processes.Child
) -> int:
    """Wait until `total` tasks are in one of `states`; the count."""
    async with asyncio.timeout(240):
        while True:
            assert child.process.returncode is None, child.logs()[-3000:]
            try:
                count: int = await db.fetchval(
                    "SELECT count(*) FROM tasks WHERE state = ANY($1::text[])", list(states)
                )
            except asyncpg.UndefinedTableError:
                count = 0  # The worker has not yet created its tables.
            if count >= total:
                return count
            await asyncio.sleep(0.5)


async def test_256_bodies_at_the_cap_at_once_stay_under_a_gibibyte(
    settings: Settings, channel: AbstractChannel, db: asyncpg.Connection
) -> None:
    settings = settings.model_copy(
        update={"max_response_bytes": CAP, "concurrency": TASKS, "response_timeout": 20}
    )
    endpoints = Endpoints(CAP, TASKS)
    server = TestServer(endpoints.app(), host="127.0.0.1")
    await server.start_server()
    # One task's events come to a queue of the test's own: its TaskCompleted carries the body
    # the endpoint sent (the others' are not gathered, to spare this process and the broker).
    watched = await channel.declare_queue(exclusive=True)
    await watched.bind(Names(settings.prefix).events, "task.completed.watched")
    expected: dict[str, tuple[str, str | None, str | None, str, int]] = {}
    for i, kind in enumerate(KINDS):
        task_id = f"m-{i}"
        mode = "callback" if i % 2 else "apiResponse"
        task: dict[str, object] = {
            "taskId": task_id,
            "planId": "plan-m",
            "waitForCompletion": mode,
            "request": {"method": "GET", "url": str(server.make_url(f"/{kind}/{task_id}"))},
        }
        reason = "HTTP 200"
        if kind in (Kind.STRINGS, Kind.INTEGERS) and mode == "apiResponse":
            # Criteria read the body: it is parsed for them, and only for that moment.
            task["successCriteria"] = "length(body) > `1000`"
            reason = "HTTP 200; successCriteria true"
        if i == 0:
            task["hubName"] = "watched"
        if mode == "apiResponse":
            expected[task_id] = ("completed", "succeeded", reason, *_size_in_database(kind))
        else:
            expected[task_id] = ("waiting", None, None, *_size_in_database(kind))
        await publish(channel, settings, task)

    started = time.perf_counter()
    worker = await processes.start(settings, "worker")
    try:
        await _recorded(db, ("completed", "waiting"), TASKS, worker)
        seconds = time.perf_counter() - started
        peak = peak_rss_mb(worker.process.pid)
    finally:
        worker.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.process.wait(), 60)
        await server.close()

    rows = await db.fetch(
        """SELECT task_id, state, result, reason, jsonb_typeof(response -> 'body') AS type,
                  CASE jsonb_typeof(response -> 'body')
                      WHEN 'array' THEN jsonb_array_length(response -> 'body')
                      ELSE length(response ->> 'body') END AS size
           FROM tasks"""
    )
    found = {
        r["task_id"]: (r["state"], r["result"], r["reason"], r["type"], r["size"]) for r in rows
    }
    message = await watched.get(timeout=10, no_ack=True)
    event = orjson.loads(message.body)
    print(
        f"\n{TASKS} tasks, each answered {CAP} bytes at once: worker peak RSS {peak:.0f} MiB "
        f"(limit {PEAK_RSS_LIMIT_MIB} MiB; body budget {BODY_BUDGET // 2**20} MiB), "
        f"all recorded in {seconds:.1f} s"
    )
    assert found == expected
    assert (event["taskId"], event["response"]["body"]) == (
        "m-0",
        orjson.loads(body(Kind.STRINGS, CAP)),
    )
    assert Counter(endpoints.calls.values()) == {1: TASKS}
    assert peak < PEAK_RSS_LIMIT_MIB


class Held:
    """An endpoint that holds each task's first call until the connection is cut, and answers
    every later one at once."""

    def __init__(self, expected: int) -> None:
        self.calls: Counter[str] = Counter()
        self.expected = expected
        self.all_held = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        self.calls[key] += 1
        if self.calls[key] == 1:
            if sum(self.calls.values()) >= self.expected:
                self.all_held.set()
            await asyncio.Event().wait()
        return web.json_response({"status": "done"})


@pytest_asyncio.fixture
async def held() -> AsyncIterator[tuple[str, Held]]:
    endpoint = Held(64)
    app = web.Application()
    app.router.add_get("/{key}", endpoint.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/")).rstrip("/"), endpoint
    await server.close()


async def test_a_worker_killed_with_tasks_in_flight_costs_each_one_attempt(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    held: tuple[str, Held],
) -> None:
    """SIGKILL, as the OOM killer sends it, to a worker with 64 tasks in flight: the next worker
    runs each of them once more (attempt 2 of the MAX_ATTEMPTS a task may start before it is
    taken for poison), and none ends `abandoned`."""
    url, endpoint = held
    settings = settings.model_copy(update={"concurrency": 64, "response_timeout": 20})
    run = uuid.uuid4().hex[:6]
    for i in range(endpoint.expected):
        request = {"method": "GET", "url": f"{url}/{i}"}
        task: dict[str, object] = {"taskId": f"o-{run}-{i}", "planId": "plan-o", "request": request}
        await publish(channel, settings, task)
    first = await processes.start(settings, "worker")
    try:
        async with asyncio.timeout(60):
            await endpoint.all_held.wait()
    finally:
        first.process.kill()
        await first.process.wait()
    second = await processes.start(settings, "worker")
    try:
        await _recorded(db, ("completed",), endpoint.expected, second)
    finally:
        second.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.process.wait(), 60)
    rows = await db.fetch("SELECT result, attempts FROM tasks")
    outcomes = Counter((r["result"], r["attempts"]) for r in rows)
    print(
        f"\nworker killed with {endpoint.expected} tasks in flight: {dict(outcomes)} "
        f"(result, attempts); abandoned only after {MAX_ATTEMPTS} such deaths"
    )
    assert outcomes == {("succeeded", 2): endpoint.expected}
    assert Counter(endpoint.calls.values()) == {2: endpoint.expected}
