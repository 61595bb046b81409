"""GET /openapi.json: it describes every route the app serves, and the live API keeps to it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import hypothesis
import orjson
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from pydantic import JsonValue, SecretStr
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import ignored_auth

from callback_api import tasks
from callback_api.app import create_app
from callback_api.openapi import document
from callback_api.routes import ROUTES
from callback_api.tasks import TaskListQuery
from tests.conftest import Api, Events, Target, task_message
from worker.contract.settings import Settings

Operation = APIOperation[Any, Any, Any, Any]
API_TOKEN = "openapi-test-token"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,
]
# Per operation and per mode (valid data, then data that breaks the schema): enough to reach
# every status a route answers, few enough that the whole file takes seconds.
EXAMPLES = 20
# The definition routes, fewer: their thirteen operations share three bodies (a definition, a
# patch, an execution) and GET /tasks's list conventions, and generating a definition is slow.
DEFINITION_EXAMPLES = 8


@pytest.fixture
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Hypothesis keeps caches in ./.hypothesis by default, where pytest would then look for tests.
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # With API tokens set, the document requires them, and `ignored_auth` checks they are.
    return settings.model_copy(update={"api_tokens": [SecretStr(API_TOKEN)]})


def operations_of(described: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in described["paths"].items() for method in item}


def test_the_document_is_valid_openapi_3_1_and_covers_the_route_table(settings: Settings) -> None:
    described = document(settings, ROUTES)

    schemathesis.openapi.from_dict(described).validate()
    assert described["openapi"] == "3.1.0"
    table = [(route.method, route.path) for route in ROUTES]
    assert len(set(table)) == len(table), "two routes share a method and a path"
    assert operations_of(described) == set(table)
    unanswered = [
        (method, path)
        for path, item in described["paths"].items()
        for method, operation in item.items()
        if not any(int(status) < 300 for status in operation["responses"])
    ]
    assert unanswered == []


def test_every_route_the_app_serves_is_described(settings: Settings) -> None:
    app = create_app(settings, worker=False)
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    assert served == operations_of(document(settings, ROUTES))


def test_the_list_query_describes_the_parameters_the_handler_takes() -> None:
    aliases = {field.alias or name for name, field in TaskListQuery.model_fields.items()}
    assert aliases == tasks._LIST_PARAMETERS


async def _waiting(events: Events, target: Target, task_id: str) -> str:
    """Once the callback task waits for its service: the AuthToken it was sent."""
    async with asyncio.timeout(10), events.changed:
        await events.changed.wait_for(lambda: bool(events.named("TaskWaiting", task_id)))
    return target.headers[task_id][-1]["AuthToken"]


def _call(operation: Operation, base_url: str, **request: Any) -> int:
    """One request of our own making, held to the document like the generated ones."""
    response = operation.Case(**request).call_and_validate(
        base_url=base_url, headers={"Authorization": f"Bearer {API_TOKEN}"}, checks=CHECKS
    )
    return response.status_code


def _submissions(schema: schemathesis.BaseSchema, base_url: str, task: dict[str, Any]) -> list[int]:
    """Generated tasks are never valid (a random `request.url` is no URL): these are."""
    submit = schema["/tasks"]["POST"]
    other = {**task, "name": "another task under the same taskId"}
    return [
        _call(submit, base_url, body=task, media_type="application/json"),
        _call(submit, base_url, body=task, media_type="application/json"),
        _call(submit, base_url, body=other, media_type="application/json"),
    ]


def _definition(schema: schemathesis.BaseSchema, base_url: str, target: Target) -> dict[str, str]:
    """A definition, executed once, for the fuzzing to find (generated ones are never valid):
    the path parameters that name it and its execution."""
    name = "openapi-definition"
    body: dict[str, JsonValue] = {"name": name, "request": {"url": f"{target.url}/hook?key={name}"}}
    create = schema["/definitions"]["POST"].Case(body=body, media_type="application/json")
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    created = create.call_and_validate(base_url=base_url, headers=auth, checks=CHECKS)
    assert created.status_code == 201, created.text
    definition_id = created.json()["id"]
    execute = schema["/definitions/{id}/executions"]["POST"].Case(
        path_parameters={"id": definition_id}, body={}, media_type="application/json"
    )
    executed = execute.call_and_validate(base_url=base_url, headers=auth, checks=CHECKS)
    assert executed.status_code == 202, executed.text
    return {"id": definition_id, "name": name, "index": "1"}


def _operations(schema: schemathesis.BaseSchema) -> Iterator[Operation]:
    for path in schema:
        for method in schema[path]:
            yield schema[path][method]


def _modes(operation: Operation) -> list[GenerationMode]:
    parts = (operation.path_parameters, operation.query, operation.headers, operation.body)
    # Only a request with something in it can be sent broken.
    if any(parts):
        return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    return [GenerationMode.POSITIVE]


def _fuzz(
    schema: schemathesis.BaseSchema,
    base_url: str,
    task_id: str,
    callback_token: str,
    definition: dict[str, str],
) -> list[str]:
    """Every operation, valid and invalid data, against the live API: the failures found."""
    failures: list[str] = []
    with requests.Session() as session:
        for operation in _operations(schema):
            token = callback_token if operation.path.startswith(("/plans", "/{")) else API_TOKEN
            for mode in _modes(operation):
                try:
                    _check(operation, mode, task_id, definition, base_url, session, token)
                # Every operation is tried, so that one run tells every failure.
                except (FailureGroup, Exception) as exc:
                    failures.append(f"{operation.label} ({mode.value}):\n{exc}")
    return failures


def _check(
    operation: Operation,
    mode: GenerationMode,
    task_id: str,
    definition: dict[str, str],
    base_url: str,
    session: requests.Session,
    token: str,
) -> None:
    names = {parameter.name for parameter in operation.path_parameters}
    # Half the cases name the waiting task, or the definition and its execution, so that
    # handlers get past "no such task" to the answers built from its record. The definition is
    # never deleted: the operations after DELETE still find it.
    known = {"taskId": task_id, "planId": "plan-1"}
    if operation.method.upper() != "DELETE":
        known |= definition
    pinned = {k: v for k, v in known.items() if k in names}
    cases = st.one_of(
        operation.as_strategy(generation_mode=mode),
        operation.as_strategy(generation_mode=mode, path_parameters=pinned).map(
            lambda case: _for_the_task(case, task_id)
        ),
    )

    @hypothesis.settings(
        max_examples=DEFINITION_EXAMPLES if operation.path.startswith("/definitions") else EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        # Every example is a request to a live server: slow by Hypothesis's measure, and meant.
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=cases)
    def check(case: Case[Operation]) -> None:
        case.call_and_validate(
            base_url=base_url,
            session=session,
            headers={"Authorization": f"Bearer {token}"},
            checks=CHECKS,
        )

    check()


def _for_the_task(case: Case[Operation], task_id: str) -> Case[Operation]:
    # An event names its task in the body too; the token's task, for the handler to act on it.
    if case.operation.path.endswith("/events") and isinstance(case.body, dict):
        case.body = {**case.body, "taskId": task_id}
    return case


@pytest.mark.usefixtures("hypothesis_home")
async def test_the_live_api_keeps_to_its_document(api: Api, events: Events, target: Target) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{api.url}/openapi.json") as response,
    ):
        assert response.status == 200
        served = orjson.loads(await response.read())
    assert served == document(api.settings, ROUTES)

    schema = schemathesis.openapi.from_dict(served)
    task = task_message(target, waitForCompletion="callback")
    task_id = str(task["taskId"])
    # Schemathesis is synchronous: it runs in a thread while this loop serves its requests.
    assert await asyncio.to_thread(_submissions, schema, api.url, task) == [202, 202, 409]
    token = await _waiting(events, target, task_id)
    definition = await asyncio.to_thread(_definition, schema, api.url, target)

    failures = await asyncio.to_thread(_fuzz, schema, api.url, task_id, token, definition)
    assert failures == [], "\n\n".join(failures)


# Server errors the fuzzing can reach, each to be fixed where the handler reads its input (not
# where it answers): NUL characters reach PostgreSQL, which refuses them, and `_positive` takes
# str.isdigit() for "int() will parse it", which superscript digits are not.
# Inputs that once made handlers answer 500 (found by schemathesis): each is now a 4xx.
ONCE_SERVER_ERRORS = [
    pytest.param("GET", "/tasks?rowsPerPage=%C2%B2", None, id="superscript-digit-page-size"),
    pytest.param("GET", "/tasks?pageNumber=%C2%B9", None, id="superscript-digit-page"),
    pytest.param("GET", "/tasks?planId=a%00b", None, id="nul-in-a-filter"),
    pytest.param("GET", "/tasks/a%00b", None, id="nul-in-a-task-id"),
    pytest.param("POST", "/tasks/a%00b/cancel", None, id="nul-in-a-canceled-task-id"),
    pytest.param("GET", "/tasks/a%00b/logs", None, id="nul-in-a-task-id-for-logs"),
    pytest.param(
        "PATCH",
        "/p/_apis/distributedtask/hubs/build/plans/plan-1/timelines/t/records",
        {"value": [{"variables": {"name\u0000": {"value": "v"}}}]},
        id="nul-in-a-variable-name",
    ),
    pytest.param(
        "PATCH",
        "/p/_apis/distributedtask/hubs/build/plans/plan-1/timelines/t/records",
        {"value": [{"variables": {"name": {"value": "a\u0000b"}}}]},
        id="nul-in-a-variable-value",
    ),
    pytest.param(
        "POST",
        "/tasks",
        {"taskId": "big", "planId": "p", "request": {"url": "http://x"}, "variables": {"a": 2**64}},
        id="integer-beyond-64-bits-in-a-task",
    ),
    pytest.param(
        "POST",
        "/definitions/d/executions",
        {"input": {"a": 2**64}},
        id="integer-beyond-64-bits-in-an-execution-input",
    ),
]


@pytest.mark.parametrize(("method", "path", "body"), ONCE_SERVER_ERRORS)
async def test_inputs_that_once_caused_server_errors(
    api: Api, events: Events, target: Target, method: str, path: str, body: object
) -> None:
    task = task_message(target, waitForCompletion="callback")
    async with aiohttp.ClientSession() as session:
        auth = {"Authorization": f"Bearer {API_TOKEN}"}
        async with session.post(f"{api.url}/tasks", json=task, headers=auth) as response:
            response.raise_for_status()
        token = await _waiting(events, target, str(task["taskId"]))
        if not path.startswith(("/tasks", "/definitions")):
            auth = {"Authorization": f"Bearer {token}"}
        async with session.request(method, api.url + path, json=body, headers=auth) as response:
            assert response.status < 500, await response.text()
