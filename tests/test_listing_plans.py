"""The listing's plans on a full table: every order and the common filters of GET /tasks, and the
queue's statements, read an index in their order and never scan or sort the whole table; and the
lists they make are whole (no task twice, none missing) across pages and parts."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson

from worker.store import listing, overview, queries
from worker.store.database import SESSION_SETTINGS
from worker.store.schema import migrate

COMPLETED = 36_000
WAITING = 4_000
PAGE = 50
DEEP = 10_000

# Completed tasks of mixed results, hubs and five-task plans (but for one long-lived plan that
# holds a third of them), and waiting callback tasks, as a busy installation has them (bodies
# left small: the plans depend on the rows' number).
SEED = """
INSERT INTO tasks (task_id, plan_id, job_id, hub_name, name, mode, state, result, attempts,
                   digest, message, queued_at, started_at, completed_at, waiting_since)
SELECT 't-' || lpad(i::text, 6, '0'),
       CASE WHEN i % 3 = 2 THEN 'Nightly' ELSE 'Plan-' || (i / 5) END, 'job',
       (ARRAY['build', 'Release', 'deploy', 'test'])[1 + i % 4],
       CASE WHEN i % 9 = 0 THEN NULL ELSE 'step ' || (i % 97) END,
       CASE WHEN i > $1::int THEN 'callback' ELSE 'apiResponse' END,
       CASE WHEN i > $1::int THEN 'waiting' ELSE 'completed' END,
       CASE WHEN i > $1::int THEN NULL WHEN i % 10 = 0 THEN 'failed'
            WHEN i % 50 = 1 THEN 'canceled' ELSE 'succeeded' END,
       1 + i % 3, '\\x00', '{}',
       at, at + interval '1 s',
       CASE WHEN i <= $1::int THEN at + interval '2 s' END,
       CASE WHEN i > $1::int THEN at + interval '1 s' END
FROM generate_series(1, $1::int + $2::int) AS i,
     LATERAL (SELECT now() - make_interval(secs => ($1::int + $2::int - i) * 10) AS at) AS a
"""


async def test_plans_and_totals_on_a_full_table(db: asyncpg.Connection) -> None:
    """One table filled once (the filling is most of the time): the plans, then the totals."""
    await migrate(db)
    await db.execute(SEED, COMPLETED, WAITING)
    # As autovacuum leaves a table that has settled: statistics, and a visibility map that lets
    # an index-only scan skip the rows before a deep page without reading them.
    await db.execute("VACUUM ANALYZE tasks")
    await db.execute("VACUUM ANALYZE workers")
    # Planned as the store's own sessions plan them.
    for name, value in SESSION_SETTINGS.items():
        await db.execute(f"SET {name} = {value}")
    await every_order_and_filter_reads_an_index_in_its_order(db)
    await the_queue_reads_the_unfinished_tasks_alone(db)
    await totals_past_ten_thousand_are_estimates(db)


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


async def plan_of(db: asyncpg.Connection, statement: str, *args: object) -> list[dict[str, Any]]:
    explained = await db.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *args)
    return list(nodes(orjson.loads(explained)[0]["Plan"]))


def assert_indexed(
    plan: list[dict[str, Any]], what: str, *, most_sorted: int = PAGE, most_read: int | None = None
) -> None:
    """No full scan of tasks, and nothing sorted but the page itself; a bitmap scan, which reads
    its rows in the table's order rather than the list's, only where at most `most_read` rows
    are counted."""
    shown = [
        (n["Node Type"], n.get("Index Name") or n.get("Relation Name"), n["Plan Rows"])
        for n in plan
    ]
    for node in plan:
        # The workers table holds a row a process: read whole.
        full_scan = node["Node Type"] == "Seq Scan" and node["Relation Name"] == "tasks"
        assert not full_scan, (what, shown)
        if node["Node Type"] == "Bitmap Heap Scan":
            assert most_read is not None, (what, shown)
            assert node["Plan Rows"] <= most_read, (what, shown)
        if node["Node Type"] in ("Sort", "Incremental Sort"):
            assert node["Plan Rows"] <= most_sorted, (what, shown)
    assert any("Index" in n["Node Type"] for n in plan), (what, shown)


LISTINGS = [
    *(({}, order, descending) for order in queries.ORDER_COLUMNS for descending in (True, False)),
    ({"state": "waiting"}, "queuedAt", True),
    ({"state": "waiting"}, "completedAt", True),
    ({"state": "completed"}, "queuedAt", True),
    ({"state": "completed"}, "completedAt", True),
    ({"result": "succeeded"}, "queuedAt", True),
    ({"result": "succeeded"}, "completedAt", True),
    ({"result": "failed"}, "completedAt", True),
    ({"planId": "plan-77"}, "queuedAt", True),
    ({"planId": "plan-77"}, "completedAt", True),
    ({"planId": "nightly"}, "queuedAt", True),
    ({"planId": "nightly"}, "completedAt", True),
    ({"planId": "nightly"}, "completedAt", False),
    ({"hubName": "RELEASE"}, "queuedAt", True),
    ({"hubName": "RELEASE"}, "completedAt", True),
    ({"state": "completed", "result": "failed"}, "completedAt", True),
    ({"hubName": "release", "result": "failed"}, "queuedAt", True),
    ({"hubName": "release", "result": "failed"}, "completedAt", True),
]


async def all_visible(db: asyncpg.Connection) -> bool:
    """Whether VACUUM marked the table's pages all-visible, which an index-only scan needs to
    skip rows unread: it cannot while another session's snapshot predates them (the other test
    process's long transaction, say), and the planner then rightly reads the rows instead."""
    marked: bool = await db.fetchval(
        "SELECT relallvisible >= relpages FROM pg_class WHERE oid = 'tasks'::regclass"
    )
    return marked


