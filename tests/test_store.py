"""The store against the real PostgreSQL, and the group commit beneath it."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from worker.contract.models import Outcome, Result
from worker.contract.records import TaskRecord
from worker.contract.settings import Settings
from worker.store import queries
from worker.store.batch import Batcher
from worker.store.changes import Claimed, ClaimRequest, PollStarted
from worker.store.database import Store
from worker.store.errors import TaskVanished
from worker.store.registry import registered_worker
from worker.store.schema import migrate, migrations


async def test_concurrent_start_ups_migrate_once(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async def start_up() -> str:
        async with Store.open(settings.database_url, pool_size=1) as store:
            return store.schema

    schemas = await asyncio.gather(*(start_up() for _ in range(8)))
    assert len(set(schemas)) == 1
    versions = await db.fetch("SELECT version FROM schema_migrations ORDER BY version")
    assert [v["version"] for v in versions] == [m.version for m in migrations()]


async def test_events_pending_before_the_outbox_move_into_it(
    settings: Settings, db: asyncpg.Connection
) -> None:
    # The schema as migration 0012 left it, with one event still to publish.
    await migrate(db, up_to=12)
    await db.execute(
        "INSERT INTO tasks (task_id, plan_id, job_id, hub_name, mode, state, digest, message, "
        "queued_at, completed_at, updated_at, event_pending) VALUES "
        "('told', 'p', 'j', 'h', 'callback', 'completed', '\\x00', '{}', now(), now(), now(), "
        "false), ('untold', 'p', 'j', 'h', 'callback', 'completed', '\\x00', '{}', now(), "
        "now(), now() - interval '1 minute', true)"
    )
    async with (
        Store.open(settings.database_url, pool_size=1) as store,
        store.pending_events(older_than=0) as records,
    ):
        assert [r.task_id for r in records] == ["untold"]
    assert await db.fetchval("SELECT count(*) FROM event_outbox") == 0


def claim_request(task_id: str, body: bytes = b"{}") -> ClaimRequest:
    return ClaimRequest(
        task_id=task_id,
        plan_id="p",
        job_id="p",
        hub_name="build",
        project_id=None,
        name=None,
        mode="apiResponse",
        digest=hashlib.sha256(body).digest(),
        message=body.decode(),
        queued_at=None,
        lease_seconds=60,
        reply_to=None,
        correlation_id=None,
    )


def poll_started(task_id: str, attempts: int = 1) -> PollStarted:
    """The attempt's start answered: its task polls every minute for an hour."""
    return PollStarted(
        task_id,
        attempts,
        response_json=None,
        timeout_seconds=3600,
        first_delay=60,
        poll_request_json='{"method": "GET", "url": "http://127.0.0.1:9/status"}',
        poll_secrets=None,
        outputs_json="{}",
    )


