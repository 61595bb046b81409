"""The task API: submit, read, list and cancel tasks, and read their log lines (SPEC §6)."""

from __future__ import annotations

import logging
import re
from typing import Final

import orjson
from aiohttp import web
from pydantic import JsonValue, ValidationError

from callback_api.guard import guard_key
from callback_api.problems import Problem, read_body
from callback_api.services import services
from worker.contract.models import ID_PATTERN, MAX_TASK_BYTES, Result, State, TaskMessage
from worker.contract.records import TaskRecord
from worker.logs import bind_task
from worker.store.changes import ClaimRequest
from worker.store.queries import ORDER_COLUMNS
from worker.views import (
    LogLine,
    Submitted,
    TaskDetail,
    TaskLogs,
    TaskPage,
    TaskStatus,
    TaskSummary,
)

log = logging.getLogger(__name__)

MAX_ROWS_PER_PAGE: Final = 1000
DEFAULT_ROWS_PER_PAGE: Final = 50
_RANGE = re.compile(r"items=(\d{1,12})-(\d{1,12})")
_LIST_PARAMETERS = frozenset(
    {"state", "result", "planId", "hubName", "rowsPerPage", "pageNumber", "orderField", "sortType"}
)
_STATES = {s.value.lower(): s.value for s in State}
_RESULTS = {r.value.lower(): r.value for r in Result}


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def _canonical(task: TaskMessage) -> bytes:
    """One byte form per task, so that the same task submitted twice is known for the same."""
    data = task.model_dump(mode="json", by_alias=True, exclude_none=True)
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


async def submit_task(request: web.Request) -> web.Response:
    request.app[guard_key].check(request)
    body = await read_body(request, MAX_TASK_BYTES)
    if b"\\u0000" in body:
        raise Problem(400, "the task contains a NUL character (\\u0000), which cannot be stored")
    try:
        task = TaskMessage.model_validate_json(body)
    except ValidationError as exc:
        errors = [
            {
                "field": ".".join(str(p) for p in error["loc"]) or "(body)",
                "message": error["msg"].removeprefix("Value error, "),
            }
            for error in exc.errors(include_url=False, include_input=False)
        ]
        fields = ", ".join(e["field"] for e in errors)
        raise Problem(400, f"the task is not valid; fix: {fields}", errors=errors) from exc
    bind_task(task.task_id, task.plan_id)
    svc = services(request)
    canonical = _canonical(task)
    recorded = await svc.store.submit(ClaimRequest.of(task, canonical))
    location = f"/tasks/{task.task_id}"
    if isinstance(recorded, TaskRecord):
        if recorded.digest != ClaimRequest.of(task, canonical).digest:
            raise Problem(
                409,
                f"taskId {task.task_id!r} already belongs to a different task; use a new taskId",
            )
        if recorded.state is not State.QUEUED:
            return _json(_submitted(recorded.task_id, recorded.state), 202, {"Location": location})
        # Queued but perhaps never published (a crash after the insert): publish again; a
        # duplicate message is harmless, the claim runs the task once.
    await svc.broker.publish(
        canonical, svc.broker.names.tasks, message_id=task.task_id, correlation_id=task.task_id
    )
    log.info("task submitted")
    return _json(_submitted(task.task_id, State.QUEUED), 202, {"Location": location})


def _submitted(task_id: str, state: State) -> JsonValue:
    answer = Submitted(task_id=task_id, state=state, location=f"/tasks/{task_id}")
    return answer.model_dump(mode="json", by_alias=True)


async def get_task(request: web.Request) -> web.Response:
    request.app[guard_key].check(request)
    task_id = _task_id(request)
    record = await services(request).store.get(task_id)
    if record is None:
        raise Problem(404, f"there is no task {task_id!r}")
    return _json(TaskDetail.from_record(record).model_dump(mode="json", by_alias=True))


def _choice(value: str, table: dict[str, str], name: str) -> str:
    if value.lower() not in table:
        raise Problem(400, f"{name} {value!r} is not one of {', '.join(table.values())}")
    return value


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["taskId"]
    if not ID_PATTERN.fullmatch(task_id):
        # Not an id at all (a NUL, a space…): no such task can exist.
        raise Problem(404, f"there is no task {task_id!r}")
    return task_id


