"""The operations page: its formatting, its escaping, and the page itself in a headless browser."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel

from callback_api.ops_page import EXCERPT_CHARS, render
from tests.conftest import Api, Events, Target, publish, task_message
from worker.contract.models import Mode, Result, State
from worker.views import Dashboard, DeadLetterView, QueueView, TaskSummary, WorkerView

ARTIFACTS = Path(__file__).parent / "artifacts"
SCRIPT = "<script>alert(1)</script>"
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
    assert re.search(r'<td class="id">t-no-name</td>\s*<td></td>\s*<td class="reason"></td>', page)
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


async def test_the_page_shows_a_live_api_with_real_tasks(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
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

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "operations-page.png"
    screenshot.unlink(missing_ok=True)
    await chromium(f"--screenshot={screenshot}", "--window-size=1280,900", f"{api.url}/")
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
