"""The database's clock as a process reads it: the offset from a reading, which reading to trust,
and the store's measurement of the real PostgreSQL's clock."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from worker.contract.clock import Clock, Sample, best
from worker.contract.settings import Settings
from worker.store.clock import follow
from worker.store.database import Store


@pytest.mark.parametrize(
    ("sample", "offset", "error"),
    [
        (Sample(sent=100.0, database=100.5, received=101.0), 0.0, 0.5),
        (Sample(sent=100.0, database=400.0, received=100.0), 300.0, 0.0),
        (Sample(sent=1000.0, database=700.1, received=1000.2), -300.0, 0.1),
    ],
)
def test_a_reading_gives_the_offset_and_how_far_to_trust_it(
    sample: Sample, offset: float, error: float
) -> None:
    assert (round(sample.offset, 6), round(sample.error, 6)) == (offset, error)


def test_the_reading_of_the_shortest_round_trip_is_trusted() -> None:
    slow = Sample(sent=0.0, database=305.0, received=10.0)
    quick = Sample(sent=20.0, database=320.0, received=20.002)
    assert best([slow, quick, slow]) == quick


def test_the_clock_reads_the_database_time_from_its_own_clock_and_the_offset() -> None:
    clock = Clock(local=lambda: 1_000_000.0)
    assert (clock.timestamp(), clock.error) == (1_000_000.0, float("inf"))
    clock.follow(Sample(sent=1_000_000.0, database=999_700.0, received=1_000_000.0))
    assert (clock.timestamp(), clock.now()) == (
        999_700.0,
        datetime.fromtimestamp(999_700.0, UTC),
    )


def test_a_busy_moment_does_not_spoil_a_good_reading() -> None:
    clock = Clock(local=lambda: 0.0)
    follow(clock, Sample(sent=0.0, database=300.0, received=0.002))
    follow(clock, Sample(sent=0.0, database=0.0, received=2.0))
    assert (clock.offset, clock.error) == (299.999, 0.001)
    # A reading good enough is followed, even if the last one was better: clocks get stepped.
    follow(clock, Sample(sent=0.0, database=5.01, received=0.02))
    assert (round(clock.offset, 6), round(clock.error, 6)) == (5.0, 0.01)


async def test_the_store_measures_the_database_clock_when_it_opens(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with Store.open(settings.database_url, pool_size=1) as store:
        database: datetime = await db.fetchval("SELECT clock_timestamp()")
        read = store.clock.now()
    # This machine and PostgreSQL share one clock: the offset is the measuring's own error.
    assert (abs(store.clock.offset) < 0.5, store.clock.error < 0.5) == (True, True)
    assert abs((read - database).total_seconds()) < 0.5
