"""What the API's HTTP server allows a client: deadlines for slow ones, file descriptors for many.

Left to itself, aiohttp waits for a request body as long as the client keeps its connection open:
a client that sends its headers and then stalls holds a connection, a file descriptor and a
handler for good. Connections that never complete a request (idle ones, headers dripped a byte at
a time) are closed after `keepalive_timeout`, counted from the connection's start or its last
answer (aiohttp 3.14.4 and later; before, such a connection was never closed). The deadlines
below bound both; `agentless api` and `agentless run` serve with them.

There is no cap on concurrent connections: a cap would let whoever holds the most connections
lock everybody else out. Each connection lives a bounded time instead, and the process may open
as many files as its hard limit allows.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import TypedDict

from aiohttp import web

log = logging.getLogger(__name__)


class ServerOptions(TypedDict):
    keepalive_timeout: float
    lingering_time: float


@dataclass(frozen=True, slots=True)
class Deadlines:
    # A connection without a whole request's headers this long after it opened, or after its
    # last answer, is closed: idle keep-alive connections and dripped headers alike. nginx's
    # default, longer than common load balancers' idle timeouts (60 s), so that they close first.
    idle_seconds: float = 75.0
    # A body must arrive whole this long after its headers, else 408 (inputs.read_body). What is
    # left of a body after the answer (too late, or not needed) is read and dropped for at most
    # this long more; the connection is closed if it has not ended by then.
    body_seconds: float = 30.0

    def server_options(self) -> ServerOptions:
        """Keyword arguments for `web.run_app` and `web.AppRunner`."""
        return ServerOptions(keepalive_timeout=self.idle_seconds, lingering_time=self.body_seconds)


deadlines_key = web.AppKey("deadlines", Deadlines)


def raise_open_files_limit() -> None:
    """Let the process hold as many connections as its hard limit allows: the soft limit is
    often 1024, which 1,000 clients and the database and broker connections would exceed (Go and
    the JVM raise it the same way at start-up)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is not a value Linux lets the soft limit take (nr_open caps it).
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files limit left at %d: %s", soft, exc)
        return
    log.info("open files limit raised from %d to %d", soft, wanted)
