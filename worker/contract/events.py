"""The events a task's life publishes (SPEC §7), built from the task or from its record."""

from __future__ import annotations

from datetime import datetime

import orjson

from worker.contract.models import (
    EventName,
    HttpResponse,
    Outcome,
    TaskEvent,
    TaskMessage,
    event_id,
)
from worker.contract.records import TaskRecord


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
        outputs=(None if outcome is None else outcome.outputs) or {},
    )


def completed_event(record: TaskRecord) -> bytes:
    """The TaskCompleted event (SPEC §7) of a completed task, from its record alone.

    The JSON columns go into the event as they are, never parsed: this runs once per callback.
    It is the same document as `TaskEvent` gives (a test holds the two together).
    """
    assert record.result is not None, "only a completed task has a TaskCompleted event"
    return orjson.dumps(
        {
            "name": EventName.COMPLETED.value,
            "eventId": event_id(record.task_id, EventName.COMPLETED),
            "taskId": record.task_id,
            "planId": record.plan_id,
            "jobId": record.job_id,
            "hubName": record.hub_name,
            "result": record.result.value,
            "reason": record.reason,
            "response": None if record.response is None else orjson.Fragment(record.response),
            "attempts": record.attempts,
            "queuedAt": record.queued_at,
            "startedAt": record.started_at,
            "completedAt": record.completed_at,
            "variables": orjson.Fragment(record.variables or "{}"),
            "outputs": orjson.Fragment(record.outputs),
        },
        option=orjson.OPT_UTC_Z,
    )
