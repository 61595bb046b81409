"""Fixtures against the real RabbitMQ and PostgreSQL; each test gets its own prefix and schema."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
import pytest_asyncio
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from pydantic import AnyUrl

from callback_api.app import create_app, worker_key
from callback_api.server import Deadlines
from worker.contract.models import REASON_HEADER, Mode, Names, State
from worker.contract.records import TaskRecord
from worker.contract.settings import Settings
from worker.service import Worker, running_worker
from worker.topology import declare_topology

AMQP_URL = os.environ.get("AGENTLESS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL = os.environ.get(
    "AGENTLESS_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SESSION = uuid.uuid4().hex[:8]


def unique_name() -> str:
    return f"t{SESSION}_{uuid.uuid4().hex[:8]}"


def schema_url(schema: str) -> str:
    joiner = "&" if "?" in DATABASE_URL else "?"
    return f"{DATABASE_URL}{joiner}search_path={schema}"


@pytest.fixture
def settings() -> Settings:
    """Settings for one test: its own queue prefix and database schema, short timeouts."""
    name = unique_name()
    return Settings(
        amqp_url=AMQP_URL,
        database_url=schema_url(name),
        prefix=f"agentless-test.{name}",
        response_timeout=3,
        max_response_bytes=65_536,
        concurrency=32,
        worker_port=0,
        log_format="json",
        connections=None,
        egress_deny=[],
        egress_allow=[],
    )


@pytest_asyncio.fixture(scope="session")
async def amqp() -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(
        AMQP_URL, client_properties={"connection_name": f"agentless tests {SESSION}"}
    )
    async with connection:
        yield connection


@pytest_asyncio.fixture
async def channel(
    amqp: AbstractRobustConnection, settings: Settings, request: pytest.FixtureRequest
) -> AsyncIterator[AbstractChannel]:
    """A confirming channel on which this test's topology exists; removed after the test."""
    names = Names(settings.prefix)
    ch = await amqp.channel(publisher_confirms=True)
    await declare_topology(ch, names)
    yield ch
    for queue in (names.tasks, names.dead):
        await ch.queue_delete(queue)
    await ch.exchange_delete(names.events)
    await ch.close()


@pytest_asyncio.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's schema, dropped after the test."""
    conn: asyncpg.Connection = await asyncpg.connect(settings.database_url)
    yield conn
    if conn.is_closed():
        # The test restarted PostgreSQL.
        conn = await asyncpg.connect(settings.database_url)
    schema = settings.database_url.rsplit("search_path=", 1)[1]
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()


@dataclass
class Events:
    """Everything published to a test's events exchange, gathered as it arrives."""

    received: list[dict[str, object]] = field(default_factory=list)
    routing_keys: list[str] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        async with self.changed:
            self.received.append(orjson.loads(message.body))
            self.routing_keys.append(message.routing_key or "")
            self.changed.notify_all()

    def named(self, name: str, task_id: str | None = None) -> list[dict[str, object]]:
        return [e for e in self.received if e["name"] == name and task_id in (None, e["taskId"])]

    async def completed(self, task_id: str, timeout: float = 15) -> dict[str, object]:
        """The first TaskCompleted event of `task_id`, once it has arrived."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: bool(self.named("TaskCompleted", task_id)))
        return self.named("TaskCompleted", task_id)[0]

    async def completed_count(self, count: int, timeout: float) -> set[str]:
        """Wait until `count` distinct tasks have completed; their ids."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(
                lambda: len({e["taskId"] for e in self.named("TaskCompleted")}) >= count
            )
        return {str(e["taskId"]) for e in self.named("TaskCompleted")}


@pytest_asyncio.fixture
async def events(channel: AbstractChannel, settings: Settings) -> AsyncIterator[Events]:
    names = Names(settings.prefix)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(names.events, "task.#")
    gathered = Events()
    tag = await queue.consume(gathered.on_message, no_ack=True)
    yield gathered
    await queue.cancel(tag)


