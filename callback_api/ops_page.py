"""The operations page (GET /): the dashboard rendered on the server, refreshing itself.

No JavaScript and no build step: a meta refresh re-renders it, so it works in any browser and
under a Content-Security-Policy that forbids scripts outright.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape

from aiohttp import web

from callback_api.guard import guard_key
from callback_api.ops import current_dashboard
from worker.views import Dashboard, DeadLetterView, QueueView, TaskSummary, WorkerView

REFRESH_SECONDS = 5
EXCERPT_CHARS = 160
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A page that refreshes itself must show the present, never a cached past.
    "Cache-Control": "no-store",
}

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:12px 24px;display:flex;gap:16px;align-items:baseline}
header h1{font-size:20px;margin:0}header span{color:#c9d1d9;font-size:13px}
main{padding:8px 24px 24px;max-width:1280px}
h2{font-size:15px;margin:22px 0 8px}h2 small{color:#656d76;font-weight:normal}
dl{display:grid;grid-template-columns:repeat(5,1fr);gap:8px;margin:0}
@media (max-width:720px){dl{grid-template-columns:repeat(2,1fr)}}
dl div{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:8px 12px}
dt{color:#656d76;font-size:12px}dd{margin:0;font-size:22px;font-weight:600}
dl div.alert{border-color:#cf222e}dl div.alert dd{color:#cf222e}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d0d7de}
th,td{text-align:left;padding:5px 10px;border-bottom:1px solid #eaeef2;vertical-align:baseline}
th{background:#f6f8fa;font-size:12px;color:#656d76;font-weight:600}
td.id,code{font:12px ui-monospace,monospace;word-break:break-all}
.state{border-radius:10px;padding:1px 8px;font-size:12px;background:#ddf4ff;color:#0969da}
.state.waiting{background:#fff8c5;color:#7d4e00}
.reason{color:#cf222e}p.none{color:#656d76;margin:4px 0}
"""


class Html(str):
    """Text that is already markup: `cell` passes it through, everything else is escaped."""

    __slots__ = ()


def cell(value: str | int | None) -> str:
    if isinstance(value, Html):
        return value
    return escape("" if value is None else str(value))


def format_age(seconds: float) -> str:
    """A duration as a person reads it: '3 s', '2 min', '1 h 5 min', '2 d 3 h'."""
    # A clock a little behind the database's would otherwise say "-1 s".
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes = whole // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def shorten(text: str, limit: int = EXCERPT_CHARS) -> str:
    """At most `limit` characters, on one line, marked with an ellipsis when cut."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def since(at: datetime | None, now: datetime, *, suffix: str = "") -> Html:
    """The age of `at`, with the exact time on hover."""
    if at is None:
        return Html("—")
    text = format_age((now - at).total_seconds()) + suffix
    stamp = at.isoformat(timespec="seconds")
    return Html(f'<time datetime="{escape(stamp)}" title="{escape(stamp)}">{escape(text)}</time>')


Row = Sequence[str | int | None]


def table(headings: Sequence[str], rows: Sequence[Row], classes: Sequence[str]) -> str:
    if not rows:
        return '<p class="none">None.</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headings)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{c}">{cell(v)}</td>' if c else f"<td>{cell(v)}</td>"
            for c, v in zip(classes, row, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figures(queue: QueueView) -> str:
    """Two rows of five: the broker's queue and its throughput, then the tasks by state."""
    oldest = queue.oldest_waiting_age_seconds
    broker: list[tuple[str, str, str | int, bool]] = [
        ("ready", "Ready in queue", queue.ready, False),
        ("unacknowledged", "Unacknowledged", queue.unacknowledged, False),
        ("consumers", "Consumers", queue.consumers, queue.consumers == 0),
        ("dead-letters", "Dead letters", queue.dead_letters, queue.dead_letters > 0),
        ("rate", "Completed / min", queue.completed_last_minute, False),
    ]
    tasks: list[tuple[str, str, str | int, bool]] = [
        ("queued", "Queued", queue.queued, False),
        ("running", "Running", queue.running, False),
        ("waiting", "Waiting", queue.waiting, False),
        ("completed", "Completed", queue.completed, False),
        ("oldest-waiting", "Oldest waiting", "—" if oldest is None else format_age(oldest), False),
    ]
    return "".join(
        f"<h2>{escape(title)}</h2><dl>"
        + "".join(
            f'<div data-figure="{key}" class="{"alert" if alert else "plain"}">'
            f"<dt>{escape(label)}</dt><dd>{escape(str(value))}</dd></div>"
            for key, label, value, alert in shown
        )
        + "</dl>"
        for title, shown in (("Queue", broker), ("Tasks", tasks))
    )


