"""Plan events and logs from external services, on agentless's paths and on Azure's (SPEC §6).

Every route here takes the task's callback token (Bearer, or Basic with the token as password,
as Azure's server-task helper library sends it); a forged or expired token is refused before any
database read, and a token of another task or plan with 403.

Replays: once its task has completed, a token changes nothing more. A TaskCompleted that comes
again is answered 200 only when it asks for what was done: the task was completed by a
TaskCompleted, with the same result (its token, plan and taskId already match, or it would not get
this far; the event name and result may differ in case, and `jobId` is not read, since the token
names the task). Anything else about a completed task is refused with 409: another result, a task
completed by its deadline, a cancellation or its own response, TaskStarted and TaskAssigned, log
lines on every log route, a new log, and timeline record updates. Reading the record still answers.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Annotated, Final

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError
from pydantic.alias_generators import to_camel

from callback_api.guard import presented
from callback_api.inputs import read_body
from callback_api.problems import Problem
from callback_api.services import services
from worker.contract.errors import describe
from worker.contract.models import EventName, Mode, Result, State, TaskEvent, any_case, event_id
from worker.contract.records import CompletedBy, TaskRecord
from worker.contract.tokens import Grant, TokenError
from worker.logs import bind_task
from worker.views import (
    LinesAccepted,
    TaskLog,
    TaskStatus,
    TimelineRecord,
    TimelineRecords,
    TimelineState,
    TimelineVariable,
)

log = logging.getLogger(__name__)

MAX_EVENT_BYTES: Final = 64 * 1024
MAX_LOG_BYTES: Final = 1024 * 1024
# Per task, the newest lines are kept; older ones are dropped and counted.
LOG_LINES_CAP: Final = 10_000
MAX_LINE_CHARS: Final = 4096
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="agentless", Basic realm="agentless"'}


class PlanEventName(StrEnum):
    ASSIGNED = "TaskAssigned"
    STARTED = "TaskStarted"
    COMPLETED = "TaskCompleted"


class PlanEvent(BaseModel):
    """What a service posts to the events endpoint; names and results in any case."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    name: Annotated[PlanEventName, any_case(PlanEventName, "event name")]
    task_id: str = Field(min_length=1, max_length=128)
    job_id: str | None = None
    result: Annotated[Result, any_case(Result, "result")] | None = None


def grant_of(request: web.Request) -> Grant:
    """The callback token's grant; 401 without a genuine, unexpired token."""
    token = presented(request)
    if not token:
        raise Problem(
            401,
            "send the task's AuthToken as 'Authorization: Bearer <token>' or as Basic auth "
            "with an empty user name and the token as password",
            headers=_CHALLENGE,
        )
    svc = services(request)
    try:
        # Expiry by the database's clock, which set the deadline the expiry follows.
        return svc.signer.verify(token, now=svc.store.clock.timestamp())
    except TokenError as exc:
        raise Problem(
            401, f"{exc}; use the AuthToken sent with this task", headers=_CHALLENGE
        ) from exc


def _check_plan(grant: Grant, request: web.Request) -> None:
    plan_id = request.match_info["planId"]
    if plan_id != grant.plan_id:
        raise Problem(403, f"this token is for plan {grant.plan_id!r}, not plan {plan_id!r}")


def _json(body: bytes) -> JsonValue:
    try:
        value: JsonValue = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"the body is not JSON: {exc}") from exc
    return value


async def post_event(request: web.Request) -> web.Response:
    grant = grant_of(request)
    body = await read_body(request, MAX_EVENT_BYTES)
    try:
        event = PlanEvent.model_validate(_json(body))
    except ValidationError as exc:
        raise Problem(400, f"the event is not valid: {describe(exc)}") from exc
    _check_plan(grant, request)
    if event.task_id != grant.task_id:
        raise Problem(403, f"this token is for task {grant.task_id!r}, not {event.task_id!r}")
    bind_task(event.task_id, grant.plan_id)
    if event.name is PlanEventName.COMPLETED:
        return await _completed(request, event)
    return await _started(request, event)


