"""The operations page: its formatting, its escaping, its throughput chart, and the page itself
in a headless browser."""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
import tempfile
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel

from callback_api.ops_page import EXCERPT_CHARS, count_axis, render
from tests.conftest import Api, Events, Target, publish, task_message
from worker.contract.models import Mode, Result, State
from worker.views import (
    Dashboard,
    DeadLetterView,
    MinuteThroughput,
    QueueView,
    TaskSummary,
    WorkerView,
)

SCRIPT = "<script>alert(1)</script>"
# What a browser asks for when it follows a link.
BROWSER_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
)
# The chart's fills (templates/base.html).
SUCCEEDED_FILL = (0x2D, 0xA4, 0x4E)
OTHER_FILL = (0xCF, 0x22, 0x2E)
ESCAPED_SCRIPT = "&lt;script&gt;alert(1)&lt;/script&gt;"
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def summary(**fields: object) -> TaskSummary:
    base: dict[str, object] = {
        "task_id": "t-1",
        "plan_id": "plan-1",
        "job_id": "plan-1",
        "hub_name": "build",
        "mode": Mode.API_RESPONSE,
        "state": State.COMPLETED,
        "attempts": 1,
        "queued_at": NOW - timedelta(minutes=10),
    }
    base.update(fields)
    return TaskSummary.model_validate(base)


def board(**fields: object) -> Dashboard:
    base: dict[str, object] = {
        "queue": QueueView(
            ready=0,
            unacknowledged=0,
            consumers=1,
            dead_letters=0,
            queued=0,
            running=0,
            polling=0,
            waiting=0,
            completed=0,
            completed_last_minute=0,
        ),
        "unfinished": [],
        "failures": [],
        "workers": [],
        "dead_letters": [],
        "generated_at": NOW,
    }
    base.update(fields)
    return Dashboard.model_validate(base)


def test_everything_from_a_task_or_a_message_is_escaped() -> None:
    page = render(
        board(
            unfinished=[
                summary(
                    task_id="t-wait",
                    name=SCRIPT,
                    state=State.WAITING,
                    mode=Mode.CALLBACK,
                    started_at=NOW - timedelta(seconds=3900),
                )
            ],
            failures=[
                summary(
                    name='"><img src=x>',
                    result=Result.FAILED,
                    reason="HTTP 500 <b>bold</b>",
                    completed_at=NOW - timedelta(seconds=5),
                )
            ],
            dead_letters=[
                DeadLetterView(
                    message_id="m&1",
                    reason="message is not JSON",
                    excerpt="</code>" + SCRIPT,
                    at=NOW,
                )
            ],
        )
    )
    assert "<script" not in page
    assert "<img" not in page
    assert "<b>" not in page
    assert page.count(ESCAPED_SCRIPT) == 2
    # Jinja's escaping writes a double quote as a numeric reference, not as &quot;.
    assert "&#34;&gt;&lt;img src=x&gt;" in page
    assert "HTTP 500 &lt;b&gt;bold&lt;/b&gt;" in page
    assert "&lt;/code&gt;" in page
    assert "m&amp;1" in page
    assert ">1h05m<" in page
    assert ">5s ago<" in page


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        # A clock a little behind the database's must not show a negative age.
        (-2.5, "0s"),
        (0, "0s"),
        (3.9, "3s"),
        (59.99, "59s"),
        (60, "1m00s"),
        (307, "5m07s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3900, "1h05m"),
        (86_399, "23h59m"),
        (86_400, "1d00h"),
        (2 * 86_400 + 4 * 3600 + 59, "2d04h"),
    ],
)
def test_ages_are_short_with_the_exact_time_on_hover(seconds: float, shown: str) -> None:
    seen = NOW - timedelta(seconds=seconds)
    page = render(
        board(
            queue=board().queue.model_copy(update={"oldest_waiting_age_seconds": seconds}),
            workers=[
                WorkerView(
                    worker_id=1,
                    host="vm",
                    pid=7,
                    version="0.1.0",
                    in_flight=0,
                    started_at=seen,
                    last_seen=seen,
                )
            ],
        )
    )
    stamp = seen.isoformat(timespec="seconds")
    assert f'<time datetime="{stamp}" title="{stamp}">{shown}</time>' in page
    assert f'<time datetime="{stamp}" title="{stamp}">{shown} ago</time>' in page
    assert figure(page, "oldest-waiting") == shown


