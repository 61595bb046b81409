"""The wire contract (SPEC §3, §4, §7): names, states, results, task messages and events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Final

import orjson
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    SerializeAsAny,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
)

from worker.contract import criteria, response_macros
from worker.contract.criteria import CriteriaSyntax
from worker.contract.errors import InvalidTask, describe
from worker.contract.requests import (
    ID_PATTERN,
    SECRET_HEADERS,
    Id,
    PollPolicy,
    RetryPolicy,
    TaskRequest,
    WireModel,
    storable,
)

REASON_HEADER: Final = "x-agentless-reason"
MAX_TASK_BYTES: Final = 1_048_576
DEFAULT_HUB: Final = "build"
DEFAULT_PROJECT: Final = "default"


@dataclass(frozen=True, slots=True)
class Names:
    """Exchange and queue names under one prefix (SPEC §3)."""

    prefix: str

    @property
    def tasks(self) -> str:
        return f"{self.prefix}.tasks"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.dead"

    def delay(self, seconds: int) -> str:
        """The queue where a task waits `seconds` before going back to the task queue."""
        return f"{self.prefix}.delay.{seconds}s"


class State(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    POLLING = "polling"
    COMPLETED = "completed"


class Result(StrEnum):
    SUCCEEDED = "succeeded"
    SUCCEEDED_WITH_ISSUES = "succeededWithIssues"
    FAILED = "failed"
    CANCELED = "canceled"
    SKIPPED = "skipped"
    ABANDONED = "abandoned"


class Mode(StrEnum):
    API_RESPONSE = "apiResponse"
    CALLBACK = "callback"
    POLL = "poll"


class EventName(StrEnum):
    STARTED = "TaskStarted"
    WAITING = "TaskWaiting"
    COMPLETED = "TaskCompleted"

    @property
    def routing_word(self) -> str:
        return self.value.removeprefix("Task").lower()


def _mode(value: object) -> object:
    """Azure's `true`/`false` spellings, and any case of the two mode names."""
    if isinstance(value, bool):
        return Mode.CALLBACK if value else Mode.API_RESPONSE
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "callback"):
            return Mode.CALLBACK
        if lowered in ("false", "apiresponse"):
            return Mode.API_RESPONSE
        if lowered == "poll":
            return Mode.POLL
    return value


def any_case(choices: Iterable[str], what: str | None = None) -> BeforeValidator:
    """One of `choices`, in any case, as the choice itself; the error names `what` it must be."""
    table = {choice.lower(): choice for choice in choices}

    def parse(value: object) -> object:
        if isinstance(value, str) and value.lower() in table:
            return table[value.lower()]
        listed = ", ".join(table.values())
        if what is None:
            raise ValueError(f"{value!r} is not one of {listed}")
        raise ValueError(f"{value!r} is not a known {what} ({listed})")

    return BeforeValidator(parse)


def _jmespath(expression: str) -> str:
    criteria.compile_expression(expression)
    return expression


OutputName = Annotated[str, StringConstraints(pattern=rf"^{ID_PATTERN.pattern}$")]
# Compiled at validation, so that an invalid one is refused with its name (`outputs.NAME`).
OutputExpression = Annotated[str, StringConstraints(max_length=10_000), AfterValidator(_jmespath)]


class TaskIds(WireModel):
    """What makes a task of a template: its ids (SPEC §4)."""

    task_id: Id
    plan_id: Id