async def _completed(request: web.Request, event: PlanEvent) -> web.Response:
    if event.result is None:
        raise Problem(400, 'a TaskCompleted event needs a result (e.g. "succeeded")')
    svc = services(request)
    plan_id = request.match_info["planId"]
    reason = f"TaskCompleted from the external service: {event.result.value}"
    completed, record = await svc.store.complete_by_callback(
        event.task_id, plan_id, event.result, reason
    )
    record = _exists(record, event.task_id, plan_id)
    if completed:
        log.info("task completed", extra={"result": event.result.value, "reason": reason})
        svc.metrics.record_completed(record)
        svc.announcer.announce(record)
        return _accepted(record)
    if record.completed_by is CompletedBy.CALLBACK and record.result is event.result:
        # A repeat of the TaskCompleted that completed it (a retry whose answer was lost, or a
        # replay): it asks for nothing that was not done, and changes nothing.
        return _accepted(record)
    detail = _conflict(record, event.result)
    if record.state is State.WAITING and record.deadline is not None:
        # Its deadline passed a moment ago, by the database's clock; the sweep is on its way.
        when = record.deadline.isoformat()
        detail = f"task {record.task_id!r} timed out waiting for callback at {when}"
    raise Problem(409, detail, state=record.state, result=record.result)


async def _started(request: web.Request, event: PlanEvent) -> web.Response:
    svc = services(request)
    plan_id = request.match_info["planId"]
    started, record = await svc.store.external_started(event.task_id, plan_id)
    record = _exists(record, event.task_id, plan_id)
    if not started:
        raise Problem(409, _conflict(record, None), state=record.state, result=record.result)
    await svc.broker.publish_event(
        TaskEvent(
            name=EventName.STARTED,
            # Not the worker's TaskStarted: the service's own word that it started.
            event_id=f"{event_id(record.task_id, EventName.STARTED)}:external",
            task_id=record.task_id,
            plan_id=record.plan_id,
            job_id=record.job_id,
            hub_name=record.hub_name,
            attempts=record.attempts,
            queued_at=record.queued_at,
            started_at=record.started_at,
        )
    )
    return _accepted(record)


def _exists(record: TaskRecord | None, task_id: str, plan_id: str) -> TaskRecord:
    if record is None:
        raise Problem(404, f"plan {plan_id!r} has no task {task_id!r}")
    return record


def _conflict(record: TaskRecord, result: Result | None) -> str:
    """Why the task takes no more events, in words."""
    if record.mode is not Mode.CALLBACK:
        return f"task {record.task_id!r} is not a callback task: it completes on its response"
    if record.state is State.QUEUED:
        return f"task {record.task_id!r} has not been started yet"
    when = record.completed_at.isoformat() if record.completed_at else "earlier"
    match record.completed_by:
        case CompletedBy.TIMEOUT:
            return f"task {record.task_id!r} {record.reason} at {when}"
        case CompletedBy.CANCEL:
            return f"task {record.task_id!r} was canceled at {when}"
        case CompletedBy.CALLBACK if result is not None:
            return (
                f"task {record.task_id!r} already completed with result "
                f"{record.result}, not {result.value}"
            )
        case _:
            return f"task {record.task_id!r} already completed at {when}: {record.reason}"


async def _refused(request: web.Request, grant: Grant, final: str) -> Problem:
    """Why a change to the grant's task was not made: the plan has no such task (404), or the
    task has completed and `final` says what of it can no longer change (409)."""
    record = _exists(
        await services(request).store.in_plan(grant.task_id, grant.plan_id),
        grant.task_id,
        grant.plan_id,
    )
    return _final(record, final)


def _final(record: TaskRecord, final: str) -> Problem:
    detail = f"task {record.task_id!r} already completed; {final}"
    return Problem(409, detail, state=record.state, result=record.result)


def _accepted(record: TaskRecord) -> web.Response:
    answer = TaskStatus(task_id=record.task_id, state=record.state, result=record.result)
    return web.json_response(text=answer.model_dump_json(by_alias=True))


def _lines(body: bytes, *, as_json: bool) -> list[str]:
    """Log lines from text (one per line) or JSON ({"value": [lines]}, as Azure's feed sends).
    Text is never guessed to be JSON: a log line may well look like JSON."""
    lines: list[str] = []
    if as_json:
        data = _json(body)
        values = data.get("value") if isinstance(data, dict) else data
        if not isinstance(values, list):
            raise Problem(400, 'a JSON log body is {"value": ["line", …]}: a list of strings')
        for value in values:
            if not isinstance(value, str):
                raise Problem(400, 'a JSON log body is {"value": ["line", …]}: a list of strings')
            lines.append(value)
    else:
        try:
            lines = body.decode().splitlines()
        except UnicodeDecodeError as exc:
            raise Problem(400, f"log text must be UTF-8: {exc}") from exc
    return [
        line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + "…"
        for line in (line.replace("\x00", "\ufffd") for line in lines)
    ]


