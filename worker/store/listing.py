"""One page of a task list and how many tasks the list holds, at a cost that does not grow with
the table: the page is read off an index in its order (queries.list_tasks), and the total is
counted exactly only up to EXACT_UP_TO, past which it is the planner's estimate, and says so."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import orjson

from worker.contract.records import TaskSummaryRecord
from worker.store import queries
from worker.store.errors import Executor
from worker.store.rows import task_summary

# A list of up to this many tasks has an exact total; a longer one an estimate. Counting 10,000
# index entries takes a few milliseconds; counting a million takes a few hundred.
EXACT_UP_TO = 10_000


@dataclass(frozen=True, slots=True)
class TaskList:
    """A page of tasks, and how many tasks the whole list holds: exactly, or an estimate."""

    tasks: list[TaskSummaryRecord]
    total: int
    exact: bool


async def page(
    conn: Executor,
    filters: dict[str, str],
    order: str,
    *,
    descending: bool,
    offset: int,
    limit: int,
) -> TaskList:
    listing = queries.list_tasks(filters, order, descending)
    values = list(filters.values())
    counted: int | None = None
    if offset:
        # A deep page of a short list may lie past its end: the count (bounded) says so at once,
        # where reading the page would walk every matching row to find none.
        counted = await conn.fetchval(listing.count, *values, EXACT_UP_TO + 1)
        if counted <= EXACT_UP_TO and offset >= counted:
            return TaskList([], counted, exact=True)
    rows: list[asyncpg.Record] = []
    start = offset
    for index, part in enumerate(listing.parts):
        found = await conn.fetch(part, *values, start, limit - len(rows))
        rows.extend(found)
        if len(rows) == limit or index + 1 == len(listing.parts):
            break
        # The next part starts where this one ends: at its first row if this page reached this
        # part's last; else this part's rows all lie before the page, and are counted (no more
        # than the offset: the cost is that of the offset's rows, never of the whole table).
        if found:
            start = 0
        else:
            start -= await conn.fetchval(listing.part_counts[index], *values, start)
    tasks = [task_summary(row) for row in rows]
    if tasks and len(tasks) < limit:
        # The page holds the list's last task: the total is known without counting.
        return TaskList(tasks, offset + len(tasks), exact=True)
    if not tasks and offset == 0:
        return TaskList(tasks, 0, exact=True)
    if counted is None:
        counted = await conn.fetchval(listing.count, *values, EXACT_UP_TO + 1)
    if counted <= EXACT_UP_TO:
        return TaskList(tasks, counted, exact=True)
    if not tasks:
        # A page past the end of a long list: the total is below the offset, and counting up to
        # it says what it is (a range past the end is answered with the total).
        return TaskList(tasks, await conn.fetchval(listing.count, *values, offset), exact=True)
    guess = await estimate(conn, listing.estimate, values)
    return TaskList(tasks, max(guess, counted, offset + len(tasks)), exact=False)


async def estimate(conn: Executor, statement: str, values: list[str]) -> int:
    """How many rows the planner expects `statement` to return: its statistics scaled to the
    table's current size, at the cost of planning it."""
    plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *values)
    rows: float = orjson.loads(plan)[0]["Plan"]["Plan Rows"]
    return round(rows)
