"""What callers hand the store to change a task, and what they get back: claims and completions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from worker.contract.models import Result, State, TaskMessage, stored_message
from worker.contract.records import TaskRecord


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    task_id: str
    plan_id: str
    job_id: str
    hub_name: str
    project_id: str | None
    name: str | None
    mode: str
    digest: bytes
    message: str
    queued_at: datetime | None
    lease_seconds: float
    reply_to: str | None
    correlation_id: str | None

    @classmethod
    def of(
        cls,
        task: TaskMessage,
        body: bytes,
        *,
        queued_at: datetime | None = None,
        lease_seconds: float = 0,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> ClaimRequest:
        """The row for `task`, whose message is `body`."""
        return cls(
            task_id=task.task_id,
            plan_id=task.plan_id,
            job_id=task.job,
            hub_name=task.hub_name,
            project_id=task.project_id,
            name=task.name,
            mode=task.wait_for_completion.value,
            digest=hashlib.sha256(body).digest(),
            message=stored_message(task, body),
            queued_at=queued_at,
            lease_seconds=lease_seconds,
            reply_to=reply_to,
            correlation_id=correlation_id,
        )


@dataclass(frozen=True, slots=True)
class Claimed:
    """This worker now runs the task's attempt number `attempts`, after `retries` retries."""

    attempts: int
    retries: int
    queued_at: datetime
    started_at: datetime

    def lost_in(self, record: TaskRecord) -> bool:
        """Whether `record`, found where this attempt should be, is the task as it was before
        this claim: an earlier attempt's, not yet completed. A newer attempt would have counted
        past this one; so the claim itself is gone, lost with the last commits of a failed
        primary, and the message in hand is the only one left to carry the task."""
        return record.state in (State.QUEUED, State.RUNNING) and record.attempts < self.attempts


@dataclass(frozen=True, slots=True)
class CallbackCompletion:
    task_id: str
    plan_id: str
    result: Result
    reason: str


@dataclass(frozen=True, slots=True)
class Waited:
    """A callback task's attempt recorded `waiting` (queries.WAIT's arguments)."""

    task_id: str
    attempts: int
    response_json: str | None
    deadline: datetime
    started_deadline: datetime | None
    outputs_json: str


@dataclass(frozen=True, slots=True)
class PollStarted:
    """A poll task's attempt recorded `polling` (poll_queries.START_POLLING's arguments): its
    deadline and first poll run from the moment it is recorded."""

    task_id: str
    attempts: int
    response_json: str | None
    timeout_seconds: float
    first_delay: float
    poll_request_json: str
    poll_secrets: bytes | None
    outputs_json: str


@dataclass(frozen=True, slots=True)
class Completion:
    """An attempt's result as COMPLETE writes it: what it holds is all a worker keeps of it among
    its recent writes (recent.py), not the response it came from."""

    task_id: str
    attempts: int
    result: Result
    reason: str
    response_json: str | None
    outputs_json: str


@dataclass(frozen=True, slots=True)
class DuePoll:
    """A poll this worker has taken: the task's poll number `polls + 1` is to be made."""

    task_id: str
    polls: int
    due_at: datetime
    message: str
    poll_request: str
    poll_secrets: bytes | None


@dataclass(frozen=True, slots=True)
class PollAnswer:
    """What a poll found: the task polls again after `delay` seconds, or completes (`result`)."""

    task_id: str
    polls: int
    reason: str
    response_json: str | None
    delay: float = 0
    result: Result | None = None
    outputs_json: str = "{}"
    # time.monotonic() when the answer came: the delay runs from then, not from its recording.
    answered: float = 0
