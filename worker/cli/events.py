"""`agentless events`: task events as they are published to `{prefix}.events` (SPEC §7).

A private queue (exclusive, auto-delete, named by the broker) is bound to the exchange, so the
command sees what is published from then on, and takes nothing from anybody else.

Without --follow the command ends by itself: with --task, once that task's TaskCompleted has
been printed (at once, from the database, if the task had already completed); without --task,
once a second has passed without an event. With --follow it prints until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from worker.cli.connect import broker_connection, group_size
from worker.cli.exits import EXIT_DONE
from worker.contract.errors import Unavailable, UsageError
from worker.contract.events import completed_event
from worker.contract.models import EventName, Names
from worker.contract.requests import ID_PATTERN
from worker.contract.settings import Settings, redact_url
from worker.store.database import Store
from worker.text import one_line
from worker.topology import declare_topology_on

# Without --follow or --task: the quiet after which nothing more is expected.
IDLE_SECONDS = 1.0


def cmd_events(settings: Settings, args: argparse.Namespace) -> int:
    for flag, value in (("--hub", args.hub), ("--task", args.task)):
        if value is not None and not ID_PATTERN.fullmatch(value):
            raise UsageError(f"{flag} {value!r} is not an id (1-128 of A-Z a-z 0-9 . _ : -)")
    return asyncio.run(_events(settings, args))


def binding_key(hub: str | None) -> str:
    """The routing keys (`task.<event>.<hubName>`) of every event, or of one hub's."""
    return "task.#" if hub is None else f"task.*.{hub}"


@dataclass(frozen=True, slots=True)
class Event:
    """One event as it arrived: its body, and the fields read from it."""

    body: bytes
    fields: dict[str, Any]
    at: datetime

    @classmethod
    def parse(cls, body: bytes, at: datetime) -> Event | None:
        """The event, or None for a body that is no JSON object (not ours to print)."""
        try:
            fields = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return cls(body, fields, at) if isinstance(fields, dict) else None

    @property
    def task_id(self) -> str:
        return str(self.fields.get("taskId", ""))

    @property
    def completed(self) -> bool:
        return self.fields.get("name") == EventName.COMPLETED.value

    def json_line(self) -> str:
        return orjson.dumps(self.fields).decode()

    def human_line(self) -> str:
        """Time (UTC), event, taskId, hub; for TaskCompleted, the result and the reason."""
        stamp = self.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        parts = [stamp, f"{self._text('name'):<13}", self._text("taskId"), self._text("hubName")]
        if self.completed:
            parts += [self._text("result"), self._text("reason")]
        return "  ".join(parts).rstrip()

    def _text(self, name: str) -> str:
        value = self.fields.get(name)
        return "" if value is None else one_line(str(value))


class EventFeed:
    """The events that arrive on a private queue, in order; ConnectionError once the channel
    is closed."""

    def __init__(self) -> None:
        self._inbox: asyncio.Queue[Event | None] = asyncio.Queue()

    @classmethod
    async def bound(cls, channel: AbstractChannel, names: Names, hub: str | None) -> EventFeed:
        feed = cls()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(names.events, binding_key(hub))
        channel.close_callbacks.add(lambda *_: feed._inbox.put_nowait(None))
        await queue.consume(feed._take, no_ack=True)
        return feed

    async def _take(self, message: AbstractIncomingMessage) -> None:
        event = Event.parse(message.body, datetime.now(UTC))
        if event is not None:
            self._inbox.put_nowait(event)

    async def next(self) -> Event:
        event = await self._inbox.get()
        if event is None:
            self._inbox.put_nowait(None)
            raise ConnectionError("the broker closed the channel")
        return event


async def _events(settings: Settings, args: argparse.Namespace) -> int:
    names = Names(settings.prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connection = await broker_connection(settings, "events")
    async with connection:
        channel = await connection.channel()
        await declare_topology_on(connection, names, group_size(settings))
        feed = await EventFeed.bound(channel, names, args.hub)
        until_completed = args.task is not None and not args.follow
        if until_completed:
            done = await _completed_already(settings, args.task)
            if done is not None:
                _show(done, json=args.json)
                return EXIT_DONE
        idle = None if args.follow or until_completed else IDLE_SECONDS
        stopped = asyncio.create_task(stop.wait())
        try:
            while True:
                arriving = asyncio.create_task(feed.next())
                await asyncio.wait(
                    {arriving, stopped}, timeout=idle, return_when=asyncio.FIRST_COMPLETED
                )
                if not arriving.done():
                    # Stopped, or quiet for long enough.
                    arriving.cancel()
                    return EXIT_DONE
                try:
                    event = arriving.result()
                except ConnectionError as exc:
                    raise Unavailable(
                        f"lost the connection to RabbitMQ at {redact_url(settings.amqp_url)}; "
                        "run the command again"
                    ) from exc
                if args.task is not None and event.task_id != args.task:
                    continue
                _show(event, json=args.json)
                if until_completed and event.completed:
                    return EXIT_DONE
        finally:
            stopped.cancel()


def _show(event: Event, *, json: bool) -> None:
    # Flushed at once: whoever reads a pipe wants each event as it happens.
    print(event.json_line() if json else event.human_line(), flush=True)


async def _completed_already(settings: Settings, task_id: str) -> Event | None:
    """The TaskCompleted event of a task that completed before the queue was bound."""
    async with Store.open(settings.database_url, pool_size=1) as store:
        record = await store.get(task_id)
    if record is None or record.result is None:
        return None
    event = Event.parse(completed_event(record), record.completed_at or datetime.now(UTC))
    assert event is not None
    return event
