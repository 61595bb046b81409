"""Clocks that disagree: a worker and an API whose clocks are five minutes off PostgreSQL's, one
ahead and one behind. PostgreSQL's clock is the reference: deadlines are counted and swept by it,
and token expiry is checked against it, so callbacks just before a deadline are accepted, those
just after are told it passed, tokens are never refused while their tasks wait, and deadlines
fire within 2 s of the database's time.

The skew is real: each child process runs under libfaketime, which offsets the wall clock it
reads (its monotonic clock is left alone, so its timers run true).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import sysconfig
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel
from aiohttp import web

from tests import processes
from tests.callbacks import post
from tests.conftest import Events, free_port, publish
from tests.poll_target import JobService, poll_task
from tests.processes import Child, wait_until_ready
from tests.task_api import call
from worker.contract.settings import Settings

SKEW_SECONDS = 300
# Short deadlines, so that the whole test takes seconds: long enough to post before one.
DEADLINE_SECONDS = 6
SWEPT_DEADLINE_SECONDS = 4
POLL_DEADLINE_SECONDS = 3
# Further away than the skew: a token for it must never be refused as expired.
FAR_DEADLINE_SECONDS = 900
# How far after its deadline, by the database's clock, a task may be failed.
DEADLINE_TOLERANCE = timedelta(seconds=2)


def _faketime_library() -> str | None:
    """libfaketime's multithreaded build, where Debian's `faketime` package puts it."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for lib in (f"/usr/lib/{multiarch}", "/usr/lib", "/usr/local/lib"):
        path = Path(lib, "faketime", "libfaketimeMT.so.1")
        if path.exists():
            return str(path)
    return None


