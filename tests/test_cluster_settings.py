"""Settings for clusters: several RabbitMQ nodes in AGENTLESS_AMQP_URL, libpq's multi-host form
in AGENTLESS_DATABASE_URL; the first broker node that answers is the one used, and the queues
start with one replica per node listed, up to three."""

from __future__ import annotations

import aio_pika
import asyncpg
import pytest
from pamqp.common import FieldTable
from pydantic import ValidationError
from yarl import URL

from tests.conftest import free_port
from worker.broker import Broker
from worker.contract.models import Names
from worker.contract.settings import Settings, redact_url
from worker.store.database import Store
from worker.store.registry import registered_worker
from worker.topology import GROUP_SIZE, quorum_group_size, tasks_queue_arguments

NODES = "amqp://guest:guest@mq-1:5672/,amqp://guest:guest@mq-2:5672/, amqp://guest:guest@mq-3/"
REPLICAS = (
    "postgresql://agentless:secret@pg-1:5432,pg-2:5432/agentless?target_session_attrs=read-write"
)


def test_several_broker_nodes_and_database_hosts_are_accepted() -> None:
    settings = Settings(amqp_url=NODES, database_url=REPLICAS)
    assert settings.amqp_urls == (
        "amqp://guest:guest@mq-1:5672/",
        "amqp://guest:guest@mq-2:5672/",
        "amqp://guest:guest@mq-3/",
    )
    assert settings.database_url == REPLICAS


@pytest.mark.parametrize(
    ("amqp_url", "says"),
    [
        ("amqp://guest:s3cret@mq-1/,http://guest:s3cret@mq-2/", "URL 2 of 2 is not one"),
        ("amqp://guest:s3cret@mq-1/,", "URL 2 of 2 is not one"),
        ("mq-1:5672", "must be an amqp:// or amqps:// URL, or several"),
    ],
)
def test_a_node_list_with_a_bad_url_says_which_without_echoing_it(amqp_url: str, says: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(amqp_url=amqp_url)
    assert says in str(refused.value)
    assert "s3cret" not in str(refused.value)


def test_every_password_is_hidden_in_what_a_person_reads() -> None:
    assert redact_url("amqp://a:one@mq-1/,amqp://b:two@mq-2/") == (
        "amqp://a:***@mq-1/,amqp://b:***@mq-2/"
    )
    assert redact_url(REPLICAS) == REPLICAS.replace("secret", "***")
    assert redact_url("postgresql://postgres@pg-1/db") == "postgresql://postgres@pg-1/db"


def test_quorum_queues_start_with_a_replica_per_node_up_to_three() -> None:
    assert [quorum_group_size(n) for n in (1, 2, 3, 5)] == [None, 2, 3, 3]


async def test_the_first_node_that_answers_is_used(settings: Settings) -> None:
    silent = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    names = Names(settings.prefix)
    async with Broker(f"{silent},{settings.amqp_url}", names, connection_name="t") as broker:
        await broker.publish(b"{}", names.dead)
        connection = await broker.connection()
        # Declared with two replicas (as many as the nodes listed): the same declare is
        # equivalent, another group size is not.
        async with connection.channel() as channel:
            await channel.declare_queue(
                names.tasks, passive=False, durable=True, arguments=_tasks_arguments(names, 2)
            )
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match=GROUP_SIZE):
            async with connection.channel() as channel:
                await channel.declare_queue(
                    names.tasks, durable=True, arguments=_tasks_arguments(names, 3)
                )
        async with connection.channel() as channel:
            await channel.queue_delete(names.tasks)
            await channel.queue_delete(names.dead)


async def test_queues_declared_with_another_group_size_are_used_as_they_are(
    settings: Settings, channel: aio_pika.abc.AbstractChannel
) -> None:
    # The test's topology exists already, declared without an initial group size.
    names = Names(settings.prefix)
    urls = f"{settings.amqp_url},{settings.amqp_url}"
    async with Broker(urls, names, connection_name="t") as broker:
        assert broker.group_size == 2
        await broker.publish(b"{}", names.tasks)
        await broker.publish_later(await _one_message(channel, names.tasks), 1)


def _tasks_arguments(names: Names, group_size: int) -> FieldTable:
    return tasks_queue_arguments(names, group_size)


async def _one_message(
    channel: aio_pika.abc.AbstractChannel, queue_name: str
) -> aio_pika.abc.AbstractIncomingMessage:
    queue = await channel.declare_queue(queue_name, passive=True)
    message = await queue.get(timeout=5)
    assert message is not None
    await message.ack()
    return message


async def test_the_database_is_found_among_several_hosts(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """libpq's multi-host form, the first host down: the read-write one is used, for the store
    and for a worker's liveness lock alike."""
    url = URL(settings.database_url)
    hosts = f"127.0.0.1:{free_port()},{url.host}:{url.port}"
    replicas = str(url.with_query({**url.query, "target_session_attrs": "read-write"})).replace(
        f"{url.host}:{url.port}", hosts
    )
    async with (
        Store.open(replicas) as store,
        registered_worker(store, replicas, lambda: 0) as worker_id,
    ):
        assert store.live.is_set()
        assert await db.fetchval("SELECT count(*) FROM workers WHERE worker_id = $1", worker_id)