def _positive(query: dict[str, str], name: str, default: int, maximum: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    # isdigit() alone would take "²", which int() refuses.
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= maximum:
        raise Problem(400, f"{name} must be a whole number from 1 to {maximum}, not {text!r}")
    return int(text)


def _filters(query: dict[str, str]) -> dict[str, str]:
    """The listing's filters, each checked; unknown parameters are refused, not ignored."""
    unknown = sorted(set(query) - _LIST_PARAMETERS)
    if unknown:
        raise Problem(
            400,
            f"unknown query parameters: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_LIST_PARAMETERS))}",
        )
    filters: dict[str, str] = {
        n: query[n] for n in ("state", "result", "planId", "hubName") if n in query
    }
    if "state" in filters:
        _choice(filters["state"], _STATES, "state")
    if "result" in filters:
        _choice(filters["result"], _RESULTS, "result")
    for name in ("planId", "hubName"):
        if name in filters and not ID_PATTERN.fullmatch(filters[name]):
            raise Problem(
                400,
                f"{name} must be an id: 1 to 128 of A-Z a-z 0-9 . _ : - (not {filters[name]!r})",
            )
    return filters


def _window(query: dict[str, str], ranged: str | None) -> tuple[int, int]:
    """Offset and limit: from a Range header if there is one, else from the page parameters."""
    if ranged is None:
        limit = _positive(query, "rowsPerPage", DEFAULT_ROWS_PER_PAGE, MAX_ROWS_PER_PAGE)
        return (_positive(query, "pageNumber", 1, 10**9) - 1) * limit, limit
    match = _RANGE.fullmatch(ranged.strip())
    if match is None or int(match[1]) > int(match[2]):
        raise Problem(400, f"Range must be 'items=FIRST-LAST' with FIRST <= LAST, not {ranged!r}")
    first, last = int(match[1]), int(match[2])
    return first, min(last, first + MAX_ROWS_PER_PAGE - 1) - first + 1


async def list_tasks(request: web.Request) -> web.Response:
    request.app[guard_key].check(request)
    query = dict(request.query)
    filters = _filters(query)
    order = query.get("orderField", "queuedAt")
    if order not in ORDER_COLUMNS:
        raise Problem(400, f"orderField {order!r} is not one of {', '.join(ORDER_COLUMNS)}")
    sort = query.get("sortType", "desc").lower()
    if sort not in ("asc", "desc"):
        raise Problem(400, f"sortType must be asc or desc, not {query['sortType']!r}")
    ranged = request.headers.get("Range")
    offset, limit = _window(query, ranged)
    records, total = await services(request).store.list_tasks(
        filters, order, descending=sort == "desc", offset=offset, limit=limit
    )
    page = TaskPage(tasks=[TaskSummary.of(record) for record in records], total=total)
    body = page.model_dump(mode="json", by_alias=True)
    if ranged is None:
        return _json(body)
    if offset >= total and (total or offset):
        raise Problem(
            416,
            f"the range starts past the last of {total} tasks",
            headers={"Content-Range": f"items */{total}"},
        )
    # A page with no task in it has no first and last to name.
    shown = f"{offset}-{offset + len(records) - 1}" if records else "*"
    return _json(body, 206, {"Content-Range": f"items {shown}/{total}"})


async def cancel_task(request: web.Request) -> web.Response:
    request.app[guard_key].check(request)
    task_id = _task_id(request)
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
    svc.announcer.announce(record)
    answer = TaskStatus(task_id=record.task_id, state=record.state, result=record.result)
    return _json(answer.model_dump(mode="json", by_alias=True))


async def get_task_logs(request: web.Request) -> web.Response:
    request.app[guard_key].check(request)
    task_id = _task_id(request)
    svc = services(request)
    if await svc.store.get(task_id) is None:
        raise Problem(404, f"there is no task {task_id!r}")
    lines, dropped = await svc.store.log_lines(task_id)
    answer = TaskLogs(
        task_id=task_id,
        dropped_lines=dropped,
        lines=[LogLine(at=at, line=line) for at, line in lines],
    )
    return _json(answer.model_dump(mode="json", by_alias=True))