async def test_claim_then_complete_then_redelivery_sees_the_result(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with Store.open(settings.database_url) as store:
        claimed = await store.claim(claim_request("s-1"))
        assert isinstance(claimed, Claimed)
        assert claimed.attempts == 1
        completed_at = await store.complete("s-1", 1, Outcome(Result.SUCCEEDED, "HTTP 200"))
        assert not isinstance(completed_at, TaskRecord)
        again = await store.claim(claim_request("s-1"))
        assert isinstance(again, TaskRecord)
        assert (again.result, again.reason, again.completed_at) == (
            Result.SUCCEEDED,
            "HTTP 200",
            completed_at,
        )


async def test_a_superseded_attempt_cannot_record_its_result(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with Store.open(settings.database_url) as store:
        # Worker id 0 holds no lock, so the running attempt counts as abandoned.
        assert isinstance(await store.claim(claim_request("s-2")), Claimed)
        second = await store.claim(claim_request("s-2"))
        assert isinstance(second, Claimed)
        assert second.attempts == 2
        late = await store.complete("s-2", 1, Outcome(Result.FAILED, "late"))
        assert isinstance(late, TaskRecord)
        assert late.result is None
        assert not isinstance(
            await store.complete("s-2", 2, Outcome(Result.SUCCEEDED, "ok")), TaskRecord
        )


async def test_a_running_attempt_of_a_live_worker_is_not_claimed(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with (
        Store.open(settings.database_url) as store,
        registered_worker(store, settings.database_url, lambda: 0),
    ):
        assert isinstance(await store.claim(claim_request("s-3")), Claimed)
        busy = await store.claim(claim_request("s-3"))
        assert isinstance(busy, TaskRecord)
        assert busy.worker_alive


async def test_an_event_stays_in_the_outbox_until_published_without_waiting_for_the_disk(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with Store.open(settings.database_url) as store:
        assert isinstance(await store.claim(claim_request("e-1")), Claimed)
        assert (await store.cancel("e-1")) is not None
        assert await db.fetchval("SELECT count(*) FROM event_outbox WHERE task_id = 'e-1'") == 1
        await store.events_published(["e-1"])
        assert await db.fetchval("SELECT count(*) FROM event_outbox") == 0
    # The statement turns synchronous commit off for its own transaction, and only for it.
    await db.execute("INSERT INTO event_outbox (task_id) VALUES ('e-1')")
    async with db.transaction():
        await db.execute(queries.EVENTS_PUBLISHED, ["e-1"])
        assert await db.fetchval("SELECT current_setting('synchronous_commit')") == "off"
    assert await db.fetchval("SELECT current_setting('synchronous_commit')") == "on"
    assert await db.fetchval("SELECT count(*) FROM event_outbox") == 0


async def test_many_concurrent_claims_share_round_trips(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with Store.open(settings.database_url) as store:
        got = await asyncio.gather(*(store.claim(claim_request(f"m-{i}")) for i in range(300)))
        assert all(isinstance(g, Claimed) and g.attempts == 1 for g in got)
        # The same id twice in one burst: one statement must not touch a row twice.
        twice = await asyncio.gather(
            store.claim(claim_request("dup")), store.claim(claim_request("dup"))
        )
        assert sorted(isinstance(t, Claimed) for t in twice) == [False, True] or all(
            isinstance(t, Claimed) for t in twice
        )


async def test_batcher_groups_concurrent_items_and_isolates_a_bad_one() -> None:
    sizes: list[int] = []

    async def flush(items: list[int]) -> list[int]:
        sizes.append(len(items))
        await asyncio.sleep(0)
        if 13 in items:
            raise ValueError("13 is refused")
        return [i * 2 for i in items]

    batcher: Batcher[int, int] = Batcher(flush, key=lambda i: i, parallel=1)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 2 for i in range(10)]
    assert sizes[0] == 10

    outcomes = await asyncio.gather(
        *(batcher.submit(i) for i in range(10, 16)), return_exceptions=True
    )
    assert [o if not isinstance(o, Exception) else str(o) for o in outcomes] == [
        20,
        22,
        24,
        "13 is refused",
        28,
        30,
    ]


async def test_batcher_keeps_duplicate_keys_apart() -> None:
    batches: list[list[str]] = []

    async def flush(items: list[str]) -> list[str]:
        batches.append(items)
        return items

    batcher: Batcher[str, str] = Batcher(flush, key=lambda s: s, parallel=1)
    await asyncio.gather(*(batcher.submit(s) for s in ["a", "b", "a", "a"]))
    assert batches == [["a", "b"], ["a"], ["a"]]


async def test_batcher_stops_a_batch_short_of_its_weight() -> None:
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        return items

    batcher: Batcher[int, int] = Batcher(
        flush, key=lambda i: i, parallel=1, weigh=lambda i: i, max_weight=10
    )
    await asyncio.gather(*(batcher.submit(i) for i in [4, 5, 20, 1, 6]))
    # An item heavier than the whole allowance still goes, alone; a light one passes a heavy one.
    assert batches == [[4, 5, 1], [20], [6]]


@pytest.mark.parametrize(
    ("gather_turns", "turns", "sizes"),
    [
        (0, (0, 4, 8), [1, 1, 1]),
        # Callers a turn apart, as tasks woken one after another by their responses, join.
        (10, (0, 1, 2, 3), [4]),
        # A turn that brings no caller ends the gathering: a lone caller goes on its own.
        (10, (0, 4, 8), [1, 1, 1]),
        # However many keep coming, a batch gathers for no more than its turns.
        (2, tuple(range(8)), [4, 4]),
    ],
)
async def test_batcher_gathers_callers_while_they_keep_coming(
    gather_turns: int, turns: tuple[int, ...], sizes: list[int]
) -> None:
    flushed: list[int] = []

    async def flush(items: list[int]) -> list[int]:
        flushed.append(len(items))
        return items

    batcher: Batcher[int, int] = Batcher(flush, key=lambda i: i, gather_turns=gather_turns)

    async def submit_after(turns: int) -> int:
        for _ in range(turns):
            await asyncio.sleep(0)
        return await batcher.submit(turns)

    assert await asyncio.gather(*(submit_after(t) for t in turns)) == list(turns)
    assert flushed == sizes


@pytest.mark.parametrize(
    ("first", "overlapped"),
    [
        # A small batch in flight: the next caller's flush goes at once, beside it.
        (2, True),
        # A batch as large as the bound: the next caller waits for its commit, as under load.
        (3, False),
    ],
)
async def test_batcher_overlaps_a_second_flush_only_with_small_ones(
    first: int, overlapped: bool
) -> None:
    committed = asyncio.Event()
    flushing: list[list[int]] = []
    # How many flushes were in flight as each began, itself included.
    beside: list[int] = []
    running = 0

    async def flush(items: list[int]) -> list[int]:
        nonlocal running
        running += 1
        flushing.append(items)
        beside.append(running)
        try:
            if len(flushing) == 1:
                await committed.wait()
            return items
        finally:
            running -= 1

    batcher: Batcher[int, int] = Batcher(flush, key=lambda i: i, parallel=2, overlap_below=3)
    firsts = asyncio.gather(*(batcher.submit(i) for i in range(first)))
    while not flushing:
        await asyncio.sleep(0)
    late = asyncio.ensure_future(batcher.submit(99))
    for _ in range(5):
        await asyncio.sleep(0)
    assert late.done() is overlapped
    committed.set()
    assert await firsts == list(range(first))
    assert await late == 99
    assert flushing == [list(range(first)), [99]]
    assert beside == ([1, 2] if overlapped else [1, 1])
    # Once nothing is in flight, the next caller's flush goes alone again.
    assert await batcher.submit(7) == 7
    assert (flushing[-1], beside[-1]) == ([7], 1)


async def test_batcher_runs_every_pending_caller_whichever_flush_ends_first() -> None:
    """Callers that came while two flushes were in flight are taken by whichever ends first and
    may start again; none is left pending."""
    releases = [asyncio.Event(), asyncio.Event()]
    sizes: list[int] = []

    async def flush(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if len(sizes) <= 2:
            await releases[len(sizes) - 1].wait()
        return items

    batcher: Batcher[int, int] = Batcher(flush, key=lambda i: i, parallel=2, overlap_below=8)
    first = asyncio.ensure_future(batcher.submit(1))
    while len(sizes) < 1:
        await asyncio.sleep(0)
    second = asyncio.ensure_future(batcher.submit(2))
    while len(sizes) < 2:
        await asyncio.sleep(0)
    # Both flushes in flight: these wait for one of them.
    later = asyncio.gather(*(batcher.submit(i) for i in range(10, 14)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(sizes) == 2
    releases[1].set()
    assert await later == [10, 11, 12, 13]
    assert sizes == [1, 1, 4]
    assert not first.done()
    releases[0].set()
    assert (await first, await second) == (1, 2)


@pytest.mark.parametrize("parallel", [1, 3])
async def test_batcher_fails_every_caller_when_the_database_is_gone(parallel: int) -> None:
    async def flush(items: list[int]) -> list[int]:
        raise ConnectionRefusedError("gone")

    batcher: Batcher[int, int] = Batcher(
        flush, key=lambda i: i, parallel=parallel, isolate=lambda e: not isinstance(e, OSError)
    )
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(o, ConnectionRefusedError) for o in outcomes)


async def test_an_attempt_whose_row_vanished_is_told_so(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A promotion of a replica that had not received the claim (asynchronous replication)
    leaves an attempt running with no row: each of its writes says so, rather than failing
    with a bare KeyError, so that the runner can claim the task again and record."""
    async with Store.open(settings.database_url) as store:
        assert isinstance(await store.claim(claim_request("gone-1")), Claimed)
        await db.execute("DELETE FROM tasks WHERE task_id = 'gone-1'")
        with pytest.raises(TaskVanished, match="gone-1"):
            await store.complete("gone-1", 1, Outcome(Result.SUCCEEDED, "HTTP 200"))
        with pytest.raises(TaskVanished):
            await store.renew_lease("gone-1", 1, 60)
        with pytest.raises(TaskVanished):
            await store.retry("gone-1", 1, Outcome(Result.FAILED, "HTTP 503"), 5)
        with pytest.raises(TaskVanished):
            await store.wait("gone-1", 1, None, datetime.now(UTC) + timedelta(minutes=5), None)
        # Claimed again, the task has a row once more, and its attempt records.
        again = await store.claim(claim_request("gone-1"))
        assert isinstance(again, Claimed)
        done = await store.complete("gone-1", again.attempts, Outcome(Result.SUCCEEDED, "ok"))
        assert not isinstance(done, TaskRecord)


async def test_writes_a_failover_lost_are_recorded_again(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """Asynchronous replication loses a promoted primary's last commits: a result, a wait and a
    poll's start the worker recorded (and acknowledged) come back as `running`. Recorded again
    once the worker holds its lock on the new primary; on a database that lost nothing, nothing
    changes."""
    async with (
        Store.open(settings.database_url) as store,
        registered_worker(store, settings.database_url, lambda: 0),
    ):
        for task_id in ("lost-1", "lost-2", "lost-3", "kept-1"):
            assert isinstance(await store.claim(claim_request(task_id)), Claimed)
        await store.complete("lost-1", 1, Outcome(Result.SUCCEEDED, "HTTP 200"))
        await store.complete("kept-1", 1, Outcome(Result.FAILED, "HTTP 500"))
        deadline = datetime.now(UTC) + timedelta(minutes=5)
        assert await store.wait("lost-2", 1, None, deadline, None) is None
        assert await store.start_polling(poll_started("lost-3")) is None
        assert await store.write_recent_again() == 0

        # The promotion: the replica had the claims, not what came after them.
        await db.execute(
            "UPDATE tasks SET state = 'running', result = NULL, reason = NULL, deadline = NULL,"
            " completed_at = NULL, next_poll_at = NULL, poll_request = NULL"
            " WHERE task_id IN ('lost-1', 'lost-2', 'lost-3')"
        )
        assert await store.write_recent_again() == 3
        rows = {
            r["task_id"]: (r["state"], r["result"], r["deadline"])
            for r in await db.fetch("SELECT task_id, state, result, deadline FROM tasks")
        }
        assert rows["lost-1"] == ("completed", "succeeded", None)
        assert rows["lost-2"] == ("waiting", None, deadline)
        assert rows["lost-3"][:2] == ("polling", None)
        assert rows["kept-1"][:2] == ("completed", "failed")


async def _seq_scans_of_tasks(store: Store, db: asyncpg.Connection) -> int:
    # A backend reports its table statistics when idle, at most once a second unless asked.
    async with store._pool.acquire() as conn:
        await conn.execute("SELECT pg_stat_force_next_flush()")
    await asyncio.sleep(0.05)
    scans: int = await db.fetchval(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'tasks'::regclass"
    )
    return scans


async def test_the_hot_path_keeps_to_its_indexes_once_the_table_has_grown(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """Plans made while the tasks table was nearly empty, and cached (a statement goes generic
    after five executions), must not read the whole table once it holds thousands of tasks:
    with autovacuum off, or before it first runs, nothing makes the planner look again."""
    async with (
        Store.open(settings.database_url, pool_size=1) as store,
        registered_worker(store, settings.database_url, lambda: 0),
    ):

        async def run(prefix: str, count: int) -> None:
            for i in range(count):
                task_id = f"{prefix}-{i}"
                assert isinstance(await store.claim(claim_request(task_id)), Claimed)
                await store.complete(task_id, 1, Outcome(Result.SUCCEEDED, "HTTP 200"))
                await store.complete_by_callback(task_id, "p", Result.SUCCEEDED, "late")

        await run("small", 8)
        await db.execute(
            """INSERT INTO tasks (task_id, plan_id, job_id, hub_name, mode, state, attempts,
                                  digest, message, queued_at, started_at, completed_at, result)
               SELECT 'grown-' || i, 'p', 'p', 'build', 'apiResponse', 'completed', 1,
                      '\\x00', '{}', now(), now(), now(), 'succeeded'
               FROM generate_series(1, 5000) AS i"""
        )
        before = await _seq_scans_of_tasks(store, db)
        await run("large", 20)
        assert await _seq_scans_of_tasks(store, db) == before
