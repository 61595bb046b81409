"""`agentless events` as an operator follows tasks with it, and the progress line of
`agentless submit --wait` on a terminal."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel

from tests import processes
from tests.conftest import Events, Target, publish, task_message
from worker.contract.models import Names
from worker.contract.settings import Settings
from worker.service import Worker

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@dataclass
class Listener:
    """`agentless events …` running, its stdout read line by line."""

    process: asyncio.subprocess.Process

    async def line(self, timeout: float = 15) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        assert raw, "the command ended"
        return raw.decode().rstrip("\n")

    async def finish(self, timeout: float = 15) -> tuple[int, str, str]:
        """Its exit code and what it printed from here on."""
        out, err = await asyncio.wait_for(self.process.communicate(), timeout)
        assert self.process.returncode is not None
        return self.process.returncode, out.decode(), err.decode()


async def _listen(settings: Settings, *args: str) -> Listener:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "events",
        *args,
        cwd=processes.ROOT,
        env=processes.environment(settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return Listener(process)


def _event(name: str, task_id: str, hub: str = "build") -> dict[str, object]:
    return {
        "name": name,
        "eventId": f"{task_id}:{name.removeprefix('Task').lower()}",
        "taskId": task_id,
        "planId": "plan-1",
        "jobId": "plan-1",
        "hubName": hub,
        "attempts": 1,
        "queuedAt": "2026-01-02T03:04:05Z",
    }


async def _send(channel: AbstractChannel, settings: Settings, event: dict[str, object]) -> None:
    exchange = await channel.get_exchange(Names(settings.prefix).events, ensure=False)
    name = str(event["name"]).removeprefix("Task").lower()
    await exchange.publish(
        aio_pika.Message(orjson.dumps(event)), routing_key=f"task.{name}.{event['hubName']}"
    )


async def _bound(
    listener: Listener, channel: AbstractChannel, settings: Settings, hello: dict[str, object]
) -> str:
    """Once the listener's queue is bound: `hello` is sent until the listener prints it."""
    async with asyncio.timeout(15):
        while True:
            await _send(channel, settings, hello)
            try:
                return await listener.line(timeout=0.3)
            except TimeoutError:
                continue


async def test_follow_json_prints_every_event_body_as_published(
    worker: Worker, settings: Settings, channel: AbstractChannel, events: Events, target: Target
) -> None:
    listener = await _listen(settings, "--follow", "--json")
    await _bound(listener, channel, settings, _event("TaskWaiting", "hello"))
    await publish(channel, settings, task_message(target, taskId="ev-1"))
    completed = await events.completed("ev-1")
    printed: list[dict[str, object]] = []
    while not printed or printed[-1].get("name") != "TaskCompleted":
        line = json.loads(await listener.line())
        if line["taskId"] == "ev-1":
            printed.append(line)
    assert printed == [e for e in events.received if e["taskId"] == "ev-1"]
    assert printed[-1] == completed
    listener.process.send_signal(signal.SIGTERM)
    code, _, err = await listener.finish()
    assert (code, err) == (0, "")


async def test_hub_and_task_filter_and_end_with_the_tasks_completion(
    worker: Worker, settings: Settings, channel: AbstractChannel, events: Events, target: Target
) -> None:
    listener = await _listen(settings, "--hub", "release", "--task", "ev-2")
    hello = await _bound(listener, channel, settings, _event("TaskWaiting", "ev-2", "release"))
    assert re.fullmatch(rf"{STAMP}  TaskWaiting    ev-2  release", hello), hello
    # Another hub's event of the same task, another task's of the same hub: neither is shown.
    await _send(channel, settings, _event("TaskStarted", "ev-2", "build"))
    await _send(channel, settings, _event("TaskStarted", "other", "release"))
    await publish(
        channel,
        settings,
        task_message(target, taskId="ev-2", hubName="release", query="&status=503"),
    )
    code, out, err = await listener.finish()
    assert (code, err) == (0, "")
    lines = [line for line in out.splitlines() if "TaskWaiting" not in line]
    assert len(lines) == 2, out
    assert re.fullmatch(rf"{STAMP}  TaskStarted    ev-2  release", lines[0]), lines
    assert re.fullmatch(rf"{STAMP}  TaskCompleted  ev-2  release  failed  HTTP 503", lines[1])

    # Once it has completed, its TaskCompleted is printed at once, from the database.
    code, out, err = await processes.run(settings, "events", "--task", "ev-2", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == await events.completed("ev-2")


async def test_without_follow_or_task_it_ends_after_a_quiet_second(
    settings: Settings, channel: AbstractChannel
) -> None:
    began = time.monotonic()
    code, out, err = await processes.run(settings, "events", timeout=20)
    assert (code, out, err) == (0, "", "")
    assert time.monotonic() - began < 10


async def test_events_refuses_what_is_not_an_id(settings: Settings) -> None:
    code, _, err = await processes.run(settings, "events", "--hub", "a b")
    assert code == 2
    assert "--hub 'a b' is not an id" in err


async def test_submit_wait_shows_progress_on_a_terminal_and_nothing_on_a_pipe(
    worker: Worker, settings: Settings, target: Target
) -> None:
    controller, terminal = os.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "submit",
            "--url",
            f"{target.url}/hook?delay=2.5",
            "--task-id",
            "prog-1",
            "--wait",
            cwd=processes.ROOT,
            env=processes.environment(settings),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=terminal,
        )
    finally:
        os.close(terminal)
    shown = asyncio.get_running_loop().run_in_executor(None, _read_all, controller)
    result, _ = await asyncio.wait_for(process.communicate(), 30)
    progress = (await asyncio.wait_for(shown, 10)).decode()
    assert process.returncode == 0, progress
    assert json.loads(result)["result"] == "succeeded"
    assert re.search(r"\rtask prog-1: running · \ds", progress), progress
    # The line is erased before the result is printed.
    assert progress.endswith("\r\x1b[K"), progress

    code, out, err = await processes.run(
        settings, "submit", "--url", f"{target.url}/hook?delay=1.5", "--wait"
    )
    assert (code, err) == (0, "")
    assert json.loads(out)["result"] == "succeeded"


def _read_all(fd: int) -> bytes:
    """Everything written to a pty until its other end is closed."""
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    except OSError:
        pass  # EIO: the child has exited and the terminal side is closed
    finally:
        os.close(fd)
    return b"".join(chunks)
