"""Metrics that tell the truth: every completion counted once, by the process that made it and
with whose word completed it; the deployment's gauges from the API alone; the API alone sweeps
deadlines."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import asyncpg
from aio_pika.abc import AbstractChannel
from prometheus_client.parser import text_string_to_metric_families
from pydantic import AnyUrl

from tests import processes
from tests.callbacks import callback_task, post, waiting
from tests.conftest import Api, Events, Target, free_port, publish, task_message
from tests.processes import wait_until_ready
from tests.task_api import call
from worker import __version__
from worker.contract.settings import Settings
from worker.service import running_worker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    headers = {} if accept is None else {"Accept": accept}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        assert response.status == 200
        return response.headers["Content-Type"], await response.text()


async def samples(url: str) -> Samples:
    _, text = await scrape(url)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def completions(found: Samples, by: str, mode: str, result: str) -> float | None:
    return value(
        found, "agentless_tasks_completed_total", completed_by=by, mode=mode, result=result
    )


async def test_each_completion_is_counted_once_with_whose_word_made_it(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    metrics = f"{api.url}/metrics"
    failing = task_message(target, query="&status=500")
    await publish(channel, api.settings, failing)
    await events.completed(str(failing["taskId"]))

    answered, headers = await waiting(api, channel, events, target)
    canceled, _ = await waiting(api, channel, events, target)
    timing_out, _ = await waiting(api, channel, events, target, timeoutSeconds=1)
    found = await samples(metrics)
    assert value(found, "agentless_tasks", state="waiting") in (2.0, 3.0)
    assert (value(found, "agentless_oldest_waiting_task_age_seconds") or 0) > 0
    assert value(found, "agentless_tasks", state="queued") == 0.0
    assert value(found, "agentless_oldest_queued_task_age_seconds") == 0.0

    body = {"name": "TaskCompleted", "taskId": answered["taskId"], "result": "succeeded"}
    status, _, _ = await post(f"{api.url}/plans/plan-1/events", body, headers["AuthToken"])
    assert status == 200
    status, _, _ = await call("POST", f"{api.url}/tasks/{canceled['taskId']}/cancel")
    assert status == 200
    for task in (answered, canceled, timing_out):
        await events.completed(task["taskId"])

    found = await samples(metrics)
    assert completions(found, "worker", "apiResponse", "failed") == 1.0
    assert completions(found, "callback", "callback", "succeeded") == 1.0
    assert completions(found, "cancel", "callback", "canceled") == 1.0
    assert completions(found, "deadline", "callback", "failed") == 1.0
    total = sum(v for (name, _), v in found.items() if name == "agentless_tasks_completed_total")
    assert total == 4.0
    assert value(found, "agentless_task_duration_seconds_count", mode="callback") == 3.0
    assert value(found, "agentless_task_wait_duration_seconds_count", mode="callback") == 3.0
    assert value(found, "agentless_task_wait_duration_seconds_count", mode="apiResponse") is None
    assert value(found, "agentless_tasks", state="waiting") == 0.0
    assert value(found, "agentless_tasks_overdue") == 0.0
    assert value(found, "agentless_workers") == 1.0
    assert value(found, "agentless_queue_messages", queue="tasks") == 0.0
    assert value(found, "agentless_dependency_up", dependency="broker") == 1.0
    assert value(found, "agentless_dependency_up", dependency="database") == 1.0
    assert value(found, "agentless_build_info", version=__version__, python=_python(found)) == 1.0
    assert (value(found, "process_resident_memory_bytes") or 0) > 0


def _python(found: Samples) -> str:
    (labels,) = (dict(labels) for name, labels in found if name == "agentless_build_info")
    return labels["python"]


async def test_openmetrics_when_the_scraper_asks_for_it(api: Api) -> None:
    kind, text = await scrape(
        f"{api.url}/metrics", "application/openmetrics-text; version=1.0.0; charset=utf-8"
    )
    assert kind.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    kind, text = await scrape(f"{api.url}/metrics")
    assert kind.startswith("text/plain")
    assert "# TYPE agentless_tasks_completed_total counter" in text


async def test_an_api_alone_sweeps_deadlines_and_counts_them(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
) -> None:
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    served = settings.model_copy(update={"public_url": AnyUrl(api_url)})
    task = callback_task(target, timeoutSeconds=3)
    async with running_worker(served) as worker:
        await asyncio.wait_for(worker.consumer.consuming.wait(), 10)
        await publish(channel, settings, task)
        async with asyncio.timeout(10), events.changed:
            await events.changed.wait_for(lambda: bool(events.named("TaskWaiting", task["taskId"])))
    # No worker runs from here on: the deadline is the API's to keep.
    child = await processes.start(
        settings, "api", AGENTLESS_API_PORT=str(port), AGENTLESS_PUBLIC_URL=api_url
    )
    try:
        await wait_until_ready(f"{api_url}/readyz", child)
        event = await events.completed(task["taskId"])
        assert (event["result"], event["reason"]) == ("failed", "timed out waiting for callback")
        found = await samples(f"{api_url}/metrics")
        assert completions(found, "deadline", "callback", "failed") == 1.0
        assert value(found, "agentless_workers") == 0.0
    finally:
        child.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(child.process.wait(), 30) == 0, child.logs()
