"""The commands' own broker connection: a plain one, for one short run (a worker's supervised
Broker re-opens its connection; a command that loses its connection says so and exits 4)."""

from __future__ import annotations

import aiormq
from aio_pika.abc import AbstractConnection

from worker.amqp import BROKER_ERRORS, CONNECT_SECONDS, connect_to_a_node
from worker.cli.exits import what_to_do
from worker.contract.errors import ConfigError, Unavailable
from worker.contract.settings import Settings, redact_url
from worker.topology import quorum_group_size


async def broker_connection(settings: Settings, command: str) -> AbstractConnection:
    """An open connection to RabbitMQ, named after the command; Unavailable if RabbitMQ does not
    answer, ConfigError if it refuses the credentials."""
    try:
        connection, _ = await connect_to_a_node(
            settings.amqp_urls,
            client_properties={"connection_name": f"agentless {command}"},
            timeout=CONNECT_SECONDS,
        )
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise ConfigError(
            f"RabbitMQ at {redact_url(settings.amqp_url)} refused the login: {exc}; "
            "check AGENTLESS_AMQP_URL's user and password"
        ) from exc
    except BROKER_ERRORS as exc:
        why = str(exc) or type(exc).__name__
        raise Unavailable(
            what_to_do(f"cannot reach RabbitMQ at {redact_url(settings.amqp_url)}: {why}", settings)
        ) from exc
    return connection


def group_size(settings: Settings) -> int | None:
    """The initial group size of the queues a command may be the first to declare: the one the
    service's processes declare them with."""
    return quorum_group_size(len(settings.amqp_urls))
