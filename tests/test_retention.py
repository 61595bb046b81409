"""Retention: completed tasks, dead letters and the tombstones of purged tasks deleted past
AGENTLESS_RETENTION, one process at a time; a purged task answers 410 Gone, and runs again when
submitted again. Rows are made old by moving their times back, not by waiting."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel

from tests.conftest import Api, Events, Target, task_message
from tests.task_api import call
from worker.cli.exits import EXIT_NOT_SUCCEEDED
from worker.cli.task import cmd_task
from worker.contract.errors import ConfigError
from worker.contract.settings import Settings, load_settings
from worker.metrics import Metrics
from worker.purger import Purger
from worker.store.database import Store
from worker.store.retention import Purged

# Rows older than this are past the retention in these tests.
RETENTION = 1.0

_TASK = """
INSERT INTO tasks (task_id, plan_id, job_id, hub_name, mode, state, result, digest, message,
                   queued_at, completed_at, cancel_state)
VALUES ($1, 'p', 'j', 'h', 'apiResponse', $2, $3, '\\x00', '{}', now() - interval '1 hour',
        CASE WHEN $2 = 'completed' THEN now() - make_interval(secs => $4) END, $5)
"""


async def add_task(
    db: asyncpg.Connection,
    task_id: str,
    *,
    age: float = 60,
    state: str = "completed",
    event_pending: bool = False,
    cancel_state: str | None = None,
    log_lines: int = 0,
) -> None:
    """A task row (completed `age` seconds ago, by the database's clock) with its log lines."""
    result = "succeeded" if state == "completed" else None
    await db.execute(_TASK, task_id, state, result, age, cancel_state)
    if event_pending:
        await db.execute("INSERT INTO event_outbox (task_id) VALUES ($1)", task_id)
    await db.executemany(
        "INSERT INTO task_logs (task_id, line) VALUES ($1, $2)",
        [(task_id, f"line {n}") for n in range(log_lines)],
    )


@pytest_asyncio.fixture
async def store(settings: Settings, db: asyncpg.Connection) -> AsyncIterator[Store]:
    async with Store.open(settings.database_url, pool_size=2) as opened:
        yield opened


def purger(store: Store, metrics: Metrics | None = None, batch_rows: int = 2) -> Purger:
    return Purger(
        store, RETENTION, metrics=metrics or Metrics(), batch_rows=batch_rows, batch_pause=0
    )


# --- the setting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0),
        ("86400", 86400),
        ("90s", 90),
        ("30m", 1800),
        ("36h", 129_600),
        ("7d", 604_800),
        ("1.5d", 129_600),
        (" 2H ", 7200),
    ],
)
def test_retention_takes_seconds_or_a_number_with_a_unit(value: str, seconds: float) -> None:
    assert Settings.model_validate({"retention": value}).retention == seconds


def test_retention_is_seven_days_by_default() -> None:
    assert Settings().retention == 7 * 86400


