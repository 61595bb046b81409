"""`agentless execute`: a task queued from a definition (SPEC §9), as
POST /definitions/name/{name}/executions queues one: the execution is recorded in the database,
then its task published as `agentless submit` publishes one; with --wait, its result."""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson
from pydantic import JsonValue, ValidationError

from worker.cli.definitions import no_such_definition
from worker.cli.exits import EXIT_NOT_SUCCEEDED
from worker.cli.submit import queue_task
from worker.contract.definitions import ExecutionFields, ExecutionStarted
from worker.contract.errors import Unavailable, UsageError, describe
from worker.contract.requests import ID_PATTERN
from worker.contract.settings import Settings
from worker.store.database import Store
from worker.store.errors import DefinitionNotFound, ExecutionConflict


def cmd_execute(settings: Settings, args: argparse.Namespace) -> int:
    ids = [("--tag", tag) for tag in args.tag] + [("--execution-id", args.execution_id)]
    for flag, value in ids:
        if value is not None and not ID_PATTERN.fullmatch(value):
            raise UsageError(f"{flag} {value!r} is not an id (1-128 of A-Z a-z 0-9 . _ : -)")
    try:
        fields = ExecutionFields(
            input=parse_inputs(args.input),
            comments=args.comments or "",
            tags=args.tag,
            source=args.source,
        )
    except ValidationError as exc:
        raise UsageError(describe(exc)) from exc
    return asyncio.run(_execute(settings, args, fields))


def parse_inputs(items: list[str]) -> dict[str, JsonValue]:
    """`--input NAME=VALUE`s as variables: VALUE as JSON when it is JSON (7, true, null, [1],
    {"a": 1}, "quoted"), else as the text it is (v1.2, main, an empty string)."""
    inputs: dict[str, JsonValue] = {}
    for item in items:
        name, found, value = item.partition("=")
        if not found or not name.strip():
            raise UsageError(f"--input {item!r} is not of the form NAME=VALUE")
        try:
            inputs[name.strip()] = orjson.loads(value)
        except orjson.JSONDecodeError:
            inputs[name.strip()] = value
    return inputs


async def _execute(settings: Settings, args: argparse.Namespace, fields: ExecutionFields) -> int:
    async with Store.open(settings.database_url, pool_size=1) as store:
        try:
            execution = await store.definitions.execute(
                args.definition, fields, execution_id=args.execution_id
            )
        except DefinitionNotFound:
            print(no_such_definition(args.definition), file=sys.stderr)
            return EXIT_NOT_SUCCEEDED
        except ExecutionConflict as exc:
            raise UsageError(str(exc)) from exc
    record = execution.record
    started = ExecutionStarted(
        execution_id=record.execution_id,
        execution_index=record.execution_index,
        execution_link=f"{str(settings.public_url).rstrip('/')}/tasks/{record.execution_id}",
    )
    if args.wait:
        print(
            f"{record.definition_name} execution #{record.execution_index} (version "
            f"{record.version}): task {record.execution_id}, {started.execution_link}",
            file=sys.stderr,
        )
    # Published whether or not this call made the execution: a repeat (the same id) may follow
    # one whose message never reached the broker; the task runs once however often it is sent.
    try:
        return await queue_task(
            settings,
            execution.task,
            wait=args.wait,
            wait_timeout=args.wait_timeout,
            body=execution.message,
            receipt=started.model_dump_json(by_alias=True),
            command="execute",
        )
    except Unavailable as exc:
        if record.execution_id in str(exc):
            raise
        raise Unavailable(
            f"{exc}; execution #{record.execution_index} of {record.definition_name} is recorded "
            f"but may not be queued: run the same command again later with --execution-id "
            f"{record.execution_id} (it runs once however often it is sent)"
        ) from exc
