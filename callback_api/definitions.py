"""The definitions API (SPEC §9): create, read, list, replace, patch and delete stored task
definitions, with the list conventions of GET /tasks (callback_api/paging.py). Executions of a
definition are in executions.py; what both read and how they answer, in definition_io.py.

Choices the SPEC leaves open, as the README tells them:
- A write (PUT, PATCH) answers `Agentless-Changed`: the attributes it changed, in alphabetical
  order, comma-separated (an array PUT: the ids of the definitions it changed), or `none` when
  it changed nothing; then the version stays. A PATCH whose attributes are all absent or null
  is such a write: 200, the definition as it was, `none`.
- An array body is all or nothing: every invalid field of every item is listed in one 400
  (`[INDEX].field`), a name clash is a 409 naming the item. In an array PUT, an item's `version`
  is its If-Match: the item must still be at that version (412).
- `If-Match` ("VERSION", or * for any) also guards DELETE.
- A browser (Accept preferring text/html) gets the answer as an HTML page of its JSON, unless
  the URL has `?json`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated, ClassVar, Final

from aiohttp import web
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    JsonValue,
    RootModel,
    TypeAdapter,
    ValidationError,
)

from callback_api.definition_io import (
    DefinitionQuery,
    answer,
    definition_id,
    dumped,
    if_match,
    invalid,
    json_body,
    refusals_answered,
    wants_page,
)
from callback_api.inputs import query_of
from callback_api.paging import (
    DEFAULT_ROWS_PER_PAGE,
    PageNumber,
    RowsPerPage,
    SortType,
    json_response,
    one_of,
    page_response,
    window,
)
from callback_api.problems import Problem
from callback_api.services import services
from worker.contract.definitions import (
    SERVER_FIELDS,
    Definition,
    DefinitionName,
    DefinitionSpec,
    DefinitionSummary,
    validation_context,
)
from worker.contract.requests import ID_PATTERN, Id
from worker.store.definitions import ORDER_COLUMNS, Change, Replacement
from worker.store.errors import DefinitionNotFound

MAX_ITEMS: Final = 1000
CHANGED_HEADER: Final = "Agentless-Changed"


def _name_filter(value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(f"must be part of a name: 1 to 128 of A-Z a-z 0-9 . _ : - (not {value!r})")
    return value


class DefinitionListQuery(DefinitionQuery):
    """GET /definitions: a name filter, a page, an order and a format."""

    name: Annotated[str, AfterValidator(_name_filter)] | None = Field(
        default=None, description="the definitions whose name contains it, in any case"
    )
    rows_per_page: RowsPerPage = DEFAULT_ROWS_PER_PAGE
    page_number: PageNumber = 1
    order_field: Annotated[str, AfterValidator(one_of(ORDER_COLUMNS))] = Field(
        default="name", json_schema_extra={"enum": list(ORDER_COLUMNS)}
    )
    sort_type: SortType = "asc"
    format: str = Field(
        default="list",
        description="list (id, name, description, version, updatedAt), detail (everything) or "
        "name (id and name); any other value is taken for list",
        json_schema_extra={"examples": ["list", "detail", "name"]},
    )


class DefinitionPage(BaseModel):
    """A page of definitions, each in the format asked for."""

    definitions: list[Definition | DefinitionSummary | DefinitionName]
    total: int = Field(description="how many definitions match, exactly")


class DefinitionSpecs(RootModel[DefinitionSpec | list[DefinitionSpec]]):
    """One definition, or an array of them (all made, or none)."""


class Definitions(RootModel[Definition | list[Definition]]):
    """The definition made, or those made, in the order given."""


class DefinitionReplacement(DefinitionSpec):
    """An item of an array PUT: a definition as written, with the id of the one it replaces."""

    # `id` and `version` are read here; the other server-made fields are ignored.
    _ignored: ClassVar[frozenset[str]] = SERVER_FIELDS - {"id", "version"}

    id: Id = Field(description="the definition to replace")
    version: int | None = Field(
        default=None, ge=1, description="if given, the definition must still be at it (412)"
    )


class DefinitionReplacements(RootModel[list[DefinitionReplacement]]):
    """Definitions to replace, each by its id: all replaced, or none."""


class DefinitionList(RootModel[list[Definition]]):
    """The definitions as replaced, in the order given."""


class DefinitionIds(RootModel[list[Id]]):
    """The ids of the definitions to delete: all deleted, or none."""


# Validated with the service connections known as context (validation_context).
_SPECS: Final = TypeAdapter(list[DefinitionSpec])
_REPLACEMENTS: Final = TypeAdapter(list[DefinitionReplacement])
_IDS: Final = TypeAdapter(list[Id])


# Reading requests.


async def _connections(request: web.Request) -> frozenset[str] | None:
    """The service connections a definition may name: those of AGENTLESS_CONNECTIONS, read
    anew for each write (the file may have changed); None when the API is not told them, as
    when it runs apart from the workers (the worker then reports an unknown one)."""
    settings = services(request).settings
    if settings.connections is None:
        return None
    return frozenset(await asyncio.to_thread(settings.load_connections))


async def _definitions_body(request: web.Request) -> JsonValue:
    """The body, an array of 1 to MAX_ITEMS if it is one."""
    parsed = await json_body(request)
    if isinstance(parsed, list) and not 1 <= len(parsed) <= MAX_ITEMS:
        raise Problem(400, f"an array body holds 1 to {MAX_ITEMS} items, not {len(parsed)}")
    return parsed


# Answering.


def changed_header(change: Change) -> dict[str, str]:
    """ETag and Agentless-Changed: the attributes the write changed, or none."""
    before, after = change.previous.written(), change.definition.written()
    names = sorted(key for key in {**before, **after} if before.get(key) != after.get(key))
    return {"ETag": change.definition.etag, CHANGED_HEADER: ", ".join(names) or "none"}


# The routes.


async def create_definitions(request: web.Request) -> web.Response:
    parsed = await _definitions_body(request)
    array = isinstance(parsed, list)
    context = validation_context(await _connections(request))
    try:
        if array:
            specs = _SPECS.validate_python(parsed, context=context)
        else:
            specs = [DefinitionSpec.model_validate(parsed, context=context)]
    except ValidationError as exc:
        raise invalid("definition", exc, array=array) from exc
    with refusals_answered():
        created = await services(request).store.definitions.create(specs)
    if array:
        return json_response([dumped(d) for d in created], 201)
    made = created[0]
    return json_response(
        dumped(made), 201, {"Location": f"/definitions/{made.id}", "ETag": made.etag}
    )


async def list_definitions(request: web.Request) -> web.Response:
    query = query_of(request, DefinitionListQuery)
    ranged = request.headers.get("Range")
    offset, limit = window(query.rows_per_page, query.page_number, ranged)
    listed = await services(request).store.definitions.page(
        name=query.name,
        order=query.order_field,
        descending=query.sort_type == "desc",
        offset=offset,
        limit=limit,
    )
    body: dict[str, JsonValue] = {
        "definitions": [dumped(_shaped(d, query.format)) for d in listed.definitions],
        "total": listed.total,
    }
    if ranged is None or wants_page(request):
        return answer(request, body, "Task definitions")
    return page_response(
        body,
        ranged=ranged,
        offset=offset,
        shown=len(listed.definitions),
        total=listed.total,
        what="task definitions",
        headers={"Vary": "Accept"},
    )


def _shaped(definition: Definition, shape: str) -> BaseModel:
    """The definition in a list's format; an unknown format is the default, list."""
    match shape:
        case "detail":
            return definition
        case "name":
            return definition.name_only()
        case _:
            return definition.summary()


