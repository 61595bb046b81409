"""What the API's handlers use, held in the app under one typed key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    # Only the handlers' view of what they are handed: the app's context builds it.
    from worker.broker import Broker
    from worker.completions import Announcer
    from worker.contract.settings import Settings
    from worker.contract.tokens import Signer
    from worker.metrics import ClusterGauges, Metrics
    from worker.store.database import Store
    from worker.views import Readiness


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: Store
    broker: Broker
    signer: Signer
    metrics: Metrics
    # The gauges of the whole deployment, which only the API exports (ops.read_cluster).
    cluster: ClusterGauges
    announcer: Announcer
    # Whether the worker of this process is ready, and why not, under `agentless run`.
    worker_ready: Callable[[], Awaitable[Readiness]] | None = None


services_key = web.AppKey("services", Services)


def services(request: web.Request) -> Services:
    return request.app[services_key]