@pytest.mark.parametrize("value", ["", "-1", "1.5", "7 days", "1w", "1e3", "d", "36501d"])
def test_a_bad_retention_stops_start_up_naming_the_setting(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("AGENTLESS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AGENTLESS_RETENTION", value)
    with pytest.raises(ConfigError, match=r"AGENTLESS_RETENTION: .*must be"):
        load_settings()


# --- the purge ----------------------------------------------------------------------------------


async def test_only_completed_tasks_past_the_retention_go_with_their_logs(
    store: Store, db: asyncpg.Connection
) -> None:
    for n in range(5):
        await add_task(db, f"old-{n}", log_lines=3)
    await add_task(db, "recent", age=0, log_lines=2)
    await add_task(db, "running", state="running")
    await add_task(db, "unannounced", event_pending=True)
    await add_task(db, "cancel-pending", cancel_state="pending")
    await add_task(db, "cancel-sent", cancel_state="done")
    await db.execute(
        "INSERT INTO dead_letters (reason, excerpt, at) VALUES "
        "('r', 'old', now() - interval '1 minute'), ('r', 'new', now())"
    )
    metrics = Metrics()

    # Batches of two: the round goes on until it finds less than a full batch.
    purged = await purger(store, metrics).purge_once()

    assert purged == {Purged.TASKS: 6, Purged.DEAD_LETTERS: 1, Purged.TOMBSTONES: 0}
    kept = {r["task_id"] for r in await db.fetch("SELECT task_id FROM tasks")}
    assert kept == {"recent", "running", "unannounced", "cancel-pending"}
    logs = await db.fetch("SELECT task_id, count(*) FROM task_logs GROUP BY task_id")
    assert {(r["task_id"], r["count"]) for r in logs} == {("recent", 2)}
    assert await db.fetchval("SELECT excerpt FROM dead_letters") == "new"
    assert metrics.registry.get_sample_value("agentless_purged_total", {"kind": "tasks"}) == 6
    gone = await db.fetchval("SELECT count(*) FROM purged_tasks")
    assert gone == 6

    # Once the event is published, the task goes at the next round.
    await db.execute("DELETE FROM event_outbox WHERE task_id = 'unannounced'")
    assert (await purger(store).purge_once())[Purged.TASKS] == 1


async def test_one_process_purges_at_a_time(store: Store, db: asyncpg.Connection) -> None:
    for n in range(20):
        await add_task(db, f"old-{n}")
    key = await db.fetchval("SELECT (x'70757267'::bigint << 32) | $1", store.lock_namespace)

    # Another process holds the purge lock: this one deletes nothing and leaves at once.
    async with db.transaction():
        assert await db.fetchval("SELECT pg_try_advisory_xact_lock($1)", key)
        skipped = await purger(store).purge_once()
        assert sum(skipped.values()) == 0
    assert await db.fetchval("SELECT count(*) FROM tasks") == 20

    # Two at once delete every row once between them.
    first, second = await asyncio.gather(purger(store).purge_once(), purger(store).purge_once())
    assert first[Purged.TASKS] + second[Purged.TASKS] == 20
    assert await db.fetchval("SELECT count(*) FROM tasks") == 0


async def test_tombstones_go_one_retention_after_their_task(
    store: Store, db: asyncpg.Connection
) -> None:
    await add_task(db, "old")
    await purger(store).purge_once()
    assert await store.retention.purged_completion("old") is not None

    await db.execute("UPDATE purged_tasks SET purged_at = now() - interval '1 minute'")
    assert (await purger(store).purge_once())[Purged.TOMBSTONES] == 1
    assert await store.retention.purged_completion("old") is None


async def test_the_duty_says_when_the_server_will_not_reuse_purged_space(
    store: Store, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await add_task(db, "old")
    duty = asyncio.create_task(purger(store).run())
    async with asyncio.timeout(10):
        while await db.fetchval("SELECT count(*) FROM tasks"):
            await asyncio.sleep(0.01)
    duty.cancel()
    await asyncio.gather(duty, return_exceptions=True)
    autovacuum = await db.fetchval("SELECT current_setting('autovacuum')::boolean")
    warned = any("without autovacuum" in record.message for record in caplog.records)
    assert warned is not autovacuum


async def test_the_tables_a_purge_deletes_from_are_vacuumed_at_the_hot_paths_pace(
    store: Store, db: asyncpg.Connection
) -> None:
    """Unthrottled and at 2% of their rows dead (0012): with the server's defaults, a vacuum of
    tasks took long enough, beside a worker at its peak, for dead rows to pile up and the
    table to grow long after retention set in (growth benchmark)."""
    tables = ["tasks", "task_logs", "purged_tasks"]
    rows = await db.fetch(
        "SELECT relname, reloptions FROM pg_class"
        " WHERE relnamespace = $1::regnamespace AND relname = ANY($2)",
        store.schema,
        tables,
    )
    paced = ("autovacuum_vacuum_cost_delay=0", "autovacuum_vacuum_scale_factor=0.02")
    assert {row["relname"]: tuple(sorted(row["reloptions"])) for row in rows} == dict.fromkeys(
        tables, paced
    )


# --- what the API and the command line say of a purged task --------------------------------------


async def test_a_purged_task_is_gone_and_runs_again_when_submitted_again(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    task = task_message(target, taskId="kept-then-gone")
    status, _, _ = await call("POST", f"{api.url}/tasks", task)
    assert status == 202
    first = await events.completed("kept-then-gone")
    await db.execute("UPDATE tasks SET completed_at = completed_at - interval '1 minute'")
    assert (await purger(api.worker.store).purge_once())[Purged.TASKS] == 1

    status, problem, headers = await call("GET", f"{api.url}/tasks/kept-then-gone")
    assert status == 410
    assert headers["Content-Type"] == "application/problem+json"
    completed_at = await db.fetchval("SELECT completed_at FROM purged_tasks")
    assert problem["completedAt"] == completed_at.isoformat().replace("+00:00", "Z")
    assert first["completedAt"] != problem["completedAt"]  # moved back a minute above
    assert "deleted after the retention period" in problem["detail"]
    assert problem["completedAt"] in problem["detail"]
    assert (await call("GET", f"{api.url}/tasks/kept-then-gone/logs"))[0] == 410
    assert (await call("GET", f"{api.url}/tasks/never-seen"))[0] == 404
    status, problem, _ = await call("POST", f"{api.url}/tasks/kept-then-gone/cancel")
    assert (status, problem["completedAt"]) == (
        409,
        completed_at.isoformat().replace("+00:00", "Z"),
    )

    # `agentless task`, run in a thread of this process (it runs a loop of its own).
    shown = argparse.Namespace(id="kept-then-gone", json=False)
    assert await asyncio.to_thread(cmd_task, api.settings, shown) == EXIT_NOT_SUCCEEDED
    said = capsys.readouterr().err
    assert "agentless: task 'kept-then-gone' completed at " in said
    assert "deleted after the retention period (AGENTLESS_RETENTION)" in said

    # The same task submitted again is a new task: it runs again, and its live row is shown.
    calls = target.calls["kept-then-gone"]
    status, _, _ = await call("POST", f"{api.url}/tasks", task)
    assert status == 202
    async with asyncio.timeout(10):
        while len(events.named("TaskCompleted", "kept-then-gone")) < 2:
            await asyncio.sleep(0.02)
    assert target.calls["kept-then-gone"] == calls + 1
    status, detail, _ = await call("GET", f"{api.url}/tasks/kept-then-gone")
    assert (status, detail["state"], detail["attempts"]) == (200, "completed", 1)
