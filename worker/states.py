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
    outputs: dict[str, JsonValue] | None = None,
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
        response=None if outcome is None else outcome.response,
        attempts=attempts,
        queued_at=queued_at,
        started_at=started_at,
        completed_at=completed_at,
        variables=task.variables,
        outputs=outputs or {},
    )


def recorded_outcome(result: Result, reason: str | None, response_json: str | None) -> Outcome:
    """The outcome as the store holds it, to re-publish a completion."""
    response = None if response_json is None else HttpResponse.model_validate_json(response_json)
    return Outcome(result, reason or "", response)


def parse_outputs(outputs_json: str) -> dict[str, JsonValue]:
    value = orjson.loads(outputs_json)
    return value if isinstance(value, dict) else {}
