"""The long-running commands: `worker`, `run` and `api`, and `openapi`. The composition root: the
one place in the core that reaches into callback_api, because `agentless run` starts both.
Signals are handled here.

The API's sockets are opened before anything connects, so that a port that is taken stops the
process at once, naming the port and the setting (the worker's probe server does the same for
its own port, first thing)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket

import orjson

from worker.contract.errors import CannotListen
from worker.contract.settings import Settings
from worker.runtime import new_event_loop, settle_heap
from worker.service import running_worker

log = logging.getLogger("agentless")

# aiohttp's own backlog for the sockets it opens.
BACKLOG = 128


def cmd_worker(settings: Settings, _: argparse.Namespace) -> int:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_worker(settings))


async def _worker(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_worker(settings) as worker:
        settle_heap()
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({stopped, worker.consuming}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            stopped.cancel()
            log.error("the consume loop ended unexpectedly; exiting")
            return 1
        log.info("stop requested; finishing in-flight tasks")
    return 0


def cmd_run(settings: Settings, _: argparse.Namespace) -> int:
    return _serve(settings, worker=True)


def cmd_api(settings: Settings, _: argparse.Namespace) -> int:
    return _serve(settings, worker=False)


def cmd_openapi(settings: Settings, _: argparse.Namespace) -> int:
    """The API's OpenAPI document, as GET /openapi.json serves it, built from the route table."""
    from callback_api.openapi import document  # noqa: PLC0415
    from callback_api.routes import ROUTES  # noqa: PLC0415

    print(orjson.dumps(document(settings, ROUTES), option=orjson.OPT_INDENT_2).decode())
    return 0


async def _settle_heap(_: object) -> None:
    settle_heap()


def _serve(settings: Settings, *, worker: bool) -> int:
    # Only `run` serves HTTP: the other commands need not load the API at all.
    from aiohttp import web  # noqa: PLC0415

    from callback_api.app import create_app, failed_key  # noqa: PLC0415
    from callback_api.server import deadlines_key, raise_open_files_limit  # noqa: PLC0415

    app = create_app(settings, worker=worker)
    sockets = _listen(settings.api_host, settings.api_port, setting="AGENTLESS_API")
    raise_open_files_limit()
    app.on_startup.append(_settle_heap)
    try:
        web.run_app(
            app,
            sock=sockets,
            access_log=None,
            loop=new_event_loop(),
            print=lambda text: log.info(text.strip().splitlines()[0]),
            **app[deadlines_key].server_options(),
        )
    finally:
        for sock in sockets:
            sock.close()
    return 1 if app[failed_key] else 0


def _listen(host: str, port: int, *, setting: str) -> list[socket.socket]:
    """Sockets listening on `port` of every address `host` names, as aiohttp would open them;
    CannotListen, naming the settings, if one cannot."""
    sockets: list[socket.socket] = []
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, protocol, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, protocol)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # As asyncio does: "::" is IPv6 alone, and 0.0.0.0 can be listened on beside it.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise CannotListen(exc, host, port, setting=setting) from exc
    return sockets
