"""Poll mode's rules (SPEC §4 `poll`, §5): what each poll's answer means for its task, and when
the next poll is due. Pure: the poller does the I/O."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import JsonValue
from yarl import URL

from worker.contract import criteria, response_macros
from worker.contract.judging import document, outputs
from worker.contract.models import HttpResponse, Outcome, Result, TaskMessage
from worker.contract.requests import SECRET_HEADERS, Method, PollPolicy, TaskRequest
from worker.contract.retries import asked_delay

# A status that says "still working on it" when no successCriteria says what done looks like.
IN_PROGRESS = 202
_FOLLOW_LOCATION = frozenset({201, 202})
# Headers that describe the start request's body, which a default poll does not send.
_BODY_HEADERS = frozenset({"content-type", "content-length", "transfer-encoding"})


@dataclass(frozen=True, slots=True)
class PollAgain:
    """The task polls on: the next poll `delay` seconds from now; `reason` says what this one
    found."""

    delay: float
    reason: str
    response: HttpResponse | None


def _polls(count: int) -> str:
    return f"{count} poll" if count == 1 else f"{count} polls"


def first_delay(policy: PollPolicy, start: HttpResponse) -> float:
    """Seconds from the start response to the first poll."""
    return policy.delay(asked_delay(start.headers))


def judge_poll(
    task: TaskMessage, answer: HttpResponse | Outcome, number: int
) -> Outcome | PollAgain:
    """What poll number `number` (from 1) found: the task's outcome, or a poll again. `answer` is
    the poll's response, or the failed outcome of a poll that got none."""
    policy = task.polling
    label = f"poll {number}"
    if isinstance(answer, Outcome):
        if not (answer.transient and policy.ignore_failures):
            return Outcome(Result.FAILED, f"{label}: {answer.reason}")
        return _again(task, number, f"{label}: {answer.reason}; ignored", None)
    status = answer.status_code
    failure = policy.failure_criteria
    if failure and criteria.holds(failure, document(answer), task.criteria_syntax):
        return _finish(task, Result.FAILED, f"{label}: HTTP {status}; failureCriteria true", answer)
    if 200 <= status < 300:
        return _judge_2xx(task, answer, number)
    if policy.ignore_failures and (status == 429 or status >= 500):
        return _again(task, number, f"{label}: HTTP {status}; ignored", answer)
    return _finish(task, Result.FAILED, f"{label}: HTTP {status}", answer)


def _judge_2xx(task: TaskMessage, answer: HttpResponse, number: int) -> Outcome | PollAgain:
    label = f"poll {number}: HTTP {answer.status_code}"
    success = task.success_criteria
    if success is None:
        if answer.status_code == IN_PROGRESS:
            return _again(task, number, f"{label}; still in progress", answer)
        return _finish(task, Result.SUCCEEDED, label, answer)
    if criteria.holds(success, document(answer), task.criteria_syntax):
        return _finish(task, Result.SUCCEEDED, f"{label}; successCriteria true", answer)
    return _again(task, number, f"{label}; successCriteria false", answer)


def _finish(task: TaskMessage, result: Result, reason: str, response: HttpResponse) -> Outcome:
    return Outcome(result, reason, response, outputs=outputs(task.outputs, response))


def _again(
    task: TaskMessage, number: int, reason: str, response: HttpResponse | None
) -> Outcome | PollAgain:
    policy = task.polling
    if policy.max_attempts is not None and number >= policy.max_attempts:
        return Outcome(
            Result.FAILED,
            f"poll criteria not met after {_polls(number)} (maxAttempts {policy.max_attempts}); "
            f"last, {reason}",
            response,
            outputs=outputs(task.outputs, response),
        )
    asked = None if response is None else asked_delay(response.headers)
    return PollAgain(policy.delay(asked), reason, response)


def poll_request(
    task: TaskMessage, start: HttpResponse, start_url: str, connection_url: str | None
) -> TaskRequest:
    """The request each poll makes, resolved once from the start response: the task's own
    `poll.request` with its `$(response.…)` macros filled (UnresolvedMacro if one cannot be), or
    the start request again with GET and without its body, at the start response's Location
    (resolved against `start_url`, where the start request went) when it answered 201 or 202.
    `connection_url` is the base URL of the start request's service connection, if it named one."""
    own = task.polling.request
    if own is not None:
        return _resolved(own, start)
    start_request = task.request
    headers = {
        name: value
        for name, value in start_request.headers.items()
        if name.lower() not in _BODY_HEADERS
    }
    found = start.headers.get("location") if start.status_code in _FOLLOW_LOCATION else None
    if found is None:
        return start_request.model_copy(
            update={"method": Method.GET, "headers": headers, "body": None}
        )
    target = str(URL(start_url).join(URL(found)).with_fragment(None))
    under = target.removeprefix(connection_url or "")
    if connection_url is not None and under != target and _is_below(connection_url, under):
        # Still the connection's service: its credentials go with each poll.
        return TaskRequest(
            method=Method.GET,
            connection=start_request.connection,
            url_suffix=under,
            headers=headers,
        )
    if URL(target).origin() != URL(start_url).origin() or connection_url is not None:
        # Another origin is not the start request's to authenticate.
        headers = {n: v for n, v in headers.items() if n.lower() not in SECRET_HEADERS}
    return TaskRequest(method=Method.GET, url=target, headers=headers)


def _is_below(base: str, rest: str) -> bool:
    return not rest or base.endswith("/") or rest[0] in "/?#"


def _resolved(request: TaskRequest, start: HttpResponse) -> TaskRequest:
    status, headers, body = start.status_code, start.headers, start.body_value()

    def fill(text: str) -> str:
        return response_macros.resolve(text, status, headers, body)

    resolved_body: JsonValue = response_macros.map_strings(request.body, fill)
    return TaskRequest.model_validate(
        {
            "method": request.method,
            "url": None if request.url is None else fill(request.url),
            "connection": request.connection,
            "urlSuffix": fill(request.url_suffix),
            "headers": {name: fill(value) for name, value in request.headers.items()},
            "body": resolved_body,
        }
    )


def split_secrets(request: TaskRequest) -> tuple[TaskRequest, dict[str, str]]:
    """The request as stored, secret header values taken out, and those values."""
    secrets = {n: v for n, v in request.headers.items() if n.lower() in SECRET_HEADERS}
    if not secrets:
        return request, {}
    kept = {n: v for n, v in request.headers.items() if n.lower() not in SECRET_HEADERS}
    return request.model_copy(update={"headers": kept}), secrets