async def every_order_and_filter_reads_an_index_in_its_order(full: asyncpg.Connection) -> None:
    visible = await all_visible(full)
    for filters, order, descending in LISTINGS:
        statements = queries.list_tasks(filters, order, descending)
        values = list(filters.values())
        what = f"{filters} by {order} {'desc' if descending else 'asc'}"
        # A deep page of a list shorter than its offset is never read: the count says it is
        # empty (listing.page).
        longer = await full.fetchval(statements.count, *values, DEEP + 1) > DEEP
        for offset in (0, DEEP) if longer else (0,):
            # The first part is the one a page of the first 10,050 tasks reads.
            plan = await plan_of(full, statements.parts[0], *values, offset, PAGE)
            # A plan of few tasks may be read off its index with a bitmap and sorted, as
            # ANALYZE's sample may make the planner prefer for so few rows; a long one is read
            # in its order (0011).
            by_plan = filters.get("planId") == "plan-77" and order == "completedAt"
            few = 500 if by_plan else None
            if offset and filters and not visible:
                # Without the visibility map, each entry before a deep page costs its row: a
                # filtered list's rows may rightly be read with a bitmap, in the table's order,
                # and sorted (this table is small). Never the whole table, though.
                few = COMPLETED + WAITING
            assert_indexed(
                plan,
                f"{what} from {offset}",
                most_sorted=few or PAGE,
                most_read=few,
            )
        if longer and (not filters or set(filters) == {"state"}) and visible:
            # Past the offset, the rows are skipped in the index alone.
            plan = await plan_of(full, statements.parts[0], *values, DEEP, PAGE)
            assert any(n["Node Type"] == "Index Only Scan" for n in plan), what
        for count in (statements.count, *statements.part_counts):
            # Counting stops at the cap, whatever it reads (a table's first pages may do).
            plan = await plan_of(full, count, *values, listing.EXACT_UP_TO + 1)
            assert [n["Node Type"] for n in plan[:2]] == ["Aggregate", "Limit"], (what, plan)
            assert not any("Sort" in n["Node Type"] for n in plan), (what, plan)
    # A hub's tasks of one result are counted off their own index (0011), not off the result's,
    # which would read every task of that result to tell the hub's apart.
    pair = queries.list_tasks({"hubName": "build", "result": "failed"}, "queuedAt", True)
    plan = await plan_of(full, pair.count, "build", "failed", listing.EXACT_UP_TO + 1)
    assert "tasks_hub_result_order" in {n.get("Index Name") for n in plan}, plan


