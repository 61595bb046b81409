"""What the task and ops API, the CLI and the operations page show: wire models built from records.

The models are the OpenAPI document's schemas too, so what is served cannot drift from it.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, JsonValue, RootModel
from pydantic.alias_generators import to_camel

from worker.contract.models import HttpResponse, Mode, Result, State
from worker.contract.records import (
    CompletedBy,
    Overview,
    TaskRecord,
    TaskSummaryRecord,
    WorkerRecord,
)

if TYPE_CHECKING:
    from worker.broker import QueueDepths


class View(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class TaskSummary(View):
    task_id: str
    plan_id: str
    job_id: str
    hub_name: str
    name: str | None = None
    mode: Mode
    state: State
    result: Result | None = None
    reason: str | None = None
    attempts: int
    queued_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    deadline: datetime | None = None

    @classmethod
    def of(cls, record: TaskSummaryRecord) -> TaskSummary:
        return cls.model_validate(record, from_attributes=True, by_name=True)


class ReceivedEvent(View):
    """An event the task's external service posted."""

    name: Literal["TaskStarted", "TaskCompleted"]
    at: datetime
    result: Result | None = None


class RetriedAttempt(View):
    """An attempt that failed and was tried again (the task's `retry` policy)."""

    attempt: int
    started_at: datetime | None = None
    ended_at: datetime
    reason: str
    status_code: int | None = Field(default=None, description="absent when no response came")
    retry_at: datetime


class TaskDetail(TaskSummary):
    request: dict[str, JsonValue] = Field(description="as queued, secret header values redacted")
    response: HttpResponse | None = None
    retries: int = 0
    retry_at: datetime | None = Field(
        default=None, description="when a queued task's next attempt is due"
    )
    history: list[RetriedAttempt] = Field(
        default_factory=list, description="the attempts that were retried, oldest first"
    )
    polls: int = Field(default=0, description="poll tasks: the polls made and recorded")
    next_poll_at: datetime | None = Field(
        default=None,
        description="a polling task's next poll is due then; null while a poll is being made",
    )
    variables: dict[str, JsonValue] = Field(default_factory=dict)
    outputs: dict[str, JsonValue] = Field(default_factory=dict)
    events: list[ReceivedEvent] = Field(default_factory=list)

    @classmethod
    def from_record(cls, record: TaskRecord) -> TaskDetail:
        message = orjson.loads(record.message)
        events = []
        if record.external_started_at is not None:
            events.append(ReceivedEvent(name="TaskStarted", at=record.external_started_at))
        if record.completed_by is CompletedBy.CALLBACK and record.completed_at is not None:
            events.append(
                ReceivedEvent(name="TaskCompleted", at=record.completed_at, result=record.result)
            )
        return cls(
            task_id=record.task_id,
            plan_id=record.plan_id,
            job_id=record.job_id,
            hub_name=record.hub_name,
            name=message.get("name"),
            mode=record.mode,
            state=record.state,
            result=record.result,
            reason=record.reason,
            attempts=record.attempts,
            queued_at=record.queued_at,
            started_at=record.started_at,
            completed_at=record.completed_at,
            deadline=record.deadline,
            request=message.get("request") or {},
            response=(
                None
                if record.response is None
                else HttpResponse.model_validate_json(record.response)
            ),
            retries=record.retries,
            retry_at=record.retry_at,
            history=orjson.loads(record.history),
            polls=record.polls,
            next_poll_at=record.next_poll_at,
            variables=message.get("variables") or {},
            outputs=orjson.loads(record.outputs),
            events=events,
        )


class TaskPage(View):
    tasks: list[TaskSummary]
    total: int = Field(
        description="how many tasks match: exact up to 10,000, past which it is an estimate "
        "(totalExact false)"
    )
    total_exact: bool = Field(
        default=True,
        description="whether total is a count (true) or the database's estimate (false)",
    )


class WorkerView(View):
    worker_id: int
    host: str
    pid: int
    version: str
    in_flight: int
    started_at: datetime
    last_seen: datetime


class DeadLetterView(View):
    message_id: str | None = None
    reason: str
    excerpt: str
    at: datetime


class QueueView(View):
    """GET /queue: the broker's view and the database's, side by side."""

    ready: int = Field(description="task messages waiting in the queue")
    unacknowledged: int = Field(description="task messages held by workers (their heartbeats)")
    consumers: int
    dead_letters: int = Field(description="messages in the dead-letter queue")
    queued: int = Field(description="tasks submitted over HTTP that no worker took yet")
    running: int
    waiting: int = Field(description="callback tasks waiting for their TaskCompleted")
    polling: int = Field(description="poll tasks waiting for their next poll")
    completed: int
    estimated: list[State] = Field(
        default_factory=list,
        description="the states whose count above is an estimate: each is counted exactly up "
        "to 10,000 tasks, and estimated past that",
    )
    oldest_waiting_age_seconds: float | None = None
    completed_last_minute: int
    broker_blocked: str | None = Field(
        default=None,
        description="why RabbitMQ is blocking publishes (its memory or disk alarm), while it is",
    )


