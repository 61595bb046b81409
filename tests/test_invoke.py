"""The HTTP call of a task, against real local servers: one aiohttp app, one raw-socket server."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import JsonValue, SecretStr

from worker.contract.macros import build_macros, expand
from worker.contract.models import HttpResponse, Method, TaskMessage, TaskRequest
from worker.contract.settings import BasicAuth, BearerAuth, HeaderAuth, ServiceConnection, Settings
from worker.invoke import InvokeFailure, Invoker

LIMIT = 1000


# --- the endpoints -------------------------------------------------------------------------------


async def echo(request: web.Request) -> web.Response:
    """What the worker sent, as JSON."""
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": {name.lower(): value for name, value in request.headers.items()},
            "body": await request.text(),
        }
    )


async def redirect(request: web.Request) -> web.Response:
    status = int(request.match_info["status"])
    return web.Response(status=status, headers={"Location": request.query["to"]})


async def loop(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/loop"})


async def fixed(request: web.Request) -> web.Response:
    """The body and headers named by the path, for what the worker makes of a response."""
    kind = request.match_info["kind"]
    responses: dict[str, web.Response] = {
        "json": web.json_response({"status": "created", "n": [1, 2]}, status=201),
        "json-as-text": web.Response(text='{"a": 1}', content_type="text/plain"),
        "text": web.Response(text="hello, world"),
        "not-utf8": web.Response(body=b"caf\xe9", content_type="text/plain"),
        "empty": web.Response(status=204),
        "exactly-limit": web.Response(body=b"x" * LIMIT),
        "over-limit": web.Response(body=b"x" * (LIMIT + 1)),
        "gzip": web.Response(
            body=gzip.compress(b'{"zipped": true}'), headers={"Content-Encoding": "gzip"}
        ),
        "deflate": web.Response(
            body=zlib.compress(b"deflated"), headers={"Content-Encoding": "deflate"}
        ),
        "raw-deflate": web.Response(
            body=raw_deflate(b"raw"), headers={"Content-Encoding": "deflate"}
        ),
        "unknown-encoding": web.Response(body=b"\x01\x02", headers={"Content-Encoding": "br"}),
        "gzip-bomb": web.Response(
            body=gzip.compress(b"\0" * 100_000), headers={"Content-Encoding": "gzip"}
        ),
        "bad-gzip": web.Response(body=b"\x1f\x8bnot gzip", headers={"Content-Encoding": "gzip"}),
    }
    return responses[kind]


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


async def repeated(request: web.Request) -> web.Response:
    response = web.Response(text="ok")
    response.headers.add("X-Multi", "one")
    response.headers.add("X-Multi", "two")
    response.headers.add("Set-Cookie", "a=1")
    response.headers.add("Set-Cookie", "b=2")
    return response


async def chunked_over_limit(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for _ in range(4):
        await response.write(b"y" * (LIMIT // 2))
    await response.write_eof()
    return response


async def silent(request: web.Request) -> web.Response:
    """Never answers; the server cancels this handler when the worker hangs up."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def drip(request: web.Request) -> web.StreamResponse:
    """Headers at once, then a byte of body every 20 ms: each read is quick, the whole is not."""
    response = web.StreamResponse(headers={"Content-Length": "500"})
    await response.prepare(request)
    for _ in range(500):
        await response.write(b".")
        await asyncio.sleep(0.02)
    return response


def endpoint_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_route("*", "/redirect/{status}", redirect)
    app.router.add_get("/loop", loop)
    app.router.add_get("/fixed/{kind}", fixed)
    app.router.add_get("/repeated", repeated)
    app.router.add_get("/chunked-over-limit", chunked_over_limit)
    app.router.add_get("/silent", silent)
    app.router.add_get("/drip", drip)
    return app


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server() -> AsyncIterator[TestServer]:
    started = TestServer(endpoint_app())
    async with started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def other_server() -> AsyncIterator[TestServer]:
    """Another origin, for redirects that leave the first one."""
    started = TestServer(endpoint_app())
    async with started:
        yield started


