"""A local job service for poll tasks: a start request begins a job and answers 202 with a
`Location` to poll; each poll of that location answers what the job's script says for that poll.

The script is given in the start request's query, so that a task message alone says how its job
behaves: `script=running,503,done` answers the first poll "still running", the second 503, and
every later one "done" (the last entry repeats). Entries:

- `running`: 200 `{"state": "running"}`; `accepted`: 202, the same body
- `done`: 200 `{"state": "done", "result": …}`; `failed`: 200 `{"state": "failed"}`
- a number: that status, `{"state": "error"}`
- `hang`: no answer until the job is released (`Job.release`), then as `running`; or the
  caller gives up first

Other start query parameters: `id` (the job's id; else one is made), `startstatus` (default 202;
a non-2xx one starts no job), `startretryafter` (Retry-After on the start answer), `retryafter`
(Retry-After on every in-progress or 5xx poll answer), `startfail` (the first N start requests of
this id answer 503).

A poll is any request to `/jobs/{id}`, or to `/jobs?id=…` other than a POST (the start URL polled
with GET); `/jobs/{id}/cancel` counts the job's cancel requests. Every request is recorded with
the wall-clock time it arrived, so that a test can check the pace of polls.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.conftest import Api, free_port
from tests.task_api import call


@dataclass(frozen=True)
class Seen:
    """One request the service got."""

    at: float
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Job:
    id: str
    script: list[str]
    retry_after: str | None
    polls: list[Seen] = field(default_factory=list)
    starts: int = 0
    cancels: int = 0
    # When the start answer was sent, wall clock.
    started_at: float = 0.0
    # Answer times of the polls that were answered, wall clock, in order.
    answered_at: list[float] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def answer_for(self, number: int) -> str:
        return self.script[min(number, len(self.script)) - 1]


class JobService:
    """The service's state; `url` is set once it listens."""

    def __init__(self) -> None:
        self.url = ""
        self.jobs: dict[str, Job] = {}
        self.changed = asyncio.Condition()
        # While fewer jobs than this were started, "done" answers as "running": a test of many
        # tasks makes them all poll at once.
        self.done_once_started: int | None = None
        self._runner: web.AppRunner | None = None

    def job(self, job_id: str) -> Job:
        return self.jobs[job_id]

    def start_url(self, job_id: str | None = None, script: str = "done", **query: object) -> str:
        """The start request's URL for a job with this id and script."""
        job_id = job_id or uuid.uuid4().hex
        params = "".join(f"&{name}={value}" for name, value in query.items())
        return f"{self.url}/jobs?id={job_id}&script={script}{params}"

    async def until(self, job_id: str, polls: int, timeout: float = 20) -> Job:
        """Wait until the job has had `polls` poll requests (answered or not)."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(
                lambda: job_id in self.jobs and len(self.jobs[job_id].polls) >= polls
            )
        return self.jobs[job_id]

    async def until_answered(self, job_id: str, polls: int, timeout: float = 20) -> Job:
        """Wait until the job's first `polls` polls have been answered."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(
                lambda: job_id in self.jobs and len(self.jobs[job_id].answered_at) >= polls
            )
        return self.jobs[job_id]

    async def until_cancelled(self, job_id: str, timeout: float = 20) -> Job:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(
                lambda: job_id in self.jobs and self.jobs[job_id].cancels >= 1
            )
        return self.jobs[job_id]

    async def listen_also(self, port: int) -> None:
        """Serve on `port` too, from now on (a poll URL that refused connections until now)."""
        assert self._runner is not None
        await web.TCPSite(self._runner, "127.0.0.1", port).start()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def handle_jobs(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return await self._poll(request, request.query.get("id", ""))
        job_id = request.query.get("id") or uuid.uuid4().hex
        job = self.jobs.get(job_id)
        if job is None:
            job = Job(
                job_id,
                request.query.get("script", "done").split(","),
                request.query.get("retryafter"),
            )
            self.jobs[job_id] = job
        job.starts += 1
        status = int(request.query.get("startstatus", "202"))
        if job.starts <= int(request.query.get("startfail", "0")):
            status = 503
        headers = {"X-Job-Token": f"tok-{job_id}"}
        if 200 <= status < 300:
            headers["Location"] = f"/jobs/{job_id}"
        if retry_after := request.query.get("startretryafter"):
            headers["Retry-After"] = retry_after
        body = {
            "id": job_id,
            "state": "queued",
            "links": [{"rel": "self", "href": f"/jobs/{job_id}"}],
        }
        job.started_at = time.time()
        await self._notify()
        return web.json_response(body, status=status, headers=headers)

    async def handle_job(self, request: web.Request) -> web.StreamResponse:
        return await self._poll(request, request.match_info["id"])

    async def handle_cancel(self, request: web.Request) -> web.StreamResponse:
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            raise web.HTTPNotFound
        job.cancels += 1
        await self._notify()
        return web.json_response({"id": job.id, "state": "canceled"})

    async def _poll(self, request: web.Request, job_id: str) -> web.StreamResponse:
        seen = await _seen(request)
        job = self.jobs.get(job_id)
        if job is None:
            return web.json_response({"error": f"no job {job_id!r}"}, status=404)
        job.polls.append(seen)
        number = len(job.polls)
        await self._notify()
        what = job.answer_for(number)
        if what == "hang":
            # Held until released; the caller may give up first (its timeout, its death).
            await job.release.wait()
            what = "running"
        waits_for_others = self.done_once_started is not None and (
            len(self.jobs) < self.done_once_started
        )
        if what == "done" and waits_for_others:
            what = "running"
        response = _answer(job, what, number)
        job.answered_at.append(time.time())
        await self._notify()
        return response

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[JobService]:
        app = web.Application()
        app.router.add_route("*", "/jobs", self.handle_jobs)
        app.router.add_route("*", "/jobs/{id}/cancel", self.handle_cancel)
        app.router.add_route("*", "/jobs/{id}", self.handle_job)
        # Held polls are cut short at the end rather than waited for.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self._runner = runner
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            for job in self.jobs.values():
                job.release.set()
            await runner.cleanup()


def _answer(job: Job, what: str, number: int) -> web.Response:
    headers: dict[str, str] = {}
    status = 200
    body: dict[str, object] = {"id": job.id, "poll": number}
    if what in ("running", "accepted"):
        status = 202 if what == "accepted" else 200
        body["state"] = "running"
    elif what == "done":
        body["state"] = "done"
        body["result"] = {"artifact": f"/artifacts/{job.id}", "size": 42}
    elif what == "failed":
        body["state"] = "failed"
        body["error"] = "the job broke"
    else:
        status = int(what)
        body["state"] = "error"
    in_progress = what in ("running", "accepted") or status >= 500
    if job.retry_after is not None and in_progress:
        headers["Retry-After"] = job.retry_after
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


async def _seen(request: web.Request) -> Seen:
    return Seen(
        at=time.time(),
        method=request.method,
        path=request.path,
        query=dict(request.query),
        headers=dict(request.headers),
        body=await request.read(),
    )


def poll_task(
    service: JobService,
    job_id: str | None = None,
    *,
    script: str = "done",
    poll: Mapping[str, object] | None = None,
    query: dict[str, object] | None = None,
    start: dict[str, object] | None = None,
    **fields: object,
) -> dict[str, Any]:
    """A poll task (id `poll-<job id>`) that starts a job on `service`: `script` and the other
    start query parameters (`query`, see the module's docstring) go in the start URL, `start` is
    merged into the start request, `poll` into `{"intervalSeconds": 1}` (SPEC's default of 10 s
    would make the tests slow), and `fields` into the task."""
    job_id = job_id or uuid.uuid4().hex
    request: dict[str, object] = {
        "method": "POST",
        "url": service.start_url(job_id, script, **(query or {})),
    }
    request.update(start or {})
    message: dict[str, Any] = {
        "taskId": f"poll-{job_id}",
        "planId": "plan-poll",
        "request": request,
        "waitForCompletion": "poll",
        "successCriteria": "body.state == 'done'",
        "poll": {"intervalSeconds": 1, **(poll or {})},
    }
    message.update(fields)
    return message


async def detail(api: Api, task_id: str) -> dict[str, Any]:
    """GET /tasks/{id}."""
    status, body, _ = await call("GET", f"{api.url}/tasks/{task_id}")
    assert status == 200, body
    return dict(body)


async def detail_when(
    api: Api, task_id: str, holds: Callable[[dict[str, Any]], bool], timeout: float = 20
) -> dict[str, Any]:
    """GET /tasks/{id} once what it shows satisfies `holds`; a task published over AMQP is not
    known until a worker takes it (404 until then)."""
    async with asyncio.timeout(timeout):
        while True:
            status, found, _ = await call("GET", f"{api.url}/tasks/{task_id}")
            if status != 404:
                assert status == 200, found
                if holds(found):
                    return dict(found)
            await asyncio.sleep(0.05)
