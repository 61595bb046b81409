"""Load on the callback API: a few hundred slow-loris clients, then 1,000 concurrent connections.
Every valid callback posted meanwhile is answered 200 and completes its task, and the slow
clients are cut off by the server's deadlines (callback_api/server.py). Each test prints the
valid callbacks' figures, quiet and under load; speed is never asserted."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import pytest
from aio_pika.abc import AbstractChannel

from callback_api.server import Deadlines
from tests.conftest import Api, Events, Target, publish
from tests.test_callbacks import callback_task
from worker.tokens import Signer, new_key

QUIET = 100  # valid callbacks with nobody else connected
LOADED = 200  # valid callbacks under load
LANES = 8  # valid callbacks in flight at once
ROUNDS = 4  # the callbacks under load are posted in rounds, a wave of abuse before each
SLOW_PER_KIND = 75  # four kinds of slow client: 300 of them
CONNECTIONS = 1000
# Short deadlines, so that the slow clients are cut off (and come back) many times in one test.
SHORT = Deadlines(idle_seconds=1, body_seconds=1)
# Far beyond either deadline: a slow connection still open this long after it opened was not cut.
CUT_OFF_SECONDS = 15
DRIP_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class Waiting:
    task_id: str
    token: str


async def waiting_tasks(
    api: Api, channel: AbstractChannel, events: Events, target: Target, count: int
) -> list[Waiting]:
    """`count` callback tasks, each brought to `waiting` by the worker; with their tokens."""
    tasks = [callback_task(target) for _ in range(count)]
    await asyncio.gather(*(publish(channel, api.settings, task) for task in tasks))
    ids = {task["taskId"] for task in tasks}
    async with asyncio.timeout(30), events.changed:
        await events.changed.wait_for(
            lambda: ids <= {e["taskId"] for e in events.named("TaskWaiting")}
        )
    return [Waiting(t["taskId"], target.headers[t["taskId"]][-1]["AuthToken"]) for t in tasks]


@dataclass
class Figures:
    """The valid callbacks of one phase: what they were answered, and how fast."""

    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, share: float) -> float:
        """Nearest rank."""
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


async def post_callbacks(api: Api, tasks: list[Waiting]) -> Figures:
    """TaskCompleted for each of `tasks`, LANES at a time, each timed as its client sees it."""
    figures = Figures()
    pending = iter(tasks)

    async def lane(session: aiohttp.ClientSession) -> None:
        for task in pending:
            body = {"name": "TaskCompleted", "taskId": task.task_id, "result": "succeeded"}
            began = time.perf_counter()
            try:
                async with session.post(
                    f"{api.url}/plans/plan-1/events",
                    json=body,
                    headers={"Authorization": f"Bearer {task.token}"},
                ) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError:
                status = 0  # no answer at all: counted, so that the figures are still printed
            figures.latencies_ms.append((time.perf_counter() - began) * 1000)
            figures.statuses[status] += 1

    connector = aiohttp.TCPConnector(limit=LANES)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(lane(session) for _ in range(LANES)))
    return figures


async def post_in_rounds(
    api: Api, tasks: list[Waiting], between: Callable[[int], Awaitable[None]]
) -> Figures:
    """`tasks` in ROUNDS equal rounds, `between(n)` awaited before round n: so that the callbacks
    are spread over the whole of the abuse, not over its first fraction of a second."""
    figures = Figures()
    for number in range(ROUNDS):
        await between(number)
        part = await post_callbacks(api, tasks[number::ROUNDS])
        figures.statuses += part.statuses
        figures.latencies_ms += part.latencies_ms
    return figures


async def check_completed(events: Events, tasks: list[Waiting]) -> int:
    """How many of `tasks` completed (each must, succeeded), once their events are in."""
    ids = {task.task_id for task in tasks}
    try:
        async with asyncio.timeout(15), events.changed:
            await events.changed.wait_for(
                lambda: ids <= {e["taskId"] for e in events.named("TaskCompleted")}
            )
    except TimeoutError:
        pass
    results = {
        e["taskId"]: e["result"] for e in events.named("TaskCompleted") if e["taskId"] in ids
    }
    assert set(results.values()) <= {"succeeded"}
    return len(results)


def report(label: str, tasks: list[Waiting], figures: Figures, completed: int) -> str:
    return (
        f"{label}: submitted {len(tasks)} / answered {figures.statuses[200]} with HTTP 200 / "
        f"completed {completed} / lost {len(tasks) - completed} / "
        f"p50 {figures.percentile(0.5):.1f} ms / p99 {figures.percentile(0.99):.1f} ms"
    )


def forged_token(task_id: str) -> str:
    return Signer(new_key()).issue(task_id, "plan-1", time.time() + 3600)


def event_request(host: str, token: str, *, length: int, body: bytes = b"") -> bytes:
    return (
        f"POST /plans/plan-1/events HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode() + body


def answered(data: bytes) -> str:
    """What the server said before it closed the connection: `closed`, or `HTTP 408, closed`."""
    if not data:
        return "closed"
    return f"HTTP {data.split(b' ', 2)[1].decode()}, closed"


async def drip(writer: asyncio.StreamWriter, request: bytes, closed: asyncio.Task[bytes]) -> None:
    """Headers one byte at a time, never finished, until the server closes the connection."""
    for byte in request:
        if closed.done():
            return
        writer.write(bytes([byte]))
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(DRIP_SECONDS)


@dataclass
class SlowClients:
    """Slow-loris clients of four kinds, each reconnecting as soon as the server cuts it off."""

    host: str
    port: int
    token: str  # a real task's token: its body is read, and never comes
    forged: str  # a forged token: refused at once, its announced body never comes either
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    opened: int = 0
    everyone_connected: asyncio.Event = field(default_factory=asyncio.Event)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def cut_off(self, count: int) -> None:
        """Wait until the server has cut off `count` slow connections in all."""
        async with asyncio.timeout(CUT_OFF_SECONDS), self.changed:
            await self.changed.wait_for(lambda: sum(self.outcomes.values()) >= count)

    async def client(self, kind: str) -> None:
        host = f"{self.host}:{self.port}"
        dripped = event_request(host, self.token, length=100)[:-2] + b"X-Slow: " + b"x" * 8000
        requests = {
            "stalled body": event_request(host, self.token, length=100),
            "stalled body, refused": event_request(host, self.forged, length=100),
        }
        while not self.stop.is_set():
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened += 1
            if self.opened >= 4 * SLOW_PER_KIND:
                self.everyone_connected.set()
            closed = asyncio.create_task(reader.read())
            try:
                if kind == "dripped headers":
                    await drip(writer, dripped, closed)
                elif kind in requests:
                    writer.write(requests[kind])
                    await writer.drain()
                outcome = answered(await asyncio.wait_for(closed, CUT_OFF_SECONDS))
            except ConnectionResetError:
                # Closed while a dripped byte was on its way: the server's side answers it with RST.
                outcome = "reset"
            except TimeoutError:
                outcome = f"still open after {CUT_OFF_SECONDS} s"
            finally:
                writer.close()
                closed.cancel()
                await asyncio.gather(closed, return_exceptions=True)
            async with self.changed:
                self.outcomes[kind, outcome] += 1
                self.changed.notify_all()

    async def run(self) -> None:
        kinds = ("idle", "dripped headers", "stalled body", "stalled body, refused")
        await asyncio.gather(*(self.client(kind) for kind in kinds for _ in range(SLOW_PER_KIND)))


@pytest.mark.parametrize("deadlines", [SHORT])
async def test_slow_loris_clients_are_cut_off_while_valid_callbacks_complete(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    tasks = await waiting_tasks(api, channel, events, target, QUIET + LOADED + 1)
    victim, quiet_tasks, loaded_tasks = tasks[0], tasks[1 : QUIET + 1], tasks[QUIET + 1 :]
    quiet = await post_callbacks(api, quiet_tasks)

    address = urlsplit(api.url)
    assert address.hostname is not None
    assert address.port is not None
    slow = SlowClients(address.hostname, address.port, victim.token, forged_token(victim.task_id))
    running = asyncio.create_task(slow.run())
    async with asyncio.timeout(15):
        await slow.everyone_connected.wait()
    # Before each round, every slow client is cut off once more (and comes back).
    loaded = await post_in_rounds(
        api, loaded_tasks, lambda number: slow.cut_off(number * 4 * SLOW_PER_KIND)
    )
    slow.stop.set()
    async with asyncio.timeout(CUT_OFF_SECONDS + 5):
        await running

    completed_quiet = await check_completed(events, quiet_tasks)
    completed_loaded = await check_completed(events, loaded_tasks)
    cut = ", ".join(
        f"{kind}: {n} x {outcome}" for (kind, outcome), n in sorted(slow.outcomes.items())
    )
    under = f"{4 * SLOW_PER_KIND} slow-loris clients"
    print(
        f"\n{report('quiet', quiet_tasks, quiet, completed_quiet)}"
        f"\n{report(under, loaded_tasks, loaded, completed_loaded)}"
        f"\nslow connections: {slow.opened} opened; {cut}"
    )
    assert quiet.statuses == Counter({200: QUIET})
    assert loaded.statuses == Counter({200: LOADED})
    assert (completed_quiet, completed_loaded) == (QUIET, LOADED)
    # Every slow connection was closed by the server: the idle ones and the dripped headers
    # without a word (a byte dripped as it closed draws a reset), a body that never came with
    # 408, an unread one after its answer.
    assert {pair for pair in slow.outcomes if pair[1] != "reset"} == {
        ("idle", "closed"),
        ("dripped headers", "closed"),
        ("stalled body", "HTTP 408, closed"),
        ("stalled body, refused", "HTTP 401, closed"),
    }
    assert {kind for kind, outcome in slow.outcomes if outcome == "reset"} <= {"dripped headers"}
    assert sum(slow.outcomes.values()) == slow.opened


async def read_answer(reader: asyncio.StreamReader) -> int:
    """One whole response off a keep-alive connection: its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(line.partition(":")[2]) for line in lines if line.lower().startswith("content-length:")
    )
    await reader.readexactly(length)
    return int(lines[0].split(" ", 2)[1])