def state_badge(task: TaskSummary) -> Html:
    return Html(f'<span class="state {escape(task.state)}">{escape(task.state)}</span>')


def unfinished_table(tasks: Sequence[TaskSummary], now: datetime) -> str:
    rows: list[Row] = [
        [
            t.task_id,
            t.name,
            state_badge(t),
            t.plan_id,
            t.attempts,
            since(t.started_at or t.queued_at, now),
            since(t.queued_at, now, suffix=" ago"),
        ]
        for t in tasks
    ]
    headings = ("Task", "Name", "State", "Plan", "Attempts", "Age", "Queued")
    return table(headings, rows, ("id", "", "", "id", "", "", ""))


def failures_table(tasks: Sequence[TaskSummary], now: datetime) -> str:
    rows: list[Row] = [
        [t.task_id, t.name, t.reason, t.attempts, since(t.completed_at, now, suffix=" ago")]
        for t in tasks
    ]
    headings = ("Task", "Name", "Reason", "Attempts", "Failed")
    return table(headings, rows, ("id", "", "reason", "", ""))


def workers_table(workers: Sequence[WorkerView], now: datetime) -> str:
    rows: list[Row] = [
        [
            w.host,
            w.pid,
            w.version,
            w.in_flight,
            since(w.started_at, now),
            since(w.last_seen, now, suffix=" ago"),
        ]
        for w in workers
    ]
    headings = ("Host", "PID", "Version", "In flight", "Up", "Last seen")
    return table(headings, rows, ("", "", "", "", "", ""))


def dead_letters_table(letters: Sequence[DeadLetterView], now: datetime) -> str:
    rows: list[Row] = [
        [
            since(d.at, now, suffix=" ago"),
            d.reason,
            d.message_id,
            Html(f"<code>{escape(shorten(d.excerpt))}</code>"),
        ]
        for d in letters
    ]
    headings = ("When", "Reason", "Message id", "Message")
    return table(headings, rows, ("", "reason", "id", ""))


def section(title: str, count: int, body: str) -> str:
    return f"<section><h2>{escape(title)} <small>({count})</small></h2>{body}</section>"


def render(board: Dashboard) -> str:
    """The whole page; every value that came from a task or a message is escaped."""
    now = board.generated_at
    generated = now.strftime("%Y-%m-%d %H:%M:%S %Z")
    sections = (
        section(
            # The list is capped; the heading counts them all.
            "Running and waiting",
            board.queue.running + board.queue.waiting,
            unfinished_table(board.unfinished, now),
        )
        + section("Recent failures", len(board.failures), failures_table(board.failures, now))
        + section("Workers", len(board.workers), workers_table(board.workers, now))
        + section(
            "Recent dead letters",
            len(board.dead_letters),
            dead_letters_table(board.dead_letters, now),
        )
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>agentless</title><style>{STYLE}</style></head><body>"
        f"<header><h1>agentless</h1><span>operations · {escape(generated)} · "
        f"refreshes every {REFRESH_SECONDS} s</span></header>"
        f"<main>{figures(board.queue)}{sections}</main></body></html>"
    )


async def get_page(request: web.Request) -> web.Response:
    request.app[guard_key].check(request)
    board = await current_dashboard(request)
    return web.Response(text=render(board), content_type="text/html", headers=HEADERS)