@pytest.mark.parametrize(
    ("excerpt", "shown"),
    [
        ("short", "short"),
        ("x" * EXCERPT_CHARS, "x" * EXCERPT_CHARS),
        ("one\ntwo\t three\r\n", "one two three"),
        ("x" * (EXCERPT_CHARS + 1), "x" * (EXCERPT_CHARS - 1) + "…"),
        ("a\n\n" + "b" * EXCERPT_CHARS, "a " + "b" * (EXCERPT_CHARS - 3) + "…"),
    ],
)
def test_a_dead_letter_shows_one_short_line_of_its_body(excerpt: str, shown: str) -> None:
    page = render(
        board(dead_letters=[DeadLetterView(reason="message is not JSON", excerpt=excerpt, at=NOW)])
    )
    assert f"<td><code>{shown}</code></td>" in page


def test_what_is_absent_shows_as_an_empty_cell() -> None:
    page = render(
        board(
            failures=[summary(task_id="t-no-name", result=Result.FAILED, completed_at=None)],
            dead_letters=[DeadLetterView(reason="message is not JSON", excerpt="{", at=NOW)],
        )
    )
    assert "None" not in page.replace('<p class="none">None.</p>', "")
    assert re.search(
        r'<td class="id"><a href="/tasks/t-no-name">t-no-name</a></td>\s*<td></td>\s*'
        r'<td class="reason"></td>',
        page,
    )
    assert "<td>—</td>" in page
    assert '<td class="id"></td>' in page


def test_polling_tasks_are_counted_apart_from_waiting_and_queued_ones() -> None:
    queue = board().queue.model_copy(update={"polling": 3, "waiting": 2, "queued": 5})
    page = render(board(queue=queue))
    shown = {key: figure(page, key) for key in ("queued", "waiting", "polling")}
    assert shown == {"queued": "5", "waiting": "2", "polling": "3"}
    assert "Running, waiting and polling" in page


def test_an_empty_dashboard_says_so() -> None:
    page = render(board())
    assert page.count('<p class="none">None.</p>') == 4
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "<title>agentless</title>" in page
    assert figure(page, "oldest-waiting") == "—"
    assert figure(page, "consumers") == "1"


def minutes(counts: dict[int, tuple[int, int]], end: datetime = NOW) -> list[MinuteThroughput]:
    """The hour up to `end`'s minute; `counts` gives some minutes (0 the last) their completions,
    succeeded and other."""
    last = end.replace(second=0, microsecond=0)
    return [
        MinuteThroughput(
            minute=last - timedelta(minutes=back),
            succeeded=counts.get(back, (0, 0))[0],
            other=counts.get(back, (0, 0))[1],
        )
        for back in reversed(range(60))
    ]


def chart_of(page: str) -> str:
    found = re.search(r'<svg class="chart" data-chart="throughput".*?</svg>', page, re.DOTALL)
    assert found is not None, "no throughput chart on the page"
    return found.group(0)


def bars(page: str) -> dict[str, tuple[int, int]]:
    """Each minute of the chart: its succeeded and other counts, as the SVG holds them."""
    found = re.findall(
        r'<g class="minute" data-minute="([^"]+)" data-succeeded="(\d+)" data-other="(\d+)">',
        chart_of(page),
    )
    return {minute: (int(succeeded), int(other)) for minute, succeeded, other in found}


def drawn_bars(svg: str) -> list[str]:
    """The class of each bar drawn (the legend's swatches are no bars)."""
    return re.findall(r'<rect class="(succeeded|other)" x="[\d.]+" y=', svg)


