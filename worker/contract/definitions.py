"""Task definitions and their executions (SPEC §9): the wire models and the pure rules.

- `DefinitionSpec`: a definition as written (POST, PUT): every field of a task message (§4) but
  `taskId` and `planId` (its `TaskTemplate`), plus `name` (an Id, unique in any case) and
  `description`; validated as a task is, every invalid field reported at once. Given
  `context=validation_context(connections)`, each service connection it names must be one of
  them. Literal secret header values are refused: a definition is stored and shown. Server-made
  fields (`id`, `version`, `createdAt`, `updatedAt`) in the input are ignored, so that a
  representation read can be written back.
- `Definition`: the stored representation: the spec plus `id`, `version`, `createdAt`,
  `updatedAt`; `summary()` (format=list) and `name_only()` (format=name).
- `patched(current, changes)`: FlexDeploy's PATCH rule: an absent or null attribute is left
  unchanged; the result is validated whole. `DefinitionPatch` documents the body.
- `ExecutionRequest` (`{input, comments, tags, source, executionId}`, nulls meaning the defaults)
  and `ExecutionMessage` (the AMQP form: `{"definition": name or id, "input": …, "taskId"?,
  "planId"?, …}`), found in a message by `parse_execution()`, its task id by
  `execution_id_of()`; `request_digest()` tells a repeat of an execution from another.
- `execution_task(definition, request, task_id=, plan_id=)`: the task message (§4) an execution
  queues: the definition's fields, its variables overridden by `input`, named after it;
  `canonical_message()` its bytes as queued.
- `ExecutionRecord` (an execution as read, with its task's state while the task is kept),
  `Execution` (what executing answers), `ExecutionStarted` (the 202's body).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, ClassVar, Final, Optional

import orjson
from pydantic import (
    BeforeValidator,
    Field,
    JsonValue,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from worker.contract.errors import InvalidTask, describe
from worker.contract.models import MAX_TASK_BYTES, Result, State, TaskMessage, TaskTemplate
from worker.contract.requests import (
    ID_PATTERN,
    SECRET_HEADERS,
    Id,
    PollPolicy,
    TaskRequest,
    WireModel,
    storable,
)

# What the server makes and a client may send back unchanged: ignored in a definition's input.
SERVER_FIELDS: Final = frozenset({"id", "version", "createdAt", "updatedAt"})
# The validation context's key for the names of the service connections known (a frozenset).
CONNECTIONS: Final = "connections"
MAX_DESCRIPTION: Final = 10_000
MAX_COMMENTS: Final = 10_000
MAX_SOURCE: Final = 1024
MAX_TAGS: Final = 50
# The task's display name is the definition's: not a field of the template.
_TEMPLATE_FIELDS: Final = set(TaskTemplate.model_fields) - {"name"}


def validation_context(connections: Collection[str] | None) -> dict[str, object] | None:
    """The context under which a definition's service connections must be among `connections`;
    None checks no connection (the worker reports an unknown one when it calls)."""
    return None if connections is None else {CONNECTIONS: frozenset(connections)}


def _request_problems(request: TaskRequest, info: ValidationInfo) -> list[str]:
    problems = []
    known = info.context.get(CONNECTIONS) if isinstance(info.context, dict) else None
    if request.connection is not None and known is not None and request.connection not in known:
        listed = ", ".join(sorted(known)) or "none is configured"
        problems.append(
            f"connection {request.connection!r} is not a service connection of this "
            f"deployment (known: {listed})"
        )
    for name, value in request.headers.items():
        # A macro is filled at each call ($(system.AccessToken), $(variables.NAME)): not stored.
        if name.lower() in SECRET_HEADERS and "$(" not in value:
            problems.append(
                f"header {name!r} would store a secret in the definition: name a service "
                "connection (request.connection) or use a macro such as $(system.AccessToken)"
            )
    return problems


def _check_request(request: TaskRequest | None, info: ValidationInfo) -> None:
    if request is not None and (problems := _request_problems(request, info)):
        raise ValueError("; ".join(problems))


class DefinitionSpec(TaskTemplate):
    """A task definition as written (SPEC §9)."""

    # In place of the task's display name: an execution's task is named after its definition.
    name: Id = Field(description="unique in any case; an execution's task is named after it")
    description: str = Field(default="", max_length=MAX_DESCRIPTION)

    # The server-made fields this model ignores in its input.
    _ignored: ClassVar[frozenset[str]] = SERVER_FIELDS

    @model_validator(mode="before")
    @classmethod
    def _ignore_server_fields(cls, data: object) -> object:
        if isinstance(data, dict) and cls._ignored and not cls._ignored.isdisjoint(data):
            return {key: value for key, value in data.items() if key not in cls._ignored}
        return data

    @field_validator("request", "cancel_request")
    @classmethod
    def _request_storable(cls, request: TaskRequest | None, info: ValidationInfo) -> object:
        _check_request(request, info)
        return request

    @field_validator("poll")
    @classmethod
    def _poll_storable(cls, poll: PollPolicy | None, info: ValidationInfo) -> object:
        if poll is not None:
            try:
                _check_request(poll.request, info)
            except ValueError as exc:
                raise ValueError(f"request: {exc}") from None
        return poll

    def spec(self) -> DefinitionSpec:
        """The definition as written, without what the server made."""
        return DefinitionSpec.model_validate(self.written())

    def written(self) -> dict[str, JsonValue]:
        """The definition as written, in JSON by alias (nulls left out)."""
        return self.template() | {"name": self.name, "description": self.description}

    def template(self) -> dict[str, JsonValue]:
        """The fields that make its tasks, as stored (JSON by alias, nulls left out)."""
        data: dict[str, JsonValue] = self.model_dump(
            mode="json", by_alias=True, exclude_none=True, include=_TEMPLATE_FIELDS
        )
        return data


class DefinitionStamp(WireModel):
    """What the server makes of a definition."""

    id: Id
    version: int = Field(ge=1, description="1, then one more on every change")
    created_at: datetime
    updated_at: datetime


class DefinitionSummary(WireModel):
    """A definition as GET /definitions lists it by default (format=list)."""

    id: str
    name: str
    description: str
    version: int
    updated_at: datetime


class DefinitionName(WireModel):
    """A definition as format=name lists it."""

    id: str
    name: str


# The stamp first: the representation reads id, name, … (see models.TaskMessage on the order).
class Definition(DefinitionSpec, DefinitionStamp):
    """A stored definition, as GET /definitions/{id} answers (format=detail)."""

    _ignored: ClassVar[frozenset[str]] = frozenset()

    def summary(self) -> DefinitionSummary:
        return DefinitionSummary(
            id=self.id,
            name=self.name,
            description=self.description,
            version=self.version,
            updated_at=self.updated_at,
        )

    def name_only(self) -> DefinitionName:
        return DefinitionName(id=self.id, name=self.name)

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


_ALIASES: Final = {name: field.alias or name for name, field in DefinitionSpec.model_fields.items()}


def patched(
    current: DefinitionSpec,
    changes: Mapping[str, JsonValue],
    *,
    connections: Collection[str] | None = None,
) -> DefinitionSpec:
    """`current` with every attribute of `changes` that is given and not null (FlexDeploy's PATCH
    rule; server-made ones ignored), validated whole: ValidationError lists every invalid field.
    Equal to `current.spec()` when nothing changes."""
    data = current.written()
    for key, value in changes.items():
        if value is not None and key not in SERVER_FIELDS:
            data[_ALIASES.get(key, key)] = value
    return DefinitionSpec.model_validate(data, context=validation_context(connections))


# PATCH's body, for the API's description: every attribute optional; null leaves one unchanged.
DefinitionPatch = create_model(
    "DefinitionPatch",
    __base__=WireModel,
    __doc__="Attributes to change; an absent or null one is left unchanged (SPEC §9).",
    **{  # type: ignore[call-overload]
        name: (Optional[field.annotation], Field(default=None, description=field.description))  # noqa: UP045
        for name, field in DefinitionSpec.model_fields.items()
    },
)


def _null_is(default: object) -> BeforeValidator:
    """null taken for the default, as an absent attribute is."""

    def parse(value: object) -> object:
        return (default() if callable(default) else default) if value is None else value

    return BeforeValidator(parse)


def _unique(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


class ExecutionFields(WireModel):
    """What an execution adds to its definition (SPEC §9)."""

    input: Annotated[dict[str, JsonValue], _null_is(dict)] = Field(
        default_factory=dict, description="overrides the definition's variables of the same name"
    )
    comments: Annotated[str, _null_is("")] = Field(default="", max_length=MAX_COMMENTS)
    tags: Annotated[list[Id], _null_is(list)] = Field(default_factory=list, max_length=MAX_TAGS)
    source: Annotated[str, _null_is("")] = Field(default="", max_length=MAX_SOURCE)

    @field_validator("tags")
    @classmethod
    def _tags_once(cls, tags: list[str]) -> list[str]:
        return _unique(tags)

    @field_validator("input")
    @classmethod
    def _input_storable(cls, data: dict[str, JsonValue]) -> dict[str, JsonValue]:
        storable(data)
        return data


class ExecutionRequest(ExecutionFields):
    """POST /definitions/{id}/executions."""

    execution_id: Id | None = Field(
        default=None,
        description="the task id; generated unless given. The same id with the same body is "
        "the same execution; with another body, a conflict",
    )


class ExecutionTarget(WireModel):
    definition: Id = Field(description="the definition's name (in any case) or id")
    task_id: Id | None = Field(
        default=None,
        description="the execution's id; by default the message's message_id, else one made "
        "from the message's content",
    )
    plan_id: Id | None = Field(default=None, description="by default the task id")


class ExecutionMessage(ExecutionFields, ExecutionTarget):
    """A task message that names a definition instead of a request (SPEC §4, §9)."""


def parse_execution(body: bytes) -> ExecutionMessage | None:
    """The execution a task message asks for when it names a definition instead of a request
    (SPEC §4); None when it names none (it is then an ordinary task message, valid or not);
    InvalidTask, with every invalid field, when it names one but does not fit."""
    # Too large, or with a NUL character: parse_task's reason stands.
    if b'"definition"' not in body or len(body) > MAX_TASK_BYTES or b"\\u0000" in body:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "definition" not in data or "request" in data:
        return None
    try:
        return ExecutionMessage.model_validate(data)
    except ValidationError as exc:
        raise InvalidTask(
            "message names a definition but does not fit the form of one (definition, input, "
            f"taskId, planId, comments, tags, source): {describe(exc)}"
        ) from exc


def execution_id_of(call: ExecutionMessage, body: bytes, message_id: str | None) -> str:
    """The task id of a message's execution: its taskId, else its message_id, else one made of
    its content, so that a redelivery (the same message) is the same execution."""
    if call.task_id is not None:
        return call.task_id
    if message_id is not None and ID_PATTERN.fullmatch(message_id):
        return message_id
    return f"x-{hashlib.sha256(body).hexdigest()[:32]}"


def request_digest(fields: ExecutionFields, plan_id: str) -> bytes:
    """sha256 of what makes an execution this one: the same under the same id is a repeat."""
    data = fields.model_dump(mode="json", by_alias=True, include=set(ExecutionFields.model_fields))
    data["planId"] = plan_id
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).digest()


def execution_task(
    definition: Definition, fields: ExecutionFields, *, task_id: str, plan_id: str | None = None
) -> TaskMessage:
    """The task message an execution of `definition` queues: its fields, its variables
    overridden by the execution's input, named after it; `plan_id` defaults to the task id."""
    data = definition.template()
    variables = data.get("variables")
    data["variables"] = (variables if isinstance(variables, dict) else {}) | fields.input
    data |= {"taskId": task_id, "planId": plan_id or task_id, "name": definition.name}
    return TaskMessage.model_validate(data)


