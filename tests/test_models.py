"""Pure functions: task parsing, judging a response, settings. No I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from tests.conftest import task_record
from worker.contract.errors import ConfigError, InvalidTask
from worker.contract.events import completed_event
from worker.contract.judging import judge
from worker.contract.models import (
    EventName,
    HttpResponse,
    Mode,
    Result,
    State,
    TaskEvent,
    parse_task,
)
from worker.contract.records import CompletedBy
from worker.contract.requests import Method, TaskRequest
from worker.contract.settings import Settings, load_settings


@pytest.mark.parametrize(
    ("spelling", "mode"),
    [
        ("apiResponse", Mode.API_RESPONSE),
        ("APIRESPONSE", Mode.API_RESPONSE),
        (False, Mode.API_RESPONSE),
        ("false", Mode.API_RESPONSE),
        ("callback", Mode.CALLBACK),
        (True, Mode.CALLBACK),
        ("True", Mode.CALLBACK),
    ],
)
def test_wait_for_completion_spellings(spelling: object, mode: Mode) -> None:
    task = parse_task(
        orjson.dumps(
            {
                "taskId": "t",
                "planId": "p",
                "request": {"url": "http://x"},
                "waitForCompletion": spelling,
            }
        )
    )
    assert task.wait_for_completion is mode


def test_defaults_follow_azure() -> None:
    task = parse_task(b'{"taskId": "t", "planId": "p", "request": {"url": "http://x"}}')
    assert (task.job, task.hub_name, task.request.method) == ("p", "build", Method.POST)
    assert task.timeline == "p"


@pytest.mark.parametrize(
    ("request_fields", "error"),
    [
        ({}, "give exactly one of request.url or request.connection"),
        ({"url": "http://x", "connection": "c"}, "give exactly one of"),
        ({"url": "http://x", "urlSuffix": "/a"}, "urlSuffix goes with request.connection"),
        ({"url": "/relative"}, "must be an absolute http:// or https:// URL"),
        ({"url": "http://x", "method": "BREW"}, "request.method: Input should be"),
        ({"url": "http://x", "headers": {"bad name": "v"}}, "request.headers.bad name"),
        ({"url": "http://x", "headers": {"X": "a\r\nInjected: 1"}}, "has a line break"),
    ],
)
def test_invalid_requests_say_what_to_fix(request_fields: dict[str, object], error: str) -> None:
    with pytest.raises(InvalidTask) as caught:
        parse_task(orjson.dumps({"taskId": "t", "planId": "p", "request": request_fields}))
    assert error in str(caught.value)


def test_request_redaction() -> None:
    request = TaskRequest(
        url="http://x", headers={"Authorization": "Bearer a", "AuthToken": "b", "X-Ok": "c"}
    )
    assert request.redacted()["headers"] == {
        "Authorization": "***",
        "AuthToken": "***",
        "X-Ok": "c",
    }


def response(
    status: int, body: object = None, headers: dict[str, str] | None = None
) -> HttpResponse:
    return HttpResponse(status_code=status, headers=headers or {}, body=body, elapsed_ms=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("answer", "criteria", "result", "reason"),
    [
        (response(200), None, Result.SUCCEEDED, "HTTP 200"),
        (response(204, ""), None, Result.SUCCEEDED, "HTTP 204"),
        (response(302), None, Result.FAILED, "HTTP 302"),
        (response(500, {"ok": True}), "body.ok", Result.FAILED, "HTTP 500"),
        (
            response(200, {"ok": True}),
            "body.ok",
            Result.SUCCEEDED,
            "HTTP 200; successCriteria true",
        ),
        (response(200, {"n": 0}), "body.n", Result.SUCCEEDED, "HTTP 200; successCriteria true"),
        (response(200, {"l": []}), "body.l", Result.FAILED, "HTTP 200; successCriteria false"),
        (
            response(200, "text"),
            "body == 'text'",
            Result.SUCCEEDED,
            "HTTP 200; successCriteria true",
        ),
        (
            response(201, None, {"x-state": "done"}),
            "headers.\"x-state\" == 'done' && statusCode == `201`",
            Result.SUCCEEDED,
            "HTTP 201; successCriteria true",
        ),
        (
            response(200, {"n": "x"}),
            "body.n > `3`",
            Result.FAILED,
            "HTTP 200; successCriteria false",
        ),
    ],
)
def test_judge(answer: HttpResponse, criteria: str | None, result: Result, reason: str) -> None:
    outcome = judge(answer, criteria)
    assert (outcome.result, outcome.reason, outcome.response) == (result, reason, answer)


def test_settings_parse_comma_lists_and_secrets() -> None:
    settings = Settings(api_tokens="tok-alpha, tok-beta", egress_deny="10.0.0.0/8,internal.example")  # type: ignore[arg-type]
    assert [t.get_secret_value() for t in settings.api_tokens] == ["tok-alpha", "tok-beta"]
    assert "tok-alpha" not in repr(settings)
    deny = settings.deny_rule
    assert "internal.example" in deny.hosts
    assert any(str(n) == "169.254.0.0/16" for n in deny.networks)
    assert any(str(n) == "10.0.0.0/8" for n in deny.networks)


def test_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTLESS_RESPONSE_TIMEOUT", "-1")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "AGENTLESS_RESPONSE_TIMEOUT: Input should be greater than 0" in str(caught.value)


@pytest.mark.parametrize(
    ("response", "completed"),
    [
        (None, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        (
            '{"body": {"ok": true}, "headers": {"x": "y"}, "elapsedMs": 3, "statusCode": 201}',
            datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        ),
    ],
)
def test_completed_event_from_a_record_is_the_task_event(
    response: str | None, completed: datetime
) -> None:
    record = task_record(
        job_id="j",
        hub_name="release",
        state=State.COMPLETED,
        result=Result.FAILED,
        reason="HTTP 500",
        attempts=2,
        response=response,
        outputs='{"out": 1}',
        queued_at=completed - timedelta(seconds=3),
        started_at=completed - timedelta(seconds=1),
        completed_at=completed,
        mode=Mode.CALLBACK,
        completed_by=CompletedBy.CALLBACK,
        variables='{"v": [1, "two"]}',
    )
    expected = TaskEvent(
        name=EventName.COMPLETED,
        event_id="t-1:completed",
        task_id="t-1",
        plan_id="p",
        job_id="j",
        hub_name="release",
        result=Result.FAILED,
        reason="HTTP 500",
        response=None if response is None else HttpResponse.model_validate_json(response),
        attempts=2,
        queued_at=record.queued_at,
        started_at=record.started_at,
        completed_at=completed,
        variables={"v": [1, "two"]},
        outputs={"out": 1},
    )
    assert orjson.loads(completed_event(record)) == orjson.loads(
        expected.model_dump_json(by_alias=True)
    )
