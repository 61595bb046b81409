"""A task's detail page: GET /tasks/{taskId} for a browser, the JSON for everyone else."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import aiohttp
import orjson
import pytest
from aio_pika.abc import AbstractChannel

from callback_api.task_page import BODY_EXCERPT_CHARS, prefers_html, render
from tests.callbacks import post, waiting
from tests.conftest import Api, Events, Target
from tests.task_api import call
from tests.test_page import BROWSER_ACCEPT, ESCAPED_SCRIPT, NOW, SCRIPT, chromium, screenshot
from worker.contract.models import HttpResponse, Mode, Result, State
from worker.views import LogLine, ReceivedEvent, TaskDetail, TaskLogs

CSP = "default-src 'none'; style-src 'unsafe-inline'"


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("application/json;q=0.5, text/html", True),
        ("text/*", True),
        # API clients, and whatever does not say: the JSON.
        (None, False),
        ("", False),
        ("*/*", False),
        ("application/json", False),
        ("application/json, text/html", False),
        ("text/html;q=0.5, application/json", False),
        ("application/problem+json, application/json", False),
        ("text/html;q=0, */*", False),
        ("text/html;q=nope, */*", False),
        ("text/html;q=nan", False),
        ("text/plain", False),
        (",;, /, text/", False),
    ],
)
def test_only_an_accept_that_ranks_html_first_gets_the_page(
    accept: str | None, *, html: bool
) -> None:
    assert prefers_html(accept) is html


def detail(**fields: object) -> TaskDetail:
    base: dict[str, object] = {
        "task_id": "t-1",
        "plan_id": "plan-1",
        "job_id": "job-1",
        "hub_name": "build",
        "mode": Mode.CALLBACK,
        "state": State.COMPLETED,
        "result": Result.FAILED,
        "attempts": 1,
        "queued_at": NOW - timedelta(minutes=3),
        "started_at": NOW - timedelta(minutes=2),
        "completed_at": NOW - timedelta(seconds=5),
        "request": {"method": "POST", "url": "https://example.test/hook"},
    }
    base.update(fields)
    return TaskDetail.model_validate(base)


def no_logs(task_id: str = "t-1") -> TaskLogs:
    return TaskLogs(task_id=task_id, dropped_lines=0, lines=[])


def test_everything_from_the_task_or_its_service_is_escaped() -> None:
    page = render(
        detail(
            name=SCRIPT,
            reason='HTTP 500 "><img src=x>',
            request={"method": "POST", "url": "https://example.test/?q=<b>", "body": SCRIPT},
            response=HttpResponse(
                status_code=500,
                headers={"X-Evil": "</code><script>", "Content-Type": "text/html"},
                body="</pre>" + SCRIPT,
                elapsed_ms=12,
            ),
            outputs={"<o>": SCRIPT},
            events=[ReceivedEvent(name="TaskStarted", at=NOW - timedelta(minutes=1))],
        ),
        TaskLogs(task_id="t-1", dropped_lines=0, lines=[LogLine(at=NOW, line="</td>" + SCRIPT)]),
        NOW,
    )
    assert "<script" not in page
    assert "<img" not in page
    assert "<b>" not in page
    assert "<o>" not in page
    assert "<title>Task t-1 · agentless</title>" in page
    assert f"<code>t-1</code> · {ESCAPED_SCRIPT}</h2>" in page
    assert "HTTP 500 &#34;&gt;&lt;img src=x&gt;" in page
    assert "<td><code>&lt;/code&gt;&lt;script&gt;</code></td>" in page
    assert f'<pre data-section="body">&lt;/pre&gt;{ESCAPED_SCRIPT}</pre>' in page
    assert f'<td class="line">&lt;/td&gt;{ESCAPED_SCRIPT}</td>' in page
    assert "<td><code>&lt;o&gt;</code></td>" in page
    # Output values are shown as JSON: a string in quotes.
    assert f"<td><code>&#34;{ESCAPED_SCRIPT}&#34;</code></td>" in page


def test_a_long_body_is_cut_and_a_completed_task_does_not_refresh() -> None:
    body = "x" * (BODY_EXCERPT_CHARS + 10)
    page = render(
        detail(response=HttpResponse(status_code=200, headers={}, body=body, elapsed_ms=3)),
        no_logs(),
        NOW,
    )
    assert f'<pre data-section="body">{"x" * BODY_EXCERPT_CHARS}</pre>' in page
    assert f"the first {BODY_EXCERPT_CHARS} of {BODY_EXCERPT_CHARS + 10} characters" in page
    assert 'http-equiv="refresh"' not in page
    assert "refreshes every" not in page
    waiting_page = render(detail(state=State.WAITING, result=None), no_logs(), NOW)
    assert '<meta http-equiv="refresh" content="5">' in waiting_page
    assert '<p class="none">None yet.</p>' in waiting_page


def test_ids_are_linked_escaped_in_urls() -> None:
    page = render(detail(task_id="build:42.a_b-c"), no_logs("build:42.a_b-c"), NOW)
    assert '<a href="/" data-link="page">' in page
    assert '<a href="/tasks/build%3A42.a_b-c?json" data-link="json">' in page
    assert '<a href="/tasks/build%3A42.a_b-c/logs" data-link="logs">' in page


def text_of(html: str, attribute: str) -> str:
    found = re.search(rf"<[a-z]+ {attribute}[^>]*>(.*?)</", html, re.DOTALL)
    assert found is not None, f"nothing with {attribute} on the page"
    return found.group(1)


async def get(url: str, accept: str | None) -> tuple[int, str, aiohttp.ClientResponse, str]:
    headers = {} if accept is None else {"Accept": accept}
    async with (
        aiohttp.ClientSession(skip_auto_headers=["Accept"]) as session,
        session.get(url, headers=headers) as response,
    ):
        return response.status, response.content_type, response, await response.text()


async def test_a_callback_task_s_page_shows_its_response_events_logs_and_outputs(
    api: Api, channel: AbstractChannel, events: Events, target: Target, tmp_path: Path
) -> None:
    task, headers = await waiting(
        api,
        channel,
        events,
        target,
        name=SCRIPT,
        projectId="proj",
        query="&say=from-the-service",
        outputs={"who": "body.status", "code": "statusCode"},
    )
    task_id, token = task["taskId"], headers["AuthToken"]
    events_url = f"{api.url}/plans/plan-1/events"
    started = {"name": "TaskStarted", "taskId": task_id}
    assert (await post(events_url, started, token))[0] == 200
    auth = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(headers=auth) as session,
        session.post(
            f"{api.url}/plans/plan-1/tasks/{task_id}/logs",
            data=f"first line\n{SCRIPT}\n".encode(),
        ) as answer,
    ):
        assert answer.status == 200
    completed = {"name": "TaskCompleted", "taskId": task_id, "result": "succeeded"}
    assert (await post(events_url, completed, token))[0] == 200
    await events.completed(task_id)

    url = f"{api.url}/tasks/{task_id}"
    status, as_json, _ = await call("GET", url)
    assert status == 200
    status, kind, response, page = await get(url, BROWSER_ACCEPT)
    assert (status, kind) == (200, "text/html")
    assert response.headers["Content-Security-Policy"] == CSP
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Vary"] == "Accept"
    assert "<script" not in page
    assert f"· {ESCAPED_SCRIPT}</h2>" in page
    assert text_of(page, 'data-field="state"').endswith(">completed")
    assert text_of(page, 'data-field="result"') == "succeeded"
    assert text_of(page, 'data-field="status"') == "200"
    assert "from-the-service" in text_of(page, 'data-section="body"')
    assert re.search(r"<td>TaskStarted</td>\s*<td><time", page)
    assert re.search(r"<td>TaskCompleted</td>\s*<td><time.*?</td>\s*<td>succeeded</td>", page)
    assert '<td class="line">first line</td>' in page
    assert f'<td class="line">{ESCAPED_SCRIPT}</td>' in page
    assert "<td><code>who</code></td>\n<td><code>&#34;from-the-service&#34;</code></td>" in page
    assert "<td><code>code</code></td>\n<td><code>200</code></td>" in page
    assert f'<a href="/tasks/{task_id}?json" data-link="json">' in page

    # API clients get the JSON they always got, and a browser too with ?json.
    for accept, address in (
        ("application/json", url),
        ("*/*", url),
        (None, url),
        (BROWSER_ACCEPT, f"{url}?json"),
    ):
        status, kind, response, text = await get(address, accept)
        assert (status, kind, orjson.loads(text)) == (200, "application/json", as_json), accept
    assert as_json["events"][0]["name"] == "TaskStarted"
    # A task that is not there is the problem it always was, whoever asks.
    status, kind, _, text = await get(f"{api.url}/tasks/nothing-here", BROWSER_ACCEPT)
    assert (status, kind) == (404, "application/problem+json")
    assert orjson.loads(text)["detail"] == "there is no task 'nothing-here'"

    # In a browser: the page is built as served, its script-looking name as text.
    dom = (await chromium("--dump-dom", url)).decode()
    assert f"<title>Task {task_id} · agentless</title>" in dom
    assert '<td class="line">first line</td>' in dom
    assert "<script" not in dom
    # Tall enough for the whole page: its response, events, logs and outputs.
    await screenshot(url, tmp_path / "task-page.png", height=1800)
