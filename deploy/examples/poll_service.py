"""A small job service for poll tasks, to try agentless by hand.

`POST /jobs` starts a job and answers 202 at once, with `Location: /jobs/{id}` and
`Retry-After: 1`, the web's usual shape for long work. `GET /jobs/{id}` answers 200 with the job's
state: `running` (with its progress) for a few seconds, then `succeeded` (with its artifact), or
`failed` when the job was started with `{"fail": true}`. It prints each request it gets, so that
you see the polls arrive:

    python deploy/examples/poll_service.py            # listens on 127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Job:
    started: float
    fail: bool


class JobService:
    """The jobs, in memory: each is done `duration` seconds after it started."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.jobs: dict[str, Job] = {}
        self.ids = itertools.count(1)

    async def start(self, request: web.Request) -> web.Response:
        try:
            options = await request.json() if request.can_read_body else {}
        except ValueError:
            options = {}
        fail = isinstance(options, dict) and options.get("fail") is True
        job_id = str(next(self.ids))
        self.jobs[job_id] = Job(time.monotonic(), fail)
        headers = {"Location": f"/jobs/{job_id}", "Retry-After": "1"}
        return answer(request, 202, {"id": job_id, "state": "running"}, headers)

    async def status(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        job = self.jobs.get(job_id)
        if job is None:
            return answer(request, 404, {"error": f"no job {job_id}"})
        elapsed = time.monotonic() - job.started
        if elapsed < self.duration:
            progress = int(100 * elapsed / self.duration)
            return answer(request, 200, {"id": job_id, "state": "running", "progress": progress})
        if job.fail:
            return answer(request, 200, {"id": job_id, "state": "failed", "error": "disk full"})
        done = {"id": job_id, "state": "succeeded", "artifact": "build-42.tar.gz"}
        return answer(request, 200, done)


def answer(
    request: web.Request,
    status: int,
    body: Mapping[str, object],
    headers: dict[str, str] | None = None,
) -> web.Response:
    """The JSON answer, printed with the request it answers."""
    print(
        f"{time.strftime('%H:%M:%S')} {request.method} {request.path} -> {status} "
        f"{json.dumps(body)}",
        flush=True,
    )
    return web.json_response(body, status=status, headers=headers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument(
        "--duration", type=float, default=5, help="seconds each job runs (default 5)"
    )
    args = parser.parse_args()
    service = JobService(args.duration)
    app = web.Application()
    app.router.add_post("/jobs", service.start)
    app.router.add_get("/jobs/{id}", service.status)
    print(f"job service on http://127.0.0.1:{args.port}/jobs", flush=True)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
