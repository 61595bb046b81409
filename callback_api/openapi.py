"""The API's OpenAPI 3.1 document, built from the route table and the pydantic models.

Every schema in it is generated from the model the handler answers with or reads, so the document
cannot drift from what is served; tests/test_openapi.py holds the live API to it.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Sequence
from datetime import datetime
from http import HTTPStatus
from typing import Any, Final, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, JsonValue, RootModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from callback_api.declarations import NoContent, Route, Text
from callback_api.problems import PROBLEM_TYPE
from worker import __version__
from worker.contract.models import Result, State
from worker.contract.requests import Id
from worker.contract.settings import Settings

OPENAPI_VERSION: Final = "3.1.0"
SCHEMAS: Final = "#/components/schemas/"
JSON_TYPE: Final = "application/json"

# Each model, as read or as answered, and the reference to its schema.
Refs = dict[tuple[type[BaseModel], JsonSchemaMode], dict[str, Any]]


class FieldError(BaseModel):
    field: str = Field(
        description="the field's path in the task or definition, dotted; in an array body, "
        "after the item's index in brackets, as [2].request.url"
    )
    message: str


class Problem(BaseModel):
    """An error, as RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str = Field(description="the status code's phrase")
    status: int
    detail: str = Field(description="what went wrong and what to do about it")
    errors: list[FieldError] | None = Field(
        default=None, description="a task or definition that is not valid (400): each field to fix"
    )
    state: State | None = Field(default=None, description="a conflict (409): the task's state")
    result: Result | None = Field(default=None, description="a conflict (409): the task's result")
    completed_at: datetime | None = Field(
        default=None,
        alias="completedAt",
        description="a task deleted after the retention period (410): when it had completed",
    )
    current_version: int | None = Field(
        default=None,
        alias="currentVersion",
        description="a stale If-Match (412): the definition's version now",
    )
    index: int | None = Field(
        default=None, description="a name clash (409) in an array body: the item that clashed"
    )
    message: str | None = Field(
        default=None,
        description="on Azure-compatible routes: the detail again, where Azure's clients read it",
    )
    type_key: str | None = Field(
        default=None,
        alias="typeKey",
        description="on Azure-compatible routes: the kind of error, as Azure's clients name it",
    )


class Document(RootModel[dict[str, JsonValue]]):
    """An OpenAPI 3.1 document."""


document_key = web.AppKey("openapi", bytes)


async def get_document(request: web.Request) -> web.Response:
    return web.Response(body=request.app[document_key], content_type=JSON_TYPE)


# What each path parameter is; an id unless said otherwise. A path segment of "." or ".." is
# folded away by clients and servers alike, so such an id cannot be addressed in a path.
_ID_SCHEMA: Final[dict[str, Any]] = {
    **TypeAdapter(Id).json_schema(),
    "not": {"enum": [".", ".."]},
}
_PATH_PARAMETERS: Final[dict[str, tuple[str, dict[str, Any]]]] = {
    "taskId": ("the task's taskId", _ID_SCHEMA),
    "planId": ("the task's planId", _ID_SCHEMA),
    "projectId": ("Azure's project id; not checked: the token names the task", _ID_SCHEMA),
    "hubName": ("Azure's hub name; not checked: the token names the task", _ID_SCHEMA),
    "timelineId": ("Azure's timeline id; not checked: the token names the task", _ID_SCHEMA),
    "recordId": (
        "the task's jobId, as Azure's helper library sends it; not checked: the token names "
        "the task",
        _ID_SCHEMA,
    ),
    "logId": (
        "the id a created log was given; the lines join the task's log lines whatever it is",
        {"type": "integer", "minimum": 1},
    ),
    # Never "name": /definitions/name/{name}/… is the path by name.
    "id": (
        "the definition's id, as the server made it",
        {**_ID_SCHEMA, "not": {"enum": [".", "..", "name"]}},
    ),
    "name": ("the definition's name, in any case", _ID_SCHEMA),
    "index": (
        "the execution's index: 1 for the definition's first",
        {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
    ),
}
_PATH_PARAMETER = re.compile(r"\{([^}:]+)")


def _path_parameter(name: str) -> dict[str, Any]:
    description, schema = _PATH_PARAMETERS.get(name, ("an id", _ID_SCHEMA))
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


_RANGE_HEADER: Final[dict[str, Any]] = {
    "name": "Range",
    "in": "header",
    "required": False,
    "description": "items=FIRST-LAST, zero-based and inclusive: answered 206 with that slice "
    "(at most 1000 items), or 416 if it starts past the end",
    "schema": {"type": "string", "pattern": r"^items=[0-9]{1,12}-[0-9]{1,12}$"},
}


_IF_MATCH_HEADER: Final[dict[str, Any]] = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": 'the ETag read, "VERSION": the change is made only to that version (412 '
    "when the definition has changed since); * for any version",
    "schema": {"type": "string"},
}