async def get_definition(request: web.Request) -> web.Response:
    definition = await services(request).store.definitions.get(definition_id(request))
    if definition is None:
        raise Problem(404, f"there is no task definition {request.match_info['id']!r}")
    return _one(request, definition)


async def get_definition_by_name(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    definition = None
    if ID_PATTERN.fullmatch(name):
        definition = await services(request).store.definitions.get_by_name(name)
    if definition is None:
        raise Problem(404, f"there is no task definition named {name!r} (in any case)")
    return _one(request, definition)


def _one(request: web.Request, definition: Definition) -> web.Response:
    return answer(
        request,
        dumped(definition),
        f"Task definition {definition.name}",
        headers={"ETag": definition.etag},
    )


async def replace_definition(request: web.Request) -> web.Response:
    target = definition_id(request)
    expected = if_match(request)
    parsed = await _definitions_body(request)
    try:
        spec = DefinitionSpec.model_validate(
            parsed, context=validation_context(await _connections(request))
        )
    except ValidationError as exc:
        raise invalid("definition", exc) from exc
    with refusals_answered():
        change = await services(request).store.definitions.replace(
            target, spec, expected_version=expected
        )
    return json_response(dumped(change.definition), headers=changed_header(change))


async def replace_definitions(request: web.Request) -> web.Response:
    parsed = await _definitions_body(request)
    if not isinstance(parsed, list):
        raise Problem(
            400,
            "PUT /definitions replaces an array of definitions, each with its id; to replace "
            "one, PUT /definitions/{id}",
        )
    try:
        items = _REPLACEMENTS.validate_python(
            parsed, context=validation_context(await _connections(request))
        )
    except ValidationError as exc:
        raise invalid("definition", exc, array=True) from exc
    _refuse_repeats([item.id for item in items], "replaced")
    replacements = [Replacement(item.id, item.spec(), item.version) for item in items]
    with refusals_answered():
        changes = await services(request).store.definitions.replace_many(replacements)
    changed = [change.definition.id for change in changes if change.changed]
    return json_response(
        [dumped(change.definition) for change in changes],
        headers={CHANGED_HEADER: ", ".join(changed) or "none"},
    )


def _refuse_repeats(ids: Sequence[str], done: str) -> None:
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise Problem(
            400,
            f"each definition is {done} once: {', '.join(map(repr, repeated))} is given more "
            "than once",
        )


async def patch_definition(request: web.Request) -> web.Response:
    target = definition_id(request)
    expected = if_match(request)
    parsed = await _definitions_body(request)
    if not isinstance(parsed, dict):
        raise Problem(400, "PATCH takes a JSON object of the attributes to change")
    try:
        with refusals_answered():
            change = await services(request).store.definitions.patch(
                target,
                parsed,
                expected_version=expected,
                connections=await _connections(request),
            )
    except ValidationError as exc:
        raise invalid("definition", exc) from exc
    return json_response(dumped(change.definition), headers=changed_header(change))


async def delete_definition(request: web.Request) -> web.Response:
    target = definition_id(request)
    expected = if_match(request)
    with refusals_answered():
        await services(request).store.definitions.delete(target, expected_version=expected)
    return web.Response(status=204)


async def delete_definitions(request: web.Request) -> web.Response:
    parsed = await _definitions_body(request)
    try:
        ids = _IDS.validate_python(parsed)
    except ValidationError as exc:
        raise invalid("list of definition ids", exc, array=True) from exc
    _refuse_repeats(ids, "deleted")
    try:
        await services(request).store.definitions.delete_many(ids)
    except DefinitionNotFound as exc:
        raise Problem(
            404, f"there is no task definition {exc.ref!r}: none was deleted", id=exc.ref
        ) from exc
    return web.Response(status=204)
