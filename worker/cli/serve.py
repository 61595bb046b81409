"""The long-running commands: `worker`, `run` and `api`. The composition root: the one place in
the core that reaches into callback_api, because `agentless run` starts both. Signals are handled
here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from worker.contract.settings import Settings
from worker.runtime import new_event_loop, settle_heap
from worker.service import running_worker

log = logging.getLogger("agentless")


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


async def _settle_heap(_: object) -> None:
    settle_heap()


def _serve(settings: Settings, *, worker: bool) -> int:
    # Only `run` serves HTTP: the other commands need not load the API at all.
    from aiohttp import web  # noqa: PLC0415

    from callback_api.app import create_app, failed_key  # noqa: PLC0415
    from callback_api.server import deadlines_key, raise_open_files_limit  # noqa: PLC0415

    raise_open_files_limit()
    app = create_app(settings, worker=worker)
    app.on_startup.append(_settle_heap)
    web.run_app(
        app,
        host=settings.api_host,
        port=settings.api_port,
        access_log=None,
        loop=new_event_loop(),
        print=lambda text: log.info(text.strip().splitlines()[0]),
        **app[deadlines_key].server_options(),
    )
    return 1 if app[failed_key] else 0
