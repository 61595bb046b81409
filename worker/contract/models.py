"""The wire contract (SPEC §3, §4, §7): names, states, results, task messages and events."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Final

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from yarl import URL

from worker.contract import criteria, response_macros
from worker.contract.criteria import CriteriaSyntax
from worker.contract.errors import InvalidTask, describe

REASON_HEADER: Final = "x-agentless-reason"
MAX_TASK_BYTES: Final = 1_048_576
DEFAULT_HUB: Final = "build"
DEFAULT_PROJECT: Final = "default"

# Header names (lower case) whose values never reach a log, a stored record or an event.
SECRET_HEADERS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "authtoken",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-auth-token",
    }
)
REDACTED: Final = "***"


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


class Method(StrEnum):
    OPTIONS = "OPTIONS"
    GET = "GET"
    HEAD = "HEAD"
    POST = "POST"
    PUT = "PUT"
    DELETE = "DELETE"
    TRACE = "TRACE"
    PATCH = "PATCH"


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


def _method(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
Id = Annotated[str, StringConstraints(pattern=rf"^{ID_PATTERN.pattern}$")]
HeaderName = Annotated[str, StringConstraints(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")]


class WireModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class TaskRequest(WireModel):
    """The HTTP call a task makes (also the shape of `cancelRequest`)."""

    method: Annotated[Method, BeforeValidator(_method)] = Method.POST
    url: str | None = None
    connection: Id | None = None
    url_suffix: str = ""
    headers: dict[HeaderName, str] = Field(default_factory=dict)
    body: JsonValue = None

    @field_validator("url")
    @classmethod
    def _absolute_http(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            url = URL(value)
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an absolute http:// or https:// URL")
        return value

    @field_validator("headers")
    @classmethod
    def _header_values(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name!r} has a line break in its value")
        return headers

    @model_validator(mode="after")
    def _one_target(self) -> TaskRequest:
        if (self.url is None) == (self.connection is None):
            raise ValueError("give exactly one of request.url or request.connection")
        if self.url is not None and self.url_suffix:
            raise ValueError("request.urlSuffix goes with request.connection, not request.url")
        return self

    def redacted(self) -> dict[str, JsonValue]:
        """This request as stored and shown: secret header values replaced."""
        data: dict[str, JsonValue] = self.model_dump(mode="json", by_alias=True)
        data["headers"] = {
            name: REDACTED if name.lower() in SECRET_HEADERS else value
            for name, value in self.headers.items()
        }
        return data


# The longest wait before a retry, whatever the policy or the endpoint's Retry-After asks.
MAX_RETRY_DELAY: Final = 3600


class RetryPolicy(WireModel):
    """Opt-in retries of transient failures (SPEC §4): at most `attempts` calls in all, the
    n-th retry `delaySeconds * backoff ** (n - 1)` seconds after the failure."""

    attempts: int = Field(default=3, ge=1, le=100)
    delay_seconds: float = Field(default=1.0, ge=0, le=MAX_RETRY_DELAY)
    backoff: float = Field(default=2.0, ge=1, le=10)

    def delay(self, retry: int) -> float:
        """Seconds before retry number `retry` (from 1)."""
        return min(self.delay_seconds * self.backoff ** (retry - 1), MAX_RETRY_DELAY)


# The longest interval between two polls, and the factor by which a Retry-After may stretch it.
MAX_POLL_INTERVAL: Final = 86_400
RETRY_AFTER_STRETCH: Final = 10


class PollPolicy(WireModel):
    """How a poll task follows the job its start request began (SPEC §4 `poll`)."""

    request: TaskRequest | None = None
    interval_seconds: float = Field(default=10, ge=1, le=MAX_POLL_INTERVAL)
    max_attempts: int | None = Field(default=None, ge=1, le=1_000_000)
    failure_criteria: str | None = Field(default=None, max_length=10_000)
    ignore_failures: bool = False

    def delay(self, retry_after: float | None) -> float:
        """Seconds until the next poll: the interval, or longer if the answer asked for it."""
        if retry_after is None or retry_after <= self.interval_seconds:
            return self.interval_seconds
        return min(retry_after, self.interval_seconds * RETRY_AFTER_STRETCH)


OutputName = Annotated[str, StringConstraints(pattern=rf"^{ID_PATTERN.pattern}$")]


class TaskMessage(WireModel):
    """A task as queued (SPEC §4)."""

    task_id: Id
    plan_id: Id
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
    outputs: dict[OutputName, str] = Field(default_factory=dict, max_length=100)
    variables: dict[str, JsonValue] = Field(default_factory=dict)

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

    @field_validator("outputs")
    @classmethod
    def _outputs_compile(cls, outputs: dict[str, str]) -> dict[str, str]:
        for name, expression in outputs.items():
            try:
                criteria.compile_expression(expression)
            except ValueError as exc:
                raise ValueError(f"output {name!r}: {exc}") from None
        return outputs

    @model_validator(mode="after")
    def _poll_fits(self) -> TaskMessage:
        if self.poll is None:
            return self
        if self.wait_for_completion is not Mode.POLL:
            raise ValueError('poll goes with waitForCompletion "poll"')
        failure = self.poll.failure_criteria
        if failure is not None and failure.strip():
            try:
                criteria.compile_criterion(failure, self.criteria_syntax)
            except ValueError as exc:
                raise ValueError(f"poll.failureCriteria: {exc}") from None
        request = self.poll.request
        if request is not None:
            texts = [request.url or "", request.url_suffix, *request.headers.values()]
            try:
                response_macros.check([*texts, *response_macros.strings(request.body)])
            except ValueError as exc:
                raise ValueError(f"poll.request: {exc}") from None
        return self

    @property
    def polling(self) -> PollPolicy:
        """The poll policy of a poll task: its own, or every default."""
        return self.poll or _DEFAULT_POLL

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
    response: HttpResponse | None = None
    attempts: int
    queued_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    variables: dict[str, JsonValue] = Field(default_factory=dict)
    outputs: dict[str, JsonValue] = Field(default_factory=dict)

    @property
    def routing_key(self) -> str:
        return routing_key(self.name, self.hub_name)


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
