"""Abuse of the worker's HTTP client: endpoints that send too much, too slowly, or forever. Each
ends in a clean `failed` with its reason, and the client is fine afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from worker.contract.models import HttpResponse
from worker.contract.requests import Method, TaskRequest
from worker.contract.settings import Settings
from worker.invoke import InvokeFailure, Invoker

LIMIT = 1_000_000
Behaviour = Callable[[asyncio.StreamWriter], Awaitable[None]]


async def huge_body(writer: asyncio.StreamWriter) -> None:
    """Claims 10 GB and starts sending them."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10737418240\r\n\r\n")
    for _ in range(10_000):
        writer.write(b"x" * 65536)
        await writer.drain()


async def huge_unannounced_body(writer: asyncio.StreamWriter) -> None:
    """Sends without a length until the connection is closed on it."""
    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    for _ in range(10_000):
        writer.write(b"x" * 65536)
        await writer.drain()


@functools.cache
def bomb() -> bytes:
    """200 MB of zeros in 200 KB. Compressed before the test's call, not while it waits: a second
    or more of compressing on the test's event loop, under load, outlasted the call's timeout."""
    return gzip.compress(b"\0" * 200_000_000, compresslevel=9)


async def gzip_bomb(writer: asyncio.StreamWriter) -> None:
    body = bomb()
    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()


async def endless_chunks(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    while True:
        writer.write(b"1\r\nx\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)


async def dripped_headers(writer: asyncio.StreamWriter) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 100:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.1)


async def ten_thousand_headers(writer: asyncio.StreamWriter) -> None:
    headers = b"".join(b"X-H-%d: v\r\n" % i for i in range(10_000))
    writer.write(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\n{}")
    await writer.drain()


async def well_behaved(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n")
    writer.write(b'{"ok":true}')
    await writer.drain()


BEHAVIOURS: dict[str, Behaviour] = {
    "/huge": huge_body,
    "/huge-unannounced": huge_unannounced_body,
    "/bomb": gzip_bomb,
    "/endless": endless_chunks,
    "/drip": dripped_headers,
    "/headers": ten_thousand_headers,
    "/ok": well_behaved,
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def abuser() -> AsyncIterator[str]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            await BEHAVIOURS[head.split(b" ", 2)[1].decode()](writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    await asyncio.to_thread(bomb)
    listener = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with listener:
        host, port = listener.sockets[0].getsockname()[:2]
        yield f"http://{host}:{port}"


@pytest_asyncio.fixture(loop_scope="session")
async def invoker() -> AsyncIterator[Invoker]:
    settings = Settings(
        response_timeout=2,
        max_response_bytes=LIMIT,
        concurrency=8,
        connections=None,
        egress_deny=[],
        egress_allow=[],
    )
    async with Invoker(settings, {}) as started:
        yield started


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/huge", f"response body is larger than the {LIMIT}-byte limit"),
        ("/huge-unannounced", f"response body is larger than the {LIMIT}-byte limit"),
        ("/bomb", f"response body is larger than the {LIMIT}-byte limit"),
        ("/endless", "no complete response within 2 s"),
        ("/drip", "no complete response within 2 s"),
        ("/headers", "invalid HTTP response from 127.0.0.1:"),
    ],
)
async def test_abusive_endpoints_fail_cleanly(
    invoker: Invoker, abuser: str, path: str, reason: str
) -> None:
    answer = await invoker.invoke(TaskRequest(method=Method.GET, url=abuser + path), {})
    assert isinstance(answer, InvokeFailure), answer
    assert reason in answer.reason
    # And the client is as good as before.
    after = await invoker.invoke(TaskRequest(method=Method.GET, url=abuser + "/ok"), {})
    assert isinstance(after, HttpResponse)
    assert after.body == {"ok": True}