# What no well-behaved server sends, written straight to the socket, by request path.
RAW_ANSWERS = {
    b"/garbage": b"this is not HTTP\r\n\r\n",
    b"/cut": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part of it",
    b"/hang-up": b"",
    b"/bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc",
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def raw_server() -> AsyncIterator[str]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(RAW_ANSWERS[head.split(b" ", 2)[1]])
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    listener = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with listener:
        host, port = listener.sockets[0].getsockname()[:2]
        yield f"http://{host}:{port}"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connecting to it is refused, for certain."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


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


@pytest_asyncio.fixture(loop_scope="session")
async def invoker() -> AsyncIterator[Invoker]:
    async with invoker_with() as started:
        yield started


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


# --- pure functions ------------------------------------------------------------------------------

MACROS = {"system.planid": "p-7", "variables.color": "blue", "variables.empty": ""}


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("no macros here", "no macros here"),
        ("$(system.PlanId)", "p-7"),
        ("plan $(SYSTEM.PLANID) is $(variables.Color)!", "plan p-7 is blue!"),
        ("$(variables.color)$(variables.color)", "blueblue"),
        ("[$(variables.empty)]", "[]"),
        ("$(variables.missing) stays", "$(variables.missing) stays"),
        ("$(not closed", "$(not closed"),
        ("$() $( spaced ) $((nested))", "$() $( spaced ) $((nested))"),
        ("$$(system.planid)", "$p-7"),
    ],
)
def test_expand(text: str, expanded: str) -> None:
    assert expand(text, MACROS) == expanded


def test_expand_returns_the_same_string_when_there_is_nothing_to_do() -> None:
    text = "x" * 100
    assert expand(text, MACROS) is text


def task_message(**fields: Any) -> TaskMessage:
    fields.setdefault("request", http_request("http://x.test/"))
    return TaskMessage(task_id="t-42", plan_id="p-7", **fields)


@pytest.mark.parametrize(
    ("task", "token", "macros"),
    [
        (
            task_message(),
            None,
            {
                "system.planid": "p-7",
                "system.jobid": "p-7",
                "system.taskinstanceid": "t-42",
                "system.timelineid": "p-7",
                "system.hosttype": "build",
                "system.teamprojectid": "default",
                "system.collectionuri": "http://api.test/",
            },
        ),
        (
            task_message(
                job_id="j-1",
                hub_name="release",
                project_id="proj",
                timeline_id="tl-3",
                variables={
                    "Name": "v",
                    "Count": 3,
                    "Flag": True,
                    "Obj": {"a": [1, None]},
                    "N": None,
                },
            ),
            "secret-token",
            {
                "system.planid": "p-7",
                "system.jobid": "j-1",
                "system.taskinstanceid": "t-42",
                "system.timelineid": "tl-3",
                "system.hosttype": "release",
                "system.teamprojectid": "proj",
                "system.collectionuri": "http://api.test/",
                "system.accesstoken": "secret-token",
                "variables.name": "v",
                "variables.count": "3",
                "variables.flag": "true",
                "variables.obj": '{"a":[1,null]}',
                "variables.n": "null",
            },
        ),
        (
            task_message(job_id="j-1"),
            "",
            {
                "system.planid": "p-7",
                "system.jobid": "j-1",
                "system.taskinstanceid": "t-42",
                "system.timelineid": "j-1",
                "system.hosttype": "build",
                "system.teamprojectid": "default",
                "system.collectionuri": "http://api.test/",
                "system.accesstoken": "",
            },
        ),
    ],
)
def test_build_macros(task: TaskMessage, token: str | None, macros: dict[str, str]) -> None:
    assert build_macros(task, "http://api.test/", token) == macros


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
    task_request = http_request(server.make_url("/echo"), Method.POST, body={"n": 2**70})
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
        "set-cookie": "a=1, b=2",
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


