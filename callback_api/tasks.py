"""The task API: submit, read, list and cancel tasks, and read their log lines (SPEC §6)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Final

import orjson
from aiohttp import web
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
)
from pydantic.alias_generators import to_camel

from callback_api import task_page
from callback_api.inputs import query_of, read_body
from callback_api.paging import (
    DEFAULT_ROWS_PER_PAGE,
    PageNumber,
    RowsPerPage,
    SortType,
    json_response,
    one_of,
    page_response,
    window,
)
from callback_api.problems import Problem
from callback_api.services import Services, services
from worker.amqp import BrokerBlocked
from worker.contract.errors import invalid_fields
from worker.contract.models import MAX_TASK_BYTES, Result, State, TaskMessage, any_case
from worker.contract.records import TaskRecord
from worker.contract.requests import ID_PATTERN
from worker.logs import bind_task
from worker.store.changes import ClaimRequest
from worker.store.database import Store
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

# How long POST /tasks waits for the broker to confirm the task's message before answering 503.
PUBLISH_SECONDS: Final = 3.0


# The query's validators: each message follows the parameter's name, as in "state 'x' is not …".


def _id(value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(f"must be an id: 1 to 128 of A-Z a-z 0-9 . _ : - (not {value!r})")
    return value


class TaskListQuery(BaseModel):
    """GET /tasks: filters, a page and an order; parameters it does not take are refused."""

    model_config = ConfigDict(alias_generator=to_camel, extra="forbid")

    state: Annotated[State, any_case(State)] | None = Field(default=None, description="in any case")
    result: Annotated[Result, any_case(Result)] | None = Field(
        default=None, description="in any case"
    )
    plan_id: Annotated[str, AfterValidator(_id)] | None = None
    hub_name: Annotated[str, AfterValidator(_id)] | None = None
    definition: Annotated[str, AfterValidator(_id)] | None = Field(
        default=None,
        description="the tasks executed from this definition: its id, or its name in any case "
        "(a deleted definition's executions: by its id)",
    )
    tag: Annotated[str, AfterValidator(_id)] | None = Field(
        default=None, description="the tasks an execution gave this tag, exactly"
    )
    rows_per_page: RowsPerPage = DEFAULT_ROWS_PER_PAGE
    page_number: PageNumber = 1
    order_field: Annotated[str, AfterValidator(one_of(ORDER_COLUMNS))] = Field(
        default="queuedAt", json_schema_extra={"enum": list(ORDER_COLUMNS)}
    )
    sort_type: SortType = "desc"

    def filters(self) -> dict[str, str]:
        """The filters given, by the names the store knows them by."""
        given = {
            "state": self.state,
            "result": self.result,
            "planId": self.plan_id,
            "hubName": self.hub_name,
            "definition": self.definition,
            "tag": self.tag,
        }
        return {name: str(value) for name, value in given.items() if value is not None}


# What GET /tasks takes, by name (query_of refuses any other parameter).
_LIST_PARAMETERS = frozenset(
    field.alias or name for name, field in TaskListQuery.model_fields.items()
)


def _canonical(task: TaskMessage) -> bytes:
    """One byte form per task, so that the same task submitted twice is known for the same."""
    data = task.model_dump(mode="json", by_alias=True, exclude_none=True)
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


async def submit_task(request: web.Request) -> web.Response:
    body = await read_body(request, MAX_TASK_BYTES)
    if b"\\u0000" in body:
        raise Problem(400, "the task contains a NUL character (\\u0000), which cannot be stored")
    try:
        task = TaskMessage.model_validate_json(body)
    except ValidationError as exc:
        errors = [
            {"field": invalid.field or "(body)", "message": invalid.message}
            for invalid in invalid_fields(exc)
        ]
        fields = ", ".join(e["field"] for e in errors)
        raise Problem(400, f"the task is not valid; fix: {fields}", errors=errors) from exc
    bind_task(task.task_id, task.plan_id)
    svc = services(request)
    refuse_while_blocked(svc)
    # The model refused what orjson cannot write (worker.contract.requests.storable).
    canonical = _canonical(task)
    claim = ClaimRequest.of(task, canonical)
    recorded = await svc.store.submit(claim)
    location = f"/tasks/{task.task_id}"
    if isinstance(recorded, TaskRecord):
        if recorded.digest != claim.digest:
            raise Problem(
                409,
                f"taskId {task.task_id!r} already belongs to a different task; use a new taskId",
            )
        if recorded.state is not State.QUEUED:
            return json_response(
                _submitted(recorded.task_id, recorded.state), 202, {"Location": location}
            )
        # Queued but perhaps never published (a crash after the insert): publish again; a
        # duplicate message is harmless, the claim runs the task once.
    await publish_task(svc, task.task_id, canonical)
    log.info("task submitted")
    return json_response(_submitted(task.task_id, State.QUEUED), 202, {"Location": location})


def refuse_while_blocked(svc: Services) -> None:
    """503 while the broker blocks publishes, before a task is recorded: the same request sent
    again later is then a new one."""
    if (blocked := svc.broker.blocked) is not None:
        raise BrokerBlocked(blocked)


async def publish_task(svc: Services, task_id: str, message: bytes) -> None:
    """Send a recorded, queued task's message to the task queue (POST /tasks, and executions of
    definitions). Bounded: a broker that blocks publishes, or is gone, is answered 503 within
    seconds, not by a hung request. The task is recorded by then and its message goes out when
    it can, so a retry of the same request is answered 202 as the same task, and runs it once."""
    await svc.broker.publish_within(
        PUBLISH_SECONDS,
        message,
        svc.broker.names.tasks,
        message_id=task_id,
        correlation_id=task_id,
    )


def _submitted(task_id: str, state: State) -> JsonValue:
    answer = Submitted(task_id=task_id, state=state, location=f"/tasks/{task_id}")
    return answer.model_dump(mode="json", by_alias=True)


async def get_task(request: web.Request) -> web.Response:
    task_id = _task_id(request)
    store = services(request).store
    record = await store.get(task_id)
    if record is None:
        raise await _unknown(store, task_id)
    detail = TaskDetail.from_record(record)
    # A browser (following a link of the operations page) gets the page; API clients the JSON.
    if task_page.wants_page(request):
        return await task_page.get_page(request, detail)
    return json_response(detail.model_dump(mode="json", by_alias=True), headers={"Vary": "Accept"})


async def _unknown(store: Store, task_id: str) -> Problem:
    """410 for a task deleted past the retention while its completion time is remembered (a
    task submitted again since is its live row), else 404."""
    completed_at = await store.retention.purged_completion(task_id)
    if completed_at is None:
        return Problem(404, f"there is no task {task_id!r}")
    stamp = _rfc3339(completed_at)
    return Problem(
        410,
        f"task {task_id!r} completed at {stamp} and was deleted after the retention period "
        "(AGENTLESS_RETENTION): its result and log are no longer kept",
        completedAt=stamp,
    )


def _rfc3339(moment: datetime) -> str:
    """In UTC, as every time the API answers."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["taskId"]
    if not ID_PATTERN.fullmatch(task_id):
        # Not an id at all (a NUL, a space…): no such task can exist.
        raise Problem(404, f"there is no task {task_id!r}")
    return task_id


