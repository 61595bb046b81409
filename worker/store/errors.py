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


class DefinitionNotFound(LookupError):
    """No definition has this id (or name, where a name may be given)."""

    def __init__(self, ref: str) -> None:
        super().__init__(f"no task definition has the id or name {ref!r}")
        self.ref = ref


class NameTaken(ValueError):
    """A definition's name is another's already, in some case (names are unique in any case).
    `index` is its place in a bulk write, if it was one."""

    def __init__(self, name: str, index: int | None = None) -> None:
        where = "" if index is None else f" (item {index})"
        super().__init__(
            f"a task definition named {name!r} exists already (names are unique in any case)"
            f"{where}; choose another name, or replace that definition"
        )
        self.name = name
        self.index = index


class StaleVersion(ValueError):
    """A write that expected a definition's version found another: someone changed it since."""

    def __init__(self, definition_id: str, expected: int, current: int) -> None:
        super().__init__(
            f"task definition {definition_id!r} is at version {current}, not {expected}: it "
            "changed since it was read; read it again and apply the change to that version"
        )
        self.definition_id = definition_id
        self.expected = expected
        self.current = current


class ExecutionConflict(ValueError):
    """An execution id already names another execution, or a task that is none."""

    def __init__(self, execution_id: str, why: str) -> None:
        super().__init__(f"executionId {execution_id!r} {why}; use a new executionId")
        self.execution_id = execution_id