# --- time ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/silent", "/drip"])
async def test_whole_response_must_arrive_in_time(server: TestServer, path: str) -> None:
    async with invoker_with(response_timeout=0.3) as invoker:
        result = await invoker.invoke(http_request(server.make_url(path)), {})
    assert isinstance(result, InvokeFailure)
    assert result.reason == "no complete response within 0.3 s"
    assert 300 <= result.elapsed_ms < 1500


async def test_timeout_reason_names_whole_seconds_plainly(server: TestServer) -> None:
    async with invoker_with(response_timeout=1) as invoker:
        result = await invoker.invoke(http_request(server.make_url("/silent")), {})
    assert failed(result) == "no complete response within 1 s"


# --- connections that fail -----------------------------------------------------------------------


async def test_connection_refused(invoker: Invoker, closed_port: int) -> None:
    reason = failed(await invoker.invoke(http_request(f"http://127.0.0.1:{closed_port}/"), {}))
    assert reason == f"cannot connect to 127.0.0.1:{closed_port}: connection refused"


async def test_unknown_host(invoker: Invoker) -> None:
    reason = failed(await invoker.invoke(http_request("http://nope.invalid/x"), {}))
    assert reason == "cannot resolve host 'nope.invalid'"


async def test_tls_to_a_plain_http_server(invoker: Invoker, server: TestServer) -> None:
    url = server.make_url("/echo").with_scheme("https")
    reason = failed(await invoker.invoke(http_request(url), {}))
    assert reason.startswith(f"TLS handshake with 127.0.0.1:{server.port} failed: ")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/cut", "connection closed by {where} before the response was complete"),
        ("/hang-up", "connection closed by {where} before the response was complete"),
        ("/garbage", "invalid HTTP response from {where}: Bad status line: "),
        ("/bad-chunk", "invalid HTTP response from {where}: Invalid character in chunk size"),
    ],
)
async def test_broken_responses(invoker: Invoker, raw_server: str, path: str, reason: str) -> None:
    got = failed(await invoker.invoke(http_request(raw_server + path), {}))
    assert got.startswith(reason.format(where=raw_server.removeprefix("http://")))


async def test_legacy_ipv4_spellings_are_not_sent(invoker: Invoker) -> None:
    """127.1 means 127.0.0.1 to inet_aton; an egress rule reading it as a name would miss it."""
    reason = failed(await invoker.invoke(http_request("http://127.1/"), {}))
    assert reason == "invalid URL 127.1: is not a canonical IPv4 address"


# --- redirects and egress ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "status", "method_after", "body_after"),
    [
        (Method.POST, 301, "GET", ""),
        (Method.POST, 302, "GET", ""),
        (Method.PUT, 303, "GET", ""),
        (Method.POST, 307, "POST", '{"a":1}'),
        (Method.PATCH, 308, "PATCH", '{"a":1}'),
        (Method.DELETE, 307, "DELETE", '{"a":1}'),
    ],
)
async def test_redirects_are_followed(
    invoker: Invoker,
    server: TestServer,
    *,
    method: Method,
    status: int,
    method_after: str,
    body_after: str,
) -> None:
    url = server.make_url(f"/redirect/{status}").with_query(to="/echo/after")
    got = echoed(await invoker.invoke(http_request(url, method, body={"a": 1}), {}))
    assert (got["method"], got["path"], got["body"]) == (method_after, "/echo/after", body_after)
    assert ("content-type" in got["headers"]) is bool(body_after)


async def test_head_stays_head_through_a_redirect(invoker: Invoker, server: TestServer) -> None:
    url = server.make_url("/redirect/302").with_query(to="/echo")
    response = succeeded(await invoker.invoke(http_request(url, Method.HEAD), {}))
    assert (response.status_code, response.body) == (200, "")
    assert response.headers["content-type"] == "application/json; charset=utf-8"