async def _append(request: web.Request, grant: Grant, *, as_json: bool) -> web.Response:
    _check_plan(grant, request)
    bind_task(grant.task_id, grant.plan_id)
    lines = _lines(await read_body(request, MAX_LOG_BYTES), as_json=as_json)
    # Even no lines are refused once the task has completed: the token is of no more use.
    if not await services(request).store.append_log_lines(
        grant.task_id, grant.plan_id, lines, LOG_LINES_CAP
    ):
        raise await _refused(request, grant, "its log is final")
    return web.json_response(text=LinesAccepted(count=len(lines)).model_dump_json(by_alias=True))


async def post_task_logs(request: web.Request) -> web.Response:
    grant = grant_of(request)
    task_id = request.match_info["taskId"]
    if task_id != grant.task_id:
        raise Problem(403, f"this token is for task {grant.task_id!r}, not {task_id!r}")
    return await _append(request, grant, as_json="json" in request.content_type)


async def post_feed(request: web.Request) -> web.Response:
    # Azure's helper sends the job id as the record id: the token tells which task it is.
    return await _append(request, grant_of(request), as_json=True)


async def post_append_log(request: web.Request) -> web.Response:
    # Azure's TaskLogger appends a text stream.
    return await _append(request, grant_of(request), as_json=False)


async def post_create_log(request: web.Request) -> web.Response:
    grant = grant_of(request)
    _check_plan(grant, request)
    body = await read_body(request, MAX_EVENT_BYTES)
    data = _json(body) if body.strip() else {}
    path = data.get("path") if isinstance(data, dict) else None
    number = await services(request).store.create_log(grant.task_id, grant.plan_id)
    if number is None:
        raise await _refused(request, grant, "its log is final")
    now = services(request).store.clock.now()
    created = TaskLog(
        id=number,
        # Only a string is a path; anything else in the body is not echoed back as one.
        path=path if isinstance(path, str) else None,
        line_count=0,
        created_on=now,
        last_changed_on=now,
    )
    return web.json_response(text=created.model_dump_json(by_alias=True))


def _timeline_records(record: TaskRecord) -> web.Response:
    states: dict[State, TimelineState] = {
        State.QUEUED: "pending",
        State.RUNNING: "inProgress",
        State.WAITING: "inProgress",
        State.POLLING: "inProgress",
        State.COMPLETED: "completed",
    }
    timeline = TimelineRecord(
        id=record.task_id,
        state=states[record.state],
        result=record.result,
        start_time=record.started_at,
        finish_time=record.completed_at,
        variables={
            name: TimelineVariable(value=value)
            for name, value in orjson.loads(record.outputs).items()
        },
    )
    answer = TimelineRecords(count=1, value=[timeline])
    return web.json_response(text=answer.model_dump_json(by_alias=True))


async def get_timeline_records(request: web.Request) -> web.Response:
    grant = grant_of(request)
    _check_plan(grant, request)
    record = _exists(
        await services(request).store.in_plan(grant.task_id, grant.plan_id),
        grant.task_id,
        grant.plan_id,
    )
    return _timeline_records(record)


async def patch_timeline_records(request: web.Request) -> web.Response:
    """Progress and output variables; the variables come back as `outputs` in TaskCompleted.
    Secret variables are not kept."""
    grant = grant_of(request)
    _check_plan(grant, request)
    data = _json(await read_body(request, MAX_EVENT_BYTES))
    records = data.get("value") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise Problem(400, 'the body is {"value": [timeline records]} or a list of records')
    outputs: dict[str, JsonValue] = {}
    secret: list[str] = []
    for item in records:
        variables = item.get("variables") if isinstance(item, dict) else None
        if not isinstance(variables, dict):
            continue
        for name, variable in variables.items():
            if isinstance(variable, dict) and variable.get("isSecret"):
                # A variable now secret must not keep a value it had in the clear.
                secret.append(name)
                outputs.pop(name, None)
            elif isinstance(variable, dict):
                outputs[name] = variable.get("value")
            else:
                outputs[name] = variable
    svc = services(request)
    if outputs or secret:
        merged, record = await svc.store.merge_outputs(
            grant.task_id, grant.plan_id, outputs, secret
        )
    else:
        # Progress alone changes nothing we keep; still, a completed task's record is final.
        record = await svc.store.in_plan(grant.task_id, grant.plan_id)
        merged = record is not None and record.state is not State.COMPLETED
    record = _exists(record, grant.task_id, grant.plan_id)
    if not merged:
        raise _final(record, "its record and output variables are final")
    return _timeline_records(record)
