"""Structured logging: one event per line, JSON off a TTY, taskId/planId bound from contextvars."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

import orjson

task_context: ContextVar[tuple[str, str] | None] = ContextVar("task_context", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def bind_task(task_id: str, plan_id: str) -> None:
    """Tag every log line of the current asyncio task with this task's ids."""
    task_context.set((task_id, plan_id))


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = {}
    bound = task_context.get()
    if bound is not None:
        fields["taskId"], fields["planId"] = bound
    fields.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        extras = " ".join(f"{key}={value}" for key, value in _fields(record).items())
        text = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            text = f"{text}  {extras}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


def configure(log_format: Literal["console", "json"], level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter (reconnect attempts, access lines) is ours to report, in our words.
    for noisy in ("aio_pika", "aiormq", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Each failed reconnect attempt is an ERROR there; the broker module reports it once, with
    # the URL and the next delay.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
