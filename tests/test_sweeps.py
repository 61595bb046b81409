"""Sweeping deadlines at scale. The sweep's plan on a table full of tasks whose deadlines have
passed: plain index scans in each deadline's order, which stop at the limit and mark the entries of
completed tasks dead for the next sweep; never a bitmap scan, which marks nothing and so reads
every task that completed since the last vacuum, at every sweep. And a burst of deadlines is swept
without waiting an interval per statement."""

from __future__ import annotations

import asyncio

import asyncpg

from worker.service import Worker
from worker.store import queries
from worker.store.schema import migrate
from worker.sweeper import SWEEP_INTERVAL, SWEEP_LIMIT

TASKS = 5_000
DUE = 10


async def seed_swept(db: asyncpg.Connection) -> None:
    """As a sweep leaves the table before a vacuum, with many tasks waiting: as many completed
    since their deadlines passed, and a few due."""
    await migrate(db)
    await db.execute("ALTER TABLE tasks SET (autovacuum_enabled = off)")
    # Task i's deadline is i seconds from now: the first half past, the second to come.
    await db.execute(
        """INSERT INTO tasks (task_id, plan_id, job_id, hub_name, mode, state, digest, message,
                              queued_at, started_at, deadline, started_deadline)
           SELECT 'swept-' || lpad(i::text, 6, '0'), 'plan', 'job', 'build', 'callback',
                  'waiting', '\\x00', '{"request": {}}', now() - interval '1 hour',
                  now() - interval '1 hour', now() + make_interval(secs => i),
                  now() + make_interval(secs => i)
           FROM generate_series(-$1::int, $1::int) AS i""",
        TASKS,
    )
    await db.execute(
        "UPDATE tasks SET state = 'completed', result = 'failed', completed_at = now()"
        " WHERE deadline < now() - make_interval(secs => $1)",
        DUE,
    )


async def test_the_sweep_scans_each_deadline_index_in_order(db: asyncpg.Connection) -> None:
    await seed_swept(db)
    # Without statistics first (autovacuum off, the table never analyzed), then with them; the
    # store prepares its statements, and after five runs PostgreSQL may keep a generic plan.
    for analyzed in (False, True):
        if analyzed:
            await db.execute("ANALYZE tasks")
        for cache_mode in ("force_custom_plan", "force_generic_plan"):
            async with db.transaction():
                await db.execute(queries.SWEEP_PLAN)
                await db.execute(f"SET LOCAL plan_cache_mode = {cache_mode}")
                explained = await db.fetch(f"EXPLAIN {queries.SWEEP}", 100)
            plan = "\n".join(row[0] for row in explained)
            assert "Bitmap" not in plan, plan
            for index in ("waiting_deadline", "started_deadline", "polling_deadline"):
                assert f"Index Scan using tasks_{index}" in plan, plan


BURST = 1_000


async def test_a_burst_of_deadlines_is_swept_at_once(
    worker: Worker, db: asyncpg.Connection
) -> None:
    """More tasks due at once than one sweep's statement takes are timed out by sweeps that follow
    one another at once, not one per interval (which would take 5 s for these)."""
    await db.execute(
        """INSERT INTO tasks (task_id, plan_id, job_id, hub_name, mode, state, digest, message,
                              queued_at, started_at, deadline)
           SELECT 'burst-' || lpad(i::text, 6, '0'), 'plan', 'job', 'build', 'callback',
                  'waiting', '\\x00', '{"request": {}}', now(), now(), now() + interval '1 s'
           FROM generate_series(1, $1) AS i""",
        BURST,
    )
    async with asyncio.timeout(10):
        while await db.fetchval("SELECT count(*) FROM tasks WHERE state = 'waiting'"):
            await asyncio.sleep(0.1)
    late = await db.fetchval(
        "SELECT extract(epoch FROM max(completed_at - deadline))::float8 FROM tasks"
        " WHERE completed_by = 'timeout'"
    )
    assert late < BURST / SWEEP_LIMIT * SWEEP_INTERVAL / 2
