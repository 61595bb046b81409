"""The operations page (GET /): the dashboard rendered on the server from Jinja2 templates
(callback_api/templates), refreshing itself.

No JavaScript and no build step: a meta refresh re-renders it, so it works in any browser and
under a Content-Security-Policy that forbids scripts outright.
"""

from __future__ import annotations

from aiohttp import web
from jinja2 import Environment, PackageLoader, StrictUndefined

from callback_api.ops import current_dashboard
from worker.text import duration, shorten
from worker.views import Dashboard

REFRESH_SECONDS = 5
EXCERPT_CHARS = 160
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A page that refreshes itself must show the present, never a cached past.
    "Cache-Control": "no-store",
}


def flatten(text: str) -> str:
    """`text` on one line, every run of whitespace (line breaks included) made one space."""
    return " ".join(text.split())


def blank_none(value: object) -> object:
    """What `{{ value }}` prints: nothing for an absent value (a task's name, a reason), where
    Jinja would print "None"."""
    return "" if value is None else value


# Built once: templates are compiled on first use and cached. Task ids, names, reasons, hosts and
# dead-letter bodies come from outside, so every template escapes what it prints (autoescape), and
# a misspelt variable fails the render instead of printing nothing (StrictUndefined).
templates = Environment(
    loader=PackageLoader("callback_api", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    finalize=blank_none,
    trim_blocks=True,
    lstrip_blocks=True,
    # The templates ship inside the package and never change while it runs: no stat of their
    # files on the event loop for every request.
    auto_reload=False,
)
templates.filters.update(duration=duration, shorten=shorten, flatten=flatten)


def render(board: Dashboard) -> str:
    """The whole page; every value that came from a task or a message is escaped."""
    return templates.get_template("page.html").render(
        board=board,
        now=board.generated_at,
        refresh_seconds=REFRESH_SECONDS,
        excerpt_chars=EXCERPT_CHARS,
    )


async def get_page(request: web.Request) -> web.Response:
    board = await current_dashboard(request)
    return web.Response(text=render(board), content_type="text/html", headers=HEADERS)