def _header(description: str, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if pattern is not None:
        schema["pattern"] = pattern
    return {"description": description, "required": True, "schema": schema}


# Headers that go with a status wherever it is answered.
_RESPONSE_HEADERS: Final[dict[int, dict[str, Any]]] = {
    202: {"Location": _header("where the task can be read")},
    206: {
        "Content-Range": _header(
            "items FIRST-LAST/TOTAL; items */TOTAL when no item is in the range. TOTAL is exact "
            "up to 10,000 tasks; past that it is * (not counted: the body's total is an "
            "estimate, totalExact false)",
            r"^items ([0-9]+-[0-9]+|\*)/([0-9]+|\*)$",
        )
    },
    401: {"WWW-Authenticate": _header("the schemes the route takes")},
    416: {
        "Content-Range": _header(
            "items */TOTAL, TOTAL counted exactly (a range past the end of a long list costs "
            "the counting of its tasks)",
            r"^items \*/[0-9]+$",
        )
    },
}

# Headers a route declares for a status it answers (Route.headers); a name ending in "?" is
# answered only sometimes (POST /definitions: with one definition made, not with an array).
_NAMED_HEADERS: Final[dict[str, dict[str, Any]]] = {
    "Location": _header("where what was made can be read"),
    "ETag": _header('"VERSION": the definition\'s version, for If-Match', r'^"[0-9]+"$'),
    "Agentless-Changed": _header(
        "what this write changed, comma-separated: the attributes of the definition (the ids of "
        "the definitions, for an array PUT); none when it changed nothing (the version stays)",
        r"^(none|[A-Za-z0-9._:-]+(, [A-Za-z0-9._:-]+)*)$",
    ),
}


def _named_header(name: str) -> tuple[str, dict[str, Any]]:
    header = _NAMED_HEADERS[name.removesuffix("?")]
    if name.endswith("?"):
        header = {**header, "required": False}
    return name.removesuffix("?"), header


_SECURITY_SCHEMES: Final = {
    "apiToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "one of AGENTLESS_API_TOKENS",
    },
    "apiTokenBasic": {
        "type": "http",
        "scheme": "basic",
        "description": "one of AGENTLESS_API_TOKENS as the password, with any user name (so "
        "that a browser can ask for it, for the operations page)",
    },
    "callbackToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "the AuthToken sent with the task: scoped to that task, it expires",
    },
    "callbackTokenBasic": {
        "type": "http",
        "scheme": "basic",
        "description": "the task's AuthToken as the password, with an empty user name (what "
        "Azure's server-task helper library sends)",
    },
}
_TAGS: Final = [
    {"name": "callbacks", "description": "what a task's external service posts back"},
    {"name": "tasks", "description": "submit, read, list and cancel tasks"},
    {
        "name": "definitions",
        "description": "stored task definitions, and the tasks executed from them",
    },
    {"name": "operations", "description": "the queue, the workers, metrics and health"},
]


def _security(auth: Literal["callback", "api", "none"], settings: Settings) -> list[Any]:
    match auth:
        case "callback":
            return [{"callbackToken": []}, {"callbackTokenBasic": []}]
        case "api" if settings.api_tokens:
            return [{"apiToken": []}, {"apiTokenBasic": []}]
        case "api":
            # Without AGENTLESS_API_TOKENS the API listens on loopback only and takes no token.
            return [{}, {"apiToken": []}, {"apiTokenBasic": []}]
        case _:
            return []


def _models(routes: Sequence[Route]) -> tuple[tuple[type[BaseModel], JsonSchemaMode], ...]:
    """Every model the routes answer with (as serialised) or read (as validated), once."""
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(Problem, "serialization"): None}
    for route in routes:
        for answer in route.responses.values():
            if isinstance(answer, type) and issubclass(answer, BaseModel):
                wanted[answer, "serialization"] = None
        for body in route.body:
            if isinstance(body, type):
                wanted[body, "validation"] = None
        if route.query is not None:
            wanted[route.query, "validation"] = None
    return tuple(wanted)


@functools.cache
def _schemas(
    models: tuple[tuple[type[BaseModel], JsonSchemaMode], ...],
) -> tuple[Refs, dict[str, Any]]:
    """Each model's reference, and the definitions they refer to; generating them takes tens
    of milliseconds, and every app (every test) describes the same models."""
    found, definitions = models_json_schema(models, ref_template=SCHEMAS + "{model}", by_alias=True)
    return {key: found[key] for key in models}, definitions.get("$defs", {})


