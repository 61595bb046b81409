"""`agentless run` and the worker's own port, as an operator probes them."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import asyncpg
from aio_pika.abc import AbstractChannel

from tests import processes
from tests.conftest import Events, Target, free_port, publish, task_message
from tests.processes import wait_until_ready
from worker.contract.settings import Settings


async def test_run_serves_health_and_runs_tasks_until_sigterm(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
) -> None:
    port = free_port()
    child = await processes.start(settings, "run", AGENTLESS_API_PORT=str(port))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        await wait_until_ready(f"{base}/readyz", child)
        async with session.get(f"{base}/healthz") as response:
            assert (response.status, await response.json()) == (200, {"status": "ok"})
        async with session.get(f"{base}/readyz") as response:
            assert (response.status, await response.json()) == (200, {"status": "ready"})
    task = task_message(target)
    await publish(channel, settings, task)
    assert (await events.completed(str(task["taskId"])))["result"] == "succeeded"
    child.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(child.process.wait(), 30) == 0, child.logs()


async def test_worker_port_serves_metrics_health_and_readiness(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
) -> None:
    port = free_port()
    child = await processes.start(settings, "worker", AGENTLESS_WORKER_PORT=str(port))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        await wait_until_ready(f"{base}/readyz", child)
        task = task_message(target, query="&status=500")
        await publish(channel, settings, task)
        await events.completed(str(task["taskId"]))
        await publish(channel, settings, b"not json")
        async with asyncio.timeout(10):
            while True:
                async with session.get(f"{base}/metrics") as response:
                    assert response.status == 200
                    text = await response.text()
                if 'agentless_dead_letters_total{reason="invalid"} 1.0' in text:
                    break
                await asyncio.sleep(0.1)
        completed = 'completed_by="worker",mode="apiResponse",result="failed"'
        assert f"agentless_tasks_completed_total{{{completed}}} 1.0" in text
        # What belongs to no process is the API's to export, never a false 0 from each worker.
        assert "agentless_tasks{" not in text
        assert "agentless_oldest_waiting_task_age_seconds" not in text
        assert 'agentless_dependency_up{dependency="database"} 1.0' in text
        assert "agentless_tasks_received_total 2.0" in text
        assert "agentless_invocation_duration_seconds_count 1.0" in text
        async with session.get(f"{base}/healthz") as response:
            assert response.status == 200
    child.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(child.process.wait(), 30) == 0, child.logs()


async def test_api_refuses_to_listen_beyond_loopback_without_tokens(settings: Settings) -> None:
    code, _, err = await processes.run(settings, "api", AGENTLESS_API_HOST="0.0.0.0")
    assert code == 2
    assert "AGENTLESS_API_TOKENS is empty: set tokens, or listen on 127.0.0.1" in err


async def test_api_tokens_guard_the_task_api(
    settings: Settings, channel: AbstractChannel, db: asyncpg.Connection
) -> None:
    port = free_port()
    child = await processes.start(
        settings, "api", AGENTLESS_API_PORT=str(port), AGENTLESS_API_TOKENS="tok-one,tok-two"
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_until_ready(f"{base}/readyz", child)
        async with aiohttp.ClientSession() as session:
            for headers, status in [
                ({}, 401),
                ({"Authorization": "Bearer tok-three"}, 401),
                ({"Authorization": "Basic dG9rLW9uZQ=="}, 401),
                ({"Authorization": "Basic OnRvay1vbmU="}, 404),
                ({"Authorization": "Bearer tok-two"}, 404),
            ]:
                async with session.post(f"{base}/tasks/nope/cancel", headers=headers) as response:
                    assert response.status == status
                    assert response.content_type == "application/problem+json"
    finally:
        child.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(child.process.wait(), 20) == 0, child.logs()
