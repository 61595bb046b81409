"""Azure DevOps's client protocol: resource-location discovery, api-version checks and the error
members Azure's clients read (SPEC §6).

Microsoft's clients (the .NET `TaskHttpClient`, the Python `azure-devops` package) build no URL by
hand: they ask `OPTIONS {PlanUrl}/_apis` where each resource lives, build each request from the
route template of the location whose id they need, negotiate the api-version against the
location's versions, and turn a non-2xx answer into an exception from its `message` and `typeKey`.
"""

from __future__ import annotations

import re
from typing import Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from callback_api.declarations import resource_location
from callback_api.inputs import query_of
from callback_api.problems import PROBLEM_TYPE, problem_response

AREA: Final = "distributedtask"
# The versions every location serves: Azure's clients of 7.x ask for "7.1-preview.1", older
# ones for "2.0-preview.1" and the like. Versions past the released one are previews.
MIN_VERSION: Final = (1, 0)
MAX_VERSION: Final = (7, 2)
RELEASED_VERSION: Final = (7, 1)
RESOURCE_VERSION: Final = 1


def _dotted(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


class ResourceLocation(BaseModel):
    """Where one resource lives, as Azure's `ApiResourceLocation`."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    id: str = Field(description="the location id a client asks for")
    area: str = AREA
    resource_name: str
    route_template: str = Field(
        description="relative to PlanUrl; {area} and {resource} are this location's own, and a "
        "path segment whose value a call does not give is left out"
    )
    resource_version: int = RESOURCE_VERSION
    min_version: str = _dotted(MIN_VERSION)
    max_version: str = _dotted(MAX_VERSION)
    released_version: str = _dotted(RELEASED_VERSION)


class ResourceLocations(BaseModel):
    """OPTIONS {PlanUrl}/_apis: every location agentless serves, the same for every plan."""

    count: int
    value: list[ResourceLocation]


class DiscoveryQuery(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, extra="ignore")

    all_host_types: bool = Field(
        default=False, description="asked by some clients; every location is on this one host"
    )


_PLAN: Final = "{scopeIdentifier}/_apis/{area}/hubs/{hubName}/plans/{planId}"

EVENTS: Final = ResourceLocation(
    id="557624af-b29e-4c20-8ab0-0399d2204f3f",
    resource_name="events",
    route_template=f"{_PLAN}/{{resource}}",
)
FEED: Final = ResourceLocation(
    id="858983e4-19bd-4c5e-864c-507b59b58b12",
    resource_name="feed",
    route_template=f"{_PLAN}/timelines/{{timelineId}}/records/{{recordId}}/{{resource}}",
)
LOGS: Final = ResourceLocation(
    id="46f5667d-263a-4684-91b1-dff7fdcf64e2",
    resource_name="logs",
    route_template=f"{_PLAN}/{{resource}}/{{logId}}",
)
RECORDS: Final = ResourceLocation(
    id="8893bc5b-35b2-4be7-83cb-99e683551db4",
    resource_name="records",
    route_template=f"{_PLAN}/timelines/{{timelineId}}/{{resource}}",
)
LOCATIONS: Final = (EVENTS, FEED, LOGS, RECORDS)

# Built once: discovery costs no database read and no serialisation per request.
_DISCOVERY: Final = orjson.dumps(
    ResourceLocations(count=len(LOCATIONS), value=list(LOCATIONS)).model_dump(by_alias=True)
)


async def get_resource_locations(request: web.Request) -> web.Response:
    # The query is read only to refuse a malformed one: every location is on this host.
    query_of(request, DiscoveryQuery)
    return web.Response(body=_DISCOVERY, content_type="application/json")


# The exception type Azure's clients would see for each status; they read `typeKey` to pick an
# exception class and show `message`.
_TYPE_KEYS: Final = {
    400: "ArgumentException",
    401: "VssUnauthorizedException",
    403: "AccessCheckException",
    404: "TaskOrchestrationJobNotFoundException",
    405: "MethodNotAllowedException",
    408: "RequestTimeoutException",
    409: "InvalidOperationException",
    413: "RequestContentTooLargeException",
    503: "ServiceUnavailableException",
}
_VERSION: Final = re.compile(r"(\d{1,4})\.(\d{1,4})(-preview(?:\.(\d{1,4}))?)?", re.IGNORECASE)
_ACCEPT_VERSION: Final = re.compile(r"api-version\s*=\s*([^;,\s]+)", re.IGNORECASE)


def requested_version(request: web.Request) -> str | None:
    """The api-version a request asks for: in the query, else in Accept (as the clients send
    it); None when it names none."""
    version = request.query.get("api-version")
    if version is not None:
        return version
    found = _ACCEPT_VERSION.search(request.headers.get("Accept", ""))
    return found[1] if found else None


def version_problem(location: ResourceLocation, requested: str) -> tuple[str, str] | None:
    """Why `location` does not serve the api-version `requested`, and its typeKey; None when
    it does."""
    served = f"{location.min_version} to {location.max_version}"
    match = _VERSION.fullmatch(requested.strip())
    if match is None:
        return (
            f"api-version {requested!r} is not a version: send one such as "
            f"{_dotted(RELEASED_VERSION)}-preview.{RESOURCE_VERSION} ({served} are served)",
            "VssVersionNotParsableException",
        )
    version = (int(match[1]), int(match[2]))
    if not MIN_VERSION <= version <= MAX_VERSION:
        return (
            f"api-version {requested} is out of range for {location.resource_name}: "
            f"agentless serves {served}",
            "VssVersionOutOfRangeException",
        )
    if version > RELEASED_VERSION and match[3] is None:
        return (
            f"api-version {requested} of {location.resource_name} is in preview: send "
            f"{_dotted(version)}-preview",
            "VssInvalidPreviewVersionException",
        )
    return None


@web.middleware
async def azure_dialect(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On the routes that serve a resource location: refuse an api-version the location does not
    serve, and give every problem answer the `message` and `typeKey` Azure's clients read."""
    location = resource_location(request)
    if location is None:
        return await handler(request)
    requested = requested_version(request)
    refused = None if requested is None else version_problem(location, requested)
    if refused is not None:
        detail, type_key = refused
        return problem_response(400, detail, message=detail, typeKey=type_key)
    response = await handler(request)
    if (
        response.status >= 400
        and isinstance(response, web.Response)
        and response.content_type == PROBLEM_TYPE
        and isinstance(response.body, bytes)
    ):
        # Only error answers are read again, and they are small.
        problem = orjson.loads(response.body)
        problem.setdefault("message", problem.get("detail"))
        problem.setdefault("typeKey", _TYPE_KEYS.get(response.status, "VssServiceException"))
        response.body = orjson.dumps(problem)
    return response
