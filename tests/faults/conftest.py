"""A private RabbitMQ node and a private PostgreSQL cluster for the fault tests that hurt the
broker or the database server itself (alarms, kill -9, restarts): each started once per session,
on first use, and removed at the end; the machine's own, which other tests use meanwhile, are
never touched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from tests.conftest import SESSION, free_port, unique_name
from tests.faults.outages import Service, served
from tests.pg_cluster import PgCluster
from tests.rabbit_node import RabbitNode
from worker.contract.settings import Settings


@pytest.fixture(scope="session")
def rabbit_node() -> Iterator[RabbitNode]:
    node = RabbitNode.create(f"agentless-{SESSION}", free_port(), free_port())
    try:
        print(f"\nprivate RabbitMQ node {node.name} started in {node.start():.1f} s")
        yield node
    finally:
        node.remove()


@pytest_asyncio.fixture
async def private_rabbit(rabbit_node: RabbitNode) -> AsyncIterator[RabbitNode]:
    """The private node, running, its alarms cleared, for one test; left that way after it, so
    that a test that failed midway does not spoil the next."""
    await asyncio.to_thread(_serving, rabbit_node)
    yield rabbit_node
    await asyncio.to_thread(_serving, rabbit_node)


def _serving(node: RabbitNode) -> None:
    if not node.running():
        node.start()
    node.set_memory_alarm(on=False)


@pytest.fixture
def private_settings(settings: Settings, private_rabbit: RabbitNode) -> Settings:
    """The test's settings, on the private node."""
    return settings.model_copy(update={"amqp_url": private_rabbit.amqp_url})


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster.create(f"agentless-{SESSION}", free_port())
    try:
        yield cluster
    finally:
        cluster.drop()


@pytest.fixture
def private_database(settings: Settings, pg_cluster: PgCluster) -> Settings:
    """The test's settings, on a schema of its own in the private PostgreSQL cluster."""
    url = f"{pg_cluster.url}?search_path={unique_name()}"
    return settings.model_copy(update={"database_url": url})


@pytest_asyncio.fixture
async def endpoint() -> AsyncIterator[tuple[str, Service]]:
    """A service for both modes (outages.Service), served locally: its URL and itself."""
    async with served(Service()) as found:
        yield found
