"""Load on the callback API: a few hundred slow-loris clients, then 1,000 concurrent connections.
Every valid callback posted meanwhile is answered 200 and completes its task, and the slow
clients are cut off by the server's deadlines (callback_api/server.py). Each test prints the
valid callbacks' figures, quiet and under load; speed is never asserted."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import pytest
from aio_pika.abc import AbstractChannel

from callback_api.server import Deadlines
from tests.abusers import SLOW_KINDS, Crowd, SlowClients
from tests.callbacks import callback_task
from tests.conftest import Api, Events, Target, publish
from worker.contract.tokens import Signer, new_key

QUIET = 100  # valid callbacks with nobody else connected
LOADED = 200  # valid callbacks under load
LANES = 8  # valid callbacks in flight at once
ROUNDS = 4  # the callbacks under load are posted in rounds, a wave of abuse before each
SLOW_PER_KIND = 75  # four kinds of slow client (tests/abusers.py): 300 of them
CONNECTIONS = 1000
# Short deadlines, so that the slow clients are cut off (and come back) many times in one test.
SHORT = Deadlines(idle_seconds=1, body_seconds=1)
# Far beyond either deadline: a slow connection still open this long after it opened was not cut.
CUT_OFF_SECONDS = 15


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
    slow = SlowClients(
        address.hostname,
        address.port,
        victim.token,
        forged_token(victim.task_id),
        per_kind=SLOW_PER_KIND,
        give_up_seconds=CUT_OFF_SECONDS,
    )
    running = asyncio.create_task(slow.run())
    async with asyncio.timeout(15):
        await slow.everyone_connected.wait()
    # Before each round, every slow client is cut off once more (and comes back).
    loaded = await post_in_rounds(
        api, loaded_tasks, lambda number: slow.cut_off(number * len(SLOW_KINDS) * SLOW_PER_KIND)
    )
    slow.stop.set()
    async with asyncio.timeout(CUT_OFF_SECONDS + 5):
        await running

    completed_quiet = await check_completed(events, quiet_tasks)
    completed_loaded = await check_completed(events, loaded_tasks)
    cut = ", ".join(
        f"{kind}: {n} x {outcome}" for (kind, outcome), n in sorted(slow.outcomes.items())
    )
    under = f"{len(SLOW_KINDS) * SLOW_PER_KIND} slow-loris clients"
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


async def test_1000_concurrent_connections_while_valid_callbacks_complete(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    tasks = await waiting_tasks(api, channel, events, target, QUIET + LOADED)
    quiet_tasks, loaded_tasks = tasks[:QUIET], tasks[QUIET:]
    quiet = await post_callbacks(api, quiet_tasks)

    address = urlsplit(api.url)
    assert address.hostname is not None
    assert address.port is not None
    crowd = Crowd(address.hostname, address.port, forged_token(quiet_tasks[0].task_id), CONNECTIONS)
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
