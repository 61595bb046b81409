"""Endpoints that answer bodies at the size cap, all at once, and the peak memory of a process:
what the memory test and the memory benchmark share."""

from __future__ import annotations

import asyncio
import contextlib
from enum import StrEnum
from typing import Final

from aiohttp import web

CHUNK: Final = 256 * 1024


class Kind(StrEnum):
    """What a body holds, from the dearest to parse into Python objects to the cheapest."""

    # About a million two-letter strings: each a Python object of its own once parsed.
    STRINGS = "strings"
    # About 800,000 integers, most beyond the ones Python keeps cached.
    INTEGERS = "integers"
    # One JSON string of the whole size.
    STRING = "string"
    # Lines of text, sent without a length (chunked), as a log or a page would be.
    TEXT = "text"


def body(kind: Kind, size: int) -> bytes:
    """A body of `kind`, exactly `size` bytes long (JSON is padded with trailing spaces)."""
    if kind is Kind.STRINGS:
        data = b"[" + b",".join([b'"ab"'] * ((size - 2) // 5)) + b"]"
    elif kind is Kind.INTEGERS:
        data = b"[" + b",".join(b"%d" % (1000 + i % 99_000) for i in range((size - 2) // 6)) + b"]"
    elif kind is Kind.STRING:
        data = b'"' + b"x" * (size - 2) + b'"'
    else:
        line = b"a line of text, as a log would have it\n"
        data = line * (size // len(line))
    return data.ljust(size, b" ")


class Endpoints:
    """One server on a path per task, `/{kind}/{key}`, answering a body of that kind. Each
    request waits until `expected` of them have arrived (or a few seconds have passed), so that
    every body is in flight at once; then its body is streamed in chunks, each written only when
    the worker has taken the last, so that this process holds no more than a chunk per
    connection."""

    def __init__(self, size: int, expected: int) -> None:
        self.size = size
        self.bodies: dict[Kind, bytes] = {}
        self.expected = expected
        self.arrived = 0
        self.calls: dict[str, int] = {}
        self.all_arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        kind = Kind(request.match_info["kind"])
        key = request.match_info["key"]
        self.calls[key] = self.calls.get(key, 0) + 1
        self.arrived += 1
        if self.arrived >= self.expected:
            self.all_arrived.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_arrived.wait(), 5)
        if kind not in self.bodies:
            self.bodies[kind] = body(kind, self.size)
        response = web.StreamResponse()
        if kind is Kind.TEXT:
            response.content_type = "text/plain"
            response.enable_chunked_encoding()
        else:
            response.content_type = "application/json"
            response.content_length = self.size
        await response.prepare(request)
        view = memoryview(self.bodies[kind])
        for start in range(0, len(view), CHUNK):
            await response.write(view[start : start + CHUNK])
        await response.write_eof()
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{kind}/{key}", self.handle)
        return app


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise LookupError(f"no VmHWM for process {pid}")
