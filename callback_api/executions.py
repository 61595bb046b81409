"""Executions of task definitions (SPEC §9): POST one, by the definition's id or name, and read
a definition's executions. An execution is a task: it is recorded and queued as POST /tasks
queues one (tasks.publish_task), and read at GET /tasks/{executionId} too."""

from __future__ import annotations

import logging
from typing import Annotated, Final, Literal

from aiohttp import web
from pydantic import BaseModel, Field, ValidationError

from callback_api.definition_io import (
    DefinitionQuery,
    answer,
    definition_id,
    dumped,
    invalid,
    json_body,
    wants_page,
)
from callback_api.inputs import query_of
from callback_api.paging import (
    DEFAULT_ROWS_PER_PAGE,
    PageNumber,
    RowsPerPage,
    SortType,
    json_response,
    page_response,
    window,
)
from callback_api.problems import Problem
from callback_api.services import services
from callback_api.tasks import publish_task, refuse_while_blocked
from worker.contract.definitions import ExecutionRecord, ExecutionRequest, ExecutionStarted
from worker.contract.models import MAX_TASK_BYTES, State
from worker.contract.requests import ID_PATTERN
from worker.logs import bind_task
from worker.store.definitions import Lookup
from worker.store.errors import DefinitionNotFound, ExecutionConflict

log = logging.getLogger(__name__)

# An execution index in a path: a bigint.
_MAX_INDEX: Final = 2**63 - 1


class ExecutionView(ExecutionRecord):
    """An execution, and where its task is read."""

    execution_link: str = Field(description="the absolute URL of GET /tasks/{executionId}")


class ExecutionPage(BaseModel):
    """A page of a definition's executions."""

    executions: list[ExecutionView]
    total: int = Field(description="how many executions the definition has had, exactly")


class ExecutionListQuery(DefinitionQuery):
    """GET /definitions/{id}/executions: a page, in index order (newest first by default)."""

    rows_per_page: RowsPerPage = DEFAULT_ROWS_PER_PAGE
    page_number: PageNumber = 1
    order_field: Annotated[Literal["executionIndex"], Field(description="the one order")] = (
        "executionIndex"
    )
    sort_type: SortType = "desc"


def _task_link(request: web.Request, task_id: str) -> str:
    base = str(services(request).settings.public_url).rstrip("/")
    return f"{base}/tasks/{task_id}"


def _view(request: web.Request, record: ExecutionRecord) -> ExecutionView:
    return ExecutionView(
        **record.model_dump(), execution_link=_task_link(request, record.execution_id)
    )


async def execute_definition(request: web.Request) -> web.Response:
    return await _execute(request, definition_id(request), "id")


async def execute_definition_by_name(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not ID_PATTERN.fullmatch(name):
        raise Problem(404, f"there is no task definition named {name!r} (in any case)")
    return await _execute(request, name, "name")


async def _execute(request: web.Request, ref: str, lookup: Lookup) -> web.Response:
    body = await json_body(request, MAX_TASK_BYTES)
    try:
        # No body at all is an execution with every default.
        asked = ExecutionRequest.model_validate({} if body is None else body)
    except ValidationError as exc:
        raise invalid("execution", exc) from exc
    svc = services(request)
    refuse_while_blocked(svc)
    try:
        execution = await svc.store.definitions.execute(
            ref, asked, lookup=lookup, execution_id=asked.execution_id
        )
    except DefinitionNotFound as exc:
        named = f"named {ref!r} (in any case)" if lookup == "name" else repr(ref)
        raise Problem(404, f"there is no task definition {named}") from exc
    except ExecutionConflict as exc:
        raise Problem(409, str(exc)) from exc
    record = execution.record
    bind_task(record.execution_id, execution.task.plan_id)
    # A repeat of an execution whose task is still queued may never have been published (a
    # crash after the insert): published again, as POST /tasks does; the claim runs it once.
    if execution.created or record.state is State.QUEUED:
        await publish_task(svc, record.execution_id, execution.message)
    if execution.created:
        log.info(
            "definition executed",
            extra={"definitionId": record.definition_id, "executionIndex": record.execution_index},
        )
    started = ExecutionStarted(
        execution_id=record.execution_id,
        execution_index=record.execution_index,
        execution_link=_task_link(request, record.execution_id),
    )
    location = f"/definitions/{record.definition_id}/executions/{record.execution_index}"
    return json_response(dumped(started), 202, {"Location": location})


async def list_executions(request: web.Request) -> web.Response:
    target = definition_id(request)
    query = query_of(request, ExecutionListQuery)
    ranged = request.headers.get("Range")
    offset, limit = window(query.rows_per_page, query.page_number, ranged)
    store = services(request).store.definitions
    listed = await store.executions(
        target, descending=query.sort_type == "desc", offset=offset, limit=limit
    )
    # A deleted definition's executions stay readable; one that never was has none.
    if not listed.total and await store.get(target) is None:
        raise Problem(404, f"there is no task definition {target!r}, nor executions of one")
    page = ExecutionPage(
        executions=[_view(request, record) for record in listed.executions],
        total=listed.total,
    )
    body = dumped(page)
    if ranged is None or wants_page(request):
        return answer(request, body, f"Executions of task definition {target}")
    return page_response(
        body,
        ranged=ranged,
        offset=offset,
        shown=len(listed.executions),
        total=listed.total,
        what="executions",
        headers={"Vary": "Accept"},
    )


async def get_execution(request: web.Request) -> web.Response:
    target = definition_id(request)
    given = request.match_info["index"]
    whole = given.isascii() and given.isdigit() and len(given) <= len(str(_MAX_INDEX))
    if not (whole and 1 <= int(given) <= _MAX_INDEX):
        raise Problem(400, f"an execution index is a whole number from 1, not {given!r}")
    record = await services(request).store.definitions.execution(target, int(given))
    if record is None:
        raise Problem(404, f"task definition {target!r} has no execution {given}")
    return answer(
        request,
        dumped(_view(request, record)),
        f"Execution {record.execution_index} of task definition {record.definition_name}",
    )
