"""Task messages that name a definition instead of a request (SPEC §4, §9): resolved when the
worker takes them, to the task they stand for.

Only a message that is no valid task message is looked at (ordinary messages cost nothing
more). Its execution is made at the definition's version current then, with the definition's
next index, and its task recorded queued (store.definitions.execute); a redelivery of the same
message is the same execution, so no second index is taken. From then on the message stands for
that task: its body becomes the task message the execution queued, which the claim's digest is
taken of, and which a retry publishes again (at the version claimed, never resolved anew).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aio_pika.abc import AbstractIncomingMessage

from worker.contract.definitions import Execution, execution_id_of, parse_execution
from worker.contract.errors import InvalidTask
from worker.contract.models import TaskMessage
from worker.store.database import Store
from worker.store.errors import DefinitionNotFound, ExecutionConflict

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Refused:
    """The message is to be dead-lettered with this reason; `kind` labels the metric."""

    reason: str
    kind: str


async def task_of(
    message: AbstractIncomingMessage,
    invalid: InvalidTask,
    store: Store,
    db: Callable[[Callable[[], Awaitable[Execution]]], Awaitable[Execution]],
) -> TaskMessage | Refused:
    """The task that `message`, found no valid task message (`invalid`), stands for, its body
    made that task's message; or why it is dead-lettered. `db` retries a call while the
    database cannot be reached."""
    try:
        call = parse_execution(message.body)
    except InvalidTask as exc:
        return Refused(str(exc), "invalid")
    if call is None:
        return Refused(str(invalid), "invalid")
    execution_id = execution_id_of(call, message.body, message.message_id)
    try:
        execution = await db(
            lambda: store.definitions.execute(
                call.definition, call, execution_id=execution_id, plan_id=call.plan_id
            )
        )
    except DefinitionNotFound:
        return Refused(
            f"no task definition is named {call.definition!r} (nor has that id)", "invalid"
        )
    except ExecutionConflict as exc:
        return Refused(str(exc), "conflict")
    # A slot of every concrete message; the abstract class declares none.
    message.body = execution.message  # type: ignore[misc]
    return execution.task
