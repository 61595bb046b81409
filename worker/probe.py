"""The health answers (/healthz, /readyz) the API serves too, and a worker's own probe server:
/metrics, /healthz and /readyz on AGENTLESS_WORKER_PORT."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web

from worker.contract.errors import CannotListen
from worker.views import Health, Readiness

# What else AGENTLESS_WORKER_PORT can be set to, should its port be taken.
PORT_OFF = "to turn the worker's probe server off"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def healthz(_: web.Request) -> web.Response:
    return web.json_response(text=Health().model_dump_json())


def readiness(
    check: Callable[[web.Request], Awaitable[Readiness]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """/readyz: 200 while `check` says ready, else 503; with its reason, if it gives one."""

    async def readyz(request: web.Request) -> web.Response:
        answer = await check(request)
        text = answer.model_dump_json(exclude_none=True)
        return web.json_response(text=text, status=200 if answer.ready else 503)

    return readyz


@asynccontextmanager
async def probe_server(
    host: str, port: int, check: Callable[[], Awaitable[Readiness]], get_metrics: Handler
) -> AsyncIterator[None]:
    """A worker's own /metrics, /healthz and /readyz on `host`:`port` (AGENTLESS_WORKER_HOST and
    AGENTLESS_WORKER_PORT); CannotListen, naming them, if it cannot listen there."""

    async def is_ready(_: web.Request) -> Readiness:
        return await check()

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readiness(is_ready))
    app.router.add_get("/metrics", get_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CannotListen(exc, host, port, setting="AGENTLESS_WORKER", port_off=PORT_OFF) from exc
    try:
        yield
    finally:
        await runner.cleanup()
