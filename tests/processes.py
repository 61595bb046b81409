"""Worker and CLI processes for tests that kill, signal or run the command line, and waiting
until a served one is ready."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from worker.contract.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    """The process environment that gives a child process these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLESS_")}
    env.update(
        AGENTLESS_AMQP_URL=settings.amqp_url,
        AGENTLESS_DATABASE_URL=settings.database_url,
        AGENTLESS_PREFIX=settings.prefix,
        AGENTLESS_RESPONSE_TIMEOUT=str(settings.response_timeout),
        AGENTLESS_MAX_RESPONSE_BYTES=str(settings.max_response_bytes),
        AGENTLESS_CONCURRENCY=str(settings.concurrency),
        AGENTLESS_WORKER_PORT="0",
        AGENTLESS_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


@dataclass
class Child:
    """A long-running `agentless` process; its logs go to a file so that it never blocks on a
    full pipe."""

    process: asyncio.subprocess.Process
    log: Path
    args: tuple[str, ...] = ()

    def logs(self) -> str:
        return self.log.read_text()

    def complaints(self, last: int = 20) -> str:
        """Its last warnings and errors: what a failed test shows of a process that ran beside
        it."""
        lines = [
            line
            for line in self.logs().splitlines()
            if '"level":"warning"' in line or '"level":"error"' in line or "Traceback" in line
        ]
        shown = "\n".join(line[:400] for line in lines[-last:])
        name = " ".join(self.args)
        return f"--- {name} (pid {self.process.pid}): {len(lines)} warnings and errors:\n{shown}"


async def _spawn(
    settings: Settings, args: tuple[str, ...], output: int, extra_env: dict[str, str]
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        cwd=ROOT,
        env=environment(settings, **extra_env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=output,
        stderr=output,
    )


async def start(settings: Settings, *args: str, **extra_env: str) -> Child:
    """`agentless ARGS…` as a child process that runs until it is stopped."""
    handle, name = tempfile.mkstemp(prefix="agentless-", suffix=".log")
    try:
        process = await _spawn(settings, args, handle, extra_env)
    finally:
        os.close(handle)
    return Child(process, Path(name), args)


async def wait_until_ready(url: str, child: Child) -> None:
    """Wait until `child` answers 200 at `url` (its readiness endpoint); fail if it exits first."""
    async with asyncio.timeout(20), aiohttp.ClientSession() as session:
        while True:
            assert child.process.returncode is None, child.logs()
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)


async def run(
    settings: Settings, *args: str, timeout: float = 60, **extra_env: str
) -> tuple[int, str, str]:
    """`agentless ARGS…` to its end: exit code, stdout, stderr."""
    process = await _spawn(settings, args, asyncio.subprocess.PIPE, extra_env)
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.communicate()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