@dataclass
class Dead:
    channel: AbstractChannel
    names: Names

    async def next(self, timeout: float = 10) -> tuple[str, AbstractIncomingMessage]:
        """The next dead-lettered message and its reason."""
        queue = await self.channel.get_queue(self.names.dead, ensure=False)
        async with asyncio.timeout(timeout):
            while True:
                message = await queue.get(fail=False, no_ack=True)
                if message is not None:
                    reason = (message.headers or {}).get(REASON_HEADER)
                    return str(reason), message
                await asyncio.sleep(0.05)


@pytest.fixture
def dead(channel: AbstractChannel, settings: Settings) -> Dead:
    return Dead(channel, Names(settings.prefix))


async def publish(
    channel: AbstractChannel,
    settings: Settings,
    task: dict[str, object] | bytes,
    **properties: object,
) -> None:
    body = task if isinstance(task, bytes) else orjson.dumps(task)
    message = aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        **properties,  # type: ignore[arg-type]
    )
    await channel.default_exchange.publish(message, routing_key=Names(settings.prefix).tasks)


async def first_message(queue: AbstractQueue) -> AbstractIncomingMessage:
    """The next message on `queue`, acknowledged."""
    async with asyncio.timeout(10), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            return message
    raise AssertionError(f"queue {queue.name} was closed")


async def published_again(
    channel: AbstractChannel, settings: Settings, db: asyncpg.Connection, task: dict[str, Any]
) -> AbstractQueue:
    """Publish `task` again with a reply queue of its own (correlation id "again"): the queue,
    once the task's row says its TaskCompleted goes there."""
    replies = await channel.declare_queue(exclusive=True, auto_delete=True)
    await publish(channel, settings, task, reply_to=replies.name, correlation_id="again")
    query = "SELECT reply_to FROM tasks WHERE task_id = $1"
    async with asyncio.timeout(10):
        while await db.fetchval(query, task["taskId"]) != replies.name:
            await asyncio.sleep(0.02)
    return replies


@dataclass
class Target:
    """A local HTTP endpoint for tasks to call; counts the calls it gets per `key` and keeps
    their headers."""

    url: str
    calls: Counter[str]
    headers: dict[str, list[dict[str, str]]]


async def _target_handler(request: web.Request) -> web.StreamResponse:
    calls: Counter[str] = request.app[CALLS]
    key = request.query.get("key", "")
    calls[key] += 1
    request.app[HEADERS].setdefault(key, []).append(dict(request.headers))
    if "early" in request.query:
        # A service that reports completion before it answers the invocation itself.
        async with (
            ClientSession() as session,
            session.post(
                f"{request.headers['PlanUrl']}/plans/{request.headers['PlanId']}/events",
                json={
                    "name": "TaskCompleted",
                    "taskId": request.headers["TaskInstanceId"],
                    "result": request.query["early"],
                },
                headers={"Authorization": f"Bearer {request.headers['AuthToken']}"},
            ) as answer,
        ):
            assert answer.status == 200, await answer.text()
    delay = float(request.query.get("delay", "0"))
    if delay:
        await asyncio.sleep(delay)
    status = int(request.query.get("status", "200"))
    if calls[key] <= int(request.query.get("fail", "0")):
        # The first `fail` calls fail, with `failstatus` and, if given, a Retry-After.
        status = int(request.query.get("failstatus", "503"))
        retry_after = request.query.get("retryafter")
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        return web.json_response({"status": "busy"}, status=status, headers=headers)
    body = await request.read()
    if "quiet" in request.query:
        # Echoes nothing of the request: for tests that look for secrets in what is kept.
        return web.json_response({"status": request.query.get("say", "created")}, status=status)
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "headers": dict(request.headers),
            "body": body.decode(errors="replace"),
            "status": request.query.get("say", "created"),
        },
        status=status,
    )


CALLS = web.AppKey("calls", Counter[str])
HEADERS = web.AppKey("headers", dict[str, list[dict[str, str]]])


