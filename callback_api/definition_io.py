"""What the definition routes (definitions.py, executions.py) read and how they answer: bodies
that can be stored, every invalid field in one problem, If-Match, and the JSON or, for a
browser, a page of it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError
from pydantic.alias_generators import to_camel

from callback_api.inputs import read_body
from callback_api.ops_page import HEADERS, templates
from callback_api.paging import json_response
from callback_api.problems import Problem
from callback_api.services import services
from callback_api.task_page import prefers_html
from worker.contract.requests import ID_PATTERN
from worker.store.errors import DefinitionNotFound, NameTaken, StaleVersion

# A bulk write's body may hold many definitions, each up to a task's size.
MAX_DEFINITIONS_BYTES: Final = 8 * 1_048_576
_ENTITY_TAG = re.compile(r'\s*(?:W/)?"([^"]*)"\s*')
_JSON: Final[TypeAdapter[JsonValue]] = TypeAdapter(JsonValue)


class DefinitionQuery(BaseModel):
    """What a browser may add to a definitions URL to get the JSON, not the page."""

    model_config = ConfigDict(alias_generator=to_camel, extra="forbid")

    json_: str | None = Field(
        default=None,
        alias="json",
        description="present, with any value or none: the JSON, even when Accept prefers "
        "text/html (a browser)",
    )


# Reading requests.


def definition_id(request: web.Request) -> str:
    """The path's definition id: 404 when it cannot be one."""
    value = request.match_info["id"]
    if not ID_PATTERN.fullmatch(value):
        raise Problem(404, f"there is no task definition {value!r}")
    return value


def field_errors(exc: ValidationError, *, array: bool) -> list[dict[str, str]]:
    """Each invalid field: its dotted path, after `[INDEX]` in an array; and what is wrong."""
    errors = []
    for error in exc.errors(include_url=False, include_input=False):
        location = [str(part) for part in error["loc"]]
        if array and location and location[0].isdigit():
            location = [f"[{location[0]}]" + ("." + location[1] if len(location) > 1 else "")]
            location += [str(part) for part in error["loc"][2:]]
        errors.append(
            {
                "field": ".".join(location) or "(body)",
                "message": error["msg"].removeprefix("Value error, "),
            }
        )
    return errors


def invalid(what: str, exc: ValidationError, *, array: bool = False) -> Problem:
    errors = field_errors(exc, array=array)
    fields = ", ".join(dict.fromkeys(error["field"] for error in errors))
    return Problem(400, f"the {what} is not valid; fix: {fields}", errors=errors)


async def json_body(request: web.Request, limit: int = MAX_DEFINITIONS_BYTES) -> JsonValue:
    """The body as JSON that can be stored; an empty body is null."""
    body = await read_body(request, limit)
    if b"\\u0000" in body:
        raise Problem(400, "the body contains a NUL character (\\u0000), which cannot be stored")
    if not body.strip():
        return None
    try:
        parsed: JsonValue = _JSON.validate_json(body)
        # What JSON allows and storing it does not: stored as JSON again, it would fail later.
        orjson.dumps(parsed)
    except ValidationError:
        raise Problem(400, "the body is not JSON") from None
    except orjson.JSONEncodeError:
        raise Problem(
            400,
            "the body holds a value that cannot be stored: integers must fit in 64 bits, and "
            "arrays and objects be nested fewer than 255 deep",
        ) from None
    return parsed


def if_match(request: web.Request) -> int | None:
    """The version If-Match asks for; None for none (or *, any version)."""
    header = request.headers.get("If-Match")
    if header is None or header.strip() == "*":
        return None
    match = _ENTITY_TAG.fullmatch(header)
    if match is None or not match[1].isascii() or not match[1].isdigit() or len(match[1]) > 9:
        raise Problem(
            400,
            f'If-Match must be the ETag read, "VERSION" (or * for any version), not {header!r}',
        )
    return int(match[1])


# Answering.


@contextmanager
def refusals_answered() -> Iterator[None]:
    """The store's refusals of a definition write as the problems the routes answer: an absent
    definition 404, a stale version 412, a name taken 409."""
    try:
        yield
    except DefinitionNotFound as exc:
        raise Problem(404, f"there is no task definition {exc.ref!r}", id=exc.ref) from exc
    except StaleVersion as exc:
        raise Problem(
            412, str(exc), headers={"ETag": f'"{exc.current}"'}, currentVersion=exc.current
        ) from exc
    except NameTaken as exc:
        extra: dict[str, Any] = {} if exc.index is None else {"index": exc.index}
        raise Problem(409, str(exc), name=exc.name, **extra) from exc


def dumped(model: BaseModel) -> JsonValue:
    data: JsonValue = model.model_dump(mode="json", by_alias=True)
    return data


def wants_page(request: web.Request) -> bool:
    """A browser's request (Accept prefers text/html) without `?json`."""
    return "json" not in request.query and prefers_html(request.headers.get("Accept"))


def answer(
    request: web.Request,
    body: JsonValue,
    title: str,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """The JSON; for a browser without `?json`, a page of it."""
    if not wants_page(request):
        return json_response(body, status, {**(headers or {}), "Vary": "Accept"})
    json_href = request.rel_url.update_query(json="")
    page = templates.get_template("definitions.html").render(
        title=title,
        body=body,
        json_href=str(json_href),
        now=services(request).store.clock.now(),
        refresh_seconds=0,
    )
    return web.Response(text=page, content_type="text/html", headers={**HEADERS, "Vary": "Accept"})