def _query_parameters(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """A query model's fields as parameters: absent rather than null when not given."""
    required = set(schema.get("required", []))
    parameters = []
    for name, declared in schema["properties"].items():
        field = {key: value for key, value in declared.items() if key != "title"}
        if field.get("default", ...) is None:
            del field["default"]
        options = field.pop("anyOf", None)
        if options is not None:
            kept = [option for option in options if option != {"type": "null"}]
            field = {**kept[0], **field} if len(kept) == 1 else {"anyOf": kept, **field}
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": name in required}
        description = field.pop("description", None)
        if description is not None:
            parameter["description"] = description
        parameters.append({**parameter, "schema": field})
    return parameters


_API_VERSION: Final[dict[str, Any]] = {
    "name": "api-version",
    "in": "query",
    "required": False,
    "description": "the version Azure's clients negotiated from the resource location (also "
    "read from `Accept: application/json;api-version=…`)",
    "schema": {"type": "string", "examples": ["7.1-preview.1"]},
}
_UNSERVED_VERSION: Final = "an api-version the resource location does not serve"


def _responses(route: Route, refs: Refs) -> dict[str, Any]:
    answers = dict(route.responses)
    if route.auth != "none":
        answers.setdefault(401, "no token, or not a valid one")
    if route.location is not None:
        said = answers.get(400)
        answers[400] = (
            f"{said}; or {_UNSERVED_VERSION}" if isinstance(said, str) else _UNSERVED_VERSION
        )
    responses: dict[str, Any] = {}
    for status, answer in sorted(answers.items()):
        if isinstance(answer, Text):
            response = {
                "description": answer.description,
                "content": {answer.media_type: {"schema": {"type": "string"}}},
            }
        elif isinstance(answer, NoContent):
            response = {"description": answer.description}
        elif isinstance(answer, str):
            problem = refs[Problem, "serialization"]
            response = {"description": answer, "content": {PROBLEM_TYPE: {"schema": problem}}}
        else:
            schema = refs[answer, "serialization"]
            response = {
                "description": HTTPStatus(status).phrase,
                "content": {JSON_TYPE: {"schema": schema}},
            }
        headers = {
            **_RESPONSE_HEADERS.get(status, {}),
            **dict(_named_header(name) for name in route.headers.get(status, ())),
        }
        if headers:
            response["headers"] = headers
        responses[str(status)] = response
    return responses


def _request_body(route: Route, refs: Refs) -> dict[str, Any]:
    content: dict[str, Any] = {}
    said = []
    for body in route.body:
        if isinstance(body, Text):
            content[body.media_type] = {"schema": {"type": "string"}}
            said.append(f"{body.media_type}: {body.description}")
        else:
            content[JSON_TYPE] = {"schema": refs[body, "validation"]}
    request_body: dict[str, Any] = {"required": route.body_required, "content": content}
    if said:
        request_body["description"] = "; ".join(said)
    return request_body


def _operation_ids(routes: Sequence[Route]) -> list[str]:
    """The handler's name, numbered from its second route on (one handler serves two paths)."""
    seen: dict[str, int] = {}
    ids = []
    for route in routes:
        name = route.handler.__name__
        seen[name] = seen.get(name, 0) + 1
        ids.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return ids


def document(settings: Settings, routes: Sequence[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes`, as served with `settings`."""
    refs, schemas = _schemas(_models(routes))
    # A query model is described by its parameters; as a schema of its own it would be unused.
    queries = set()
    paths: dict[str, dict[str, Any]] = {}
    for route, operation_id in zip(routes, _operation_ids(routes), strict=True):
        parameters = [_path_parameter(name) for name in _PATH_PARAMETER.findall(route.path)]
        if route.query is not None:
            name = refs[route.query, "validation"]["$ref"].removeprefix(SCHEMAS)
            parameters += _query_parameters(schemas[name])
            queries.add(name)
        if 206 in route.responses:
            parameters.append(_RANGE_HEADER)
        if 412 in route.responses:
            parameters.append(_IF_MATCH_HEADER)
        if route.location is not None:
            parameters.append(_API_VERSION)
        operation: dict[str, Any] = {
            "operationId": operation_id,
            "summary": route.summary,
            "tags": [route.tag],
            "security": _security(route.auth, settings),
        }
        if parameters:
            operation["parameters"] = parameters
        if route.body:
            operation["requestBody"] = _request_body(route, refs)
        operation["responses"] = _responses(route, refs)
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    described = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "agentless",
            "version": __version__,
            "description": "Agentless tasks: submit and follow HTTP tasks, and the callback API "
            "their external services report to (Azure-compatible paths included).",
        },
        "servers": [{"url": str(settings.public_url).rstrip("/")}],
        "tags": _TAGS,
        "paths": paths,
        "components": {
            "schemas": {name: s for name, s in schemas.items() if name not in queries},
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }
    # The document is the caller's to change; the cached schemas and the constants are not.
    return copy.deepcopy(described)