async def test_credentials_do_not_follow_a_redirect_to_another_origin(
    invoker: Invoker, server: TestServer, other_server: TestServer
) -> None:
    headers = {"Authorization": "Bearer secret", "X-Plain": "kept"}
    same = server.make_url("/redirect/307").with_query(to="/echo")
    other = server.make_url("/redirect/307").with_query(to=str(other_server.make_url("/echo")))
    same_origin = echoed(await invoker.invoke(http_request(same, headers=headers), {}))
    other_origin = echoed(await invoker.invoke(http_request(other, headers=headers), {}))
    assert pick(same_origin["headers"], "authorization", "x-plain") == {
        "authorization": "Bearer secret",
        "x-plain": "kept",
    }
    assert pick(other_origin["headers"], "authorization", "x-plain") == {
        "authorization": None,
        "x-plain": "kept",
    }


async def test_redirect_loop_fails(invoker: Invoker, server: TestServer) -> None:
    reason = failed(await invoker.invoke(http_request(server.make_url("/loop")), {}))
    assert reason == "too many redirects (more than 10)"


async def test_redirect_to_another_scheme_fails(invoker: Invoker, server: TestServer) -> None:
    url = server.make_url("/redirect/302").with_query(to="ftp://files.test/x")
    reason = failed(await invoker.invoke(http_request(url), {}))
    assert reason == "redirect (HTTP 302) to a URL that is not http(s): 'ftp://files.test/x'"


async def test_redirect_to_the_metadata_address_is_refused(
    invoker: Invoker, server: TestServer
) -> None:
    url = server.make_url("/redirect/302").with_query(to="http://169.254.169.254/latest/meta-data")
    reason = failed(await invoker.invoke(http_request(url), {}))
    assert reason == "egress refused: 169.254.169.254 is in the denied range 169.254.0.0/16"


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::ffff:a9fe:a9fe]:8080/",
        "http://METADATA.google.internal./computeMetadata/v1/",
    ],
)
async def test_denied_targets_are_refused_before_connecting(invoker: Invoker, url: str) -> None:
    reason = failed(await invoker.invoke(http_request(url), {}))
    assert reason.startswith("egress refused: ")


@pytest.mark.parametrize(
    ("deny", "allow", "host", "reason"),
    [
        (
            ["127.0.0.0/8"],
            [],
            "127.0.0.1",
            "egress refused: 127.0.0.1 is in the denied range 127.0.0.0/8",
        ),
        (["127.0.0.0/8"], ["127.0.0.1/32"], "127.0.0.1", None),
        (
            ["127.0.0.0/8", "::1/128"],
            [],
            "localhost",
            "egress refused: localhost resolves to ",
        ),
        (["127.0.0.0/8", "::1/128"], ["localhost"], "localhost", None),
        (["localhost"], [], "localhost", "egress refused: localhost is a denied host"),
        (["::1/128"], [], "localhost", None),
    ],
)
async def test_egress_rules_for_loopback(
    server: TestServer, deny: list[str], allow: list[str], host: str, reason: str | None
) -> None:
    url = f"http://{host}:{server.port}/echo"
    async with invoker_with(egress_deny=deny, egress_allow=allow) as invoker:
        result = await invoker.invoke(http_request(url), {})
    if reason is None:
        assert echoed(result)["path"] == "/echo"
    else:
        assert failed(result).startswith(reason)


async def test_a_redirect_into_a_denied_range_is_refused(
    server: TestServer, other_server: TestServer
) -> None:
    """The first hop is allowed by name; the second is a denied literal."""
    url = f"http://localhost:{server.port}/redirect/302"
    to = str(other_server.make_url("/echo"))
    async with invoker_with(egress_deny=["127.0.0.0/8"], egress_allow=["localhost"]) as invoker:
        reason = failed(await invoker.invoke(http_request(url + f"?to={to}"), {}))
    assert reason == "egress refused: 127.0.0.1 is in the denied range 127.0.0.0/8"
