"""Network faults, made by a TCP proxy (tests/proxy.py) between the worker and its endpoint, and
between the worker and RabbitMQ: latency, connections reset mid-response, black holes. A task
fails with a reason that says what happened, or completes once; nothing waits past its timeout;
and a worker cut off from its broker reconnects and consumes again by itself."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import asyncpg
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel
from yarl import URL

from tests import processes
from tests.conftest import Events, Target, free_port, publish, task_message
from tests.processes import wait_until_ready
from tests.proxy import Proxy
from worker.contract.settings import Settings
from worker.service import Worker

RESPONSE_TIMEOUT = 2
# The AMQP heartbeat of a worker behind the broker proxy, in seconds: short, so that a black hole
# is noticed within the test's time (the worker drops a connection whose broker leaves its probe
# unanswered for a heartbeat).
HEARTBEAT = 1
# Tasks queued to a worker whose broker connections fail in the middle of the run.
BROKER_TASKS = 300


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"response_timeout": RESPONSE_TIMEOUT})


@pytest_asyncio.fixture
async def endpoint(target: Target) -> AsyncIterator[Proxy]:
    """A proxy in front of the test target."""
    url = URL(target.url)
    assert url.host is not None
    assert url.port is not None
    async with Proxy(url.host, url.port) as proxy:
        yield proxy


@dataclass(frozen=True)
class Figures:
    submitted: int
    completed: int
    duplicate_results: int
    duplicate_events: int

    @property
    def lost(self) -> int:
        return self.submitted - self.completed


def tally(scenario: str, submitted: Iterable[str], events: Events, **more: object) -> Figures:
    """What became of the submitted tasks, by their TaskCompleted events; printed."""
    wanted = set(submitted)
    results: dict[str, set[object]] = defaultdict(set)
    count: Counter[str] = Counter()
    for event in events.named("TaskCompleted"):
        task_id = str(event["taskId"])
        if task_id in wanted:
            results[task_id].add(event["result"])
            count[task_id] += 1
    figures = Figures(
        submitted=len(wanted),
        completed=len(results),
        duplicate_results=sum(1 for found in results.values() if len(found) > 1),
        duplicate_events=sum(count.values()) - len(count),
    )
    extra = "".join(f" / {name.replace('_', ' ')} {value}" for name, value in more.items())
    print(
        f"\n{scenario}: submitted {figures.submitted} / completed {figures.completed} / "
        f"lost {figures.lost} / duplicate results {figures.duplicate_results} / "
        f"duplicate events {figures.duplicate_events}{extra}"
    )
    return figures


async def rows_of(db: asyncpg.Connection, task_ids: Iterable[str]) -> dict[str, asyncpg.Record]:
    rows = await db.fetch(
        "SELECT task_id, state, result, reason, attempts FROM tasks WHERE task_id = ANY($1)",
        list(task_ids),
    )
    return {row["task_id"]: row for row in rows}


async def submit_through(
    channel: AbstractChannel,
    settings: Settings,
    proxy: Proxy,
    count: int,
    body: str | None = None,
    retry: dict[str, object] | None = None,
) -> list[str]:
    """Queue `count` tasks whose endpoint is the test target behind `proxy`; their ids."""
    run = uuid.uuid4().hex[:6]
    task_ids = [f"n-{run}-{i}" for i in range(count)]
    for task_id in task_ids:
        request: dict[str, object] = {"url": f"http://{proxy.address}/hook?key={task_id}"}
        if body is not None:
            request["body"] = body
        task: dict[str, object] = {"taskId": task_id, "planId": "plan-net", "request": request}
        if retry is not None:
            task["retry"] = retry
        await publish(channel, settings, task)
    return task_ids


async def all_completed(events: Events, task_ids: Iterable[str], timeout: float) -> None:
    wanted = set(task_ids)
    async with asyncio.timeout(timeout), events.changed:
        await events.changed.wait_for(
            lambda: wanted <= {str(e["taskId"]) for e in events.named("TaskCompleted")}
        )


# Worker ↔ endpoint: an in-process worker whose tasks call the target through the proxy.


async def test_endpoint_latency_slows_tasks_that_still_succeed(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    db: asyncpg.Connection,
    endpoint: Proxy,
) -> None:
    endpoint.latency = 0.1
    task_ids = await submit_through(channel, settings, endpoint, 20)
    await all_completed(events, task_ids, timeout=15)

    figures = tally("endpoint latency 100 ms per chunk", task_ids, events)
    assert (figures.lost, figures.duplicate_results) == (0, 0)
    rows = await rows_of(db, task_ids)
    assert {(r["state"], r["result"], r["reason"]) for r in rows.values()} == {
        ("completed", "succeeded", "HTTP 200")
    }
    # Both ways delayed: the request, then the response.
    responses = [e["response"] for e in events.named("TaskCompleted")]
    elapsed = [r["elapsedMs"] for r in responses if isinstance(r, dict)]
    assert len(elapsed) == len(task_ids)
    assert min(elapsed) >= 200, elapsed


async def test_endpoint_reset_mid_body_fails_the_task_with_the_reset(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    db: asyncpg.Connection,
    endpoint: Proxy,
    target: Target,
) -> None:
    # The target echoes the request body: 4 KB of it make a response that is reset after its
    # headers and the first part of its body.
    endpoint.reset_after = 1000
    task_ids = await submit_through(channel, settings, endpoint, 20, body="x" * 4096)
    await all_completed(events, task_ids, timeout=15)

    figures = tally("endpoint reset mid-body", task_ids, events, connections_reset=endpoint.resets)
    assert (figures.lost, figures.duplicate_results) == (0, 0)
    reason = f"connection reset by {endpoint.address} before the response was complete"
    rows = await rows_of(db, task_ids)
    assert {(r["state"], r["result"], r["reason"]) for r in rows.values()} == {
        ("completed", "failed", reason)
    }
    assert {e["reason"] for e in events.named("TaskCompleted")} == {reason}
    assert all(target.calls[task_id] == 1 for task_id in task_ids)
    assert endpoint.resets == len(task_ids)


async def test_a_task_with_retries_survives_a_reset_mid_body(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    db: asyncpg.Connection,
    endpoint: Proxy,
    target: Target,
) -> None:
    endpoint.reset_after = 1000
    task_ids = await submit_through(
        channel, settings, endpoint, 20, body="x" * 4096, retry={"attempts": 3, "delaySeconds": 1}
    )
    async with asyncio.timeout(10):
        while endpoint.resets < len(task_ids):
            await asyncio.sleep(0.05)
    # The path heals before the retries are due.
    endpoint.reset_after = None
    await all_completed(events, task_ids, timeout=15)

    figures = tally("endpoint reset mid-body, tasks with retry", task_ids, events)
    assert (figures.lost, figures.duplicate_results) == (0, 0)
    rows = await rows_of(db, task_ids)
    assert {(r["result"], r["attempts"]) for r in rows.values()} == {("succeeded", 2)}
    assert all(target.calls[task_id] == 2 for task_id in task_ids)


async def test_black_holed_endpoint_fails_the_task_at_the_response_timeout(
    worker: Worker,
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    db: asyncpg.Connection,
    endpoint: Proxy,
) -> None:
    # A first task leaves a kept-alive connection in the worker's pool: the black hole swallows
    # both that one and the new ones.
    warm = await submit_through(channel, settings, endpoint, 1)
    await all_completed(events, warm, timeout=10)
    endpoint.black_hole()
    started = time.monotonic()
    task_ids = await submit_through(channel, settings, endpoint, 10)
    # Completing at all is the point: nothing waits on a silent endpoint past the timeout.
    await all_completed(events, task_ids, timeout=RESPONSE_TIMEOUT + 10)
    took = time.monotonic() - started
    held = endpoint.connections
    endpoint.lift()
    after = await submit_through(channel, settings, endpoint, 1)
    await all_completed(events, after, timeout=10)

    figures = tally(
        "endpoint black-holed",
        task_ids,
        events,
        seconds_to_complete_all=f"{took:.1f}",
        connections_held=held,
    )
    assert (figures.lost, figures.duplicate_results) == (0, 0)
    reason = f"no complete response within {RESPONSE_TIMEOUT} s"
    rows = await rows_of(db, [*warm, *task_ids, *after])
    assert [rows[t]["result"] for t in (*warm, *after)] == ["succeeded", "succeeded"]
    assert {(rows[t]["state"], rows[t]["result"], rows[t]["reason"]) for t in task_ids} == {
        ("completed", "failed", reason)
    }
    assert held >= 1


# Worker ↔ broker: a worker process whose AMQP connection goes through the proxy.

Fault = Callable[[Proxy], Awaitable[str]]


async def run_through_broker_fault(
    scenario: str,
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
    fault: Fault,
) -> None:
    """Queue BROKER_TASKS tasks to a worker process behind a broker proxy; apply `fault` once a
    third of them have completed; then every task must complete once, with its event, and the
    same process must take new tasks."""
    amqp = URL(settings.amqp_url)
    assert amqp.host is not None
    assert amqp.port is not None
    async with Proxy(amqp.host, amqp.port) as broker:
        proxied_url = amqp.with_host(broker.host).with_port(broker.port)
        proxied = settings.model_copy(
            update={"amqp_url": str(proxied_url.update_query(heartbeat=HEARTBEAT))}
        )
        port = free_port()
        child = await processes.start(proxied, "worker", AGENTLESS_WORKER_PORT=str(port))
        try:
            await wait_until_ready(f"http://127.0.0.1:{port}/readyz", child)
            run = uuid.uuid4().hex[:6]
            task_ids = [f"b-{run}-{i}" for i in range(BROKER_TASKS)]
            for task_id in task_ids:
                # 50 ms at the endpoint: at the worker's concurrency, the run lasts a while.
                await publish(
                    channel, settings, task_message(target, taskId=task_id, query="&delay=0.05")
                )
            await events.completed_count(BROKER_TASKS // 3, timeout=30)
            what = await fault(broker)
            # Well within the lease (the response timeout + 30 s) after which a task whose attempt
            # was abandoned would be taken over: the attempts in flight went on.
            await all_completed(events, task_ids, timeout=20)
            # The same process consumes again: new tasks complete.
            later = [f"b-{run}-later-{i}" for i in range(10)]
            for task_id in later:
                await publish(channel, settings, task_message(target, taskId=task_id))
            await all_completed(events, later, timeout=15)
            assert child.process.returncode is None
        finally:
            child.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(child.process.wait(), 30)
        logs = child.logs()

    submitted = [*task_ids, *later]
    rows = await rows_of(db, submitted)
    figures = tally(
        scenario,
        submitted,
        events,
        fault=what,
        broker_connections_made=broker.accepted,
        attempts_rerun=sum(1 for r in rows.values() if r["attempts"] > 1),
    )
    assert len(rows) == len(submitted)
    assert {(r["state"], r["result"]) for r in rows.values()} == {("completed", "succeeded")}
    assert (figures.lost, figures.duplicate_results) == (0, 0)
    assert {r["attempts"] for r in rows.values()} == {1}
    assert child.process.returncode == 0, logs[-3000:]
    assert "broker connection re-established" in logs


async def test_broker_connections_reset_mid_run(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
) -> None:
    async def reset_all(broker: Proxy) -> str:
        made = broker.accepted
        cut = broker.cut()
        # Noticed at once: the worker opens a new connection.
        async with asyncio.timeout(10):
            await broker.accepted_at_least(made + 1)
        return f"{cut} connections reset"

    await run_through_broker_fault(
        "broker connections reset", settings, channel, db, events, target, reset_all
    )


async def test_broker_black_holed_mid_run(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
) -> None:
    async def black_hole(broker: Proxy) -> str:
        made = broker.accepted
        started = time.monotonic()
        broker.black_hole()
        # The worker hears nothing, not even a close: its own probe finds the broker silent, and
        # it opens a new connection (held by the black hole, too, until it is lifted).
        async with asyncio.timeout(20):
            await broker.accepted_at_least(made + 1)
        reconnecting = time.monotonic() - started
        broker.lift()
        return f"reconnecting {reconnecting:.1f} s into the black hole"

    await run_through_broker_fault(
        "broker black-holed", settings, channel, db, events, target, black_hole
    )
