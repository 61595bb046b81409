"""What the queue page, `agentless status` and the metrics read of the whole deployment, each in
one statement: every round trip waits for a busy database's turn, and these are read at every
refresh and scrape.

Tasks are counted by state as a listing counts its total (listing.py): exactly up to
EXACT_UP_TO, past which the count is the planner's estimate, and says so. The states are spelled
out in each statement (never a parameter), so that each count reads its state's partial index:
the running tasks' own, or the order index on state that holds every other task (0009).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import orjson

from worker.contract.models import Mode, Result, State
from worker.contract.records import (
    ClusterState,
    DeadLetterRecord,
    Overview,
    TaskSummaryRecord,
    WorkerRecord,
)
from worker.store import queries
from worker.store.errors import Executor
from worker.store.listing import EXACT_UP_TO

STATES = ("queued", "running", "waiting", "polling", "completed")
UNFINISHED_STATES = STATES[:-1]
# A waiting or polling task is overdue once its deadline has passed by more than a sweep takes.
_OVERDUE = "deadline < now() - interval '30 seconds'"


def _in_state(state: str) -> str:
    return f"SELECT 1 FROM tasks t WHERE t.state = '{state}'"


def _overdue(state: str) -> str:
    return f"SELECT 1 FROM tasks t WHERE t.state = '{state}' AND t.{_OVERDUE}"


def _capped(select: str) -> str:
    """How many rows `select` returns, up to $1 (EXACT_UP_TO + 1)."""
    return f"(SELECT count(*) FROM ({select} LIMIT $1) AS capped)"


def _rows(select: str, record: type[Any]) -> str:
    """`select`'s rows as an array of anonymous records, each holding `record`'s fields in
    order (asyncpg returns each as a tuple): many lists, one round trip."""
    columns = ", ".join(f"r.{field.name}" for field in fields(record))
    return f"ARRAY(SELECT ROW({columns}) FROM ({select}) AS r)"


def _summary(values: tuple[Any, ...]) -> TaskSummaryRecord:
    """A summary from its fields' values in order, as _rows selected them."""
    named = dict(zip((field.name for field in fields(TaskSummaryRecord)), values, strict=True))
    result = named["result"]
    return TaskSummaryRecord(
        **{
            **named,
            "mode": Mode(named["mode"]),
            "state": State(named["state"]),
            "result": Result(result) if result else None,
        }
    )


# The oldest few of each unfinished state, each read off its index in queue order, then the
# oldest of those ($2 of them).
_UNFINISHED = "\nUNION ALL ".join(
    f"(SELECT {queries.SUMMARY} FROM tasks t WHERE t.state = '{state}' "
    "ORDER BY t.queued_at LIMIT $2)"
    for state in ("running", "waiting", "polling")
)
_UNFINISHED_OLDEST = f"SELECT * FROM ({_UNFINISHED}) AS u ORDER BY u.queued_at, u.task_id LIMIT $2"
_RECENT_FAILURES = f"""SELECT {queries.SUMMARY} FROM tasks t WHERE t.result = 'failed'
    ORDER BY t.completed_at DESC LIMIT $2"""
_LIVE_WORKERS = """SELECT * FROM workers WHERE last_seen > now() - interval '30 seconds'
    ORDER BY started_at"""
_RECENT_DEAD_LETTERS = "SELECT * FROM dead_letters ORDER BY at DESC LIMIT $2"


def _oldest_waiting(states: str) -> str:
    """Since when the longest-waiting task in these states has waited: by the index on
    waiting_since, and, for tasks that began to wait before migration 0006 stamped the time, by
    their attempt's start (an index of its own holds those, migration 0008)."""
    return f"""least(
        (SELECT min(waiting_since) FROM tasks WHERE state IN {states}),
        (SELECT min(started_at) FROM tasks
         WHERE state IN {states} AND waiting_since IS NULL))"""


