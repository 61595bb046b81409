"""`agentless status`, `tasks` and `dead`: the queue, the tasks and the dead letters, as tables
or JSON."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from itertools import zip_longest

import orjson
from pydantic import JsonValue, TypeAdapter

from worker.amqp import BROKER_ERRORS
from worker.broker import Broker
from worker.cli import dead
from worker.cli.tables import Column, render
from worker.contract.errors import Unavailable, UsageError
from worker.contract.models import Names
from worker.contract.settings import Settings, redact_url
from worker.store.database import Store
from worker.text import duration
from worker.views import Dashboard, TaskSummary, dashboard

# How long `status` waits to learn whether RabbitMQ blocks publishes: it confirms at once if not.
BLOCKED_PROBE_SECONDS = 2.0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    board = asyncio.run(_dashboard(settings))
    if args.json:
        _print_json(board.queue.model_dump(mode="json", by_alias=True))
    else:
        print(_status_tables(board, board.generated_at))
    return 0


async def _dashboard(settings: Settings) -> Dashboard:
    async with (
        Store.open(settings.database_url, pool_size=2) as store,
        _broker(settings, "status") as broker,
    ):
        depths, overview = await broker.queue_depths(), await store.overview()
        # Last: the question may leave the connection blocked.
        depths = replace(depths, blocked=await broker.publishing_blocked(BLOCKED_PROBE_SECONDS))
        return dashboard(depths, overview, store.clock.now())


def _status_tables(board: Dashboard, now: datetime) -> str:
    queue = board.queue
    oldest = queue.oldest_waiting_age_seconds
    broker_side = [
        ("ready", str(queue.ready)),
        ("unacknowledged", str(queue.unacknowledged)),
        ("consumers", str(queue.consumers)),
        ("dead letters", str(queue.dead_letters)),
    ]
    database_side = [
        (state, _count(number, exact=state not in queue.estimated))
        for state, number in (
            ("queued", queue.queued),
            ("running", queue.running),
            ("waiting", queue.waiting),
            ("polling", queue.polling),
            ("completed", queue.completed),
        )
    ] + [
        ("oldest waiting", "-" if oldest is None else duration(oldest)),
        ("completed last minute", str(queue.completed_last_minute)),
    ]
    counts = render(
        [Column("QUEUE"), Column("", right=True), Column("TASKS"), Column("", right=True)],
        (
            (*left, *right)
            for left, right in zip_longest(broker_side, database_side, fillvalue=("", ""))
        ),
    )
    if queue.broker_blocked is not None:
        counts += (
            f"\n\nRabbitMQ is blocking publishes ({queue.broker_blocked}): tasks queued, "
            "started or completed wait until its resource alarm clears"
        )
    if not board.workers:
        return f"{counts}\n\nno live workers"
    workers = render(
        [
            Column("WORKER", right=True),
            Column("HOST"),
            Column("PID", right=True),
            Column("VERSION"),
            Column("IN FLIGHT", right=True),
            Column("STARTED", right=True),
            Column("LAST SEEN", right=True),
        ],
        (
            (
                str(w.worker_id),
                w.host,
                str(w.pid),
                w.version,
                str(w.in_flight),
                _ago(w.started_at, now),
                _ago(w.last_seen, now),
            )
            for w in board.workers
        ),
    )
    return f"{counts}\n\n{workers}"


def cmd_tasks(settings: Settings, args: argparse.Namespace) -> int:
    filters = {
        name: value
        for name, value in (
            ("state", args.state),
            ("result", args.result),
            ("planId", args.plan_id),
            ("hubName", args.hub),
        )
        if value is not None
    }
    summaries, total, exact, now = asyncio.run(
        _tasks(settings, filters, args.order, descending=not args.asc, limit=args.limit)
    )
    if args.json:
        print(_SUMMARIES.dump_json(summaries, by_alias=True, indent=2).decode())
        return 0
    if not summaries:
        print("no tasks match", file=sys.stderr)
        return 0
    print(
        render(
            [
                Column("TASK ID"),
                Column("STATE"),
                Column("RESULT"),
                Column("ATTEMPTS", right=True),
                Column("AGE", right=True),
                Column("REASON", squeeze=True),
            ],
            (
                (
                    t.task_id,
                    t.state,
                    t.result or "-",
                    str(t.attempts),
                    duration((now - t.queued_at).total_seconds()),
                    t.reason or "",
                )
                for t in summaries
            ),
            width=_terminal_width(),
        )
    )
    if total > len(summaries):
        print(
            f"{len(summaries)} of {_count(total, exact=exact)} tasks shown; --limit shows more",
            file=sys.stderr,
        )
    return 0


_SUMMARIES = TypeAdapter(list[TaskSummary])


async def _tasks(
    settings: Settings, filters: dict[str, str], order: str, *, descending: bool, limit: int
) -> tuple[list[TaskSummary], int, bool, datetime]:
    """The tasks, how many match (and whether exactly), and the time by the database's clock
    (their ages' now)."""
    async with Store.open(settings.database_url, pool_size=1) as store:
        listed = await store.list_tasks(
            filters, order, descending=descending, offset=0, limit=limit
        )
        now = store.clock.now()
    return [TaskSummary.of(record) for record in listed.tasks], listed.total, listed.exact, now


def _count(number: int, *, exact: bool) -> str:
    """A count, or an estimate marked as one (past 10,000 tasks, totals are estimated)."""
    return str(number) if exact else f"~{number}"


def cmd_dead_list(settings: Settings, args: argparse.Namespace) -> int:
    letters = asyncio.run(_dead_list(settings, args.limit))
    if args.json:
        print(_DEAD_LETTERS.dump_json(letters.shown, by_alias=True, indent=2).decode())
        return 0
    if not letters.shown:
        print(f"no dead letters in {Names(settings.prefix).dead}", file=sys.stderr)
        return 0
    print(_dead_table(letters.shown))
    if letters.total > len(letters.shown):
        print(
            f"{len(letters.shown)} of {letters.total} dead letters shown; --limit shows more",
            file=sys.stderr,
        )
    return 0


_DEAD_LETTERS = TypeAdapter(list[dead.DeadLetter])


async def _dead_list(settings: Settings, limit: int) -> dead.DeadLetters:
    async with _broker(settings, "dead list") as broker:
        return await dead.list_dead(broker, limit=limit)


def cmd_dead_requeue(settings: Settings, args: argparse.Namespace) -> int:
    if args.ids and args.all:
        raise UsageError("give the message ids to requeue or --all, not both")
    if not args.ids and not args.all:
        raise UsageError("give the message ids to requeue, or --all")
    requeued = asyncio.run(_dead_requeue(settings, None if args.all else args.ids))
    tasks_queue = Names(settings.prefix).tasks
    if requeued.moved:
        print(f"moved {len(requeued.moved)} dead letter(s) back to {tasks_queue}:")
        print(_dead_table(requeued.moved))
    elif not requeued.missing and requeued.refused is None:
        print("no dead letters to move", file=sys.stderr)
    if requeued.refused is not None:
        print(f"agentless: {requeued.refused}", file=sys.stderr)
        return 1
    if requeued.missing:
        print(
            f"agentless: no dead letter has the message id {', '.join(requeued.missing)}",
            file=sys.stderr,
        )
        return 1
    return 0


async def _dead_requeue(settings: Settings, ids: list[str] | None) -> dead.Requeued:
    async with _broker(settings, "dead requeue") as broker:
        return await dead.requeue(broker, ids)


def _dead_table(letters: list[dead.DeadLetter]) -> str:
    return render(
        [Column("MESSAGE ID"), Column("REASON", squeeze=True), Column("BODY", squeeze=True)],
        ((d.message_id or "-", d.reason, d.excerpt) for d in letters),
        width=_terminal_width(),
    )


@asynccontextmanager
async def _broker(settings: Settings, command: str) -> AsyncIterator[Broker]:
    """The project's broker connection, which declares the topology; a failure on the way is
    reported as the other commands report an unreachable broker."""
    names = Names(settings.prefix)
    async with Broker(settings.amqp_url, names, connection_name=f"agentless {command}") as broker:
        try:
            yield broker
        except BROKER_ERRORS as exc:
            why = str(exc) or type(exc).__name__
            raise Unavailable(
                f"RabbitMQ at {redact_url(settings.amqp_url)} failed: {why}; try again"
            ) from exc


def _terminal_width() -> int | None:
    """The width to fit tables to on a terminal; piped output keeps whole lines for grep."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _ago(then: datetime, now: datetime) -> str:
    return f"{duration((now - then).total_seconds())} ago"


def _print_json(value: JsonValue) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
