"""`agentless definitions apply|list|show|delete`: task definitions (SPEC §9) kept in the
database directly, as the API keeps them (`agentless execute` is execute.py)."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson
from pydantic import JsonValue, TypeAdapter, ValidationError

from worker.cli.exits import EXIT_DONE, EXIT_NOT_SUCCEEDED, EXIT_USAGE
from worker.cli.tables import Column, render
from worker.contract.definitions import (
    Definition,
    DefinitionSpec,
    DefinitionSummary,
    ExecutionRecord,
    validation_context,
)
from worker.contract.errors import UsageError, invalid_fields
from worker.contract.settings import Settings
from worker.store.database import Store
from worker.store.definitions import Applied
from worker.store.errors import DefinitionNotFound, NameTaken
from worker.text import duration, one_line, shorten

# How many of a definition's latest executions `show` lists.
SHOWN_EXECUTIONS = 5
# Longest JSON value `show` prints on its line (variables, outputs).
SHOWN_CHARS = 200


# --- apply --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DefinitionsFile:
    """A file's definitions once every one is valid; else what is wrong, field by field."""

    path: Path
    specs: list[DefinitionSpec]
    problems: list[str]


def cmd_apply(settings: Settings, args: argparse.Namespace) -> int:
    context = validation_context(
        None if settings.connections is None else settings.load_connections()
    )
    files = [read_definitions(path, context) for path in args.files]
    for bad in (f for f in files if f.problems):
        print(
            f"agentless: {bad.path}: nothing in it was applied; fix:\n  "
            + "\n  ".join(bad.problems),
            file=sys.stderr,
        )
    good = [f for f in files if not f.problems]
    if good:
        asyncio.run(_apply(settings, good))
    return EXIT_USAGE if len(good) < len(files) else EXIT_DONE


def read_definitions(path: Path, context: dict[str, object] | None) -> DefinitionsFile:
    """The file's definitions, validated as the API validates them: one JSON object, or an array
    of them; every invalid field of every one is listed, as `[INDEX].field` in an array."""
    try:
        loaded = orjson.loads(_read(path))
    except orjson.JSONDecodeError as exc:
        return DefinitionsFile(path, [], [f"not JSON: {exc}"])
    except UsageError as exc:
        return DefinitionsFile(path, [], [str(exc)])
    array = isinstance(loaded, list)
    items = loaded if isinstance(loaded, list) else [loaded]
    if not isinstance(loaded, dict | list):
        return DefinitionsFile(path, [], ["must hold a definition (an object) or an array of them"])
    specs: list[DefinitionSpec] = []
    problems: list[str] = []
    names: dict[str, int] = {}
    for index, item in enumerate(items):
        where = f"[{index}]" if array else ""
        try:
            spec = DefinitionSpec.model_validate(item, context=context)
        except ValidationError as exc:
            problems.extend(
                f"{'.'.join(filter(None, (where, invalid.field))) or 'the definition'}: "
                f"{invalid.message}"
                for invalid in invalid_fields(exc)
            )
            continue
        if (first := names.setdefault(spec.name.lower(), index)) != index:
            problems.append(f"{where}.name: {spec.name!r} is also the name of [{first}]")
        specs.append(spec)
    if not items:
        problems.append("the array holds no definition")
    return DefinitionsFile(path, specs, problems)


def _read(path: Path) -> bytes:
    if str(path) == "-":
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read it: {exc.strerror}") from exc


async def _apply(settings: Settings, files: list[DefinitionsFile]) -> None:
    """Each file's definitions in one transaction, and what became of each, one a line."""
    async with Store.open(settings.database_url, pool_size=1) as store:
        for one in files:
            try:
                applied = await store.definitions.apply(one.specs)
            except NameTaken as exc:
                # A definition renamed to another's name; or another writer got there first.
                raise UsageError(f"{one.path}: {exc}; nothing in it was applied") from exc
            for each in applied:
                print(outcome(each))


def outcome(applied: Applied) -> str:
    """What applying did to a definition: created, updated to version N (and which attributes
    changed), or unchanged."""
    definition = applied.definition
    if applied.previous is None:
        return f"{definition.name}: created (version 1, id {definition.id})"
    if definition.version == applied.previous.version:
        return f"{definition.name}: unchanged (version {definition.version})"
    before, after = applied.previous.written(), definition.written()
    changed = sorted(
        key for key in before.keys() | after.keys() if before.get(key) != after.get(key)
    )
    return f"{definition.name}: updated to version {definition.version} ({', '.join(changed)})"


# --- list ---------------------------------------------------------------------------------------


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    listed, total, latest, now = asyncio.run(_list(settings, args.name, args.limit))
    if args.json:
        summaries = [d.summary() for d in listed]
        print(_SUMMARIES.dump_json(summaries, by_alias=True, indent=2).decode())
        return EXIT_DONE
    if not listed:
        print("no definitions" + ("" if args.name is None else " match"), file=sys.stderr)
        return EXIT_DONE
    print(
        render(
            [
                Column("NAME"),
                Column("VERSION", right=True),
                Column("UPDATED", right=True),
                Column("LAST EXECUTION"),
                Column("DESCRIPTION", squeeze=True),
            ],
            (
                (
                    d.name,
                    str(d.version),
                    f"{duration((now - d.updated_at).total_seconds())} ago",
                    _last(latest.get(d.id, []), now),
                    d.description,
                )
                for d in listed
            ),
            width=_terminal_width(),
        )
    )
    if total > len(listed):
        print(f"{len(listed)} of {total} definitions shown; --limit shows more", file=sys.stderr)
    return EXIT_DONE


