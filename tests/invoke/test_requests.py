"""A task's HTTP call as sent, through service connections, and its response as recorded."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestServer
from pydantic import JsonValue, SecretStr

from tests.invoke.calls import (
    LIMIT,
    echoed,
    failed,
    http_request,
    invoker_with,
    pick,
    succeeded,
    task_message,
)
from worker.contract.macros import build_macros
from worker.contract.models import HttpResponse
from worker.contract.requests import Method, TaskRequest
from worker.contract.settings import BasicAuth, BearerAuth, HeaderAuth, ServiceConnection
from worker.invoke import Invoker

# --- requests as sent ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(Method))
async def test_every_method_reaches_the_endpoint(
    invoker: Invoker, server: TestServer, method: Method
) -> None:
    response = succeeded(await invoker.invoke(http_request(server.make_url("/echo"), method), {}))
    assert response.status_code == 200
    if method is Method.HEAD:
        assert response.body == ""
    else:
        assert echoed(response)["method"] == method.value


@pytest.mark.parametrize(
    ("body", "sent", "content_type"),
    [
        (
            {"commit": "abc", "n": [1, 2.5, None, True]},
            '{"commit":"abc","n":[1,2.5,null,true]}',
            "application/json",
        ),
        ([1, "two"], '[1,"two"]', "application/json"),
        (0, "0", "application/json"),
        (False, "false", "application/json"),
        ("plain words é", "plain words é", "text/plain; charset=utf-8"),
        ('{"already": "json"}', '{"already": "json"}', "text/plain; charset=utf-8"),
        ("", "", "text/plain; charset=utf-8"),
    ],
)
async def test_bodies_are_sent_as_json_or_as_text(
    invoker: Invoker, server: TestServer, body: JsonValue, sent: str, content_type: str
) -> None:
    url = server.make_url("/echo")
    got = echoed(await invoker.invoke(http_request(url, Method.POST, body=body), {}))
    assert (got["body"], got["headers"]["content-type"]) == (sent, content_type)


async def test_no_body_when_body_is_null(invoker: Invoker, server: TestServer) -> None:
    got = echoed(await invoker.invoke(http_request(server.make_url("/echo"), Method.POST), {}))
    assert (got["body"], "content-type" in got["headers"]) == ("", False)


async def test_task_headers_are_sent_and_win_over_defaults(
    invoker: Invoker, server: TestServer
) -> None:
    headers = {
        "X-One": "1",
        "Content-Type": "application/vnd.x+json",
        "Accept-Encoding": "identity",
    }
    got = echoed(
        await invoker.invoke(
            http_request(server.make_url("/echo"), Method.PUT, headers=headers, body={}), {}
        )
    )
    assert pick(got["headers"], "x-one", "content-type", "accept-encoding") == {
        "x-one": "1",
        "content-type": "application/vnd.x+json",
        "accept-encoding": "identity",
    }


async def test_extra_headers_are_added_unless_the_task_sets_them(
    invoker: Invoker, server: TestServer
) -> None:
    task_request = http_request(server.make_url("/echo"), headers={"x-task": "from the task"})
    extra = {"PlanUrl": "http://api.test/", "X-Task": "from the worker"}
    got = echoed(await invoker.invoke(task_request, {}, extra_headers=extra))
    assert pick(got["headers"], "planurl", "x-task", "accept-encoding") == {
        "planurl": "http://api.test/",
        "x-task": "from the task",
        "accept-encoding": "gzip, deflate",
    }


async def test_macros_are_expanded_in_url_headers_and_body(
    invoker: Invoker, server: TestServer
) -> None:
    task = task_message(
        variables={"Color": "blue", "count": 3},
        request=TaskRequest(
            url=str(server.make_url("/echo/$(system.PlanId)")) + "?c=$(variables.color)",
            headers={"Authorization": "Bearer $(system.AccessToken)", "X-Other": "$(nope.nope)"},
            body={"plan": "$(system.planId)", "$(key)": ["$(variables.count)", 1, "$(x)"]},
        ),
    )
    macros = build_macros(task, "http://api.test/", "tok")
    got = echoed(await invoker.invoke(task.request, macros))
    assert got == {
        "method": "POST",
        "path": "/echo/p-7?c=blue",
        "headers": got["headers"] | {"authorization": "Bearer tok", "x-other": "$(nope.nope)"},
        "body": '{"plan":"p-7","$(key)":["3",1,"$(x)"]}',
    }


async def test_macros_are_expanded_in_a_text_body(invoker: Invoker, server: TestServer) -> None:
    task_request = http_request(server.make_url("/echo"), Method.POST, body="job $(system.JobId)")
    got = echoed(await invoker.invoke(task_request, {"system.jobid": "j-1"}))
    assert got["body"] == "job j-1"


async def test_a_macro_cannot_inject_a_header(invoker: Invoker, server: TestServer) -> None:
    task_request = http_request(server.make_url("/echo"), headers={"X-Evil": "$(variables.evil)"})
    reason = failed(await invoker.invoke(task_request, {"variables.evil": "a\r\nX-Injected: 1"}))
    assert reason == "header 'X-Evil' has a line break in its value after macro expansion"


async def test_a_body_json_cannot_encode_fails(invoker: Invoker, server: TestServer) -> None:
    # Such a body is refused as the task is validated (TaskRequest.body); built here without
    # validation, as a task stored before that rule would be read, the call still fails cleanly.
    valid = http_request(server.make_url("/echo"), Method.POST)
    task_request = TaskRequest.model_construct(**(dict(valid) | {"body": {"n": 2**70}}))
    reason = failed(await invoker.invoke(task_request, {}))
    assert reason.startswith("request body cannot be sent as JSON: ")


async def test_a_url_that_expands_to_nothing_fails(invoker: Invoker, server: TestServer) -> None:
    task_request = http_request("http://$(variables.host)/x")
    reason = failed(await invoker.invoke(task_request, {"variables.host": ""}))
    assert reason == "request URL is not an absolute http(s) URL after macro expansion"


# --- service connections -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "sent"),
    [
        (None, {"authorization": None, "x-api-key": "from the task"}),
        (
            BasicAuth(type="basic", username="user", password=SecretStr("pass")),
            {"authorization": "Basic dXNlcjpwYXNz", "x-api-key": "from the task"},
        ),
        (
            BearerAuth(type="bearer", token=SecretStr("t0k")),
            {"authorization": "Bearer t0k", "x-api-key": "from the task"},
        ),
        (
            HeaderAuth(type="header", name="X-Api-Key", value=SecretStr("k3y")),
            {"authorization": None, "x-api-key": "k3y"},
        ),
    ],
)
async def test_connection_credentials_are_added_and_win(
    server: TestServer, auth: BasicAuth | BearerAuth | HeaderAuth | None, sent: dict[str, str]
) -> None:
    connection = ServiceConnection(url=str(server.make_url("/echo")), auth=auth)
    task_request = TaskRequest(
        connection="ci", url_suffix="x", headers={"x-api-key": "from the task"}
    )
    async with invoker_with({"ci": connection}) as invoker:
        got = echoed(await invoker.invoke(task_request, {}))
    assert pick(got["headers"], "authorization", "x-api-key") == sent


@pytest.mark.parametrize(
    ("base", "suffix", "path"),
    [
        ("/echo", "", "/echo"),
        ("/echo", "a/b", "/echo/a/b"),
        ("/echo", "/a/b", "/echo/a/b"),
        ("/echo/", "a/b", "/echo/a/b"),
        ("/echo/", "/a/b", "/echo/a/b"),
        ("/echo/", "a?x=1&y=$(variables.y)", "/echo/a?x=1&y=2"),
        ("/echo", "?x=1", "/echo?x=1"),
    ],
)
async def test_connection_url_and_suffix_are_joined_with_one_slash(
    server: TestServer, base: str, suffix: str, path: str
) -> None:
    connection = ServiceConnection(url=str(server.make_url(base)))
    async with invoker_with({"ci": connection}) as invoker:
        task_request = TaskRequest(method=Method.GET, connection="ci", url_suffix=suffix)
        got = echoed(await invoker.invoke(task_request, {"variables.y": "2"}))
    assert got["path"] == path


async def test_unknown_connection_fails(invoker: Invoker) -> None:
    result = await invoker.invoke(TaskRequest(connection="nope"), {})
    assert failed(result) == "unknown service connection 'nope'"


# --- responses as recorded -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "body"),
    [
        ("json", 201, {"status": "created", "n": [1, 2]}),
        ("json-as-text", 200, {"a": 1}),
        ("text", 200, "hello, world"),
        ("not-utf8", 200, "caf\ufffd"),
        ("empty", 204, ""),
        ("exactly-limit", 200, "x" * LIMIT),
        ("gzip", 200, {"zipped": True}),
        ("deflate", 200, "deflated"),
        ("raw-deflate", 200, "raw"),
        ("unknown-encoding", 200, "\x01\x02"),
    ],
)
async def test_response_body_is_json_when_it_parses_else_text(
    invoker: Invoker, server: TestServer, kind: str, status: int, body: JsonValue
) -> None:
    response = succeeded(await invoker.invoke(http_request(server.make_url(f"/fixed/{kind}")), {}))
    assert (response.status_code, response.body) == (status, body)


async def test_response_headers_are_lower_case_and_repeated_ones_joined(
    invoker: Invoker, server: TestServer
) -> None:
    response = succeeded(await invoker.invoke(http_request(server.make_url("/repeated")), {}))
    assert pick(response.headers, "x-multi", "set-cookie", "content-type") == {
        "x-multi": "one, two",
        # A secret, whatever its repetitions held (tests/test_redaction.py).
        "set-cookie": "***",
        "content-type": "text/plain; charset=utf-8",
    }
    assert all(name == name.lower() for name in response.headers)


async def test_whole_response_record(invoker: Invoker, server: TestServer) -> None:
    response = succeeded(await invoker.invoke(http_request(server.make_url("/fixed/text")), {}))
    assert response == HttpResponse(
        status_code=200,
        headers={
            "content-type": "text/plain; charset=utf-8",
            "content-length": "12",
            "date": response.headers["date"],
            "server": response.headers["server"],
        },
        body="hello, world",
        elapsed_ms=response.elapsed_ms,
    )
    assert 0 <= response.elapsed_ms < 2000


@pytest.mark.parametrize("path", ["/fixed/over-limit", "/chunked-over-limit", "/fixed/gzip-bomb"])
async def test_body_over_the_limit_fails(invoker: Invoker, server: TestServer, path: str) -> None:
    reason = failed(await invoker.invoke(http_request(server.make_url(path)), {}))
    assert reason == f"response body is larger than the {LIMIT}-byte limit"


async def test_corrupt_gzip_fails(invoker: Invoker, server: TestServer) -> None:
    reason = failed(await invoker.invoke(http_request(server.make_url("/fixed/bad-gzip")), {}))
    assert reason.startswith("response body is not valid gzip data: ")
