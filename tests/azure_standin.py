"""A stand-in for a service written the way Azure's server-task helper library (`TaskClient`,
`TaskLogger`) works: it knows nothing of agentless, reads the headers Azure's server tasks send,
answers the invocation, and reports back on Azure's paths with Basic auth, `api-version` query
strings and Azure's bodies. What it sees of each call is kept for the tests to judge.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import aiohttp
import asyncpg
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.callbacks import CALLBACK_HEADERS
from tests.conftest import Api, Events

# Versions Azure's helper library sends: each is one that the resource locations serve.
EVENTS_API_VERSION: Final = "2.0-preview.1"
TIMELINE_API_VERSION: Final = "7.1-preview.1"
LOGS_API_VERSION: Final = "7.1-preview.1"

LOG_LINES: Final = ["Deploying build 42", "step 1 of 2: upload"]
FEED_LINES: Final = ["step 2 of 2: swap slots", "deployment finished"]
VARIABLES: Final = {
    "buildNumber": {"value": "42", "isSecret": False},
    "password": {"value": "hunter2", "isSecret": True},
}
# A real service retries its completion a few times before it gives up on the plan.
COMPLETION_ATTEMPTS: Final = 4

Json = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """The invocation's headers, read as Azure's helper library reads them."""

    plan_url: str
    project_id: str
    hub_name: str
    plan_id: str
    job_id: str
    timeline_id: str
    task_instance_id: str
    auth_token: str

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Plan:
        missing = [name for name in CALLBACK_HEADERS if not headers.get(name)]
        if missing:
            raise web.HTTPBadRequest(text=f"missing headers: {', '.join(missing)}")
        return cls(
            plan_url=headers["PlanUrl"].rstrip("/"),
            project_id=headers["ProjectId"],
            hub_name=headers["HubName"],
            plan_id=headers["PlanId"],
            job_id=headers["JobId"],
            timeline_id=headers["TimelineId"],
            task_instance_id=headers["TaskInstanceId"],
            auth_token=headers["AuthToken"],
        )

    @property
    def base(self) -> str:
        return (
            f"{self.plan_url}/{self.project_id}/_apis/distributedtask/hubs/{self.hub_name}"
            f"/plans/{self.plan_id}"
        )

    @property
    def authorization(self) -> str:
        # What the helper's VssBasicCredential sends: no user name, the token as password.
        return "Basic " + base64.b64encode(f":{self.auth_token}".encode()).decode()


@dataclass
class Report:
    """What the stand-in did for one task: each call as (method, what, status), the timeline
    record it read, and the error that stopped it, if any."""

    plan: Plan | None = None
    calls: list[tuple[str, str, int]] = field(default_factory=list)
    records: Json = field(default_factory=dict)
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ServiceError(Exception):
    """agentless answered a call in a way the helper library would throw on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TaskClient:
    """Azure's `TaskClient` and `TaskLogger`, cut down to the calls a server task makes."""

    def __init__(self, session: aiohttp.ClientSession, plan: Plan, report: Report) -> None:
        self._session = session
        self._plan = plan
        self._report = report

    async def _call(
        self,
        method: str,
        path: str,
        what: str,
        api_version: str,
        *,
        json: object = None,
        text: str | None = None,
    ) -> Json:
        headers = {"Authorization": self._plan.authorization}
        data: bytes | None = None
        if text is not None:
            headers["Content-Type"] = "application/octet-stream"
            data = text.encode()
        elif json is not None:
            headers["Content-Type"] = "application/json; charset=utf-8"
            data = orjson.dumps(json)
        async with self._session.request(
            method,
            f"{self._plan.base}{path}",
            params={"api-version": api_version},
            data=data,
            headers=headers,
        ) as response:
            self._report.calls.append((method, what, response.status))
            body = await response.read()
            if response.status >= 400:
                raise ServiceError(
                    response.status, f"{method} {what}: HTTP {response.status}: {body.decode()}"
                )
            answer: Json = orjson.loads(body) if body else {}
            return answer

    async def raise_event(self, name: str, result: str | None = None) -> None:
        event = {"name": name, "taskId": self._plan.task_instance_id, "jobId": self._plan.job_id}
        if result is not None:
            event["result"] = result
        await self._call("POST", "/events", f"events {name}", EVENTS_API_VERSION, json=event)

    async def complete(self, result: str) -> None:
        """TaskCompleted, retried on what a retry can cure: a lost connection or a 5xx."""
        delay = 0.05
        for attempt in range(1, COMPLETION_ATTEMPTS + 1):
            try:
                await self.raise_event("TaskCompleted", result)
            except aiohttp.ClientConnectionError:
                if attempt == COMPLETION_ATTEMPTS:
                    raise
            except ServiceError as exc:
                if attempt == COMPLETION_ATTEMPTS or exc.status < 500:
                    raise
            else:
                return
            await asyncio.sleep(delay)
            delay *= 2

    async def create_log(self, path: str) -> int:
        answer = await self._call("POST", "/logs", "logs", LOGS_API_VERSION, json={"path": path})
        log_id = answer["id"]
        assert isinstance(log_id, int), answer
        return log_id

    async def append_log(self, log_id: int, lines: list[str]) -> None:
        await self._call(
            "POST",
            f"/logs/{log_id}",
            f"logs/{log_id}",
            LOGS_API_VERSION,
            text="".join(f"{line}\n" for line in lines),
        )

    async def append_feed(self, lines: list[str]) -> None:
        # The helper names the job's record in the path, whichever task writes to it.
        path = f"/timelines/{self._plan.timeline_id}/records/{self._plan.job_id}/feed"
        body = {"value": lines, "count": len(lines)}
        await self._call("POST", path, "feed", TIMELINE_API_VERSION, json=body)

    async def update_records(self, variables: Json) -> None:
        record = {"id": self._plan.task_instance_id, "variables": variables}
        await self._call(
            "PATCH",
            f"/timelines/{self._plan.timeline_id}/records",
            "records",
            TIMELINE_API_VERSION,
            json={"value": [record], "count": 1},
        )

    async def get_records(self) -> Json:
        return await self._call(
            "GET", f"/timelines/{self._plan.timeline_id}/records", "records", TIMELINE_API_VERSION
        )