@dataclass
class Crowd:
    """CONNECTIONS keep-alive clients, each asking something about once a second over its own
    connection until told to stop: half post forged TaskCompleted events, half ask /healthz."""

    host: str
    port: int
    forged: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    connected: int = 0
    everyone_connected: asyncio.Event = field(default_factory=asyncio.Event)
    answers: Counter[int] = field(default_factory=Counter)
    broken: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def answered(self, count: int) -> None:
        """Wait until the connections have been answered `count` times in all."""
        async with asyncio.timeout(30), self.changed:
            await self.changed.wait_for(lambda: sum(self.answers.values()) >= count)

    async def client(self, number: int) -> None:
        host = f"{self.host}:{self.port}"
        body = b'{"name": "TaskCompleted", "taskId": "t", "result": "succeeded"}'
        request = (
            event_request(host, self.forged, length=len(body), body=body)
            if number % 2
            else f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        reader, writer = await asyncio.open_connection(self.host, self.port)
        counted = False
        try:
            while True:
                writer.write(request)
                status = await read_answer(reader)
                async with self.changed:
                    self.answers[status] += 1
                    self.changed.notify_all()
                if not counted:
                    counted = True
                    self.connected += 1
                    if self.connected == CONNECTIONS:
                        self.everyone_connected.set()
                if self.stop.is_set():
                    return
                await asyncio.sleep(random.uniform(0.5, 1.5))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.broken[type(exc).__name__] += 1
        finally:
            writer.close()

    async def run(self) -> None:
        await asyncio.gather(*(self.client(number) for number in range(CONNECTIONS)))


async def test_1000_concurrent_connections_while_valid_callbacks_complete(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    tasks = await waiting_tasks(api, channel, events, target, QUIET + LOADED)
    quiet_tasks, loaded_tasks = tasks[:QUIET], tasks[QUIET:]
    quiet = await post_callbacks(api, quiet_tasks)

    address = urlsplit(api.url)
    assert address.hostname is not None
    assert address.port is not None
    crowd = Crowd(address.hostname, address.port, forged_token(quiet_tasks[0].task_id))
    running = asyncio.create_task(crowd.run())
    async with asyncio.timeout(30):
        await crowd.everyone_connected.wait()
    # Before each round, about one more request from every connection (about a second).
    loaded = await post_in_rounds(
        api,
        loaded_tasks,
        lambda number: crowd.answered(sum(crowd.answers.values()) + CONNECTIONS),
    )
    crowd.stop.set()
    async with asyncio.timeout(15):
        await running

    completed_quiet = await check_completed(events, quiet_tasks)
    completed_loaded = await check_completed(events, loaded_tasks)
    print(
        f"\n{report('quiet', quiet_tasks, quiet, completed_quiet)}"
        f"\n{report(f'{CONNECTIONS:,} connections', loaded_tasks, loaded, completed_loaded)}"
        f"\nthe {CONNECTIONS:,} connections' requests: "
        + ", ".join(f"{n} x HTTP {status}" for status, n in sorted(crowd.answers.items()))
        + f"; connections broken: {sum(crowd.broken.values())}"
    )
    assert quiet.statuses == Counter({200: QUIET})
    assert loaded.statuses == Counter({200: LOADED})
    assert (completed_quiet, completed_loaded) == (QUIET, LOADED)
    # Every one of the connections was answered every time, and none was dropped.
    assert set(crowd.answers) == {200, 401}
    assert crowd.broken == Counter()
