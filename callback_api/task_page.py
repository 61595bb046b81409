"""A task's detail page: GET /tasks/{taskId} as HTML, for a browser that follows a task's link
on the operations page. API clients, and any URL with `?json`, get the JSON as before.

Rendered with the operations page's templates and headers: no script, every value escaped.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Final

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from callback_api.ops_page import HEADERS, REFRESH_SECONDS, pretty, templates
from callback_api.services import services
from worker.contract.models import State
from worker.views import LogLine, TaskDetail, TaskLogs

# What the page shows of a long response body and of a long log; the JSON has it all.
BODY_EXCERPT_CHARS: Final = 4000
LOG_LINES_SHOWN: Final = 1000
HTML: Final = ("text", "html")
JSON: Final = ("application", "json")


class TaskQuery(BaseModel):
    """GET /tasks/{taskId}: what a browser may add to get the JSON, not the page."""

    model_config = ConfigDict(extra="allow")

    json_: str | None = Field(
        default=None,
        alias="json",
        description="present, with any value or none: the JSON, even when Accept prefers "
        "text/html (a browser)",
    )


def _quality(ranges: list[tuple[str, str, float]], kind: tuple[str, str]) -> float:
    """The quality `ranges` give the media type `kind`: that of the most specific range that
    matches it (type/subtype, then type/*, then */*), 0 if none does."""
    best, quality = -1, 0.0
    for main, sub, q in ranges:
        if (main, sub) == kind:
            specificity = 2
        elif (main, sub) == (kind[0], "*"):
            specificity = 1
        elif (main, sub) == ("*", "*"):
            specificity = 0
        else:
            continue
        if specificity > best:
            best, quality = specificity, q
    return quality


def _ranges(accept: str) -> list[tuple[str, str, float]]:
    """An Accept header's media ranges, with their qualities (RFC 9110 §12.5.1)."""
    ranges = []
    for part in accept.split(","):
        media, *parameters = part.split(";")
        main, _, sub = media.strip().lower().partition("/")
        if not main or not sub:
            continue
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                q = min(max(q, 0.0), 1.0) if math.isfinite(q) else 0.0
        ranges.append((main, sub, q))
    return ranges


def prefers_html(accept: str | None) -> bool:
    """Whether an Accept header ranks text/html above application/json, as a browser's does.
    No header, `*/*`, or JSON named at least as high: the JSON."""
    if not accept:
        return False
    ranges = _ranges(accept)
    return _quality(ranges, HTML) > _quality(ranges, JSON)


def wants_page(request: web.Request) -> bool:
    """Whether GET /tasks/{taskId} answers with the page rather than the JSON."""
    return "json" not in request.query and prefers_html(request.headers.get("Accept"))


def _body_text(detail: TaskDetail) -> str | None:
    """The response's body as text: as it came if it was text, else its JSON, indented."""
    if detail.response is None:
        return None
    body = detail.response.body
    return body if isinstance(body, str) else pretty(body)


def render(detail: TaskDetail, logs: TaskLogs, now: datetime) -> str:
    """The page of one task; every value in it came from outside and is escaped."""
    body = _body_text(detail)
    shown: list[LogLine] = logs.lines[-LOG_LINES_SHOWN:]
    return templates.get_template("task.html").render(
        task=detail,
        logs=logs,
        log_lines=shown,
        body=None if body is None else body[:BODY_EXCERPT_CHARS],
        body_chars=0 if body is None else len(body),
        now=now,
        # A completed task changes no more: only an unfinished one's page refreshes itself.
        refresh_seconds=0 if detail.state is State.COMPLETED else REFRESH_SECONDS,
    )


async def get_page(request: web.Request, detail: TaskDetail) -> web.Response:
    lines, dropped = await services(request).store.log_lines(detail.task_id)
    logs = TaskLogs(
        task_id=detail.task_id,
        dropped_lines=dropped,
        lines=[LogLine(at=at, line=line) for at, line in lines],
    )
    page = render(detail, logs, services(request).store.clock.now())
    return web.Response(text=page, content_type="text/html", headers={**HEADERS, "Vary": "Accept"})
