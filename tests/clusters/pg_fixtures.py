"""A private PostgreSQL primary with a streaming replica (tests/pg_replica.py), started once per
session on first use and dropped at its end, and each test's settings on it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import SESSION, free_port, unique_name
from tests.pg_replica import ReplicatedPg, Replication
from worker.contract.settings import Settings


@pytest.fixture(scope="session")
def pg_pair() -> Iterator[ReplicatedPg]:
    began = time.monotonic()
    pair = ReplicatedPg.create(f"agentless_{SESSION}", (free_port(), free_port()))
    print(
        f"\nprivate PostgreSQL primary and streaming replica started in "
        f"{time.monotonic() - began:.1f} s"
    )
    try:
        yield pair
    finally:
        pair.drop()


@pytest.fixture
def replicated(pg_pair: ReplicatedPg, request: pytest.FixtureRequest) -> ReplicatedPg:
    """The pair, with a replica streaming in the mode the test is parametrized with (indirect:
    "async" or "sync"); a pair an earlier test failed over is rebuilt first."""
    mode: Replication = request.param
    began = time.monotonic()
    rebuilding = pg_pair.replica is None or not pg_pair.primary.running()
    pg_pair.heal()
    if rebuilding:
        print(f"\nreplica rebuilt from the promoted primary in {time.monotonic() - began:.1f} s")
    pg_pair.set_replication(mode)
    return pg_pair


@pytest.fixture
def replicated_settings(settings: Settings, replicated: ReplicatedPg) -> Settings:
    """The test's settings, on a schema of its own, through the pair's multi-host URL."""
    url = f"{replicated.url}&search_path={unique_name()}"
    return settings.model_copy(update={"database_url": url})
