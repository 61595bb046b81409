"""Pure decisions shared by the runner and the API: how a response is judged, what an event says."""

from __future__ import annotations

from datetime import datetime

import orjson
from pydantic import JsonValue

from worker import criteria
from worker.models import (
    EventName,
    HttpResponse,
    Outcome,
    Result,
    TaskEvent,
    TaskMessage,
    event_id,
)
from worker.store import TaskRecord


def judge(response: HttpResponse, expression: str | None) -> Outcome:
    """SPEC §4: succeeded when the status is 2xx and the criterion, if any, is truthy."""
    status = response.status_code
    if not 200 <= status < 300:
        return Outcome(Result.FAILED, f"HTTP {status}", response)
    if expression is None:
        return Outcome(Result.SUCCEEDED, f"HTTP {status}", response)
    document = {
        "statusCode": status,
        "headers": response.headers,
        "body": response.body,
    }
    if criteria.holds(expression, document):
        return Outcome(Result.SUCCEEDED, f"HTTP {status}; successCriteria true", response)
    return Outcome(Result.FAILED, f"HTTP {status}; successCriteria false", response)


def task_event(
    name: EventName,
    task: TaskMessage,
    *,
    attempts: int,
    queued_at: datetime,
    started_at: datetime | None = None,
    completed_at: datetime | None = None,
    outcome: Outcome | None = None,
    response: HttpResponse | None = None,
) -> TaskEvent:
    return TaskEvent(
        name=name,
        event_id=event_id(task.task_id, name),
        task_id=task.task_id,
        plan_id=task.plan_id,
        job_id=task.job,
        hub_name=task.hub_name,
        result=None if outcome is None else outcome.result,
        reason=None if outcome is None else outcome.reason,
        response=response if outcome is None else outcome.response,
        attempts=attempts,
        queued_at=queued_at,
        started_at=started_at,
        completed_at=completed_at,
        variables=task.variables,
    )


def callback_headers(task: TaskMessage, plan_url: str, token: str) -> dict[str, str]:
    """What Azure's server tasks send, so that services written for them find their way back."""
    return {
        "PlanUrl": plan_url,
        "ProjectId": task.project,
        "HubName": task.hub_name,
        "PlanId": task.plan_id,
        "JobId": task.job,
        "TimelineId": task.timeline,
        "TaskInstanceId": task.task_id,
        "AuthToken": token,
    }


def completed_event(record: TaskRecord) -> TaskEvent:
    """The TaskCompleted event of a completed task, from its record alone."""
    assert record.result is not None, "only a completed task has a TaskCompleted event"
    response = None
    if record.response is not None:
        response = HttpResponse.model_validate_json(record.response)
    return TaskEvent(
        name=EventName.COMPLETED,
        event_id=event_id(record.task_id, EventName.COMPLETED),
        task_id=record.task_id,
        plan_id=record.plan_id,
        job_id=record.job_id,
        hub_name=record.hub_name,
        result=record.result,
        reason=record.reason,
        response=response,
        attempts=record.attempts,
        queued_at=record.queued_at,
        started_at=record.started_at,
        completed_at=record.completed_at,
        variables=_object(orjson.loads(record.message).get("variables")),
        outputs=_object(orjson.loads(record.outputs)),
    )


def _object(value: object) -> dict[str, JsonValue]:
    return value if isinstance(value, dict) else {}