@pytest_asyncio.fixture(scope="session")
async def target() -> AsyncIterator[Target]:
    app = web.Application()
    app[CALLS] = Counter()
    app[HEADERS] = {}
    app.router.add_route("*", "/{tail:.*}", _target_handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield Target(str(server.make_url("/")).rstrip("/"), app[CALLS], app[HEADERS])
    await server.close()


def task_message(target: Target, **fields: object) -> dict[str, object]:
    """A valid apiResponse task against `target`, with `fields` merged in."""
    task_id = str(fields.pop("taskId", uuid.uuid4().hex))
    query = fields.pop("query", "")
    message: dict[str, object] = {
        "taskId": task_id,
        "planId": "plan-1",
        "request": {"method": "POST", "url": f"{target.url}/hook?key={task_id}{query}"},
    }
    message.update(fields)
    return message


@pytest.fixture(autouse=True)
def _no_proxy_env() -> Iterator[None]:
    # The worker must reach the local target directly, whatever the environment says.
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.lower().endswith("_proxy")}
    yield
    os.environ.update(saved)


# Ports the tests' own servers listen on are chosen below the kernel's ephemeral range (32768 and
# up by default), which every outgoing connection draws its local port from: a port picked there
# and bound a moment later by a slow-starting server (a RabbitMQ node takes seconds) may meanwhile
# have become the local end of some connection of the other test process.
PORTS = range(20000, 32000)


def _own_ports() -> Iterator[int]:
    """This test process's share of PORTS, each port once, from a random start. A port is bound
    only some time after it is handed out, so handing the same one out twice (two API processes
    of one deployment, say) or to two test processes at once must not be left to chance."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = PORTS[int(worker) :: count] if worker.isdigit() else PORTS
    start = secrets.randbelow(len(share))
    while True:
        yield from share[start:]
        yield from share[:start]


_ports = _own_ports()


def free_port() -> int:
    """A port nobody listens on or is connected from on 127.0.0.1 now, outside the ephemeral
    range, and not handed out before by this test process (see _own_ports)."""
    while True:
        port = next(_ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@dataclass
class Api:
    """`agentless run` in this process: the API at `url`, with its worker."""

    url: str
    settings: Settings
    worker: Worker


@pytest.fixture
def deadlines() -> Deadlines:
    """The API's deadlines for slow clients; a test may parametrize `deadlines` to change them."""
    return Deadlines()


@pytest_asyncio.fixture
async def api(
    settings: Settings, channel: AbstractChannel, db: asyncpg.Connection, deadlines: Deadlines
) -> AsyncIterator[Api]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    served = settings.model_copy(update={"api_port": port, "public_url": AnyUrl(url)})
    app = create_app(served, worker=True, deadlines=deadlines)
    # Served as `agentless run` serves it.
    runner = web.AppRunner(app, access_log=None, **deadlines.server_options())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        worker = app[worker_key]
        await asyncio.wait_for(worker.consumer.consuming.wait(), 10)
        yield Api(url, served, worker)
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def worker(
    settings: Settings, channel: AbstractChannel, db: asyncpg.Connection
) -> AsyncIterator[Worker]:
    """A worker running in this process for the test's duration."""
    async with running_worker(settings) as running:
        await asyncio.wait_for(running.consumer.consuming.wait(), 10)
        yield running


_RECORD = TaskRecord(
    task_id="t-1",
    plan_id="p",
    job_id="p",
    hub_name="build",
    state=State.QUEUED,
    result=None,
    reason=None,
    attempts=1,
    digest=b"",
    message="{}",
    response=None,
    outputs="{}",
    worker_id=None,
    lease_until=None,
    queued_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    started_at=None,
    completed_at=None,
    mode=Mode.API_RESPONSE,
    completed_by=None,
    deadline=None,
    reply_to=None,
    correlation_id=None,
    external_started_at=None,
    variables=None,
)


def task_record(**fields: Any) -> TaskRecord:
    """A task's row as the store reads it: `fields` over a queued apiResponse task's."""
    return replace(_RECORD, **fields)
