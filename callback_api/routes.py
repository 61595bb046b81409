"""Every route of the API in one table: app.py serves it, openapi.py describes it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web
from pydantic import BaseModel

from callback_api import events, ops, ops_page, tasks

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AZURE = "/{projectId}/_apis/distributedtask/hubs/{hubName}/plans/{planId}"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    # callback: the task's AuthToken; api: AGENTLESS_API_TOKENS (when set); none: open.
    auth: Literal["callback", "api", "none"]
    tag: Literal["callbacks", "tasks", "operations"]
    responses: dict[int, type[BaseModel] | str] = field(default_factory=dict)


ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/plans/{planId}/events",
        events.post_event,
        "A plan event from the task's external service",
        "callback",
        "callbacks",
    ),
    Route(
        "POST",
        f"{AZURE}/events",
        events.post_event,
        "A plan event, on Azure's path",
        "callback",
        "callbacks",
    ),
    Route(
        "POST",
        "/plans/{planId}/tasks/{taskId}/logs",
        events.post_task_logs,
        "Log lines from the task's external service",
        "callback",
        "callbacks",
    ),
    Route(
        "POST",
        f"{AZURE}/timelines/{{timelineId}}/records/{{recordId}}/feed",
        events.post_feed,
        "Log lines, on Azure's timeline feed path",
        "callback",
        "callbacks",
    ),
    Route(
        "POST",
        f"{AZURE}/logs",
        events.post_create_log,
        "Create a log (Azure's TaskLogger)",
        "callback",
        "callbacks",
    ),
    Route(
        "POST",
        f"{AZURE}/logs/{{logId}}",
        events.post_append_log,
        "Append text lines to a log (Azure's TaskLogger)",
        "callback",
        "callbacks",
    ),
    Route(
        "GET",
        f"{AZURE}/timelines/{{timelineId}}/records",
        events.get_timeline_records,
        "The task's timeline record",
        "callback",
        "callbacks",
    ),
    Route(
        "PATCH",
        f"{AZURE}/timelines/{{timelineId}}/records",
        events.patch_timeline_records,
        "Progress and output variables",
        "callback",
        "callbacks",
    ),
    Route("POST", "/tasks", tasks.submit_task, "Validate and queue a task", "api", "tasks"),
    Route("GET", "/tasks", tasks.list_tasks, "List tasks", "api", "tasks"),
    Route("GET", "/tasks/{taskId}", tasks.get_task, "A task's state and result", "api", "tasks"),
    Route(
        "POST",
        "/tasks/{taskId}/cancel",
        tasks.cancel_task,
        "Cancel a queued, running or waiting task",
        "api",
        "tasks",
    ),
    Route(
        "GET",
        "/tasks/{taskId}/logs",
        tasks.get_task_logs,
        "The log lines the task's service posted",
        "api",
        "tasks",
    ),
    Route("GET", "/", ops_page.get_page, "The operations page", "api", "operations"),
    Route("GET", "/queue", ops.get_queue, "The queue and the task states", "api", "operations"),
    Route("GET", "/workers", ops.get_workers, "Live worker processes", "api", "operations"),
    Route("GET", "/metrics", ops.get_metrics, "Prometheus metrics", "api", "operations"),
    Route("GET", "/healthz", ops.healthz, "Liveness", "none", "operations"),
    Route(
        "GET",
        "/readyz",
        ops.readyz,
        "Readiness: broker and database reachable",
        "none",
        "operations",
    ),
)


def add_routes(app: web.Application) -> None:
    for number, route in enumerate(ROUTES):
        # The tag leads the name, so that middlewares can tell callback routes apart.
        name = f"{route.tag}:{route.handler.__name__}_{number}"
        app.router.add_route(route.method, route.path, route.handler, name=name)
