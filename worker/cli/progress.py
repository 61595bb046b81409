"""How a task waited for by `agentless submit --wait` is doing: one status line on a terminal's
stderr, rewritten about once a second (queued, running, waiting for its callback or polling,
the time elapsed). The task's events say at once when it moves on; its row in the database,
read once a second if the database can be reached, adds what events do not tell (polls made,
when the next one or the next attempt is due). None of it is needed: the result comes anyway."""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import suppress
from datetime import datetime
from typing import TextIO

from worker.cli.events import Event, EventFeed
from worker.contract.models import EventName, Mode, State, TaskMessage
from worker.contract.records import TaskRecord
from worker.contract.settings import Settings
from worker.store.database import Store
from worker.text import duration, shorten

REFRESH_SECONDS = 1.0
DEFAULT_COLUMNS = 80
# Erase to the end of the line: what is left of a longer line written before.
_ERASE = "\x1b[K"


class Progress:
    def __init__(self, task: TaskMessage, stream: TextIO) -> None:
        self._task = task
        self._stream = stream
        self._began = time.monotonic()
        self.state = State.QUEUED
        self.attempt = 1
        self.since: datetime | None = None
        self.polls = 0
        self.next_at: datetime | None = None

    def saw(self, event: Event) -> None:
        """A TaskStarted or TaskWaiting event of the task."""
        name = event.fields.get("name")
        if name == EventName.STARTED.value:
            self.state = State.RUNNING
            attempts = event.fields.get("attempts")
            self.attempt = attempts if isinstance(attempts, int) else self.attempt
        elif name == EventName.WAITING.value:
            polling = self._task.wait_for_completion is Mode.POLL
            self.state = State.POLLING if polling else State.WAITING
            self.since = self.since or event.at

    def read(self, record: TaskRecord) -> None:
        """The task's row, as the database has it now."""
        if record.state is State.COMPLETED:
            return
        self.state = record.state
        self.attempt = record.attempts
        self.since = record.waiting_since
        self.polls = record.polls
        self.next_at = record.next_poll_at if record.state is State.POLLING else record.retry_at

    def line(self) -> str:
        text = f"task {self._task.task_id}: "
        if self.state is State.QUEUED:
            text += "queued"
            if self.next_at is not None:
                text += f", attempt {self.attempt + 1} due at {_clock(self.next_at)}"
        elif self.state is State.RUNNING:
            text += "running" + (f" (attempt {self.attempt})" if self.attempt > 1 else "")
        elif self.state is State.WAITING:
            text += "waiting for its callback" + self._since()
        else:
            text += f"polling{self._since()}, {self.polls} poll{'' if self.polls == 1 else 's'}"
            if self.next_at is not None:
                text += f", next at {_clock(self.next_at)}"
        return f"{text} · {duration(time.monotonic() - self._began)}"

    def _since(self) -> str:
        return "" if self.since is None else f" since {_clock(self.since)}"

    def show(self) -> None:
        try:
            # A terminal that does not tell its size says 0.
            columns = os.get_terminal_size(self._stream.fileno()).columns or DEFAULT_COLUMNS
        except OSError:
            columns = DEFAULT_COLUMNS
        # A line that wraps could no longer be rewritten in place.
        self._stream.write(f"\r{shorten(self.line(), max(columns - 1, 1))}{_ERASE}")
        self._stream.flush()

    def clear(self) -> None:
        self._stream.write(f"\r{_ERASE}")
        self._stream.flush()

    async def run(self, feed: EventFeed, settings: Settings) -> None:
        """Show the line until cancelled, updated from the events and the task's row."""
        watching = asyncio.create_task(self._watch(feed))
        reading = asyncio.create_task(self._read_rows(settings))
        try:
            while True:
                self.show()
                await asyncio.sleep(REFRESH_SECONDS)
        finally:
            for task in (watching, reading):
                task.cancel()
            await asyncio.gather(watching, reading, return_exceptions=True)
            self.clear()

    async def _watch(self, feed: EventFeed) -> None:
        with suppress(ConnectionError):
            while True:
                event = await feed.next()
                if event.task_id == self._task.task_id:
                    self.saw(event)
                    self.show()

    async def _read_rows(self, settings: Settings) -> None:
        # Whatever goes wrong here only leaves the line to the events.
        with suppress(Exception):
            async with Store.open(settings.database_url, pool_size=1) as store:
                while True:
                    record = await store.get(self._task.task_id)
                    if record is not None:
                        self.read(record)
                    await asyncio.sleep(REFRESH_SECONDS)


def _clock(at: datetime) -> str:
    """The time of day, in the local time zone of whoever reads the terminal."""
    return at.astimezone().strftime("%H:%M:%S")
