"""Operations: the queue, the workers, metrics and readiness (SPEC §6); the health answers
themselves are worker/probe.py's, which the worker's own port serves too."""

from __future__ import annotations

import asyncio

from aiohttp import web

from callback_api.services import Services, services
from worker.amqp import BrokerUnavailable
from worker.probe import readiness
from worker.store.errors import DB_UNAVAILABLE
from worker.views import Dashboard, QueueView, Readiness, WorkerList, dashboard, worker_views


async def current_dashboard(request: web.Request) -> Dashboard:
    svc = services(request)
    # The broker and the database at once: each answer waits on another process's turn.
    depths, overview = await asyncio.gather(svc.broker.queue_depths(), svc.store.overview())
    return dashboard(depths, overview, svc.store.clock.now())


async def get_queue(request: web.Request) -> web.Response:
    queue: QueueView = (await current_dashboard(request)).queue
    return web.json_response(text=queue.model_dump_json(by_alias=True))


async def get_workers(request: web.Request) -> web.Response:
    # Only the workers: the whole dashboard would cost the broker and six more queries.
    workers = worker_views(await services(request).store.live_workers())
    return web.json_response(text=WorkerList(workers).model_dump_json(by_alias=True))


async def get_metrics(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    await read_cluster(svc)
    return await svc.metrics.exposition(request)


async def read_cluster(svc: Services) -> None:
    """Before each scrape of the API's /metrics: what belongs to no process, from the database
    and the broker at once. What cannot be read keeps its last value, and says so through
    agentless_dependency_up."""

    async def database() -> bool:
        try:
            state = await svc.store.cluster_state()
        except DB_UNAVAILABLE:
            return False
        svc.cluster.show(state, svc.store.clock.now())
        return True

    async def broker() -> bool:
        try:
            depths = await svc.broker.queue_depths()
        except BrokerUnavailable:
            return False
        svc.cluster.show_queue(depths.ready, depths.dead, depths.consumers)
        return True

    reached = await asyncio.gather(broker(), database())
    svc.metrics.show_dependencies(broker=reached[0], database=reached[1])


async def _ready(request: web.Request) -> Readiness:
    """Ready while the broker and the database are reachable (and, under `agentless run`, its
    worker is ready). An API whose broker blocks publishes stays ready: every replica is blocked
    alike, and taking them all out of service would refuse callbacks and reads too; POST /tasks
    answers 503 at once meanwhile, and the answer says why."""
    svc = services(request)
    if not svc.broker.is_ready:
        return Readiness(status="not ready", reason="RabbitMQ is not reachable; reconnecting")
    if not await svc.store.ping():
        return Readiness(status="not ready", reason="PostgreSQL is not reachable")
    if svc.worker_ready is not None and not (worker := await svc.worker_ready()).ready:
        return worker
    if (blocked := svc.broker.blocked) is not None:
        return Readiness(
            status="ready",
            reason=f"RabbitMQ is blocking publishes ({blocked}): POST /tasks is answered 503",
        )
    return Readiness(status="ready")


readyz = readiness(_ready)
