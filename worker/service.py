"""A worker process's resources, started and stopped in order."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from worker.broker import PUBLISH_CHANNELS, Broker
from worker.consumer import Consumer
from worker.contract.models import Names
from worker.contract.sealing import Sealer
from worker.contract.settings import Settings
from worker.contract.tokens import Signer, new_key
from worker.invoke import Invoker
from worker.metrics import Metrics
from worker.poller import Poller
from worker.probe import probe_server
from worker.relay import Relay
from worker.runner import Runner
from worker.store.database import Store
from worker.store.registry import registered_worker
from worker.sweeper import Sweeper
from worker.views import Readiness

log = logging.getLogger(__name__)

# Beyond the response timeout, how long a stopping worker gives its in-flight tasks to record
# their results and publish their events.
DRAIN_GRACE_SECONDS = 5


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

    async def show_dependencies(self) -> None:
        """At each scrape of the worker's own /metrics."""
        self.metrics.show_dependencies(
            broker=self.broker.is_ready and self.consumer.broker.is_ready,
            database=await self.store.ping(),
        )

    async def readiness(self) -> Readiness:
        """Ready while it takes tasks: both broker connections up, consuming, the database
        reachable. While RabbitMQ blocks publishes the worker takes none, so it is not ready;
        it says why."""
        if (blocked := self.broker.blocked) is not None:
            why = f"RabbitMQ is blocking publishes ({blocked}): no new task is taken until it stops"
        elif not (self.broker.is_ready and self.consumer.broker.is_ready):
            why = "RabbitMQ is not reachable; reconnecting"
        elif not self.consumer.consuming.is_set():
            why = "not consuming the task queue; subscribing again"
        elif not await self.store.ping():
            why = "PostgreSQL is not reachable"
        else:
            return Readiness(status="ready")
        return Readiness(status="not ready", reason=why)


@asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """Open the store and broker, consume until the block ends, then drain in-flight tasks."""
    connections = settings.load_connections()
    metrics = Metrics()
    worker: Worker | None = None

    async def readiness() -> Readiness:
        if worker is None:
            return Readiness(status="not ready", reason="the worker is starting")
        return await worker.readiness()

    async def show_dependencies() -> None:
        if worker is not None:
            await worker.show_dependencies()

    async with AsyncExitStack() as stack:
        if settings.worker_port:
            # First, before anything connects: a port that is taken stops the worker before it
            # takes a task. Until the worker is up, the server answers that it is not ready.
            await stack.enter_async_context(
                probe_server(
                    settings.worker_host,
                    settings.worker_port,
                    readiness,
                    metrics.handler(show_dependencies),
                )
            )
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
        poller = Poller(
            settings,
            store=store,
            broker=broker,
            invoker=invoker,
            sealer=Sealer(signer),
            metrics=metrics,
        )
        runner = Runner(
            settings,
            store=store,
            broker=broker,
            invoker=invoker,
            signer=signer,
            metrics=metrics,
            poller=poller,
        )
        consumer = Consumer(
            consuming_broker, runner.handle, prefetch=settings.concurrency, publisher=broker
        )
        worker_id = await stack.enter_async_context(
            registered_worker(
                store, settings.database_url, lambda: consumer.in_flight + poller.in_flight
            )
        )
        consuming = asyncio.create_task(consumer.run(), name="consumer")
        sweeper = Sweeper(
            store,
            broker,
            metrics=metrics,
            invoker=invoker,
            signer=signer,
            public_url=str(settings.public_url).rstrip("/"),
        )
        sweeping = asyncio.create_task(sweeper.run(), name="sweeper")
        polling = asyncio.create_task(poller.run(), name="poller")
        relaying = asyncio.create_task(Relay(store, broker).run(), name="relay")
        worker = Worker(settings, store, broker, signer, consumer, metrics, worker_id, consuming)
        log.info("worker started", extra={"workerId": worker_id, "prefix": settings.prefix})
        try:
            yield worker
        finally:
            runner.stopping.set()
            grace = settings.response_timeout + DRAIN_GRACE_SECONDS
            await asyncio.gather(consumer.stop(grace), poller.stop(grace))
            for task in (consuming, sweeping, relaying, polling):
                task.cancel()
            await asyncio.gather(consuming, sweeping, relaying, polling, return_exceptions=True)
            log.info("worker stopped", extra={"workerId": worker_id})


async def open_signer(settings: Settings, store: Store) -> Signer:
    """The signer of callback tokens: AGENTLESS_SIGNING_KEY's keys, or the key kept in the
    database."""
    if settings.signing_keys:
        # Hashed, so that any text of 32 bytes or more makes a key of the HMAC's own size.
        return Signer(*(hashlib.sha256(key.encode()).digest() for key in settings.signing_keys))
    return Signer(await store.signing_key(new_key()))
