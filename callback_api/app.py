"""create_app(settings) → the API's web.Application; every route is added from here."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from callback_api.azure import azure_dialect
from callback_api.declarations import declared
from callback_api.guard import Guard, check_exposure, guard_key, require_api_token
from callback_api.problems import problem_middleware
from callback_api.routes import add_routes
from callback_api.server import Deadlines, deadlines_key
from callback_api.services import Services, services, services_key
from worker.broker import Broker
from worker.completions import Announcer
from worker.contract.models import Names
from worker.contract.settings import Settings
from worker.metrics import ClusterGauges, Metrics
from worker.purger import purging
from worker.relay import Relay
from worker.service import Worker, open_signer, running_worker
from worker.store.database import Store
from worker.sweeper import Sweeper

log = logging.getLogger(__name__)

# How long a stopping API gives the completion events it is publishing (the relay has the rest).
ANNOUNCE_GRACE_SECONDS = 5

worker_key = web.AppKey("worker", Worker)
failed_key = web.AppKey("failed", list[str])


@web.middleware
async def count_callbacks(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Callbacks by status, problems included (this runs outside the problem middleware)."""
    response = await handler(request)
    route = declared(request)
    if route is not None and route.tag == "callbacks":
        services(request).metrics.callbacks.labels(str(response.status)).inc()
    return response


def with_worker(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """Run a worker for as long as the app runs (`agentless run`), sharing its resources."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        async with (
            running_worker(settings) as worker,
            purging(worker.store, settings.retention, worker.metrics),
        ):
            app[worker_key] = worker
            announcer = Announcer(worker.broker, worker.store)
            app[services_key] = Services(
                settings,
                worker.store,
                worker.broker,
                worker.signer,
                worker.metrics,
                ClusterGauges(worker.metrics.registry),
                announcer,
                worker.readiness,
            )
            worker.consuming.add_done_callback(lambda _: _consume_loop_ended(app))
            try:
                yield
            finally:
                await announcer.drain(ANNOUNCE_GRACE_SECONDS)

    return context


def _consume_loop_ended(app: web.Application) -> None:
    # A process whose consume loop died exits non-zero rather than staying half-alive: note the
    # failure, then stop the way SIGTERM does, so that run_app cleans up in order.
    if not app[worker_key].consumer.stopping:
        app[failed_key].append("the consume loop ended unexpectedly")
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)


def standalone(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """The API's own store and broker connections (`agentless api`), the event relay, the
    deadline sweep and the purge."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        async with (
            Store.open(settings.database_url) as store,
            Broker(
                settings.amqp_url,
                Names(settings.prefix),
                connection_name=f"agentless api {settings.prefix} "
                f"{socket.gethostname()}:{os.getpid()}",
            ) as broker,
        ):
            signer = await open_signer(settings, store)
            announcer = Announcer(broker, store)
            metrics = Metrics()
            app[services_key] = Services(
                settings, store, broker, signer, metrics, ClusterGauges(metrics.registry), announcer
            )
            # Deadlines are swept wherever an API runs, so that they hold while no worker does.
            sweeper = Sweeper(
                store,
                broker,
                metrics=metrics,
                invoker=None,
                signer=signer,
                public_url=str(settings.public_url).rstrip("/"),
            )
            duties = [
                asyncio.create_task(Relay(store, broker).run(), name="relay"),
                asyncio.create_task(sweeper.run(), name="sweeper"),
            ]
            try:
                async with purging(store, settings.retention, metrics):
                    yield
            finally:
                await announcer.drain(ANNOUNCE_GRACE_SECONDS)
                for duty in duties:
                    duty.cancel()
                await asyncio.gather(*duties, return_exceptions=True)

    return context


def create_app(
    settings: Settings, *, worker: bool, deadlines: Deadlines | None = None
) -> web.Application:
    """The API; with `worker`, a worker runs in the same process. Serve it with
    `app[deadlines_key].server_options()`."""
    check_exposure(settings)
    # Outermost first: the API token is checked inside the problem middleware, which renders its
    # 401, and before any handler reads the request.
    app = web.Application(
        middlewares=[
            count_callbacks,
            azure_dialect,
            problem_middleware,
            require_api_token,
        ]
    )
    app[failed_key] = []
    app[deadlines_key] = deadlines or Deadlines()
    app[guard_key] = Guard(settings)
    app.cleanup_ctx.append(with_worker(settings) if worker else standalone(settings))
    add_routes(app)
    return app