async def the_queue_reads_the_unfinished_tasks_alone(full: asyncpg.Connection) -> None:
    for name, statement, args in [
        ("OVERVIEW", overview.OVERVIEW, (listing.EXACT_UP_TO + 1, 20)),
        ("CLUSTER_STATE", overview.CLUSTER_STATE, (listing.EXACT_UP_TO + 1,)),
    ]:
        # Three states' oldest 20 each are sorted: no more. A count may read the table's first
        # pages rather than an index (most of this one's tasks are completed), never past its
        # cap: a scan right under a Limit (the plan's nodes are in pre-order).
        explained = orjson.loads(await full.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *args))
        # Never compiled (JIT): a scan with no index to take counts as prohibitive, past the
        # cost at which PostgreSQL compiles a statement, at every execution.
        assert "JIT" not in explained[0], name
        plan = list(nodes(explained[0]["Plan"]))
        capped = [
            node
            for above, node in itertools.pairwise(plan)
            if above["Node Type"] == "Limit" and node["Node Type"] == "Seq Scan"
        ]
        assert all(node["Plan Rows"] > listing.EXACT_UP_TO for node in capped), (name, capped)
        assert_indexed(
            [node for node in plan if node not in capped], name, most_sorted=60, most_read=WAITING
        )
    board = await overview.overview(full, 20)
    assert board.states["completed"] >= listing.EXACT_UP_TO
    assert board.estimated == {"completed"}
    assert board.states["waiting"] == WAITING
    assert len(board.unfinished) == len(board.failures) == 20
    state = await overview.cluster_state(full)
    assert (state.states, state.overdue) == (
        {"queued": 0, "running": 0, "waiting": WAITING, "polling": 0},
        0,
    )


async def test_pages_make_the_whole_list_across_parts(db: asyncpg.Connection) -> None:
    """Completed tasks, then unfinished ones (no completion time: last in either direction),
    every task once, whichever page size reads them; the running tasks, which the order indexes
    leave out, merged into each order where they belong."""
    await migrate(db)
    await db.execute(SEED, 90, 30)
    await db.execute(
        """UPDATE tasks SET state = 'running', result = NULL, completed_at = NULL,
               started_at = queued_at + interval '1 s'
           WHERE task_id IN (SELECT task_id FROM tasks ORDER BY task_id OFFSET 40 LIMIT 60)
             AND task_id::text ~ '[37]$'"""
    )
    expected = await db.fetchval("SELECT count(*) FROM tasks")
    for order, key in [
        ("completedAt", "completed_at"),
        ("result", "result"),
        ("name", "name"),
        ("planId", "lower(plan_id)"),
        ("queuedAt", "queued_at"),
        ("state", "state"),
        ("attempts", "attempts"),
    ]:
        for descending in (True, False):
            seen: list[str] = []
            offset = 0
            while True:
                page = await listing.page(
                    db, {}, order, descending=descending, offset=offset, limit=7
                )
                assert (page.total, page.exact) == (expected, True)
                seen += [task.task_id for task in page.tasks]
                if len(page.tasks) < 7:
                    break
                offset += 7
            direction = "DESC" if descending else "ASC"
            # The order as one sort of the whole table gives it: empty values last.
            whole = await db.fetch(
                f"""SELECT task_id FROM tasks ORDER BY {key} {direction} NULLS LAST,
                    queued_at {direction}, task_id {direction}"""
            )
            assert seen == [row["task_id"] for row in whole], (order, direction)
    running = await listing.page(
        db, {"state": "running"}, "queuedAt", descending=True, offset=0, limit=50
    )
    assert running.total == await db.fetchval("SELECT count(*) FROM tasks WHERE state = 'running'")
    assert 0 < running.total < 50
    assert {task.state for task in running.tasks} == {"running"}
    # A page past the end of the list is empty, with the exact total.
    past = await listing.page(db, {}, "queuedAt", descending=True, offset=500, limit=7)
    assert (past.tasks, past.total, past.exact) == ([], expected, True)


async def totals_past_ten_thousand_are_estimates(full: asyncpg.Connection) -> None:
    many = await listing.page(full, {}, "queuedAt", descending=True, offset=0, limit=PAGE)
    assert not many.exact
    assert abs(many.total - (COMPLETED + WAITING)) < (COMPLETED + WAITING) / 10
    few = await listing.page(
        full, {"state": "waiting"}, "queuedAt", descending=True, offset=DEEP, limit=PAGE
    )
    assert (few.tasks, few.total, few.exact) == ([], WAITING, True)
    waiting = await listing.page(
        full, {"state": "waiting"}, "completedAt", descending=True, offset=0, limit=PAGE
    )
    assert (len(waiting.tasks), waiting.total, waiting.exact) == (PAGE, WAITING, True)