class AzureService:
    """The stand-in's state: one client session, as in any real process, and a report per task."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.url = ""
        self._session = session
        self._reports: dict[str, Report] = {}
        self._running: set[asyncio.Task[None]] = set()

    def report(self, task_id: str) -> Report:
        return self._reports.setdefault(task_id, Report())

    async def finished(self, task_id: str, timeout: float = 10) -> Report:
        """The task's report once the stand-in has stopped working on it."""
        report = self.report(task_id)
        async with asyncio.timeout(timeout):
            await report.done.wait()
        return report

    async def invoke(self, request: web.Request) -> web.Response:
        plan = Plan.from_headers(request.headers)
        report = self.report(plan.task_instance_id)
        report.plan = plan
        result = request.query.get("result", "succeeded")
        if "idle" in request.query:
            # The test itself speaks for this service, through `client`.
            report.done.set()
        elif "early" in request.query:
            # Some services finish their work before they get round to answering.
            await self._work(plan, report, result)
        else:
            running = asyncio.create_task(self._work(plan, report, result))
            self._running.add(running)
            running.add_done_callback(self._running.discard)
        return web.json_response({"status": "accepted"})

    def client(self, report: Report) -> TaskClient:
        assert report.plan is not None, "the task has not invoked the service yet"
        return TaskClient(self._session, report.plan, report)

    async def _work(self, plan: Plan, report: Report, result: str) -> None:
        client = TaskClient(self._session, plan, report)
        try:
            await client.raise_event("TaskStarted")
            log_id = await client.create_log(f"logs\\{uuid.uuid4()}")
            await client.append_log(log_id, LOG_LINES)
            await client.append_feed(FEED_LINES)
            await client.update_records(VARIABLES)
            report.records = await client.get_records()
            await client.complete(result)
        except (ServiceError, aiohttp.ClientError, KeyError, AssertionError) as exc:
            report.error = f"{type(exc).__name__}: {exc}"
        finally:
            report.done.set()

    async def stop(self) -> None:
        for running in list(self._running):
            running.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)


SERVICE = web.AppKey("service", AzureService)


async def _invoke(request: web.Request) -> web.Response:
    return await request.app[SERVICE].invoke(request)


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[AzureService]:
    """The stand-in, served on a local port until the block ends."""
    async with aiohttp.ClientSession() as session:
        service = AzureService(session)
        app = web.Application()
        app[SERVICE] = service
        app.router.add_post("/deploy", _invoke)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        service.url = str(server.make_url("/deploy"))
        try:
            yield service
        finally:
            await service.stop()
            await server.close()


def azure_task(service: AzureService, query: str = "", **fields: object) -> Json:
    task: Json = {
        "taskId": uuid.uuid4().hex,
        "planId": "plan-az",
        "jobId": "job-az",
        "request": {"method": "POST", "url": f"{service.url}{query}", "body": {"build": 42}},
        "waitForCompletion": "callback",
    }
    task.update(fields)
    return task


# Every call a service makes for one task, in order, and what agentless answered.
EXPECTED_CALLS: Final = [
    ("POST", "events TaskStarted", 200),
    ("POST", "logs", 200),
    ("POST", "logs/1", 200),
    ("POST", "feed", 200),
    ("PATCH", "records", 200),
    ("GET", "records", 200),
    ("POST", "events TaskCompleted", 200),
]


async def until(events: Events, condition: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout), events.changed:
        await events.changed.wait_for(condition)


async def task_logs(api: Api, task_id: str) -> Json:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{api.url}/tasks/{task_id}/logs") as response,
    ):
        assert response.status == 200, await response.text()
        logs: Json = await response.json()
        return logs


def lines_of(logs: Json) -> Json:
    """The logs answer with each line's time checked and set aside, so the rest compares whole."""
    times = [datetime.fromisoformat(line["at"]) for line in logs["lines"]]
    assert times == sorted(times)
    return {**logs, "lines": [line["line"] for line in logs["lines"]]}


async def assert_secret_not_kept(db: asyncpg.Connection, task_id: str) -> None:
    outputs = await db.fetchval("SELECT outputs::text FROM tasks WHERE task_id = $1", task_id)
    assert orjson.loads(outputs) == {"buildNumber": "42"}
    leaks = await db.fetchval(
        "SELECT (SELECT count(*) FROM tasks t WHERE t::text LIKE '%hunter2%')"
        " + (SELECT count(*) FROM task_logs l WHERE l::text LIKE '%hunter2%')"
    )
    assert leaks == 0
