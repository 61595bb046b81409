"""The task API: cancellation and the log lines external services posted (SPEC §6)."""

from __future__ import annotations

import logging

from aiohttp import web

from callback_api.guard import guard_key
from callback_api.problems import Problem
from callback_api.services import services
from worker.logs import bind_task
from worker.sweeper import publish_completions

log = logging.getLogger(__name__)


async def cancel_task(request: web.Request) -> web.Response:
    request.app[guard_key].check(request)
    task_id = request.match_info["taskId"]
    svc = services(request)
    record = await svc.store.cancel(task_id, "canceled by request")
    if record is None:
        existing = await svc.store.get(task_id)
        if existing is None:
            raise Problem(
                404,
                f"there is no task {task_id!r} (a task still in the queue is known once a "
                "worker takes it)",
            )
        raise Problem(
            409,
            f"task {task_id!r} already completed with result {existing.result}",
            state=existing.state,
            result=existing.result,
        )
    bind_task(record.task_id, record.plan_id)
    log.info("task completed", extra={"result": record.result, "reason": record.reason})
    await publish_completions(svc.broker, svc.store, [record])
    return web.json_response(
        {"taskId": record.task_id, "state": record.state, "result": record.result}
    )


async def get_task_logs(request: web.Request) -> web.Response:
    request.app[guard_key].check(request)
    task_id = request.match_info["taskId"]
    svc = services(request)
    if await svc.store.get(task_id) is None:
        raise Problem(404, f"there is no task {task_id!r}")
    lines, dropped = await svc.store.log_lines(task_id)
    return web.json_response(
        {
            "taskId": task_id,
            "droppedLines": dropped,
            "lines": [{"at": at.isoformat(), "line": line} for at, line in lines],
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/tasks/{taskId}/cancel", cancel_task)
    app.router.add_get("/tasks/{taskId}/logs", get_task_logs)
