"""Calls that fail: too slow, refused, broken; and the redirects and egress rules a call obeys."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestServer

from tests.invoke.calls import echoed, failed, http_request, invoker_with, pick, succeeded
from worker.contract.requests import Method
from worker.invoke import InvokeFailure, Invoker

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
