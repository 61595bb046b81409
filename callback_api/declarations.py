"""What a route declares (Route, Text), and the declaration of the route a request matched.

routes.py declares every route, openapi.py describes them and the middlewares act on them: each
reads the declarations from here, so none imports another's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

if TYPE_CHECKING:
    from callback_api.azure import ResourceLocation


@dataclass(frozen=True)
class Text:
    """A body that is text rather than JSON: its media type and what it holds."""

    media_type: str
    description: str


@dataclass(frozen=True)
class NoContent:
    """An answer without a body (204): what it means."""

    description: str


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    # callback: the task's AuthToken; api: AGENTLESS_API_TOKENS (when set); none: open.
    auth: Literal["callback", "api", "none"]
    tag: Literal["callbacks", "tasks", "definitions", "operations"]
    # By status: a model is answered as its JSON, Text as text, NoContent with no body, and a
    # str is an error (as application/problem+json) that says when it is answered. 401 goes
    # without saying.
    responses: Mapping[int, type[BaseModel] | Text | NoContent | str] = field(default_factory=dict)
    # By status, the names of the headers it is answered with besides those every route's
    # answer of that status has (openapi.py describes each name).
    headers: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    # What the route reads besides its path: a model is a JSON body; Text, another kind of body.
    body: tuple[type[BaseModel] | Text, ...] = ()
    body_required: bool = True
    query: type[BaseModel] | None = None
    # The Azure resource location the route serves, which Azure's clients discover it by.
    location: ResourceLocation | None = None


# Each route's name in the app's router, and its declaration: set by routes.add_routes.
routes_key = web.AppKey("routes", dict[str, Route])


def declared(request: web.Request) -> Route | None:
    """The declaration of the route the request matched; None when it matched none (404, 405)."""
    return request.app[routes_key].get(request.match_info.route.name or "")


def resource_location(request: web.Request) -> ResourceLocation | None:
    """The Azure resource location the matched route serves, if it serves one."""
    route = declared(request)
    return None if route is None else route.location
