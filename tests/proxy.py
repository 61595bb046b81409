"""A small TCP proxy for network-fault tests.

It listens on 127.0.0.1 (a free port, unless given another address), forwards every connection to
one upstream address, and can be switched at run time to misbehave the way networks do:

- `latency`: seconds added before each chunk is forwarded, in both directions;
- `reset_after`: a connection is reset (RST) once that many bytes of a response have passed, a
  response being what the upstream sends after the client last sent something;
- `black_hole()` / `lift()`: connections are accepted and kept, but nothing crosses in either
  direction (not even a close) until the black hole is lifted; then what was held goes on, as
  TCP's retransmissions would carry it once a partition heals;
- `cut()`: every current connection is reset on both sides at once;
- `sever()`, during a black hole: the upstream gives up on every connection it had (as a server's
  TCP keepalives would while the client is out of reach): those are reset on its side at once,
  while the client hears nothing until the black hole is lifted, and then a reset;
- `isolate(hosts)` / `rejoin(hosts)`: a black hole for the connections from those client
  addresses only, others crossing as before; when it ends, the connections it held are reset, as
  peers that heard nothing for longer than their timeouts have given them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

CHUNK_BYTES = 65_536


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: SO_LINGER 0, then close without flushing."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One accepted connection and, once made, its connection to the upstream."""

    client: asyncio.StreamWriter
    # The client's address, which `isolate()` tells connections apart by.
    client_host: str = ""
    upstream: asyncio.StreamWriter | None = None
    # Bytes that came from the upstream since the client last sent anything.
    response_bytes: int = 0
    closed: bool = False
    # The upstream side was reset by `sever()`: the client's side goes when the black hole lifts.
    severed: bool = False

    def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)

    def close(self) -> None:
        self.closed = True
        for writer in (self.client, self.upstream):
            if writer is not None and not writer.is_closing():
                writer.close()


class Proxy:
    """`async with Proxy(host, port) as proxy:` forwards `proxy.port` to `host:port`; it listens
    on `listen_host`:`listen_port` when given, else on 127.0.0.1 and a free port."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = listen_host
        self.port = listen_port
        self.latency = 0.0
        self.reset_after: int | None = None
        # Connections accepted so far, and connections reset by `reset_after` or `cut()`.
        self.accepted = 0
        self.resets = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        # Client addresses whose connections are black-holed, and an event set (then replaced)
        # whenever some are let through again.
        self._isolated: set[str] = set()
        self._rejoined = asyncio.Event()
        self._changed = asyncio.Condition()
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        # What went wrong in the proxy itself: raised when it stops.
        self.errors: list[BaseException] = []

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            link.reset()
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        if self.errors and exc is None:
            raise self.errors[0]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._links)

    @property
    def black_holed(self) -> bool:
        return not self._flowing.is_set()

    def black_hole(self) -> None:
        """From now on nothing crosses, in either direction, on old or new connections."""
        self._flowing.clear()

    def lift(self) -> None:
        """End the black hole: what was held is forwarded, and held connections go upstream."""
        self._flowing.set()

    def cut(self) -> int:
        """Reset every current connection on both sides; how many there were."""
        links = list(self._links)
        for link in links:
            link.reset()
        self.resets += len(links)
        return len(links)

    def sever(self) -> int:
        """Reset the upstream side of every connection that reached the upstream, leaving the
        client's side silent until `lift()`; how many there were."""
        severed = 0
        for link in list(self._links):
            if link.upstream is not None and not link.closed:
                link.severed = True
                _reset(link.upstream)
                severed += 1
        return severed

    def isolate(self, hosts: Iterable[str]) -> None:
        """From now on nothing crosses, in either direction, on old or new connections from any
        of these client addresses; other connections go on as before."""
        self._isolated.update(hosts)

    def rejoin(self, hosts: Iterable[str]) -> int:
        """End the isolation of these client addresses: the connections it held are reset on
        both sides, and new ones cross again; how many were reset."""
        hosts = set(hosts)
        self._isolated -= hosts
        held = [link for link in self._links if link.client_host in hosts and not link.closed]
        for link in held:
            link.reset()
        self.resets += len(held)
        self._rejoined.set()
        self._rejoined = asyncio.Event()
        return len(held)

    async def _until_flowing(self, link: _Link) -> None:
        """Wait while a black hole holds `link`: the whole proxy's, or its client's isolation."""
        await self._flowing.wait()
        while link.client_host in self._isolated and not link.closed:
            await self._rejoined.wait()
            await self._flowing.wait()

    async def accepted_at_least(self, count: int) -> None:
        """Wait until `count` connections have been accepted since the proxy started."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.accepted >= count)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A task of the proxy's own rather than asyncio's, so that stopping can cancel it.
        handler = asyncio.create_task(self._serve(reader, writer))
        self._handlers.add(handler)
        handler.add_done_callback(self._served)

    def _served(self, handler: asyncio.Task[None]) -> None:
        self._handlers.discard(handler)
        if not handler.cancelled() and (error := handler.exception()) is not None:
            self.errors.append(error)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        link = _Link(writer, client_host=peer[0] if peer else "")
        self._links.add(link)
        async with self._changed:
            self.accepted += 1
            self._changed.notify_all()
        try:
            # A black hole answers no SYN: the upstream connection waits for it to lift.
            await self._until_flowing(link)
            if link.closed:
                return
            try:
                upstream_reader, link.upstream = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                link.reset()
                return
            if link.closed:
                # Cut while the upstream connection was being made.
                _reset(link.upstream)
                return
            await asyncio.gather(
                self._pump(link, reader, link.upstream, response=False),
                self._pump(link, upstream_reader, writer, response=True),
            )
        finally:
            link.close()
            self._links.discard(link)

    async def _pump(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        response: bool,
    ) -> None:
        """Forward one direction until its end, applying whatever faults are switched on."""
        while not link.closed:
            chunk: bytes | None
            try:
                chunk = await source.read(CHUNK_BYTES)
            except OSError:
                chunk = None  # the sender reset its connection
            await self._until_flowing(link)
            if link.severed:
                link.reset()
            if link.closed:
                return
            if chunk is None:
                link.reset()
                return
            if not chunk:
                # A half-close passes on as one.
                if sink.can_write_eof():
                    with contextlib.suppress(OSError):
                        sink.write_eof()
                return
            if self.latency:
                await asyncio.sleep(self.latency)
            reset = False
            if response:
                limit = self.reset_after
                if limit is not None and link.response_bytes + len(chunk) >= limit:
                    chunk = chunk[: max(limit - link.response_bytes, 0)]
                    reset = True
                link.response_bytes += len(chunk)
            else:
                link.response_bytes = 0
            try:
                sink.write(chunk)
                await sink.drain()
            except OSError:
                link.reset()
                return
            if reset:
                self.resets += 1
                link.reset()
                return