async def list_tasks(request: web.Request) -> web.Response:
    query = query_of(request, TaskListQuery)
    ranged = request.headers.get("Range")
    offset, limit = window(query.rows_per_page, query.page_number, ranged)
    store = services(request).store
    filters = query.filters()
    if query.definition is not None:
        # The store filters by id: a name is the id of the definition it names now.
        named = await store.definitions.find(query.definition)
        if named is not None:
            filters["definition"] = named.id
    listed = await store.list_tasks(
        filters,
        query.order_field,
        descending=query.sort_type == "desc",
        offset=offset,
        limit=limit,
    )
    page = TaskPage(
        tasks=[TaskSummary.of(record) for record in listed.tasks],
        total=listed.total,
        total_exact=listed.exact,
    )
    # An empty page past the end has an exact total: listing.page counts it.
    return page_response(
        page.model_dump(mode="json", by_alias=True),
        ranged=ranged,
        offset=offset,
        shown=len(listed.tasks),
        total=listed.total,
        exact=listed.exact,
        what="tasks",
    )


async def cancel_task(request: web.Request) -> web.Response:
    task_id = _task_id(request)
    svc = services(request)
    record = await svc.store.cancel(task_id)
    if record is None:
        existing = await svc.store.get(task_id)
        if existing is None:
            completed_at = await svc.store.retention.purged_completion(task_id)
            if completed_at is not None:
                # Completed, then purged: as completed as a task can be.
                raise Problem(
                    409,
                    f"task {task_id!r} already completed (at {_rfc3339(completed_at)}) and was "
                    "deleted after the retention period",
                    completedAt=_rfc3339(completed_at),
                )
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
    svc.metrics.record_completed(record)
    svc.announcer.announce(record)
    answer = TaskStatus(task_id=record.task_id, state=record.state, result=record.result)
    return json_response(answer.model_dump(mode="json", by_alias=True))


async def get_task_logs(request: web.Request) -> web.Response:
    task_id = _task_id(request)
    svc = services(request)
    if await svc.store.get(task_id) is None:
        raise await _unknown(svc.store, task_id)
    lines, dropped = await svc.store.log_lines(task_id)
    answer = TaskLogs(
        task_id=task_id,
        dropped_lines=dropped,
        lines=[LogLine(at=at, line=line) for at, line in lines],
    )
    return json_response(answer.model_dump(mode="json", by_alias=True))