def skewed(library: str, seconds: int) -> dict[str, str]:
    """The environment that sets a child's wall clock `seconds` off the true time."""
    return {
        "LD_PRELOAD": library,
        "FAKETIME": f"{seconds:+d}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


@pytest.fixture(scope="module")
def faketime() -> str:
    library = _faketime_library()
    if library is None:
        pytest.skip("libfaketime is not installed (Debian: apt-get install faketime)")
    env = os.environ | skewed(library, SKEW_SECONDS)
    said = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if said.returncode != 0 or abs(float(said.stdout) - time.time() - SKEW_SECONDS) > 5:
        pytest.skip(f"libfaketime does not offset this Python's clock: {said.stderr.strip()}")
    return library


@dataclass
class Endpoint:
    """Callback services that answer at once and report nothing by themselves; they keep the
    headers of each invocation and the body of each cancelRequest."""

    url: str = ""
    invoked: dict[str, dict[str, str]] = field(default_factory=dict)
    cancelled: dict[str, dict[str, Any]] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.Response:
        key = request.query["key"]
        async with self.changed:
            if request.path == "/cancel":
                self.cancelled[key] = await request.json()
            else:
                self.invoked[key] = dict(request.headers)
            self.changed.notify_all()
        return web.json_response({"status": "accepted"})

    async def cancel_body(self, key: str) -> dict[str, Any]:
        async with asyncio.timeout(15), self.changed:
            await self.changed.wait_for(lambda: key in self.cancelled)
        return self.cancelled[key]


@pytest_asyncio.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    served = Endpoint()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", served.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    served.url = f"http://127.0.0.1:{port}"
    yield served
    await runner.cleanup()


def _clock_offsets(child: Child) -> list[float]:
    """The offsets from PostgreSQL's clock that the child said it measured."""
    return [
        float(orjson.loads(line)["clockOffsetSeconds"])
        for line in child.logs().splitlines()
        if "clockOffsetSeconds" in line
    ]


@pytest.mark.parametrize(
    ("worker_skew", "api_skew"),
    [(-SKEW_SECONDS, SKEW_SECONDS), (SKEW_SECONDS, -SKEW_SECONDS)],
    ids=["worker-behind-api-ahead", "worker-ahead-api-behind"],
)
async def test_the_database_clock_decides_deadlines_and_token_expiry(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    endpoint: Endpoint,
    faketime: str,
    worker_skew: int,
    api_skew: int,
) -> None:
    port, worker_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{port}"
    env = {"AGENTLESS_API_PORT": str(port), "AGENTLESS_PUBLIC_URL": api_url}
    api = await processes.start(settings, "api", **env, **skewed(faketime, api_skew))
    worker = await processes.start(
        settings,
        "worker",
        **env,
        AGENTLESS_WORKER_PORT=str(worker_port),
        **skewed(faketime, worker_skew),
    )
    try:
        await wait_until_ready(f"{api_url}/readyz", api)
        await wait_until_ready(f"http://127.0.0.1:{worker_port}/readyz", worker)
        async with (
            JobService().serving() as jobs,
            # The cases read the database side by side.
            asyncpg.create_pool(settings.database_url, min_size=1, max_size=5) as pool,
        ):
            lateness = await _run_tasks(api_url, channel, pool, events, endpoint, jobs, settings)
    finally:
        for child in (worker, api):
            child.process.terminate()
        for child in (worker, api):
            await asyncio.wait_for(child.process.wait(), 30)
    # Each process saw its own clock off by the skew, and followed PostgreSQL's.
    measured = {"worker": _clock_offsets(worker), "api": _clock_offsets(api)}
    assert [round(o / 10) * 10 for o in measured["worker"][:1]] == [-worker_skew]
    assert [round(o / 10) * 10 for o in measured["api"][:1]] == [-api_skew]
    print(
        f"\nworker clock {worker_skew:+d} s, API clock {api_skew:+d} s; offsets measured "
        f"{measured}; deadlines fired after the database's deadline by "
        + ", ".join(f"{name} {late.total_seconds() * 1000:.0f} ms" for name, late in lateness)
    )


async def _run_tasks(
    api_url: str,
    channel: AbstractChannel,
    db: asyncpg.Pool,
    events: Events,
    endpoint: Endpoint,
    jobs: JobService,
    settings: Settings,
) -> list[tuple[str, timedelta]]:
    """Queue the cases' tasks at once and check each; how late each swept deadline fired."""

    def callback(key: str, timeout: int, **fields: object) -> dict[str, object]:
        return {
            "taskId": key,
            "planId": "plan-skew",
            "waitForCompletion": "callback",
            "timeoutSeconds": timeout,
            "request": {"method": "POST", "url": f"{endpoint.url}/jobs?key={key}"},
            **fields,
        }

    cancel = {
        "method": "POST",
        "url": f"{endpoint.url}/cancel?key=swept",
        "body": {"token": "$(system.AccessToken)"},
    }
    poll = poll_task(jobs, script="running", timeoutSeconds=POLL_DEADLINE_SECONDS)
    for task in (
        callback("before", DEADLINE_SECONDS),
        callback("after", DEADLINE_SECONDS),
        callback("far", FAR_DEADLINE_SECONDS),
        callback("swept", SWEPT_DEADLINE_SECONDS, cancelRequest=cancel),
        poll,
    ):
        await publish(channel, settings, task)
    waiting = ("before", "after", "far", "swept", poll["taskId"])
    async with asyncio.timeout(15), events.changed:
        await events.changed.wait_for(
            lambda: all(events.named("TaskWaiting", key) for key in waiting)
        )
    rows = {
        row["task_id"]: row
        for row in await db.fetch(
            "SELECT task_id, started_at, waiting_since, deadline FROM tasks"
            " WHERE task_id = ANY($1::text[])",
            list(waiting),
        )
    }
    # Every deadline is counted by the database's clock: from the attempt's start for a callback
    # task, from when its polling began for a poll task.
    assert {key: row["deadline"] - row["started_at"] for key, row in rows.items()} | {
        poll["taskId"]: rows[poll["taskId"]]["deadline"] - rows[poll["taskId"]]["waiting_since"]
    } == {
        "before": timedelta(seconds=DEADLINE_SECONDS),
        "after": timedelta(seconds=DEADLINE_SECONDS),
        "far": timedelta(seconds=FAR_DEADLINE_SECONDS),
        "swept": timedelta(seconds=SWEPT_DEADLINE_SECONDS),
        poll["taskId"]: timedelta(seconds=POLL_DEADLINE_SECONDS),
    }
    before, after, far, swept, polled = await asyncio.gather(
        _completed_at(api_url, db, endpoint, rows["before"]["deadline"], timedelta(seconds=-1)),
        _completed_at(api_url, db, endpoint, rows["after"]["deadline"], timedelta(seconds=1)),
        _far(api_url, endpoint),
        _swept(api_url, db, events, endpoint),
        _late(db, events, poll["taskId"]),
    )
    assert (before, after, far) == (
        (200, "completed", "succeeded"),
        (409, "after", "timed out waiting for callback"),
        [200, 200, 200],
    )
    return [("callback", swept), ("poll", polled)]


async def _sleep_until(db: asyncpg.Pool, when: datetime) -> None:
    """Sleep until `when` by the database's clock."""
    now: datetime = await db.fetchval("SELECT clock_timestamp()")
    await asyncio.sleep(max((when - now).total_seconds(), 0))


async def _completed_at(
    api_url: str, db: asyncpg.Pool, endpoint: Endpoint, deadline: datetime, by: timedelta
) -> tuple[int, str, str]:
    """TaskCompleted posted `by` after the deadline (before it, if negative): the status, and
    the task's state and result, or the key and the reason the API gave."""
    await _sleep_until(db, deadline + by)
    key = "before" if by < timedelta(0) else "after"
    headers = endpoint.invoked[key]
    body = {"name": "TaskCompleted", "taskId": key, "result": "succeeded"}
    status, answer, _ = await post(f"{api_url}/plans/plan-skew/events", body, headers["AuthToken"])
    if status == 200:
        return status, answer["state"], answer["result"]
    detail = str(answer["detail"])
    return status, key, detail.split(f"{key!r} ", 1)[1].split(" at ", 1)[0]


def _records_url(headers: dict[str, str]) -> str:
    return (
        f"{headers['PlanUrl']}/{headers['ProjectId']}/_apis/distributedtask/hubs/"
        f"{headers['HubName']}/plans/{headers['PlanId']}/timelines/{headers['TimelineId']}/records"
    )


async def _far(api_url: str, endpoint: Endpoint) -> list[int]:
    """A task whose deadline is further off than the clocks disagree: its token is taken for
    reading, for TaskStarted and for TaskCompleted."""
    headers = endpoint.invoked["far"]
    auth = {"Authorization": f"Bearer {headers['AuthToken']}"}
    read, _, _ = await call("GET", _records_url(headers), headers=auth)
    url = f"{api_url}/plans/plan-skew/events"
    started, _, _ = await post(url, {"name": "TaskStarted", "taskId": "far"}, headers["AuthToken"])
    body = {"name": "TaskCompleted", "taskId": "far", "result": "succeeded"}
    completed, _, _ = await post(url, body, headers["AuthToken"])
    return [read, started, completed]


async def _swept(api_url: str, db: asyncpg.Pool, events: Events, endpoint: Endpoint) -> timedelta:
    """The task left to its deadline: it fails on time, and the token its cancelRequest carries
    is still good for reading the task (it expires by the database's clock, too)."""
    late = await _late(db, events, "swept")
    body = await endpoint.cancel_body("swept")
    auth = {"Authorization": f"Bearer {body['token']}"}
    status, found, _ = await call("GET", _records_url(endpoint.invoked["swept"]), headers=auth)
    assert (status, [r["result"] for r in found.get("value", [])]) == (200, ["failed"]), found
    return late


async def _late(db: asyncpg.Pool, events: Events, task_id: str) -> timedelta:
    """How long after its deadline, by the database's clock, the task was failed."""
    event = await events.completed(task_id, timeout=20)
    assert event["result"] == "failed"
    row = await db.fetchrow(
        "SELECT completed_by, deadline, completed_at FROM tasks WHERE task_id = $1", task_id
    )
    assert row is not None
    late: timedelta = row["completed_at"] - row["deadline"]
    assert (row["completed_by"], timedelta(0) <= late <= DEADLINE_TOLERANCE) == ("timeout", True)
    return late
