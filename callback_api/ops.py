"""Operations: the queue, the workers, metrics and readiness (SPEC §6); the health answers
themselves are worker/probe.py's, which the worker's own port serves too."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from callback_api.services import services
from worker.contract.models import State
from worker.probe import readiness
from worker.views import Dashboard, QueueView, WorkerList, dashboard, worker_views


async def current_dashboard(request: web.Request) -> Dashboard:
    svc = services(request)
    return dashboard(await svc.broker.queue_depths(), await svc.store.overview())


async def get_queue(request: web.Request) -> web.Response:
    queue: QueueView = (await current_dashboard(request)).queue
    return web.json_response(text=queue.model_dump_json(by_alias=True))


async def get_workers(request: web.Request) -> web.Response:
    # Only the workers: the whole dashboard would cost the broker and six more queries.
    workers = worker_views(await services(request).store.live_workers())
    return web.json_response(text=WorkerList(workers).model_dump_json(by_alias=True))


async def get_metrics(request: web.Request) -> web.Response:
    svc = services(request)
    # Waiting and polling tasks belong to no process: their counts are read from the database at
    # each scrape.
    counts = await svc.store.state_counts()
    svc.metrics.tasks_waiting.set(counts.get(State.WAITING, 0))
    svc.metrics.tasks_polling.set(counts.get(State.POLLING, 0))
    return web.Response(body=svc.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _ready(request: web.Request) -> bool:
    svc = services(request)
    ready = svc.broker.is_ready and await svc.store.ping()
    if svc.worker_ready is not None:
        ready = ready and await svc.worker_ready()
    return ready


readyz = readiness(_ready)
