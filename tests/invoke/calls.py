"""Building a task's request and reading what the invoker made of it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from worker.contract.models import HttpResponse, TaskMessage
from worker.contract.requests import Method, TaskRequest
from worker.contract.settings import ServiceConnection, Settings
from worker.invoke import InvokeFailure, Invoker

LIMIT = 1000


# --- helpers -------------------------------------------------------------------------------------


def make_settings(
    *,
    response_timeout: float = 2,
    egress_deny: list[str] | None = None,
    egress_allow: list[str] | None = None,
) -> Settings:
    return Settings(
        response_timeout=response_timeout,
        max_response_bytes=LIMIT,
        concurrency=8,
        connections=None,
        egress_deny=egress_deny or [],
        egress_allow=egress_allow or [],
    )


@contextlib.asynccontextmanager
async def invoker_with(
    connections: Mapping[str, ServiceConnection] | None = None,
    **settings: Any,
) -> AsyncIterator[Invoker]:
    async with Invoker(make_settings(**settings), connections or {}) as invoker:
        yield invoker


def http_request(url: object, method: Method = Method.GET, **fields: Any) -> TaskRequest:
    return TaskRequest(method=method, url=str(url), **fields)


def succeeded(result: HttpResponse | InvokeFailure) -> HttpResponse:
    assert isinstance(result, HttpResponse), result
    return result


def failed(result: HttpResponse | InvokeFailure) -> str:
    assert isinstance(result, InvokeFailure), result
    return result.reason


def echoed(result: HttpResponse | InvokeFailure) -> dict[str, Any]:
    body = succeeded(result).body
    assert isinstance(body, dict)
    return body


def pick(headers: Mapping[str, str], *names: str) -> dict[str, str | None]:
    return {name: headers.get(name) for name in names}


def task_message(**fields: Any) -> TaskMessage:
    fields.setdefault("request", http_request("http://x.test/"))
    return TaskMessage(task_id="t-42", plan_id="p-7", **fields)
