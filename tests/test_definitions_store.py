"""Task definitions and executions in the store (SPEC §9), against the real PostgreSQL; and the
pure rules of worker/contract/definitions.py."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest
import pytest_asyncio
from pydantic import ValidationError

from worker.contract.definitions import (
    Definition,
    DefinitionSpec,
    ExecutionMessage,
    ExecutionRequest,
    canonical_message,
    execution_id_of,
    execution_task,
    parse_execution,
    patched,
    validation_context,
)
from worker.contract.errors import InvalidTask, invalid_fields
from worker.contract.models import State, TaskMessage
from worker.contract.settings import Settings
from worker.store.changes import ClaimRequest
from worker.store.database import Store
from worker.store.definitions import Replacement
from worker.store.errors import (
    DefinitionNotFound,
    ExecutionConflict,
    NameTaken,
    StaleVersion,
)

URL = "http://ci.example.com/api/tags/$(variables.commit)"


def spec(name: str = "tag-build", **fields: object) -> DefinitionSpec:
    data: dict[str, object] = {
        "name": name,
        "request": {"url": URL},
        "variables": {"commit": "abc", "branch": "main"},
    }
    return DefinitionSpec.model_validate(data | fields)


@pytest_asyncio.fixture
async def store(settings: Settings, db: asyncpg.Connection) -> AsyncIterator[Store]:
    async with Store.open(settings.database_url, pool_size=4) as opened:
        yield opened


# The pure rules.


def test_a_definition_lists_every_invalid_field() -> None:
    with pytest.raises(ValidationError) as caught:
        DefinitionSpec.model_validate(
            {
                "name": "no spaces",
                "taskId": "t",
                "request": {"connection": "ci", "headers": {"Authorization": "Bearer s3cret"}},
                "successCriteria": "body.[",
                "poll": {"intervalSeconds": 5},
                "cancelRequest": {"url": "ftp://x"},
            },
            context=validation_context(["github"]),
        )
    fields = [(f.field, f.message) for f in invalid_fields(caught.value)]
    assert fields == [
        ("name", "String should match pattern '^[A-Za-z0-9._:-]{1,128}$'"),
        (
            "request",
            "connection 'ci' is not a service connection of this deployment (known: github); "
            "header 'Authorization' would store a secret in the definition: name a service "
            "connection (request.connection) or use a macro such as $(system.AccessToken)",
        ),
        (
            "successCriteria",
            "not a valid JMESPath expression: Invalid jmespath expression: Incomplete "
            "expression at position 6",
        ),
        ("cancelRequest.url", "must be an absolute http:// or https:// URL"),
        ("poll", 'goes with waitForCompletion "poll" only'),
        ("taskId", "Extra inputs are not permitted"),
    ]


def test_server_fields_are_ignored_and_macros_may_carry_secrets() -> None:
    written = spec(
        id="x",
        version=7,
        createdAt="2026-01-01T00:00:00Z",
        request={"url": URL, "headers": {"Authorization": "Bearer $(system.AccessToken)"}},
    )
    assert written.written() == {
        "name": "tag-build",
        "description": "",
        "hubName": "build",
        "request": {
            "method": "POST",
            "url": URL,
            "urlSuffix": "",
            "headers": {"Authorization": "Bearer $(system.AccessToken)"},
        },
        "waitForCompletion": "apiResponse",
        "criteriaSyntax": "jmespath",
        "outputs": {},
        "variables": {"commit": "abc", "branch": "main"},
    }


def test_patch_leaves_absent_and_null_attributes_unchanged() -> None:
    current = spec(description="tags a build", timeoutSeconds=60)
    assert patched(current, {}) == current
    assert patched(current, {"description": None, "request": None, "id": "other"}) == current
    changed = patched(current, {"timeout_seconds": 30, "variables": {"commit": "def"}})
    assert changed.written() == current.written() | {
        "timeoutSeconds": 30,
        "variables": {"commit": "def"},
    }
    with pytest.raises(ValidationError) as caught:
        patched(current, {"successCriteria": "body.[", "hubName": "a b"})
    assert [f.field for f in invalid_fields(caught.value)] == ["hubName", "successCriteria"]


def test_an_execution_overrides_variables_and_is_named_after_its_definition() -> None:
    definition = spec(description="tags", variables={"commit": "abc", "branch": "main"})
    stored = definition.model_dump(by_alias=True) | {
        "id": "d-1",
        "version": 3,
        "createdAt": "2026-01-01T00:00:00Z",
        "updatedAt": "2026-01-01T00:00:00Z",
    }
    task = execution_task(
        Definition.model_validate(stored),
        ExecutionRequest(input={"commit": "def", "extra": [1]}, tags=["a", "b", "a"]),
        task_id="e-1",
    )
    assert task == TaskMessage.model_validate(
        {
            "taskId": "e-1",
            "planId": "e-1",
            "name": "tag-build",
            "request": {"url": URL},
            "variables": {"commit": "def", "branch": "main", "extra": [1]},
        }
    )
    assert orjson.loads(canonical_message(task))["variables"] == task.variables


@pytest.mark.parametrize(
    ("body", "found"),
    [
        (b'{"taskId": "t", "planId": "p", "request": {"url": "ftp://x"}}', None),
        (b'{"definition": "d", "request": {"url": "http://x"}}', None),
        (b'not json, though it mentions a "definition"', None),
        (
            b'{"definition": "tag-build", "input": {"a": 1}, "tags": null}',
            ExecutionMessage(definition="tag-build", input={"a": 1}),
        ),
    ],
    ids=["task", "both", "not-json", "definition"],
)
def test_messages_that_name_a_definition(body: bytes, found: ExecutionMessage | None) -> None:
    assert parse_execution(body) == found


def test_a_message_naming_a_definition_with_bad_fields_says_which() -> None:
    with pytest.raises(InvalidTask) as caught:
        parse_execution(b'{"definition": "a b", "input": [], "tags": ["x y"]}')
    assert str(caught.value) == (
        "message names a definition but does not fit the form of one (definition, input, "
        "taskId, planId, comments, tags, source): definition: String should match pattern "
        "'^[A-Za-z0-9._:-]{1,128}$'; input: Input should be a valid dictionary; tags.0: String "
        "should match pattern '^[A-Za-z0-9._:-]{1,128}$'"
    )


def test_an_execution_id_is_the_task_id_else_the_message_id_else_the_content() -> None:
    call = ExecutionMessage(definition="d")
    assert execution_id_of(call.model_copy(update={"task_id": "t"}), b"{}", "m") == "t"
    assert execution_id_of(call, b"{}", "m-1") == "m-1"
    made = execution_id_of(call, b"{}", None)
    assert made == execution_id_of(call, b"{}", "not an id") != execution_id_of(call, b"[]", None)


# The store.


async def test_versions_names_and_optimistic_concurrency(store: Store) -> None:
    definitions = store.definitions
    [created] = await definitions.create([spec("Tag-Build")])
    assert created.version == 1
    assert created.created_at == created.updated_at
    assert await definitions.get(created.id) == created
    assert await definitions.get_by_name("TAG-build") == created
    assert await definitions.find("tag-BUILD") == await definitions.find(created.id) == created
    assert await definitions.find(created.id, "name") is None
    assert await definitions.get("nothing") is None

    unchanged = await definitions.replace(created.id, spec("Tag-Build"))
    assert (unchanged.changed, unchanged.definition) == (False, created)
    replaced = await definitions.replace(
        created.id, spec("Tag-Build", description="new"), expected_version=1
    )
    assert replaced.changed
    assert replaced.definition.version == 2
    assert replaced.definition.updated_at > created.updated_at
    with pytest.raises(StaleVersion, match="is at version 2, not 1"):
        await definitions.replace(created.id, spec("Tag-Build"), expected_version=1)
    with pytest.raises(StaleVersion):
        await definitions.patch(created.id, {"description": "x"}, expected_version=1)
    with pytest.raises(DefinitionNotFound):
        await definitions.replace("nothing", spec())

    with pytest.raises(NameTaken, match="'tag-build' exists already"):
        await definitions.create([spec("tag-build")])
    [other] = await definitions.create([spec("other")])
    with pytest.raises(NameTaken):
        await definitions.replace(other.id, spec("TAG-BUILD"))
    # A definition may change the case of its own name.
    renamed = await definitions.replace(created.id, spec("TAG-BUILD", description="new"))
    assert renamed.definition.name == "TAG-BUILD"
    assert renamed.definition.version == 3


async def test_bulk_writes_are_all_or_nothing(store: Store) -> None:
    definitions = store.definitions
    [first] = await definitions.create([spec("first")])
    with pytest.raises(NameTaken) as caught:
        await definitions.create([spec("second"), spec("FIRST")])
    assert caught.value.index == 1
    with pytest.raises(NameTaken) as caught:
        await definitions.create([spec("third"), spec("fourth"), spec("Third")])
    assert caught.value.index == 2
    assert (await definitions.page()).total == 1

    made = await definitions.create([spec("b"), spec("a")])
    assert [d.name for d in made] == ["b", "a"]
    with pytest.raises(StaleVersion):
        await definitions.replace_many(
            [
                Replacement(made[0].id, spec("b", description="x")),
                Replacement(made[1].id, spec("a", description="x"), expected_version=9),
            ]
        )
    with pytest.raises(DefinitionNotFound):
        await definitions.delete_many([first.id, "nothing"])
    page = await definitions.page()
    assert [(d.name, d.version) for d in page.definitions] == [("a", 1), ("b", 1), ("first", 1)]

    await definitions.delete_many([first.id, made[0].id])
    assert [d.name for d in (await definitions.page()).definitions] == ["a"]


async def test_patch_with_only_nulls_changes_nothing(store: Store) -> None:
    definitions = store.definitions
    [created] = await definitions.create([spec(description="tags a build")])
    nothing = await definitions.patch(created.id, {"description": None, "request": None})
    assert (nothing.changed, nothing.definition) == (False, created)
    changed = await definitions.patch(created.id, {"timeoutSeconds": 30}, expected_version=1)
    assert changed.changed
    assert changed.definition.version == 2
    assert changed.definition.description == "tags a build"
    assert changed.definition.timeout_seconds == 30
    with pytest.raises(ValidationError):
        await definitions.patch(created.id, {"successCriteria": "body.["})
    with pytest.raises(ValidationError):
        await definitions.patch(
            created.id, {"request": {"connection": "ci"}}, connections=frozenset({"github"})
        )
    assert await definitions.get(created.id) == changed.definition


async def test_pages_filter_by_name_in_any_case_and_sort(store: Store) -> None:
    definitions = store.definitions
    await definitions.create([spec(name) for name in ("Deploy-a", "deploy_b", "tag", "deployc")])
    page = await definitions.page(name="DEPLOY", order="name", descending=True, limit=2)
    assert ([d.name for d in page.definitions], page.total) == (["deployc", "deploy_b"], 3)
    page = await definitions.page(name="deploy", offset=2, limit=2)
    assert ([d.name for d in page.definitions], page.total) == (["deployc"], 3)
    # LIKE's wildcards match only themselves.
    page = await definitions.page(name="_")
    assert [d.name for d in page.definitions] == ["deploy_b"]
    page = await definitions.page(order="createdAt", limit=10)
    assert [d.name for d in page.definitions] == ["Deploy-a", "deploy_b", "tag", "deployc"]
    assert (await definitions.page(offset=10)).total == 4


async def test_concurrent_executions_get_distinct_indexes(store: Store) -> None:
    [created] = await store.definitions.create([spec()])
    executions = await asyncio.gather(
        *[store.definitions.execute("TAG-BUILD", ExecutionRequest()) for _ in range(20)]
    )
    assert sorted(e.record.execution_index for e in executions) == list(range(1, 21))
    assert len({e.record.execution_id for e in executions}) == 20
    listed = await store.definitions.executions(created.id, limit=5)
    assert ([e.execution_index for e in listed.executions], listed.total) == (
        [20, 19, 18, 17, 16],
        20,
    )


async def test_an_execution_records_its_definition_in_its_task(
    store: Store, db: asyncpg.Connection
) -> None:
    [created] = await store.definitions.create([spec()])
    await store.definitions.patch(created.id, {"description": "v2"})
    execution = await store.definitions.execute(
        created.id,
        ExecutionRequest(
            input={"commit": "def"}, tags=["nightly", "ci"], comments="why", source="cron"
        ),
        lookup="id",
        execution_id="e-1",
    )
    record = execution.record
    assert (record.execution_index, record.version, record.state) == (1, 2, State.QUEUED)
    assert execution.created
    assert execution.task.variables == {"commit": "def", "branch": "main"}
    row = await db.fetchrow(
        "SELECT definition_id, definition_version, execution_index, tags, comments, source, "
        "state, digest FROM tasks WHERE task_id = 'e-1'"
    )
    assert row is not None
    assert dict(row) == {
        "definition_id": created.id,
        "definition_version": 2,
        "execution_index": 1,
        "tags": ["nightly", "ci"],
        "comments": "why",
        "source": "cron",
        "state": "queued",
        "digest": hashlib.sha256(execution.message).digest(),
    }
    assert await store.definitions.execution_of_task("e-1") == record
    assert await store.definitions.execution(created.id, 1) == record

    await store.definitions.execute("tag-build", ExecutionRequest(tags=["ci"]))
    by_definition = await store.list_tasks(
        {"definition": created.id.upper()}, "queuedAt", descending=False, offset=0, limit=10
    )
    assert (by_definition.tasks[0].task_id, by_definition.total) == ("e-1", 2)
    nightly = await store.list_tasks(
        {"tag": "nightly"}, "queuedAt", descending=False, offset=0, limit=10
    )
    assert ([t.task_id for t in nightly.tasks], nightly.total) == (["e-1"], 1)


async def test_an_execution_id_is_idempotent(store: Store) -> None:
    [created] = await store.definitions.create([spec()])
    request = ExecutionRequest(input={"commit": "def"}, tags=["a"])
    first = await store.definitions.execute(created.id, request, execution_id="same")
    # A repeat races its own first try: both answer the one execution.
    again = await asyncio.gather(
        *[store.definitions.execute("tag-build", request, execution_id="same") for _ in range(3)]
    )
    assert [(e.record, e.message, e.created) for e in again] == [
        (first.record, first.message, False)
    ] * 3
    with pytest.raises(ExecutionConflict, match="names an execution with another request"):
        await store.definitions.execute(
            created.id, ExecutionRequest(input={"commit": "xyz"}), execution_id="same"
        )
    [other] = await store.definitions.create([spec("other")])
    with pytest.raises(ExecutionConflict):
        await store.definitions.execute(other.id, request, execution_id="same")
    concurrent = await asyncio.gather(
        *[store.definitions.execute(created.id, request, execution_id="new") for _ in range(5)]
    )
    assert [e.created for e in concurrent].count(True) == 1
    assert len({e.record.execution_index for e in concurrent}) == 1
    assert (await store.definitions.executions(created.id)).total == 2
    with pytest.raises(DefinitionNotFound):
        await store.definitions.execute("nothing", request)
    with pytest.raises(DefinitionNotFound):
        await store.definitions.execute("tag-build", request, lookup="id")


async def test_an_execution_id_of_an_ordinary_task_conflicts(store: Store) -> None:
    task = TaskMessage.model_validate({"taskId": "t-1", "planId": "p", "request": {"url": URL}})
    await store.submit(ClaimRequest.of(task, b"{}"))
    [created] = await store.definitions.create([spec()])
    with pytest.raises(ExecutionConflict, match="is the id of a task that no definition made"):
        await store.definitions.execute(created.id, ExecutionRequest(), execution_id="t-1")
    # The index was not taken.
    assert (
        await store.definitions.execute(created.id, ExecutionRequest())
    ).record.execution_index == 1


async def test_a_deleted_definition_keeps_its_executions_readable(store: Store) -> None:
    [created] = await store.definitions.create([spec()])
    execution = await store.definitions.execute(created.id, ExecutionRequest())
    with pytest.raises(StaleVersion):
        await store.definitions.delete(created.id, expected_version=2)
    await store.definitions.delete(created.id, expected_version=1)
    assert await store.definitions.get(created.id) is None
    with pytest.raises(DefinitionNotFound):
        await store.definitions.delete(created.id)
    assert (await store.definitions.executions(created.id)).executions == [execution.record]
    assert await store.definitions.execution(created.id, 1) == execution.record
    assert await store.definitions.latest_executions([created.id, "other"], 3) == {
        created.id: [execution.record],
        "other": [],
    }
    # The name is free again, and its new definition counts from 1.
    [again] = await store.definitions.create([spec()])
    assert again.id != created.id
    assert (
        await store.definitions.execute("tag-build", ExecutionRequest())
    ).record.execution_index == 1
