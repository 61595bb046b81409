"""Poll mode's pure rules (worker/contract/polling.py, SPEC §4 `poll`): what each poll's answer
means, when the next is due, which request each poll makes, and what a poll task must say."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.contract import polling
from worker.contract.errors import InvalidTask
from worker.contract.models import HttpResponse, Outcome, Result, TaskMessage, parse_task
from worker.contract.requests import Method, PollPolicy
from worker.contract.response_macros import UnresolvedMacro

START = "http://jobs.example/api/jobs?x=1"


def task(**fields: Any) -> TaskMessage:
    message: dict[str, Any] = {
        "taskId": "t",
        "planId": "p",
        "request": {"method": "POST", "url": START, "body": {"a": 1}},
        "waitForCompletion": "poll",
    }
    message.update(fields)
    return TaskMessage.model_validate(message)


def answer(status: int = 200, body: Any = None, **headers: str) -> HttpResponse:
    return HttpResponse(status_code=status, headers=headers, body=body, elapsed_ms=1)


DONE = {"successCriteria": "body.state == 'done'"}


@pytest.mark.parametrize(
    ("asked", "delay"),
    [
        (None, 5),
        (2, 5),  # shorter than the interval: the interval
        (5, 5),
        (12, 12),  # longer: honoured
        (50, 50),
        (51, 50),  # capped at 10 x the interval
        (86_400, 50),
    ],
)
def test_retry_after_that_asks_for_longer_wins_up_to_ten_intervals(
    asked: float | None, delay: float
) -> None:
    assert PollPolicy(interval_seconds=5).delay(asked) == delay


def test_the_first_poll_is_due_an_interval_after_the_start_or_its_retry_after() -> None:
    policy = PollPolicy(interval_seconds=2)
    assert polling.first_delay(policy, answer(202)) == 2
    assert polling.first_delay(policy, answer(202, **{"retry-after": "7"})) == 7
    assert polling.first_delay(policy, answer(202, **{"retry-after": "999"})) == 20
    assert polling.first_delay(policy, answer(202, **{"retry-after": "soon"})) == 2


def outcome_of(verdict: Outcome | polling.PollAgain) -> tuple[Result, str]:
    assert isinstance(verdict, Outcome), verdict
    return verdict.result, verdict.reason


def test_success_and_failure_criteria() -> None:
    t = task(**DONE, poll={"failureCriteria": "body.state == 'failed'"})
    assert outcome_of(polling.judge_poll(t, answer(body={"state": "done"}), 3)) == (
        Result.SUCCEEDED,
        "poll 3: HTTP 200; successCriteria true",
    )
    assert outcome_of(polling.judge_poll(t, answer(body={"state": "failed"}), 3)) == (
        Result.FAILED,
        "poll 3: HTTP 200; failureCriteria true",
    )
    again = polling.judge_poll(t, answer(body={"state": "running"}), 3)
    assert isinstance(again, polling.PollAgain)
    assert again.delay == 10  # the default interval
    # successCriteria hold only on a 2xx answer.
    got = polling.judge_poll(t, answer(409, body={"state": "done"}), 1)
    assert outcome_of(got) == (Result.FAILED, "poll 1: HTTP 409")


def test_criteria_in_azure_syntax_judge_polls_too() -> None:
    t = task(
        criteriaSyntax="azure",
        successCriteria="eq(root['state'], 'DONE')",
        poll={"failureCriteria": "in(root['state'], 'failed', 'canceled')"},
    )
    assert outcome_of(polling.judge_poll(t, answer(body={"state": "done"}), 2)) == (
        Result.SUCCEEDED,
        "poll 2: HTTP 200; successCriteria true",
    )
    assert outcome_of(polling.judge_poll(t, answer(body={"state": "Canceled"}), 2)) == (
        Result.FAILED,
        "poll 2: HTTP 200; failureCriteria true",
    )
    assert isinstance(
        polling.judge_poll(t, answer(body={"state": "running"}), 2), polling.PollAgain
    )
    with pytest.raises(InvalidTask, match="failureCriteria"):
        parse_task(
            orjson.dumps(
                {
                    "taskId": "t",
                    "planId": "p",
                    "request": {"url": START},
                    "waitForCompletion": "poll",
                    "criteriaSyntax": "azure",
                    "poll": {"failureCriteria": "eq(root['state'],"},
                }
            )
        )


def test_without_success_criteria_a_202_is_in_progress_and_other_2xx_succeed() -> None:
    t = task()
    assert isinstance(polling.judge_poll(t, answer(202), 1), polling.PollAgain)
    for status in (200, 201, 204):
        assert outcome_of(polling.judge_poll(t, answer(status), 2)) == (
            Result.SUCCEEDED,
            f"poll 2: HTTP {status}",
        )


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_429_and_5xx_fail_unless_ignored(status: int) -> None:
    assert outcome_of(polling.judge_poll(task(**DONE), answer(status), 2)) == (
        Result.FAILED,
        f"poll 2: HTTP {status}",
    )
    ignoring = task(**DONE, poll={"ignoreFailures": True})
    again = polling.judge_poll(ignoring, answer(status, **{"retry-after": "30"}), 2)
    assert isinstance(again, polling.PollAgain)
    assert again.delay == 30


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 301, 304])
def test_other_non_2xx_always_fail(status: int) -> None:
    ignoring = task(**DONE, poll={"ignoreFailures": True})
    assert outcome_of(polling.judge_poll(ignoring, answer(status), 4)) == (
        Result.FAILED,
        f"poll 4: HTTP {status}",
    )


def test_no_answer_fails_unless_ignored_and_transient() -> None:
    lost = Outcome(Result.FAILED, "cannot connect to h:1: connection refused", transient=True)
    assert outcome_of(polling.judge_poll(task(**DONE), lost, 2)) == (
        Result.FAILED,
        "poll 2: cannot connect to h:1: connection refused",
    )
    ignoring = task(**DONE, poll={"ignoreFailures": True})
    assert isinstance(polling.judge_poll(ignoring, lost, 2), polling.PollAgain)
    # Nothing that trying again could cure (an egress refusal, a bad certificate) is ignored.
    refused = Outcome(Result.FAILED, "egress refused", transient=False)
    assert outcome_of(polling.judge_poll(ignoring, refused, 2)) == (
        Result.FAILED,
        "poll 2: egress refused",
    )


def test_max_attempts() -> None:
    t = task(**DONE, poll={"maxAttempts": 3, "ignoreFailures": True})
    assert isinstance(
        polling.judge_poll(t, answer(body={"state": "running"}), 2), polling.PollAgain
    )
    result, reason = outcome_of(polling.judge_poll(t, answer(body={"state": "running"}), 3))
    assert result is Result.FAILED
    assert reason.startswith("poll criteria not met after 3 polls (maxAttempts 3)")
    # The last poll may succeed, or fail for its own reason.
    assert outcome_of(polling.judge_poll(t, answer(body={"state": "done"}), 3))[0] is (
        Result.SUCCEEDED
    )
    result, reason = outcome_of(polling.judge_poll(t, answer(503), 3))
    assert reason.startswith("poll criteria not met after 3 polls (maxAttempts 3)")
    one = task(**DONE, poll={"maxAttempts": 1})
    reason = outcome_of(polling.judge_poll(one, answer(body={}), 1))[1]
    assert reason.startswith("poll criteria not met after 1 poll (maxAttempts 1)")


def test_the_final_outcome_carries_the_outputs_of_its_response() -> None:
    t = task(**DONE, outputs={"id": "body.id", "code": "statusCode"})
    verdict = polling.judge_poll(t, answer(body={"state": "done", "id": "j"}), 1)
    assert isinstance(verdict, Outcome)
    assert verdict.outputs == {"id": "j", "code": 200}


@pytest.mark.parametrize("status", [201, 202])
def test_the_default_poll_follows_location_on_201_and_202(status: int) -> None:
    t = task(
        request={
            "method": "POST",
            "url": START,
            "headers": {"X-Trace": "1", "Content-Type": "application/json"},
            "body": {"a": 1},
        }
    )
    start = answer(status, location="../status/9?full=1")
    request = polling.poll_request(t, start, START, None)
    assert request.method is Method.GET
    assert request.url == "http://jobs.example/status/9?full=1"
    assert request.body is None
    assert request.headers == {"X-Trace": "1"}


def test_the_default_poll_is_the_start_url_with_get_otherwise() -> None:
    t = task()
    for start in (answer(200, location="/elsewhere"), answer(202)):
        request = polling.poll_request(t, start, START, None)
        assert (request.method, request.url, request.body) == (Method.GET, START, None)


def test_a_location_on_another_origin_gets_no_credentials() -> None:
    t = task(request={"url": START, "headers": {"Authorization": "Bearer s", "X-Trace": "1"}})
    request = polling.poll_request(
        t, answer(202, location="https://other.example/j/1"), START, None
    )
    assert request.url == "https://other.example/j/1"
    assert request.headers == {"X-Trace": "1"}
    same = polling.poll_request(t, answer(202, location="/j/1"), START, None)
    assert same.headers == {"Authorization": "Bearer s", "X-Trace": "1"}


def test_the_poll_requests_response_macros() -> None:
    t = task(
        poll={
            "request": {
                "method": "PUT",
                "url": "http://jobs.example/j/$(response.body.job.id)?s=$(response.statusCode)",
                "headers": {"X-Etag": "$(response.headers.ETag)"},
                "body": {"ids": ["$(response.body.items[1].id)"], "n": 3},
            }
        }
    )
    start = answer(202, {"job": {"id": "j-7"}, "items": [{"id": "a"}, {"id": "b"}]}, etag='"v1"')
    request = polling.poll_request(t, start, START, None)
    assert request.method is Method.PUT
    assert request.url == "http://jobs.example/j/j-7?s=202"
    assert request.headers == {"X-Etag": '"v1"'}
    assert request.body == {"ids": ["b"], "n": 3}


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("http://x/$(response.body.missing)", "$(response.body.missing)"),
        ("http://x/$(response.body.items[5].id)", "$(response.body.items[5].id)"),
        ("http://x/$(response.body.job.id.more)", "$(response.body.job.id.more)"),
        ("http://x/$(response.headers.X-None)", "$(response.headers.X-None)"),
        ("http://x/$(response.body.nothing)", "$(response.body.nothing)"),
    ],
)
def test_an_unresolvable_macro_names_itself(url: str, named: str) -> None:
    t = task(poll={"request": {"url": url}})
    start = answer(202, {"job": {"id": "j"}, "items": [], "nothing": None})
    with pytest.raises(UnresolvedMacro) as raised:
        polling.poll_request(t, start, START, None)
    assert named in str(raised.value)


def test_secret_poll_headers_are_kept_apart() -> None:
    t = task(poll={"request": {"url": "http://x/", "headers": {"Authorization": "s", "A": "b"}}})
    request = polling.poll_request(t, answer(202), START, None)
    stored, secrets = polling.split_secrets(request)
    assert (stored.headers, secrets) == ({"A": "b"}, {"Authorization": "s"})


def invalid(**fields: Any) -> str:
    message = {"taskId": "t", "planId": "p", "request": {"url": START}, **fields}
    with pytest.raises(InvalidTask) as raised:
        parse_task(orjson.dumps(message))
    return str(raised.value)


def test_what_a_poll_task_must_say() -> None:
    assert "poll" in invalid(poll={"intervalSeconds": 1})  # not poll mode
    assert "poll" in invalid(waitForCompletion="callback", poll={})
    assert "intervalSeconds" in invalid(waitForCompletion="poll", poll={"intervalSeconds": 0.5})
    assert "maxAttempts" in invalid(waitForCompletion="poll", poll={"maxAttempts": 0})
    assert "failureCriteria" in invalid(
        waitForCompletion="poll", poll={"failureCriteria": "body.["}
    )
    assert "$(response.nope)" in invalid(
        waitForCompletion="poll", poll={"request": {"url": "http://x/$(response.nope)"}}
    )
    assert "outputs" in invalid(outputs={"x": "body.["})


def test_poll_mode_in_any_case_and_its_defaults() -> None:
    for spelling in ("poll", "POLL", "Poll"):
        parsed = task(waitForCompletion=spelling)
        assert parsed.polling == PollPolicy()
    policy = task().polling
    assert (policy.interval_seconds, policy.max_attempts, policy.ignore_failures) == (
        10,
        None,
        False,
    )
    assert policy.request is None
    assert policy.failure_criteria is None
