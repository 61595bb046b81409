"""What the store's statements run on, and what a database that cannot be reached looks like, as
opposed to a statement it refused."""

from __future__ import annotations

import asyncio

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# A connection of its own or one lent by the pool: both run statements alike.
Executor = asyncpg.Connection | PoolConnectionProxy

# Errors that mean "the database cannot be reached now", as opposed to a statement it refused.
DB_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    # A pooled connection that a server shutdown left half-way through its protocol (the pool
    # does not run a reset query: see _keep_session) until its socket is seen closed.
    asyncpg.exceptions.InternalClientError,
)


def refused(exc: BaseException) -> bool:
    """Whether the database refused a statement (a batch then retries its items one by one), as
    opposed to being unreachable."""
    return not isinstance(exc, DB_UNAVAILABLE)


class NotLive(ConnectionError):
    """This worker does not hold its liveness lock now (its session was lost, and another worker
    may already have taken over its tasks): it claims nothing until it holds the lock again."""


class TaskVanished(LookupError):
    """The task's row is gone from under a running attempt: a failover to a replica that had not
    received the attempt's claim (asynchronous replication) lost it."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} is no longer in the database")
