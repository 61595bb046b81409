"""Task definitions and their executions in the store (SPEC §9), as `store.definitions`.

Definitions:
- `create(specs)`: several at once, all or nothing, answered in order; NameTaken on a clash
  (names are unique in any case, among themselves too).
- `get(id)`, `get_by_name(name)` (any case), `find(ref)` (an id, else a name): None if absent.
- `replace(id, spec, expected_version=)`, `replace_many([Replacement…])` (all or nothing),
  `patch(id, changes, expected_version=, connections=)`: each a `Change` (the definition, and
  whether it changed: a write that changes nothing keeps the version). DefinitionNotFound,
  StaleVersion (If-Match), NameTaken; patch raises pydantic's ValidationError for an invalid
  result.
- `apply(specs)`: each created, or replaced when its name (any case) is stored, all or nothing
  (`agentless definitions apply`): an `Applied` each, with the definition it replaced.
- `delete(id, expected_version=)`, `delete_many(ids)` (all or nothing): executions stay.
- `page(name=, order=, descending=, offset=, limit=)`: a `DefinitionList` (its total exact);
  `name` matches names containing it, in any case; `order` is a key of ORDER_COLUMNS.

Executions:
- `execute(ref, request, lookup=, execution_id=, plan_id=)`: allocates the definition's next
  index under its row's lock (distinct under concurrency, never given twice), builds the task
  message from the current version, and records the execution and its task (queued) in one
  transaction: an `Execution`, whose `message` the caller publishes. The same id with the same
  request answers the same execution (`created` False); with another, ExecutionConflict (also
  when the id is an ordinary task's). DefinitionNotFound when nothing matches `ref`.
- `executions(definition_id, descending=, offset=, limit=)`: an `ExecutionList`;
  `execution(definition_id, index)`, `execution_of_task(task_id)`: an ExecutionRecord or None;
  `latest_executions(definition_ids, per_definition)`: each one's latest, newest first.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import asyncpg
import orjson
from pydantic import JsonValue

from worker.contract.definitions import (
    Definition,
    DefinitionSpec,
    Execution,
    ExecutionFields,
    ExecutionRecord,
    canonical_message,
    execution_task,
    patched,
    request_digest,
)
from worker.contract.models import State, stored_message
from worker.store import definition_queries as queries
from worker.store.errors import (
    DefinitionNotFound,
    ExecutionConflict,
    Executor,
    NameTaken,
    StaleVersion,
)

ORDER_COLUMNS: Final = queries.ORDER_COLUMNS
# Where a definition is looked up: by id, by name (any case), or by id and else by name.
Lookup = Literal["id", "name", "any"]
# Concurrent executions under one new id: the losers find the winner's on their next try.
_EXECUTE_TRIES = 3
# Concurrent applies that create one name: the loser replaces the winner's on its next try.
_APPLY_TRIES = 2


@dataclass(frozen=True, slots=True)
class Change:
    """A definition as written, and whether the write changed it (and its version); `previous`
    is the definition before it (the API names the attributes that changed)."""

    definition: Definition
    changed: bool
    previous: Definition


@dataclass(frozen=True, slots=True)
class Applied:
    """What `apply` made of one definition: `previous` is None when it created it; when it
    replaced it, its version tells whether anything changed."""

    definition: Definition
    previous: Definition | None


@dataclass(frozen=True, slots=True)
class Replacement:
    """One element of a bulk replace: the definition `id` becomes `spec`, if it is still at
    `expected_version` (None: whatever its version)."""

    id: str
    spec: DefinitionSpec
    expected_version: int | None = None


@dataclass(frozen=True, slots=True)
class DefinitionList:
    definitions: list[Definition]
    total: int


@dataclass(frozen=True, slots=True)
class ExecutionList:
    executions: list[ExecutionRecord]
    total: int


class DefinitionStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(self, specs: Sequence[DefinitionSpec]) -> list[Definition]:
        """Store each, in order, all or none; NameTaken names the first clash and its item."""
        seen: dict[str, int] = {}
        for index, spec in enumerate(specs):
            if spec.name.lower() in seen:
                raise NameTaken(spec.name, index if len(specs) > 1 else None)
            seen[spec.name.lower()] = index
        created = []
        async with self._pool.acquire() as conn, conn.transaction():
            for index, spec in enumerate(specs):
                try:
                    row = await conn.fetchrow(
                        queries.INSERT,
                        str(uuid.uuid4()),
                        spec.name,
                        spec.description,
                        _template_json(spec),
                    )
                except asyncpg.UniqueViolationError:
                    raise NameTaken(spec.name, index if len(specs) > 1 else None) from None
                assert row is not None  # RETURNING of an insert made
                created.append(_definition(row))
        return created

    async def apply(self, specs: Sequence[DefinitionSpec]) -> list[Applied]:
        """Create each whose name (in any case) is not stored, and replace the one that is, in
        order, all or none (`agentless definitions apply`); NameTaken when two of them share a
        name. A definition another writer creates meanwhile is replaced on a second try, so that
        the same file applied twice at once is created once and left unchanged once."""
        seen: set[str] = set()
        for index, spec in enumerate(specs):
            if spec.name.lower() in seen:
                raise NameTaken(spec.name, index)
            seen.add(spec.name.lower())
        clash = None
        async with self._pool.acquire() as conn:
            for _ in range(_APPLY_TRIES):
                try:
                    async with conn.transaction():
                        return await _apply(conn, specs)
                except NameTaken as exc:
                    clash = exc
        assert clash is not None  # each try returned or raised
        raise clash

    async def get(self, definition_id: str) -> Definition | None:
        row = await self._pool.fetchrow(queries.SELECT_BY_ID, definition_id)
        return None if row is None else _definition(row)

    async def get_by_name(self, name: str) -> Definition | None:
        """The definition of this name, in any case."""
        row = await self._pool.fetchrow(queries.SELECT_BY_NAME, name)
        return None if row is None else _definition(row)

    async def find(self, ref: str, lookup: Lookup = "any") -> Definition | None:
        """The definition `ref` names: by id, by name, or (`any`) by id and else by name."""
        row = await self._pool.fetchrow(queries.FIND, ref, lookup != "name", lookup != "id")
        return None if row is None else _definition(row)

    async def replace(
        self, definition_id: str, spec: DefinitionSpec, *, expected_version: int | None = None
    ) -> Change:
        """Make the definition `spec` (every attribute: omitted ones took their defaults)."""
        return (await self.replace_many([Replacement(definition_id, spec, expected_version)]))[0]

    async def replace_many(self, replacements: Sequence[Replacement]) -> list[Change]:
        """Each replacement, in order, all or none."""
        changes = []
        bulk = len(replacements) > 1
        async with self._pool.acquire() as conn, conn.transaction():
            for index, replacement in enumerate(replacements):
                changes.append(await _replace(conn, replacement, index if bulk else None))
        return changes

    async def patch(
        self,
        definition_id: str,
        changes: Mapping[str, JsonValue],
        *,
        expected_version: int | None = None,
        connections: Collection[str] | None = None,
    ) -> Change:
        """Change the attributes given and not null (contract.definitions.patched); nothing
        given, or nothing different, is no change."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(queries.LOCK_BY_ID, definition_id)
            if row is None:
                raise DefinitionNotFound(definition_id)
            current = _definition(row)
            _check_version(current, expected_version)
            spec = patched(current, changes, connections=connections)
            return await _replace(conn, Replacement(definition_id, spec), None, current)

    async def delete(self, definition_id: str, *, expected_version: int | None = None) -> None:
        """Delete it (its executions stay readable); DefinitionNotFound, StaleVersion."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(queries.LOCK_BY_ID, definition_id)
            if row is None:
                raise DefinitionNotFound(definition_id)
            _check_version(_definition(row), expected_version)
            await conn.execute(queries.DELETE, [definition_id])

    async def delete_many(self, definition_ids: Sequence[str]) -> None:
        """Delete each, all or none: DefinitionNotFound names the first that does not exist."""
        async with self._pool.acquire() as conn, conn.transaction():
            deleted = {row["id"] for row in await conn.fetch(queries.DELETE, definition_ids)}
            for definition_id in definition_ids:
                if definition_id not in deleted:
                    raise DefinitionNotFound(definition_id)

    async def page(
        self,
        *,
        name: str | None = None,
        order: str = "name",
        descending: bool = False,
        offset: int = 0,
        limit: int = 50,
    ) -> DefinitionList:
        """One page of the definitions whose name contains `name` (any case; None: all)."""
        pattern = None if name is None else f"%{_escape_like(name)}%"
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(queries.page(order, descending), pattern, offset, limit)
            if rows and len(rows) < limit:
                total = offset + len(rows)
            else:
                total = await conn.fetchval(queries.COUNT, pattern)
        return DefinitionList([_definition(row) for row in rows], total)

    async def execute(
        self,
        ref: str,
        request: ExecutionFields,
        *,
        lookup: Lookup = "any",
        execution_id: str | None = None,
        plan_id: str | None = None,
    ) -> Execution:
        """Execute the definition `ref` names, at its current version (see the module's doc)."""
        execution_id = execution_id or str(uuid.uuid4())
        plan_id = plan_id or execution_id
        digest = request_digest(request, plan_id)
        async with self._pool.acquire() as conn:
            for _ in range(_EXECUTE_TRIES):
                try:
                    async with conn.transaction():
                        return await _execute(
                            conn,
                            ref,
                            request,
                            lookup=lookup,
                            execution_id=execution_id,
                            plan_id=plan_id,
                            digest=digest,
                        )
                except asyncpg.UniqueViolationError:
                    # Another execution under this id committed first: the next try finds it.
                    continue
        raise ExecutionConflict(execution_id, "is being executed concurrently by other requests")

    async def executions(
        self, definition_id: str, *, descending: bool = True, offset: int = 0, limit: int = 50
    ) -> ExecutionList:
        """One page of the definition's executions in index order (newest first by default),
        whether or not the definition still exists."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(queries.executions(descending), definition_id, offset, limit)
            if rows and len(rows) < limit:
                total = offset + len(rows)
            else:
                total = await conn.fetchval(queries.COUNT_EXECUTIONS, definition_id)
        return ExecutionList([_execution_record(row) for row in rows], total)

    async def execution(self, definition_id: str, index: int) -> ExecutionRecord | None:
        row = await self._pool.fetchrow(queries.SELECT_EXECUTION_BY_INDEX, definition_id, index)
        return None if row is None else _execution_record(row)

    async def execution_of_task(self, task_id: str) -> ExecutionRecord | None:
        """The execution that queued this task, if one did."""
        row = await self._pool.fetchrow(queries.SELECT_EXECUTION, task_id)
        return None if row is None else _execution_record(row)

    async def latest_executions(
        self, definition_ids: Sequence[str], per_definition: int
    ) -> dict[str, list[ExecutionRecord]]:
        """Each definition's latest executions, newest first (none: an empty list)."""
        latest: dict[str, list[ExecutionRecord]] = {i: [] for i in definition_ids}
        rows = await self._pool.fetch(
            queries.LATEST_EXECUTIONS, list(definition_ids), per_definition
        )
        for row in rows:
            latest[row["definition_id"]].append(_execution_record(row))
        return latest


async def _apply(conn: Executor, specs: Sequence[DefinitionSpec]) -> list[Applied]:
    """Each spec created or replaced by name, in the caller's transaction; NameTaken when
    another writer has created one of the names since this one looked."""
    applied = []
    for index, spec in enumerate(specs):
        row = await conn.fetchrow(queries.LOCK_BY_NAME, spec.name)
        if row is not None:
            current = _definition(row)
            change = await _replace(conn, Replacement(current.id, spec), index, current)
            applied.append(Applied(change.definition, current))
            continue
        try:
            row = await conn.fetchrow(
                queries.INSERT, str(uuid.uuid4()), spec.name, spec.description, _template_json(spec)
            )
        except asyncpg.UniqueViolationError:
            raise NameTaken(spec.name, index) from None
        assert row is not None  # RETURNING of an insert made
        applied.append(Applied(_definition(row), None))
    return applied


async def _replace(
    conn: Executor,
    replacement: Replacement,
    index: int | None,
    current: Definition | None = None,
) -> Change:
    if current is None:
        row = await conn.fetchrow(queries.LOCK_BY_ID, replacement.id)
        if row is None:
            raise DefinitionNotFound(replacement.id)
        current = _definition(row)
        _check_version(current, replacement.expected_version)
    spec = replacement.spec
    if spec.written() == current.written():
        return Change(current, changed=False, previous=current)
    try:
        row = await conn.fetchrow(
            queries.REPLACE, replacement.id, spec.name, spec.description, _template_json(spec)
        )
    except asyncpg.UniqueViolationError:
        raise NameTaken(spec.name, index) from None
    assert row is not None  # the row is locked: the update finds it
    return Change(_definition(row), changed=True, previous=current)


async def _execute(
    conn: Executor,
    ref: str,
    request: ExecutionFields,
    *,
    lookup: Lookup,
    execution_id: str,
    plan_id: str,
    digest: bytes,
) -> Execution:
    if (existing := await _existing(conn, ref, execution_id, digest)) is not None:
        return existing
    row = await conn.fetchrow(queries.TAKE_INDEX, ref, lookup != "name", lookup != "id")
    if row is None:
        raise DefinitionNotFound(ref)
    definition = _definition(row)
    index: int = row["executions"]
    task = execution_task(definition, request, task_id=execution_id, plan_id=plan_id)
    message = canonical_message(task)
    queued_at = await conn.fetchval(
        queries.INSERT_TASK,
        task.task_id,
        task.plan_id,
        task.job,
        task.hub_name,
        task.project_id,
        task.name,
        task.wait_for_completion.value,
        hashlib.sha256(message).digest(),
        stored_message(task, message),
        definition.id,
        definition.version,
        index,
        request.tags,
        request.comments,
        request.source,
    )
    if queued_at is None:
        # The id is taken: by an execution committed meanwhile (the caller's next try finds
        # it), or by a task that is no execution.
        if await conn.fetchval(queries.SELECT_EXECUTION, execution_id) is not None:
            raise asyncpg.UniqueViolationError("execution made concurrently")
        raise ExecutionConflict(execution_id, "is the id of a task that no definition made")
    created_at = await conn.fetchval(
        queries.INSERT_EXECUTION,
        execution_id,
        definition.id,
        definition.name,
        index,
        definition.version,
        digest,
        orjson.dumps(request.input).decode(),
        request.tags,
        request.comments,
        request.source,
        message.decode(),
    )
    record = ExecutionRecord(
        execution_id=execution_id,
        execution_index=index,
        definition_id=definition.id,
        definition_name=definition.name,
        version=definition.version,
        input=request.input,
        tags=request.tags,
        comments=request.comments,
        source=request.source,
        created_at=created_at,
        state=State.QUEUED,
        queued_at=queued_at,
    )
    return Execution(record, message, created=True)


async def _existing(conn: Executor, ref: str, execution_id: str, digest: bytes) -> Execution | None:
    """The execution already made under this id with the same request, if any; an
    ExecutionConflict if it was made with another, or of another definition."""
    row = await conn.fetchrow(queries.SELECT_EXECUTION, execution_id)
    if row is None:
        return None
    same_definition = ref == row["definition_id"] or (ref.lower() == row["definition_name"].lower())
    if not same_definition or row["request_digest"] != digest:
        raise ExecutionConflict(execution_id, "names an execution with another request")
    return Execution(_execution_record(row), row["message"].encode(), created=False)


def _check_version(current: Definition, expected: int | None) -> None:
    if expected is not None and current.version != expected:
        raise StaleVersion(current.id, expected, current.version)


def _template_json(spec: DefinitionSpec) -> str:
    return orjson.dumps(spec.template()).decode()


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _definition(row: asyncpg.Record) -> Definition:
    data = orjson.loads(row["template"]) | {
        "id": row["id"],
        "name": row["name"],
        "description": row["description"],
        "version": row["version"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }
    return Definition.model_validate(data)


def _execution_record(row: asyncpg.Record) -> ExecutionRecord:
    return ExecutionRecord(
        execution_id=row["execution_id"],
        execution_index=row["execution_index"],
        definition_id=row["definition_id"],
        definition_name=row["definition_name"],
        version=row["version"],
        input=orjson.loads(row["input"]),
        tags=list(row["tags"]),
        comments=row["comments"],
        source=row["source"],
        created_at=row["created_at"],
        state=row["state"],
        result=row["result"],
        reason=row["reason"],
        queued_at=row["queued_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
    )
