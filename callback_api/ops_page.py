"""The operations page (GET /): the dashboard rendered on the server from Jinja2 templates
(callback_api/templates), refreshing itself, with the last hour's throughput as an SVG chart.

No JavaScript and no build step: a meta refresh re-renders it, and the chart is drawn here, as
inline SVG, so it works in any browser and under a Content-Security-Policy that forbids scripts
(and every other resource) outright.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import orjson
from aiohttp import web
from jinja2 import Environment, PackageLoader, StrictUndefined

from callback_api.ops import current_dashboard
from callback_api.services import services
from worker.contract.definitions import Definition, ExecutionRecord
from worker.store.database import Store
from worker.store.throughput import MINUTES
from worker.text import duration, shorten
from worker.views import Dashboard, MinuteThroughput

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


def pretty(value: object) -> str:
    """A JSON value as indented JSON text, for a <pre>."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


templates.filters.update(duration=duration, shorten=shorten, flatten=flatten, pretty=pretty)


# The chart's frame, in the SVG's own units: it scales to the page's width, at which one unit is
# about one pixel, so that its labels read at the size of the page's small print.
CHART_WIDTH = 1200
CHART_HEIGHT = 220
PLOT_LEFT = 56
PLOT_RIGHT = CHART_WIDTH - 16
PLOT_TOP = 30
PLOT_BOTTOM = CHART_HEIGHT - 46
# At most this many steps up the count axis, each 1, 2 or 5 times a power of ten.
MAX_STEPS = 4
# A time on the time axis every this many minutes of the clock.
TICK_MINUTES = 10


@dataclass(frozen=True, slots=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True, slots=True)
class Bar:
    """One minute's column: the succeeded tasks at the bottom, the others stacked on them."""

    minute: MinuteThroughput
    label: str
    x: float
    width: float
    succeeded_top: float
    succeeded_height: float
    other_top: float
    other_height: float


@dataclass(frozen=True, slots=True)
class Chart:
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    succeeded: int
    other: int
    busiest: Bar | None
    zone: str
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT
    left: int = PLOT_LEFT
    right: int = PLOT_RIGHT
    top: int = PLOT_TOP
    bottom: int = PLOT_BOTTOM


def count_axis(peak: int) -> tuple[int, int]:
    """The count axis for a busiest minute of `peak`: its top and its step, both whole. With no
    completions at all, 0 to 1."""
    peak = max(peak, 1)
    magnitude = 1
    while True:
        for step in (magnitude, 2 * magnitude, 5 * magnitude):
            steps = math.ceil(peak / step)
            if steps <= MAX_STEPS:
                return step * steps, step
        magnitude *= 10


def quiet_hour(now: datetime) -> list[MinuteThroughput]:
    """The last hour's minutes with no completion in them, for a board that was given none."""
    last = now.replace(second=0, microsecond=0)
    return [
        MinuteThroughput(minute=last - timedelta(minutes=back), succeeded=0, other=0)
        for back in reversed(range(MINUTES))
    ]


def chart(board: Dashboard) -> Chart:
    """Where the throughput chart's bars, ticks and labels go."""
    minutes = board.throughput or quiet_hour(board.generated_at)
    zone = board.generated_at.tzinfo
    top, step = count_axis(max(m.succeeded + m.other for m in minutes))
    column = (PLOT_RIGHT - PLOT_LEFT) / len(minutes)
    height = PLOT_BOTTOM - PLOT_TOP

    def y(count: int) -> float:
        return round(PLOT_BOTTOM - height * count / top, 2)

    bars = []
    x_ticks = []
    for index, minute in enumerate(minutes):
        local = minute.minute.astimezone(zone)
        x = PLOT_LEFT + index * column
        label = local.strftime("%H:%M")
        if local.minute % TICK_MINUTES == 0:
            x_ticks.append(Tick(round(x, 2), label))
        succeeded_top = y(minute.succeeded)
        other_top = y(minute.succeeded + minute.other)
        bars.append(
            Bar(
                minute=minute,
                label=label,
                x=round(x + column * 0.1, 2),
                width=round(column * 0.8, 2),
                succeeded_top=succeeded_top,
                succeeded_height=round(PLOT_BOTTOM - succeeded_top, 2),
                other_top=other_top,
                other_height=round(succeeded_top - other_top, 2),
            )
        )
    busiest = max(bars, key=lambda b: b.minute.succeeded + b.minute.other)
    return Chart(
        bars=bars,
        x_ticks=x_ticks,
        y_ticks=[Tick(y(value), str(value)) for value in range(0, top + 1, step)],
        succeeded=sum(m.succeeded for m in minutes),
        other=sum(m.other for m in minutes),
        busiest=busiest if busiest.minute.succeeded + busiest.minute.other else None,
        zone=board.generated_at.strftime("%Z") or "local time",
    )


# The definitions the page lists (by name; the heading counts them all), and how many of each
# one's latest executions.
LISTED_DEFINITIONS = 20
LATEST_EXECUTIONS = 3


@dataclass(frozen=True, slots=True)
class DefinitionActivity:
    """A definition on the page, and its latest executions, newest first."""

    definition: Definition
    executions: list[ExecutionRecord]


@dataclass(frozen=True, slots=True)
class Definitions:
    listed: list[DefinitionActivity]
    total: int


NO_DEFINITIONS = Definitions([], 0)


async def definition_activity(store: Store) -> Definitions:
    """The first definitions by name, each with its latest executions: two or three queries,
    each off an index, whatever the number of definitions or executions."""
    page = await store.definitions.page(limit=LISTED_DEFINITIONS)
    if not page.definitions:
        return NO_DEFINITIONS
    latest = await store.definitions.latest_executions(
        [d.id for d in page.definitions], LATEST_EXECUTIONS
    )
    return Definitions([DefinitionActivity(d, latest[d.id]) for d in page.definitions], page.total)


def render(board: Dashboard, definitions: Definitions = NO_DEFINITIONS) -> str:
    """The whole page; every value that came from a task, a definition or a message is
    escaped."""
    return templates.get_template("page.html").render(
        board=board,
        now=board.generated_at,
        refresh_seconds=REFRESH_SECONDS,
        excerpt_chars=EXCERPT_CHARS,
        chart=chart(board),
        definitions=definitions,
    )


async def get_page(request: web.Request) -> web.Response:
    # The chart's query is the page's alone: GET /queue, which shares the dashboard, has no use
    # for it. Both at once, each on a connection of its own.
    board, minutes = await asyncio.gather(
        current_dashboard(request), services(request).store.throughput()
    )
    board = board.model_copy(
        update={
            "throughput": [
                MinuteThroughput.model_validate(m, from_attributes=True, by_name=True)
                for m in minutes
            ]
        }
    )
    definitions = await definition_activity(services(request).store)
    return web.Response(text=render(board, definitions), content_type="text/html", headers=HEADERS)
