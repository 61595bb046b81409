"""The endpoints a task's HTTP call is tried against: one aiohttp app, one raw-socket server; and
an invoker."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import zlib
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.invoke.calls import LIMIT, invoker_with
from worker.invoke import Invoker

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


@pytest_asyncio.fixture(loop_scope="session")
async def invoker() -> AsyncIterator[Invoker]:
    async with invoker_with() as started:
        yield started