def test_the_chart_draws_each_minute_of_the_hour_stacked_by_result() -> None:
    page = render(board(throughput=minutes({0: (3, 1), 2: (8, 0), 59: (0, 2)})))
    svg = chart_of(page)
    drawn = bars(page)
    assert len(drawn) == 60
    assert drawn["2024-05-01T12:00:00+00:00"] == (3, 1)
    assert drawn["2024-05-01T11:58:00+00:00"] == (8, 0)
    assert drawn["2024-05-01T11:01:00+00:00"] == (0, 2)
    assert sum(s + o for s, o in drawn.values()) == 14
    assert "(14 completed: 11 succeeded, 3 not)" in page
    # Titled for people who cannot see it, and each minute's counts on hover.
    assert '<title id="throughput-title">Tasks completed per minute' in svg
    assert "The busiest minute, 11:58 UTC, saw 8." in svg
    assert "<title>12:00 UTC: 3 succeeded, 1 not</title>" in svg
    # The busiest minute reaches the top of the axis (8 of 0, 2, 4, 6, 8); the one of 3 and 1
    # stacks its other on its succeeded.
    assert re.findall(r'dominant-baseline="middle">(\d+)</text>', svg) == ["0", "2", "4", "6", "8"]
    assert '<rect class="succeeded" x="1129.48" y="30.0" width="15.04" height="144.0"/>' in svg
    assert '<rect class="succeeded" x="1167.08" y="120.0" width="15.04" height="54.0"/>' in svg
    assert '<rect class="other" x="1167.08" y="102.0" width="15.04" height="18.0"/>' in svg
    # Minutes without completions have no bar; the times are every ten minutes of the clock.
    assert sorted(drawn_bars(svg)) == ["other", "other", "succeeded", "succeeded"]
    times = re.findall(r'text-anchor="middle">(\d\d:\d\d)</text>', svg)
    assert times == ["11:10", "11:20", "11:30", "11:40", "11:50", "12:00"]
    assert "time (UTC)" in svg
    assert "tasks / min" in svg
    assert "No task completed" not in svg
    assert "<script" not in page


def test_the_chart_of_a_quiet_hour_says_so() -> None:
    for given in ([], minutes({})):
        svg = chart_of(render(board(throughput=given)))
        assert "No task completed in the last hour." in svg
        assert re.findall(r'dominant-baseline="middle">(\d+)</text>', svg) == ["0", "1"]
        assert drawn_bars(svg) == []
        assert svg.count('<g class="minute"') == 60


@pytest.mark.parametrize(
    ("peak", "axis"),
    [
        (0, (1, 1)),
        (1, (1, 1)),
        (4, (4, 1)),
        (5, (6, 2)),
        (8, (8, 2)),
        (9, (10, 5)),
        (21, (30, 10)),
        (41, (60, 20)),
        (1234, (1500, 500)),
    ],
)
def test_the_count_axis_steps_by_one_two_or_five_to_at_least_the_peak(
    peak: int, axis: tuple[int, int]
) -> None:
    assert count_axis(peak) == axis
    top, step = axis
    assert top >= peak
    assert top // step <= 4


def figure(page: str, key: str) -> str:
    found = re.search(rf'data-figure="{key}"[^>]*><dt>[^<]*</dt><dd>([^<]*)</dd>', page)
    assert found is not None, f"no figure {key!r} on the page"
    return found.group(1)


async def chromium(*arguments: str, timeout: float = 60) -> bytes:
    """Run headless Chromium with a throwaway profile; what it wrote to stdout."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("the chromium binary is not installed (.ci/run installs Debian's chromium)")
    with tempfile.TemporaryDirectory(prefix="agentless-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-proxy-server",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *arguments,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout):
                out, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    assert process.returncode == 0, err.decode(errors="replace")
    return out


def png_pixels(data: bytes) -> Counter[tuple[int, int, int]]:
    """How many pixels of each colour a screenshot has: an 8-bit, non-interlaced RGB or RGBA PNG
    (what Chromium writes), decoded here, so that the tests need no imaging library."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    position, compressed, header = 8, [], b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunk = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            compressed.append(chunk)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, interlace, colour in (2, 6)) == (8, 0, True), "not a PNG that Chromium writes"
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(compressed))
    stride = width * channels
    previous = bytearray(stride)
    counted: Counter[tuple[int, int, int]] = Counter()
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        _unfilter(kind, line, previous, channels)
        counted.update(zip(line[0::channels], line[1::channels], line[2::channels], strict=True))
        previous = line
    return counted


def _unfilter(kind: int, line: bytearray, previous: bytearray, channels: int) -> None:
    """Undo one scanline's PNG filter (None, Sub, Up, Average or Paeth), in place; a loop for
    each, which keeps a tall screenshot's decoding to about a second."""
    if kind == 1:
        for i in range(channels, len(line)):
            line[i] = (line[i] + line[i - channels]) & 0xFF
    elif kind == 2:
        for i in range(len(line)):
            line[i] = (line[i] + previous[i]) & 0xFF
    elif kind == 3:
        for i in range(len(line)):
            left = line[i - channels] if i >= channels else 0
            line[i] = (line[i] + ((left + previous[i]) >> 1)) & 0xFF
    elif kind == 4:
        for i in range(len(line)):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            guess = left + up - corner
            to_left, to_up, to_corner = abs(guess - left), abs(guess - up), abs(guess - corner)
            if to_left <= to_up and to_left <= to_corner:
                nearest = left
            elif to_up <= to_corner:
                nearest = up
            else:
                nearest = corner
            line[i] = (line[i] + nearest) & 0xFF


