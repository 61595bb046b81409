"""A private three-node RabbitMQ cluster (tests/rabbit_cluster.py), started once per session on
first use and removed at its end, whole again after every test whatever the test did to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from tests.conftest import SESSION, free_port
from tests.rabbit_cluster import RabbitCluster


@pytest.fixture(scope="session")
def rabbit_cluster_session() -> Iterator[RabbitCluster]:
    cluster = RabbitCluster.create(
        f"agentless-{SESSION}", [(free_port(), free_port()) for _ in range(3)]
    )
    try:
        print(f"\nprivate 3-node RabbitMQ cluster started in {cluster.start():.1f} s")
        yield cluster
    finally:
        cluster.remove()


@pytest_asyncio.fixture
async def rabbit_cluster(rabbit_cluster_session: RabbitCluster) -> AsyncIterator[RabbitCluster]:
    """The cluster, whole (every node running, no partition, each seeing the three), for one
    test; whole again after it, so that a test that failed midway does not spoil the next."""
    await asyncio.to_thread(rabbit_cluster_session.restore)
    yield rabbit_cluster_session
    await asyncio.to_thread(rabbit_cluster_session.restore)