class TaskTemplate(WireModel):
    """Every field of a task message but its ids, and the rules they follow together: what a task
    definition stores (SPEC §9) and a task message carries."""

    job_id: Id | None = None
    hub_name: Id = DEFAULT_HUB
    project_id: Id | None = None
    timeline_id: Id | None = None
    name: str | None = Field(default=None, max_length=1024)
    request: TaskRequest
    wait_for_completion: Annotated[Mode, BeforeValidator(_mode)] = Mode.API_RESPONSE
    # Before successCriteria: that field's validator reads it.
    criteria_syntax: Annotated[CriteriaSyntax, any_case(CriteriaSyntax, "criteria syntax")] = (
        CriteriaSyntax.JMESPATH
    )
    success_criteria: str | None = Field(default=None, max_length=10_000)
    timeout_seconds: int | None = Field(default=None, gt=0, le=366 * 86_400)
    started_timeout_seconds: int | None = Field(default=None, gt=0, le=366 * 86_400)
    cancel_request: TaskRequest | None = None
    retry: RetryPolicy | None = None
    poll: PollPolicy | None = None
    outputs: dict[OutputName, OutputExpression] = Field(default_factory=dict, max_length=100)
    variables: Annotated[dict[str, JsonValue], AfterValidator(storable)] = Field(
        default_factory=dict
    )

    @field_validator("success_criteria")
    @classmethod
    def _compiles(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and value.strip():
            # An invalid criteriaSyntax has its own error; the criterion is not judged by it.
            syntax = info.data.get("criteria_syntax")
            if isinstance(syntax, CriteriaSyntax):
                criteria.compile_criterion(value, syntax)
            return value
        return None

    @field_validator("poll")
    @classmethod
    def _poll_fits(cls, poll: PollPolicy | None, info: ValidationInfo) -> PollPolicy | None:
        if poll is None:
            return None
        if info.data.get("wait_for_completion") is not Mode.POLL:
            raise ValueError('goes with waitForCompletion "poll" only')
        failure = poll.failure_criteria
        syntax = info.data.get("criteria_syntax")
        if failure is not None and failure.strip() and isinstance(syntax, CriteriaSyntax):
            try:
                criteria.compile_criterion(failure, syntax)
            except ValueError as exc:
                raise ValueError(f"failureCriteria is {exc}") from None
        request = poll.request
        if request is not None:
            texts = [request.url or "", request.url_suffix, *request.headers.values()]
            try:
                response_macros.check([*texts, *response_macros.strings(request.body)])
            except ValueError as exc:
                raise ValueError(f"request: {exc}") from None
        return poll

    @property
    def polling(self) -> PollPolicy:
        """The poll policy of a poll task: its own, or every default."""
        return self.poll or _DEFAULT_POLL


# The template's fields first, as declared, then the ids: pydantic orders a model's fields from
# its last base to its first, so the ids lead (and errors about them are listed first).
class TaskMessage(TaskTemplate, TaskIds):
    """A task as queued (SPEC §4)."""

    @property
    def job(self) -> str:
        return self.job_id or self.plan_id

    @property
    def project(self) -> str:
        # Azure always has a project; services build URLs with it, so it is never empty.
        return self.project_id or DEFAULT_PROJECT

    @property
    def timeline(self) -> str:
        return self.timeline_id or self.job


_DEFAULT_POLL: Final = PollPolicy()


class HttpResponse(WireModel):
    """What the endpoint answered, as recorded and as judged."""

    status_code: int
    headers: dict[str, str]
    body: JsonValue
    elapsed_ms: int

    # The body is read with `body_value()`, which an UnparsedResponse parses for the moment.
    def body_value(self) -> JsonValue:
        return self.body

    def json_text(self) -> str:
        """The response as JSON, as it is stored."""
        return self.model_dump_json(by_alias=True)


class UnparsedResponse(HttpResponse):
    """A response whose large JSON body is kept as the text that came, not as Python objects,
    which take 10 to 50 times its size: it is parsed only for the moment that criteria, outputs
    or macros read it, and goes into the stored response and the events as it is. Its `body`
    field is None."""

    _body_json: bytes = PrivateAttr(default=b"null")

    @classmethod
    def of(
        cls, status_code: int, headers: dict[str, str], body_json: bytes, elapsed_ms: int
    ) -> UnparsedResponse:
        """`body_json` is JSON text known to be valid."""
        response = cls.model_construct(
            status_code=status_code, headers=headers, body=None, elapsed_ms=elapsed_ms
        )
        response._body_json = body_json
        return response

    def body_value(self) -> JsonValue:
        """The body, parsed anew: drop it after use."""
        parsed: JsonValue = orjson.loads(self._body_json)
        return parsed

    @field_serializer("body")
    def _serialize_body(self, body: JsonValue) -> JsonValue:
        # Any serialisation is right; `json_fields` is the one that does not parse the body.
        return self.body_value()

    def json_fields(self) -> dict[str, object]:
        """The response as a dict for orjson, its body embedded as it came."""
        fields = self.model_dump(mode="json", by_alias=True, exclude={"body"})
        fields["body"] = orjson.Fragment(self._body_json)
        return fields

    def json_text(self) -> str:
        return orjson.dumps(self.json_fields()).decode()


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one invocation ended: the result to record and why."""

    result: Result
    reason: str
    response: HttpResponse | None = None
    # No response came, for a reason that trying again may cure (a lost connection, a timeout).
    transient: bool = False
    # The task's named outputs, evaluated on the response (SPEC §4 `outputs`).
    outputs: dict[str, JsonValue] | None = None


class TaskEvent(WireModel):
    """What is published to `{prefix}.events` (SPEC §7)."""

    model_config = ConfigDict(extra="ignore")

    name: EventName
    event_id: str
    task_id: str
    plan_id: str
    job_id: str
    hub_name: str
    result: Result | None = None
    reason: str | None = None
    # As what it is: an UnparsedResponse serialises its body itself.
    response: SerializeAsAny[HttpResponse] | None = None
    attempts: int
    queued_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    variables: dict[str, JsonValue] = Field(default_factory=dict)
    outputs: dict[str, JsonValue] = Field(default_factory=dict)

    @property
    def routing_key(self) -> str:
        return routing_key(self.name, self.hub_name)

    def json_bytes(self) -> bytes:
        """The event as published; a response body kept as text goes in without being parsed."""
        if not isinstance(self.response, UnparsedResponse):
            return self.model_dump_json(by_alias=True).encode()
        fields = self.model_dump(mode="json", by_alias=True, exclude={"response"})
        fields["response"] = self.response.json_fields()
        return orjson.dumps(fields)


def event_id(task_id: str, name: EventName) -> str:
    return f"{task_id}:{name.routing_word}"


def routing_key(name: EventName, hub_name: str) -> str:
    return f"task.{name.routing_word}.{hub_name}"


def parse_task(body: bytes) -> TaskMessage:
    """The task in `body`, or InvalidTask with the reason that the dead-letter queue shows."""
    if len(body) > MAX_TASK_BYTES:
        raise InvalidTask(f"message is {len(body)} bytes, over the {MAX_TASK_BYTES}-byte limit")
    if b"\\u0000" in body:
        raise InvalidTask("message contains a NUL character (\\u0000), which cannot be stored")
    try:
        return TaskMessage.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise InvalidTask(f"message is not JSON: {errors[0]['ctx']['error']}") from exc
        if errors and errors[0]["type"] == "model_type":
            raise InvalidTask("message is not a JSON object") from exc
        raise InvalidTask(f"message does not fit the task schema: {describe(exc)}") from exc


def stored_message(task: TaskMessage, body: bytes) -> str:
    """The message as stored: as received, unless secret header values must be redacted."""
    poll_request = None if task.poll is None else task.poll.request
    requests = (task.request, task.cancel_request, poll_request)
    if not any(
        name.lower() in SECRET_HEADERS
        for request in requests
        if request is not None
        for name in request.headers
    ):
        return body.decode()
    data = task.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["request"] = task.request.redacted()
    if task.cancel_request is not None:
        data["cancelRequest"] = task.cancel_request.redacted()
    if poll_request is not None:
        data["poll"]["request"] = poll_request.redacted()
    return orjson.dumps(data).decode()