class MinuteThroughput(View):
    """The tasks that completed in one minute: succeeded (with issues too), or not."""

    minute: datetime = Field(description="the minute's start")
    succeeded: int
    other: int = Field(description="every other result: failed, canceled, …")


class Dashboard(View):
    """Everything the operations page shows."""

    queue: QueueView
    unfinished: list[TaskSummary]
    failures: list[TaskSummary]
    workers: list[WorkerView]
    dead_letters: list[DeadLetterView]
    generated_at: datetime
    # The page's chart, read for the page alone (GET /queue has no use for it).
    throughput: list[MinuteThroughput] = Field(
        default_factory=list, description="the last hour's minutes, oldest first"
    )


def worker_views(records: list[WorkerRecord]) -> list[WorkerView]:
    return [WorkerView.model_validate(r, from_attributes=True, by_name=True) for r in records]


def dashboard(depths: QueueDepths, overview: Overview, now: datetime) -> Dashboard:
    """What the queue page and `agentless status` show; ages as of `now`, by the database's
    clock (the store's Clock), as the times they are counted from are."""
    workers = worker_views(overview.workers)
    oldest = overview.oldest_waiting_since
    queue = QueueView(
        ready=depths.ready,
        unacknowledged=sum(w.in_flight for w in workers),
        consumers=depths.consumers,
        dead_letters=depths.dead,
        queued=overview.states.get(State.QUEUED, 0),
        running=overview.states.get(State.RUNNING, 0),
        waiting=overview.states.get(State.WAITING, 0),
        polling=overview.states.get(State.POLLING, 0),
        completed=overview.states.get(State.COMPLETED, 0),
        estimated=sorted(State(state) for state in overview.estimated),
        oldest_waiting_age_seconds=None if oldest is None else (now - oldest).total_seconds(),
        completed_last_minute=overview.completed_last_minute,
        broker_blocked=depths.blocked,
    )
    return Dashboard(
        queue=queue,
        unfinished=[TaskSummary.of(record) for record in overview.unfinished],
        failures=[TaskSummary.of(record) for record in overview.failures],
        workers=workers,
        dead_letters=[
            DeadLetterView.model_validate(r, from_attributes=True, by_name=True)
            for r in overview.dead_letters
        ],
        generated_at=now,
    )


# The answers below are what the handlers serialise through, so that the OpenAPI document's
# schemas are the answers' own.


class TaskStatus(View):
    """Where a task stands once a cancel or a plan event has been applied to it."""

    task_id: str
    state: State
    result: Result | None = None


class Submitted(View):
    """POST /tasks: the task is queued (or was already, with the same body)."""

    task_id: str
    state: State
    location: str = Field(description="where the task can be read: /tasks/{taskId}")


class LogLine(View):
    at: datetime
    line: str


class TaskLogs(View):
    """GET /tasks/{taskId}/logs: the lines the task's service posted, oldest first."""

    task_id: str
    dropped_lines: int = Field(description="older lines dropped to keep the newest")
    lines: list[LogLine]


class LinesAccepted(View):
    count: int = Field(description="log lines taken from the body")


class TaskLog(View):
    """A log created through Azure's TaskLogger; its lines join the task's log lines."""

    id: int
    path: str | None = None
    line_count: int
    created_on: datetime
    last_changed_on: datetime


class TimelineVariable(View):
    value: JsonValue
    is_secret: bool = False


TimelineState = Literal["pending", "inProgress", "completed"]


class TimelineRecord(View):
    """The task, as Azure's TaskClient reads its timeline record."""

    id: str
    type: Literal["Task"] = "Task"
    state: TimelineState
    result: Result | None = None
    start_time: datetime | None = None
    finish_time: datetime | None = None
    variables: dict[str, TimelineVariable] = Field(default_factory=dict)


class TimelineRecords(View):
    count: int
    value: list[TimelineRecord]


class WorkerList(RootModel[list[WorkerView]]):
    """GET /workers."""

    model_config = ConfigDict(frozen=True)


class Health(View):
    status: Literal["ok"] = "ok"


class Readiness(View):
    status: Literal["ready", "not ready"]
    reason: str | None = Field(
        default=None,
        description="why the process is not ready; or, while it is, what holds it back (RabbitMQ "
        "blocking publishes)",
    )

    @property
    def ready(self) -> bool:
        return self.status == "ready"