def canonical_message(task: TaskMessage) -> bytes:
    """One byte form per task (keys sorted, nulls left out): what an execution queues, and what
    its task's digest is taken of."""
    data = task.model_dump(mode="json", by_alias=True, exclude_none=True)
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


class ExecutionRecord(WireModel):
    """An execution as read: what made it, and its task's state while the task is kept (null
    once the task is purged past AGENTLESS_RETENTION)."""

    execution_id: str
    execution_index: int
    definition_id: str
    definition_name: str
    version: int = Field(description="the definition's version it executed")
    input: dict[str, JsonValue]
    tags: list[str]
    comments: str
    source: str
    created_at: datetime
    state: State | None = None
    result: Result | None = None
    reason: str | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Execution:
    """What executing a definition answers: the execution, the task message it queued (as
    published, byte for byte), and whether this call made it (False: a repeat)."""

    record: ExecutionRecord
    message: bytes
    created: bool

    @property
    def task(self) -> TaskMessage:
        return TaskMessage.model_validate_json(self.message)


class ExecutionStarted(WireModel):
    """The 202 answer of POST …/executions."""

    execution_id: str = Field(description="the task id")
    execution_index: int = Field(description="1, 2, … per definition, never reused")
    execution_link: str = Field(description="the absolute URL of GET /tasks/{executionId}")
