"""Abusive HTTP clients on raw sockets, for the load tests and the load benchmark.

- `SlowClients`: slow-loris clients of four kinds, each reconnecting as soon as the server cuts it
  off: `idle` (connects, sends nothing), `dripped headers` (one byte at a time, never finished),
  `stalled body` (a callback with a real token announces a body that never comes) and `stalled
  body, refused` (the same with a forged token: answered at once, its body never comes either).
- `Crowd`: keep-alive connections, each asking something about once a second until told to stop:
  half post forged TaskCompleted events, half ask for /healthz.

Both post to plan `plan-1`; each counts what the server did, so that a test can check it.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

SLOW_KINDS = ("idle", "dripped headers", "stalled body", "stalled body, refused")
DRIP_SECONDS = 0.1


def event_request(host: str, token: str, *, length: int, body: bytes = b"") -> bytes:
    """A TaskCompleted request's bytes that announce a `length`-byte body and send `body`."""
    return (
        f"POST /plans/plan-1/events HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode() + body


def _said(data: bytes) -> str:
    """What the server said before it closed the connection: `closed`, or `HTTP 408, closed`."""
    if not data:
        return "closed"
    return f"HTTP {data.split(b' ', 2)[1].decode()}, closed"


async def _drip(writer: asyncio.StreamWriter, request: bytes, closed: asyncio.Task[bytes]) -> None:
    """`request` one byte at a time, until the server closes the connection."""
    for byte in request:
        if closed.done():
            return
        writer.write(bytes([byte]))
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(DRIP_SECONDS)


@dataclass
class SlowClients:
    host: str
    port: int
    token: str  # a real task's token: its body is read, and never comes
    forged: str  # a forged token: refused at once
    per_kind: int
    # A connection that the server has not closed this long after it opened is given up on, and
    # counted as `still open after … s`.
    give_up_seconds: float
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    opened: int = 0
    everyone_connected: asyncio.Event = field(default_factory=asyncio.Event)
    # (kind, what the server did) → connections
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def cut_off(self, count: int) -> None:
        """Wait until the server has cut off `count` slow connections in all."""
        async with asyncio.timeout(self.give_up_seconds), self.changed:
            await self.changed.wait_for(lambda: sum(self.outcomes.values()) >= count)

    async def client(self, kind: str) -> None:
        host = f"{self.host}:{self.port}"
        # Never finished: no blank line, and a header that would take 13 minutes to drip.
        dripped = event_request(host, self.token, length=100)[:-2] + b"X-Slow: " + b"x" * 8000
        requests = {
            "stalled body": event_request(host, self.token, length=100),
            "stalled body, refused": event_request(host, self.forged, length=100),
        }
        while not self.stop.is_set():
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened += 1
            if self.opened >= len(SLOW_KINDS) * self.per_kind:
                self.everyone_connected.set()
            closed = asyncio.create_task(reader.read())
            try:
                if kind == "dripped headers":
                    await _drip(writer, dripped, closed)
                elif kind in requests:
                    writer.write(requests[kind])
                    await writer.drain()
                outcome = _said(await asyncio.wait_for(closed, self.give_up_seconds))
            except ConnectionResetError:
                # Closed while a dripped byte was on its way: the server's side answers it with RST.
                outcome = "reset"
            except TimeoutError:
                outcome = f"still open after {self.give_up_seconds:g} s"
            finally:
                writer.close()
                closed.cancel()
                await asyncio.gather(closed, return_exceptions=True)
            async with self.changed:
                self.outcomes[kind, outcome] += 1
                self.changed.notify_all()

    async def run(self) -> None:
        """Until `stop` is set, each client's last connection then closed by the server."""
        await asyncio.gather(
            *(self.client(kind) for kind in SLOW_KINDS for _ in range(self.per_kind))
        )


async def _read_answer(reader: asyncio.StreamReader) -> int:
    """One whole response off a keep-alive connection: its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(line.partition(":")[2]) for line in lines if line.lower().startswith("content-length:")
    )
    await reader.readexactly(length)
    return int(lines[0].split(" ", 2)[1])


@dataclass
class Crowd:
    host: str
    port: int
    forged: str
    connections: int
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    connected: int = 0
    everyone_connected: asyncio.Event = field(default_factory=asyncio.Event)
    answers: Counter[int] = field(default_factory=Counter)  # status → answers
    broken: Counter[str] = field(default_factory=Counter)  # error → connections
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def answered(self, count: int, timeout: float = 30) -> None:
        """Wait until the connections have been answered `count` times in all."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: sum(self.answers.values()) >= count)

    async def client(self, number: int) -> None:
        host = f"{self.host}:{self.port}"
        body = b'{"name": "TaskCompleted", "taskId": "t", "result": "succeeded"}'
        request = (
            event_request(host, self.forged, length=len(body), body=body)
            if number % 2
            else f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        reader, writer = await asyncio.open_connection(self.host, self.port)
        counted = False
        try:
            while True:
                writer.write(request)
                status = await _read_answer(reader)
                async with self.changed:
                    self.answers[status] += 1
                    self.changed.notify_all()
                if not counted:
                    counted = True
                    self.connected += 1
                    if self.connected == self.connections:
                        self.everyone_connected.set()
                if self.stop.is_set():
                    return
                await asyncio.sleep(random.uniform(0.5, 1.5))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.broken[type(exc).__name__] += 1
        finally:
            writer.close()

    async def run(self) -> None:
        """Until `stop` is set, each connection then answered once more."""
        await asyncio.gather(*(self.client(number) for number in range(self.connections)))
