"""Typed task records: what the store reads of tasks, workers and dead letters, for the runner,
the views, the API and the events. Plain data: the store builds them from its rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from worker.contract.models import Mode, Result, State


class CompletedBy(StrEnum):
    """Whose word completed a task."""

    WORKER = "worker"
    CALLBACK = "callback"
    TIMEOUT = "timeout"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class TaskRecord:
    task_id: str
    plan_id: str
    job_id: str
    hub_name: str
    state: State
    result: Result | None
    reason: str | None
    attempts: int
    digest: bytes
    message: str
    response: str | None
    outputs: str
    worker_id: int | None
    lease_until: datetime | None
    queued_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    mode: Mode
    completed_by: CompletedBy | None
    deadline: datetime | None
    reply_to: str | None
    correlation_id: str | None
    external_started_at: datetime | None
    # The task's variables, as JSON text.
    variables: str | None
    # The attempts that were retried, as a JSON array; how many; when a queued task's next is due.
    history: str = "[]"
    retries: int = 0
    retry_at: datetime | None = None
    # Only where the record was read with the liveness check (queries.SELECT_TASKS).
    worker_alive: bool = False
    # Poll tasks: the polls recorded, and when a polling task's next one is due.
    polls: int = 0
    next_poll_at: datetime | None = None
    # Callback and poll tasks: when the task began to wait (its invocation was accepted).
    waiting_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class TaskSummaryRecord:
    """A task as lists show it."""

    task_id: str
    plan_id: str
    job_id: str
    hub_name: str
    name: str | None
    mode: Mode
    state: State
    result: Result | None
    reason: str | None
    attempts: int
    queued_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    deadline: datetime | None
    polls: int = 0


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A live worker process, from its heartbeats."""

    worker_id: int
    host: str
    pid: int
    version: str
    in_flight: int
    started_at: datetime
    last_seen: datetime


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    message_id: str | None
    reason: str
    excerpt: str
    at: datetime


@dataclass(frozen=True, slots=True)
class Overview:
    states: dict[str, int]
    oldest_waiting_since: datetime | None
    completed_last_minute: int
    unfinished: list[TaskSummaryRecord]
    failures: list[TaskSummaryRecord]
    workers: list[WorkerRecord]
    dead_letters: list[DeadLetterRecord]
    # The states whose count is an estimate: those with more than 10,000 tasks.
    estimated: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ClusterState:
    """What the metrics export of the whole deployment: unfinished tasks by state, the oldest
    queued and waiting ones, the overdue ones, the live workers."""

    states: dict[str, int]
    oldest_queued_at: datetime | None
    oldest_waiting_since: datetime | None
    overdue: int
    workers: int
