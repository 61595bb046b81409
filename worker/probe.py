"""A worker's own probe server: /metrics, /healthz and /readyz on AGENTLESS_WORKER_PORT."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from worker.service import Worker


@asynccontextmanager
async def probe_server(worker: Worker) -> AsyncIterator[None]:
    """The worker's own /metrics, /healthz and /readyz on AGENTLESS_WORKER_PORT."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready = await worker.ready()
        return web.json_response(
            {"status": "ready" if ready else "not ready"}, status=200 if ready else 503
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=worker.metrics.render(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, worker.settings.api_host, worker.settings.worker_port)
    await site.start()
    try:
        yield
    finally:
        await runner.cleanup()