# $1: the count's cap; $2: how many tasks, failures and dead letters each list shows.
OVERVIEW = f"""
SELECT
    {", ".join(f"{_capped(_in_state(state))} AS {state}" for state in STATES)},
    {_oldest_waiting("('waiting')")} AS oldest_waiting_since,
    (SELECT count(*) FROM tasks WHERE completed_at > now() - interval '60 seconds')
        AS completed_last_minute,
    {_rows(_UNFINISHED_OLDEST, TaskSummaryRecord)} AS unfinished,
    {_rows(_RECENT_FAILURES, TaskSummaryRecord)} AS failures,
    {_rows(_LIVE_WORKERS, WorkerRecord)} AS workers,
    {_rows(_RECENT_DEAD_LETTERS, DeadLetterRecord)} AS dead_letters
"""

# What the metrics export, $1 the count's cap. Only unfinished tasks are counted by state, never
# the completed ones, which grow without bound.
CLUSTER_STATE = f"""
SELECT
    {", ".join(f"{_capped(_in_state(state))} AS {state}" for state in UNFINISHED_STATES)},
    {_capped(f"{_overdue('waiting')} UNION ALL {_overdue('polling')}")} AS overdue,
    (SELECT min(queued_at) FROM tasks WHERE state = 'queued') AS oldest_queued_at,
    {_oldest_waiting("('waiting', 'polling')")} AS oldest_waiting_since,
    (SELECT count(*) FROM workers WHERE last_seen > now() - interval '30 seconds') AS workers
"""


async def overview(conn: Executor, limit: int) -> Overview:
    """What the queue page and `agentless status` show from the database."""
    row = await conn.fetchrow(OVERVIEW, EXACT_UP_TO + 1, limit)
    assert row is not None
    counts, estimated = await _estimated_past_cap(
        conn, {state: (row[state], _in_state(state)) for state in STATES}
    )
    return Overview(
        states=counts,
        estimated=estimated,
        oldest_waiting_since=row["oldest_waiting_since"],
        completed_last_minute=row["completed_last_minute"],
        unfinished=[_summary(values) for values in row["unfinished"]],
        failures=[_summary(values) for values in row["failures"]],
        workers=[WorkerRecord(*values) for values in row["workers"]],
        dead_letters=[DeadLetterRecord(*values) for values in row["dead_letters"]],
    )


async def cluster_state(conn: Executor) -> ClusterState:
    """What the metrics export of the whole deployment (metrics.ClusterGauges)."""
    row = await conn.fetchrow(CLUSTER_STATE, EXACT_UP_TO + 1)
    assert row is not None
    counted = {state: (row[state], _in_state(state)) for state in UNFINISHED_STATES}
    # Estimated as one scan: a union in the plan of all the estimates would merge into it.
    counted["overdue"] = (
        row["overdue"],
        f"SELECT 1 FROM tasks t WHERE t.state IN ('waiting', 'polling') AND t.{_OVERDUE}",
    )
    counts, _ = await _estimated_past_cap(conn, counted)
    overdue = counts.pop("overdue")
    return ClusterState(
        states=counts,
        oldest_queued_at=row["oldest_queued_at"],
        oldest_waiting_since=row["oldest_waiting_since"],
        overdue=overdue,
        workers=row["workers"],
    )


async def _estimated_past_cap(
    conn: Executor, counted: dict[str, tuple[int, str]]
) -> tuple[dict[str, int], frozenset[str]]:
    """Each count as counted, or, past EXACT_UP_TO, the planner's estimate of its statement
    (never below what was counted): all of those planned at once, in one round trip."""
    over = {name: select for name, (n, select) in counted.items() if n > EXACT_UP_TO}
    counts = {name: n for name, (n, _) in counted.items()}
    if over:
        guesses = await estimates(conn, list(over.values()))
        for name, guess in zip(over, guesses, strict=True):
            counts[name] = max(guess, counts[name])
    return counts, frozenset(over)


async def estimates(conn: Executor, selects: list[str]) -> list[int]:
    """How many rows the planner expects each of `selects` to return, from one plan of them all
    (an Append of their scans, one child each)."""
    union = " UNION ALL ".join(f"({select})" for select in selects)
    plan = orjson.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {union}"))[0]["Plan"]
    children = plan["Plans"] if len(selects) > 1 else [plan]
    assert len(children) == len(selects), plan
    return [round(child["Plan Rows"]) for child in children]
