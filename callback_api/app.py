"""create_app(settings) → the callback API's web.Application; every route is listed here."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from worker.service import Worker, running_worker
from worker.settings import Settings

worker_key = web.AppKey("worker", Worker)
failed_key = web.AppKey("failed", list[str])


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready = await request.app[worker_key].ready()
    return web.json_response(
        {"status": "ready" if ready else "not ready"}, status=200 if ready else 503
    )


def with_worker(
    settings: Settings,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that runs a worker for as long as the app runs (`agentless run`)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        async with running_worker(settings) as worker:
            app[worker_key] = worker
            worker.consuming.add_done_callback(lambda _: _consume_loop_ended(app))
            yield

    return context


def _consume_loop_ended(app: web.Application) -> None:
    # A process whose consume loop died exits non-zero rather than staying half-alive: note the
    # failure, then stop the way SIGTERM does, so that run_app cleans up in order.
    if not app[worker_key].consumer.stopping:
        app[failed_key].append("the consume loop ended unexpectedly")
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)


def create_app(settings: Settings) -> web.Application:
    """The API with a worker in the same process."""
    app = web.Application(client_max_size=64 * 1024)
    app[failed_key] = []
    app.cleanup_ctx.append(with_worker(settings))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
