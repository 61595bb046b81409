"""The command's exit codes (SPEC §8), and which failures mean "try again later" (4) rather than
"fix the configuration" (2)."""

from __future__ import annotations

import errno
import socket

import aiormq
import asyncpg

from worker.contract.errors import ConfigError
from worker.contract.settings import Settings, redact_url

EXIT_DONE = 0
EXIT_NOT_SUCCEEDED = 1
EXIT_USAGE = 2
EXIT_WAIT_TIMEOUT = 3
EXIT_UNAVAILABLE = 4

# What `--help` says of them.
EXIT_CODES = f"""exit codes:
  {EXIT_DONE}  done (with --wait: the task succeeded)
  {EXIT_NOT_SUCCEEDED}  the task's result is not succeeded, or what was asked for is not there
  {EXIT_USAGE}  usage or invalid input, or a setting to fix (the message says which)
  {EXIT_WAIT_TIMEOUT}  --wait-timeout passed
  {EXIT_UNAVAILABLE}  the broker, database or API is unavailable: try again later"""

# SQLSTATE classes of a PostgreSQL that cannot serve now but may soon: connection exceptions,
# insufficient resources (too many connections), operator intervention (starting, shutting down).
_TRANSIENT_SQLSTATE = ("08", "53", "57")

# A connection lost while a command runs.
CONNECTION_LOST = (
    ConnectionError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
)


def unreachable(exc: ConfigError) -> bool:
    """Whether this configuration error is an address that does not answer now (a broker or
    database down or out of reach), rather than one that refuses what it is told (credentials,
    a database or virtual host that does not exist)."""
    cause = exc.__cause__
    if isinstance(cause, aiormq.exceptions.ProbableAuthenticationError):
        return False
    if isinstance(cause, asyncpg.PostgresError):
        return str(cause.sqlstate or "").startswith(_TRANSIENT_SQLSTATE)
    if isinstance(cause, ConnectionError | TimeoutError | socket.gaierror):
        return True
    # Not a file that cannot be read, which is an OSError too.
    return isinstance(cause, OSError) and cause.errno in _NO_ROUTE


_NO_ROUTE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})


def what_to_do(message: str, settings: Settings) -> str:
    """`message`, about an address that does not answer, with the setting to check."""
    for url, name, setting in (
        (settings.amqp_url, "RabbitMQ", "AGENTLESS_AMQP_URL"),
        (settings.database_url, "PostgreSQL", "AGENTLESS_DATABASE_URL"),
    ):
        if redact_url(url) in message:
            return (
                f"{message}; check that {name} is running there and that {setting} is right, "
                "then try again"
            )
    return f"{message}; try again later"


def lost(exc: BaseException, settings: Settings) -> str:
    """A connection lost while a command ran, as one line: which one, and what to do."""
    why = str(exc) or type(exc).__name__
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        where = f"PostgreSQL at {redact_url(settings.database_url)}"
    elif isinstance(exc, aiormq.exceptions.AMQPError):
        where = f"RabbitMQ at {redact_url(settings.amqp_url)}"
    else:
        where = "RabbitMQ or PostgreSQL"
    return f"lost the connection to {where}: {why}; try again"
