"""A worker process's resources, started and stopped in order."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from worker.broker import PUBLISH_CHANNELS, Broker
from worker.consumer import Consumer
from worker.contract.models import Names
from worker.contract.settings import Settings
from worker.contract.tokens import Signer, new_key
from worker.invoke import Invoker
from worker.metrics import Metrics
from worker.runner import Runner
from worker.store.database import Store
from worker.store.registry import registered_worker
from worker.sweeper import Sweeper

log = logging.getLogger(__name__)

# Beyond the response timeout, how long a stopping worker gives its in-flight tasks to record
# their results and publish their events.
DRAIN_GRACE_SECONDS = 5


# Allocations between young-generation collections (CPython's default is 700): a busy process
# allocates that many in well under a millisecond.
YOUNG_COLLECTION_THRESHOLD = 10_000


def settle_heap() -> None:
    """Once started: keep what start-up loaded (modules, schemas, compiled models) out of the
    garbage collector's sight from now on. Otherwise each full collection walks all of it, and
    for its tens of milliseconds nothing is answered: under load such pauses made the callback
    API's p99 several times its p50."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop of a long-running process: uvloop's where it is installed (everywhere but
    Windows). Every task passes through the loop a dozen times, and uvloop's turns cost a
    fraction of asyncio's: in the throughput benchmark it took the worker from 88% to 92-97% of
    the baseline's rate at 100 ms."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@dataclass
class Worker:
    settings: Settings
    store: Store
    broker: Broker
    signer: Signer
    consumer: Consumer
    metrics: Metrics
    worker_id: int
    # Done when the consume loop ends; if it ends before the worker is stopped, it has failed.
    consuming: asyncio.Task[None]

    async def ready(self) -> bool:
        return (
            self.broker.is_ready
            and self.consumer.broker.is_ready
            and self.consumer.consuming.is_set()
            and await self.store.ping()
        )


@asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """Open the store and broker, consume until the block ends, then drain in-flight tasks."""
    connections = settings.load_connections()
    metrics = Metrics()
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(Store.open(settings.database_url))
        name = f"agentless worker {settings.prefix} {socket.gethostname()}:{os.getpid()}"
        # Consuming and publishing on connections of their own: the broker throttles a
        # connection as a whole when its publishes back up, and on a shared one that would
        # hold up the acks that make room for the next deliveries.
        broker = await stack.enter_async_context(
            Broker(
                settings.amqp_url,
                Names(settings.prefix),
                connection_name=f"{name} publishing",
                publish_channels=PUBLISH_CHANNELS,
            )
        )
        consuming_broker = await stack.enter_async_context(
            Broker(settings.amqp_url, Names(settings.prefix), connection_name=f"{name} consuming")
        )
        invoker = await stack.enter_async_context(Invoker(settings, connections))
        signer = await open_signer(settings, store)
        runner = Runner(
            settings, store=store, broker=broker, invoker=invoker, signer=signer, metrics=metrics
        )
        consumer = Consumer(consuming_broker, runner.handle, prefetch=settings.concurrency)
        worker_id = await stack.enter_async_context(
            registered_worker(store, settings.database_url, lambda: consumer.in_flight)
        )
        consuming = asyncio.create_task(consumer.run(), name="consumer")
        sweeper = Sweeper(
            store,
            broker,
            invoker=invoker,
            signer=signer,
            public_url=str(settings.public_url).rstrip("/"),
        )
        sweeping = asyncio.create_task(sweeper.run(), name="sweeper")
        worker = Worker(settings, store, broker, signer, consumer, metrics, worker_id, consuming)
        if settings.worker_port:
            await stack.enter_async_context(probe_server(worker))
        log.info("worker started", extra={"workerId": worker_id, "prefix": settings.prefix})
        try:
            yield worker
        finally:
            runner.stopping.set()
            await consumer.stop(settings.response_timeout + DRAIN_GRACE_SECONDS)
            for task in (consuming, sweeping):
                task.cancel()
            await asyncio.gather(consuming, sweeping, return_exceptions=True)
            log.info("worker stopped", extra={"workerId": worker_id})


async def open_signer(settings: Settings, store: Store) -> Signer:
    """The signer of callback tokens: AGENTLESS_SIGNING_KEY, or the key kept in the database."""
    if settings.signing_key is not None:
        return Signer(hashlib.sha256(settings.signing_key.get_secret_value().encode()).digest())
    return Signer(await store.signing_key(new_key()))


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