_SUMMARIES = TypeAdapter(list[DefinitionSummary])


async def _list(
    settings: Settings, name: str | None, limit: int
) -> tuple[list[Definition], int, dict[str, list[ExecutionRecord]], datetime]:
    async with Store.open(settings.database_url, pool_size=1) as store:
        page = await store.definitions.page(name=name, limit=limit)
        ids = [d.id for d in page.definitions]
        latest = await store.definitions.latest_executions(ids, 1)
        return page.definitions, page.total, latest, store.clock.now()


def _last(executions: list[ExecutionRecord], now: datetime) -> str:
    """A definition's latest execution on one line: #index, how it stands, how long ago."""
    if not executions:
        return "-"
    latest = executions[0]
    return f"#{latest.execution_index} {_standing(latest)} {_ago(latest.created_at, now)}"


def _standing(execution: ExecutionRecord) -> str:
    """Its task's result, or state while it runs; `purged` once the task is no longer kept."""
    if execution.result is not None:
        return execution.result.value
    return "purged" if execution.state is None else execution.state.value


def _ago(then: datetime, now: datetime) -> str:
    return f"{duration((now - then).total_seconds())} ago"


# --- show ---------------------------------------------------------------------------------------


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    found = asyncio.run(_show(settings, args.definition))
    if found is None:
        print(no_such_definition(args.definition), file=sys.stderr)
        return EXIT_NOT_SUCCEEDED
    definition, executions, total, now = found
    if args.json:
        print(definition.model_dump_json(by_alias=True, indent=2))
        return EXIT_DONE
    print(summary(definition, total, now))
    if executions:
        print()
        print(executions_table(executions, now))
    return EXIT_DONE


async def _show(
    settings: Settings, ref: str
) -> tuple[Definition, list[ExecutionRecord], int, datetime] | None:
    async with Store.open(settings.database_url, pool_size=1) as store:
        definition = await store.definitions.find(ref)
        if definition is None:
            return None
        listed = await store.definitions.executions(definition.id, limit=SHOWN_EXECUTIONS)
        return definition, listed.executions, listed.total, store.clock.now()


def summary(definition: Definition, executions: int, now: datetime) -> str:
    """The definition as a person reads it: one attribute a line, the empty ones left out."""
    rows = list(_rows(definition, executions, now))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {one_line(value)}".rstrip() for label, value in rows)


def _rows(definition: Definition, executions: int, now: datetime) -> Iterator[tuple[str, str]]:
    yield "name", definition.name
    yield "id", definition.id
    yield "version", str(definition.version)
    yield "updated", _ago(definition.updated_at, now)
    yield "created", _ago(definition.created_at, now)
    if definition.description:
        yield "description", definition.description
    template = definition.template()
    request = definition.request
    where = (
        f"connection {request.connection}{request.url_suffix}"
        if request.connection
        else str(request.url)
    )
    yield "request", f"{request.method} {where}"
    yield "mode", definition.wait_for_completion.value
    yield "hub", definition.hub_name
    for label, key in (
        ("criteria", "successCriteria"),
        ("timeout", "timeoutSeconds"),
        ("poll", "poll"),
        ("retry", "retry"),
        ("outputs", "outputs"),
        ("variables", "variables"),
    ):
        value = template.get(key)
        if value not in (None, {}, ""):
            yield label, value if isinstance(value, str) else _json(value)
    yield "executions", str(executions)


def executions_table(executions: list[ExecutionRecord], now: datetime) -> str:
    return render(
        [
            Column("#", right=True),
            Column("EXECUTION ID"),
            Column("VERSION", right=True),
            Column("RESULT"),
            Column("WHEN", right=True),
            Column("INPUT", squeeze=True),
        ],
        (
            (
                str(e.execution_index),
                e.execution_id,
                str(e.version),
                _standing(e),
                _ago(e.created_at, now),
                _json(e.input) if e.input else "",
            )
            for e in executions
        ),
        width=_terminal_width(),
    )


def _terminal_width() -> int | None:
    """Tables fit a terminal; piped output keeps whole lines for grep (as `agentless tasks`)."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _json(value: JsonValue) -> str:
    return shorten(orjson.dumps(value).decode(), SHOWN_CHARS)


def no_such_definition(ref: str) -> str:
    return f"agentless: no definition is named {ref!r} or has that id"


# --- delete -------------------------------------------------------------------------------------


def cmd_delete(settings: Settings, args: argparse.Namespace) -> int:
    deleted, missing = asyncio.run(_delete(settings, args.definitions))
    for definition in deleted:
        print(f"{definition.name}: deleted (its executions stay readable)")
    for ref in missing:
        print(no_such_definition(ref), file=sys.stderr)
    return EXIT_NOT_SUCCEEDED if missing else EXIT_DONE


async def _delete(settings: Settings, refs: list[str]) -> tuple[list[Definition], list[str]]:
    """Those found deleted, each once; and the names or ids that match none."""
    found: dict[str, Definition] = {}
    missing = []
    async with Store.open(settings.database_url, pool_size=1) as store:
        for ref in refs:
            definition = await store.definitions.find(ref)
            if definition is None:
                missing.append(ref)
            else:
                found.setdefault(definition.id, definition)
        deleted = []
        for definition in found.values():
            try:
                await store.definitions.delete(definition.id)
            except DefinitionNotFound:
                # Deleted by someone else since it was found.
                missing.append(definition.name)
            else:
                deleted.append(definition)
    return deleted, missing