async def screenshot(url: str, path: Path, height: int = 900) -> Counter[tuple[int, int, int]]:
    """A screenshot of `url` at the page's width, saved at `path`; its pixels by colour, once
    it is known not to be blank."""
    await chromium(f"--screenshot={path}", f"--window-size=1280,{height}", url)
    # Decoding takes a second of pure Python: off the loop the API runs on.
    pixels = await asyncio.to_thread(lambda: png_pixels(path.read_bytes()))
    assert sum(pixels.values()) == 1280 * height
    # A blank or failed render is one or two colours; text and borders make hundreds.
    assert len(pixels) > 50, f"{path.name} looks blank: {len(pixels)} colours"
    return pixels


async def test_the_page_shows_a_live_api_with_real_tasks(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    succeeding = task_message(target, name="succeeds")
    failing = task_message(target, name=SCRIPT, query="&status=500")
    waiting = task_message(target, name="waits", waitForCompletion="callback", timeoutSeconds=600)
    for task in (succeeding, failing, waiting):
        await publish(channel, api.settings, task)
    await publish(channel, api.settings, b"not json")

    assert (await events.completed(str(succeeding["taskId"])))["result"] == "succeeded"
    assert (await events.completed(str(failing["taskId"])))["reason"] == "HTTP 500"
    async with asyncio.timeout(10), events.changed:
        await events.changed.wait_for(
            lambda: bool(events.named("TaskWaiting", str(waiting["taskId"])))
        )
    # The broker's dead letter comes first; the page reads the database's record of it.
    async with asyncio.timeout(10):
        while not await db.fetchval("SELECT count(*) FROM dead_letters"):
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as session, session.get(f"{api.url}/") as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/html"
        assert {
            name: response.headers.get(name)
            for name in ("Content-Security-Policy", "X-Content-Type-Options")
        } == {
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff",
        }
        served = await response.text()
    assert SCRIPT not in served
    assert ESCAPED_SCRIPT in served

    dom = (await chromium("--dump-dom", f"{api.url}/")).decode()
    assert "<title>agentless</title>" in dom
    expected = {
        "consumers": "1",
        "dead-letters": "1",
        "queued": "0",
        "running": "0",
        "waiting": "1",
        "completed": "2",
        "rate": "2",
    }
    assert {key: figure(dom, key) for key in expected} == expected
    assert re.fullmatch(r"\d+s", figure(dom, "oldest-waiting"))
    assert str(waiting["taskId"]) in dom
    assert str(failing["taskId"]) in dom
    assert "HTTP 500" in dom
    assert "message is not JSON" in dom
    assert "not json" in dom
    # The name arrives as text, not as an element the browser built.
    assert ESCAPED_SCRIPT in dom
    assert "<script" not in dom

    # The chart holds the two completions, in this minute (or the one before, at a turn).
    assert 'data-chart="throughput"' in dom
    drawn = bars(dom)
    assert len(drawn) == 60
    assert (sum(s for s, _ in drawn.values()), sum(o for _, o in drawn.values())) == (1, 1)
    assert "(2 completed: 1 succeeded, 1 not)" in dom

    # Each task's row links to its detail page, which a browser gets as HTML.
    for task in (failing, waiting):
        assert f'<a href="/tasks/{task["taskId"]}">{task["taskId"]}</a>' in dom
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{api.url}/tasks/{failing['taskId']}", headers={"Accept": BROWSER_ACCEPT}
        ) as response,
    ):
        assert (response.status, response.content_type) == (200, "text/html")
        detail = await response.text()
    assert f"<code>{failing['taskId']}</code> · {ESCAPED_SCRIPT}</h2>" in detail
    assert "HTTP 500" in detail

    pixels = await screenshot(f"{api.url}/", tmp_path / "operations-page.png")
    # One bar of each colour at least: the fills are the chart's alone (red text is another red).
    assert pixels[SUCCEEDED_FILL] > 200
    assert pixels[OTHER_FILL] > 200
