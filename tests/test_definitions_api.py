"""The definitions API over HTTP (SPEC §9): definitions made, read, listed, replaced, patched and
deleted, and tasks executed from them, against one API (with its worker) shared by the module."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from pydantic import AnyUrl

from callback_api.app import create_app, worker_key
from tests.conftest import (
    AMQP_URL,
    Api,
    Events,
    Target,
    free_port,
    schema_url,
    unique_name,
)
from tests.task_api import call
from worker.contract.models import Names
from worker.contract.settings import Settings
from worker.topology import declare_topology

# One API for the module: each test names its definitions apart (`named`).
pytestmark = pytest.mark.xdist_group("definitions_api")


@pytest_asyncio.fixture(scope="module")
async def shared(
    amqp: AbstractRobustConnection, target: Target, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Api, Events]]:
    """`agentless run` with its own prefix and schema, and the events it publishes; its one
    service connection, `ci`, is the target."""
    name = unique_name()
    connections = tmp_path_factory.mktemp("connections") / "connections.json"
    connections.write_bytes(orjson.dumps({"ci": {"url": target.url}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = Settings(
        amqp_url=AMQP_URL,
        database_url=schema_url(name),
        prefix=f"agentless-test.{name}",
        response_timeout=3,
        concurrency=32,
        worker_port=0,
        log_format="json",
        connections=connections,
        egress_deny=[],
        egress_allow=[],
        api_port=port,
        public_url=AnyUrl(url),
    )
    names = Names(settings.prefix)
    channel = await amqp.channel(publisher_confirms=True)
    await declare_topology(channel, names)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(names.events, "task.#")
    events = Events()
    await queue.consume(events.on_message, no_ack=True)
    app = create_app(settings, worker=True)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        worker = app[worker_key]
        await asyncio.wait_for(worker.consumer.consuming.wait(), 10)
        yield Api(url, settings, worker), events
    finally:
        await runner.cleanup()
        for doomed in (names.tasks, names.dead):
            await channel.queue_delete(doomed)
        await channel.exchange_delete(names.events)
        await channel.close()
        conn = await asyncpg.connect(settings.database_url)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


@pytest.fixture
def api(shared: tuple[Api, Events]) -> Api:
    return shared[0]


@pytest.fixture
def events(shared: tuple[Api, Events]) -> Events:
    return shared[1]


def named(stem: str) -> str:
    """A definition name no other test of the module uses."""
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def definition(target: Target, name: str, **fields: Any) -> dict[str, Any]:
    """A valid definition calling `target`, keyed by its name, with `fields` merged in."""
    return {
        "name": name,
        "request": {"method": "POST", "url": f"{target.url}/hook?key={name}"},
        **fields,
    }


async def create(api: Api, body: object) -> Any:
    status, made, _ = await call("POST", f"{api.url}/definitions", body)
    assert status == 201, made
    return made


async def test_create_then_read_by_id_and_by_name(api: Api, target: Target) -> None:
    name = named("Tag-Build")
    status, made, headers = await call(
        "POST", f"{api.url}/definitions", definition(target, name, description="tags it")
    )
    assert status == 201, made
    assert headers["Location"] == f"/definitions/{made['id']}"
    assert headers["ETag"] == '"1"'
    assert (made["name"], made["description"], made["version"]) == (name, "tags it", 1)
    assert made["createdAt"] == made["updatedAt"]
    assert made["request"]["url"] == f"{target.url}/hook?key={name}"
    assert made["hubName"] == "build"  # the task's defaults

    status, read, headers = await call("GET", f"{api.url}{headers['Location']}")
    assert (status, read, headers["ETag"]) == (200, made, '"1"')
    status, read, headers = await call("GET", f"{api.url}/definitions/name/{name.upper()}")
    assert (status, read, headers["ETag"]) == (200, made, '"1"')

    for path in ("/definitions/no-such-id", "/definitions/name/no-such-name"):
        status, problem, headers = await call("GET", api.url + path)
        assert (status, headers["Content-Type"]) == (404, "application/problem+json")
        assert "there is no task definition" in problem["detail"]


async def test_a_name_is_unique_in_any_case(api: Api, target: Target) -> None:
    name = named("unique")
    await create(api, definition(target, name))
    status, problem, _ = await call(
        "POST", f"{api.url}/definitions", definition(target, name.upper())
    )
    assert status == 409
    assert f"named {name.upper()!r} exists already" in problem["detail"]
    # In an array, against the others too: the item is named, and none is made.
    other = named("other")
    status, problem, _ = await call(
        "POST",
        f"{api.url}/definitions",
        [definition(target, other), definition(target, other.title())],
    )
    assert (status, problem["index"]) == (409, 1)
    assert (await call("GET", f"{api.url}/definitions/name/{other}"))[0] == 404


async def test_an_array_is_made_all_or_nothing_in_order(api: Api, target: Target) -> None:
    stem = named("bulk")
    bad = [
        definition(target, f"{stem}-a"),
        definition(target, f"{stem}-b", request={"url": "ftp://x"}),
        definition(target, f"{stem}-c", successCriteria="body.["),
        {"name": "no spaces allowed", "request": {"url": f"{target.url}/"}},
    ]
    status, problem, _ = await call("POST", f"{api.url}/definitions", bad)
    assert status == 400
    assert [error["field"] for error in problem["errors"]] == [
        "[1].request.url",
        "[2].successCriteria",
        "[3].name",
    ]
    assert "fix: [1].request.url, [2].successCriteria, [3].name" in problem["detail"]
    status, page, _ = await call("GET", f"{api.url}/definitions?name={stem}")
    assert (status, page) == (200, {"definitions": [], "total": 0})

    good = [definition(target, f"{stem}-{letter}") for letter in "zay"]
    made = await create(api, good)
    assert [d["name"] for d in made] == [f"{stem}-z", f"{stem}-a", f"{stem}-y"]
    assert len({d["id"] for d in made}) == 3

    for body, detail in [
        ([], "an array body holds 1 to 1000 items"),
        (b"{", "not JSON"),
        (b'{"name": "a\\u0000"}', "NUL character"),
    ]:
        status, problem, _ = await call("POST", f"{api.url}/definitions", body)
        assert (status, detail in problem["detail"]) == (400, True), problem


async def test_a_definition_is_validated_as_a_task_is(api: Api, target: Target) -> None:
    status, problem, _ = await call(
        "POST",
        f"{api.url}/definitions",
        {
            "name": named("invalid"),
            "request": {"url": f"{target.url}/", "method": "BREW"},
            "criteriaSyntax": "azure",
            "successCriteria": "eq(root['a'],",
            "timeoutSeconds": -1,
            "taskId": "not-a-definition-field",
        },
    )
    assert status == 400
    assert {error["field"] for error in problem["errors"]} == {
        "request.method",
        "successCriteria",
        "timeoutSeconds",
        "taskId",
    }


async def test_a_connection_must_be_one_the_deployment_has(
    api: Api, events: Events, target: Target
) -> None:
    name = named("connected")
    status, problem, _ = await call(
        "POST",
        f"{api.url}/definitions",
        {"name": name, "request": {"connection": "nope", "urlSuffix": "/x"}},
    )
    assert status == 400
    assert problem["errors"] == [
        {
            "field": "request",
            "message": "connection 'nope' is not a service connection of this deployment "
            "(known: ci)",
        }
    ]
    made = await create(
        api, {"name": name, "request": {"connection": "ci", "urlSuffix": f"/hook?key={name}"}}
    )
    status, problem, _ = await call(
        "PATCH", f"{api.url}/definitions/{made['id']}", {"request": {"connection": "nope"}}
    )
    assert (status, [e["field"] for e in problem["errors"]]) == (400, ["request"])
    status, started, _ = await call("POST", f"{api.url}/definitions/{made['id']}/executions")
    assert status == 202
    assert (await events.completed(started["executionId"]))["result"] == "succeeded"
    assert target.calls[name] == 1


async def test_list_formats_filter_order_and_pages(api: Api, target: Target) -> None:
    stem = named("Listed")
    made = await create(
        api, [definition(target, f"{stem}-{n}", description=f"number {n}") for n in range(5)]
    )
    lower = stem.lower()
    status, page, _ = await call("GET", f"{api.url}/definitions?name={lower}")
    assert status == 200
    assert page["total"] == 5
    assert page["definitions"][0] == {
        key: made[0][key] for key in ("id", "name", "description", "version", "updatedAt")
    }
    formats = {}
    for shape in ("list", "detail", "name", "no-such-format"):
        status, page, _ = await call(
            "GET", f"{api.url}/definitions?name={lower}&format={shape}&rowsPerPage=1"
        )
        assert status == 200
        formats[shape] = page["definitions"][0]
    assert formats["detail"] == made[0]
    assert formats["name"] == {"id": made[0]["id"], "name": made[0]["name"]}
    assert formats["no-such-format"] == formats["list"]

    status, page, _ = await call(
        "GET",
        f"{api.url}/definitions?name={stem}&orderField=createdAt&sortType=DESC"
        "&rowsPerPage=2&pageNumber=2&format=name",
    )
    assert (status, [d["name"] for d in page["definitions"]]) == (
        200,
        [f"{stem}-2", f"{stem}-1"],
    )

    query = f"{api.url}/definitions?name={stem}&format=name"
    status, page, headers = await call("GET", query, headers={"Range": "items=1-2"})
    assert (status, headers["Content-Range"]) == (206, "items 1-2/5")
    assert [d["name"] for d in page["definitions"]] == [f"{stem}-1", f"{stem}-2"]
    status, problem, headers = await call("GET", query, headers={"Range": "items=5-9"})
    assert (status, headers["Content-Range"]) == (416, "items */5")
    assert "past the last of 5 task definitions" in problem["detail"]

    for bad, detail in [
        ("orderField=version", "orderField 'version' is not one of name, createdAt, updatedAt"),
        ("sortType=up", "sortType must be asc or desc"),
        ("name=a%20b", "name must be part of a name"),
        ("nmae=x", "unknown query parameters: nmae"),
    ]:
        status, problem, _ = await call("GET", f"{api.url}/definitions?{bad}")
        assert (status, detail in problem["detail"]) == (400, True), problem


async def test_a_browser_gets_a_page_unless_the_url_asks_for_json(api: Api, target: Target) -> None:
    name = named("browsed")
    made = await create(api, definition(target, name, description="<b>not bold</b>"))
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    for path in (f"/definitions?name={name}", f"/definitions/{made['id']}"):
        raw = await _raw("GET", api.url + path, browser)
        assert raw[0] == 200
        assert raw[1].startswith("text/html")
        assert "&lt;b&gt;not bold&lt;/b&gt;" in raw[2]
        joiner = "&" if "?" in path else "?"
        status, body, headers = await call("GET", f"{api.url}{path}{joiner}json", headers=browser)
        assert (status, headers["Content-Type"]) == (200, "application/json")
        assert made["id"] in str(body)


async def _raw(method: str, url: str, headers: dict[str, str]) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        return response.status, response.content_type, await response.text()


async def test_put_replaces_and_patch_changes_only_what_is_given(api: Api, target: Target) -> None:
    name = named("changed")
    made = await create(
        api,
        definition(target, name, description="first", variables={"a": 1}, timeoutSeconds=60),
    )
    url = f"{api.url}/definitions/{made['id']}"

    # PUT: every attribute; the omitted ones take their defaults.
    status, put, headers = await call("PUT", url, definition(target, name, description="second"))
    assert status == 200, put
    assert (put["version"], put["description"], put["variables"], put["timeoutSeconds"]) == (
        2,
        "second",
        {},
        None,
    )
    assert (headers["ETag"], headers["Agentless-Changed"]) == (
        '"2"',
        "description, timeoutSeconds, variables",
    )
    assert put["createdAt"] == made["createdAt"] < put["updatedAt"]

    # If-Match: a stale version is refused, and changes nothing.
    status, problem, headers = await call(
        "PUT", url, definition(target, name, description="third"), {"If-Match": '"1"'}
    )
    assert (status, problem["currentVersion"], headers["ETag"]) == (412, 2, '"2"')
    status, problem, _ = await call("PATCH", url, {"description": "x"}, {"If-Match": "1"})
    assert (status, 'If-Match must be the ETag read, "VERSION"' in problem["detail"]) == (400, True)

    # PATCH with only nulls (or nothing): nothing changes, and the answer says so.
    for nothing in ({"description": None, "request": None}, {}):
        status, same, headers = await call("PATCH", url, nothing, {"If-Match": '"2"'})
        assert (status, same, headers["Agentless-Changed"], headers["ETag"]) == (
            200,
            put,
            "none",
            '"2"',
        )

    # PATCH: the attributes given; null ones stay.
    status, patched, headers = await call(
        "PATCH", url, {"description": "patched", "successCriteria": None, "hubName": "Release"}
    )
    assert status == 200
    assert headers["Agentless-Changed"] == "description, hubName"
    assert patched == {
        **put,
        "description": "patched",
        "hubName": "Release",
        "version": 3,
        "updatedAt": patched["updatedAt"],
    }
    # The same again changes nothing: the version stays.
    status, again, headers = await call("PATCH", url, {"description": "patched"})
    assert (status, again["version"], headers["Agentless-Changed"]) == (200, 3, "none")

    status, problem, _ = await call(
        "PATCH", url, {"request": {"url": "ftp://x"}, "timeoutSeconds": 0, "nope": 1}
    )
    assert status == 400
    assert {error["field"] for error in problem["errors"]} == {
        "request.url",
        "timeoutSeconds",
        "nope",
    }
    taken = named("taken")
    await create(api, definition(target, taken))
    status, problem, _ = await call("PATCH", url, {"name": taken.upper()})
    assert status == 409
    status, problem, _ = await call("PUT", f"{api.url}/definitions/no-such-id", put)
    assert status == 404


async def test_an_array_put_replaces_by_id_all_or_nothing(api: Api, target: Target) -> None:
    stem = named("replaced")
    first, second = await create(api, [definition(target, f"{stem}-{n}") for n in (1, 2)])
    status, problem, _ = await call(
        "PUT",
        f"{api.url}/definitions",
        [
            {**first, "description": "new"},
            {**second, "description": "new", "version": 7},
        ],
    )
    assert (status, problem["currentVersion"]) == (412, 1)
    status, problem, _ = await call(
        "PUT",
        f"{api.url}/definitions",
        [{**first, "description": "new"}, {"name": f"{stem}-3", "request": first["request"]}],
    )
    assert (status, [e["field"] for e in problem["errors"]]) == (400, ["[1].id"])
    assert (await call("GET", f"{api.url}/definitions/{first['id']}"))[1] == first

    status, replaced, headers = await call(
        "PUT",
        f"{api.url}/definitions",
        [{**first, "description": "new"}, second],
    )
    assert status == 200
    assert [(d["id"], d["version"], d["description"]) for d in replaced] == [
        (first["id"], 2, "new"),
        (second["id"], 1, ""),
    ]
    assert headers["Agentless-Changed"] == first["id"]


async def test_delete_one_or_several(api: Api, target: Target) -> None:
    stem = named("deleted")
    one, two, three = await create(api, [definition(target, f"{stem}-{n}") for n in range(3)])
    url = f"{api.url}/definitions/{one['id']}"
    status, executed, _ = await call("POST", f"{url}/executions", {})
    assert status == 202, executed

    assert (await call("DELETE", url, headers={"If-Match": '"5"'}))[0] == 412
    assert (await call("DELETE", url))[0:2] == (204, None)
    assert (await call("GET", url))[0] == 404
    assert (await call("DELETE", url))[0] == 404
    # Its executions stay readable.
    status, page, _ = await call("GET", f"{url}/executions")
    assert (status, [e["executionId"] for e in page["executions"]]) == (
        200,
        [executed["executionId"]],
    )
    assert (await call("GET", f"{url}/executions/1"))[0] == 200

    status, problem, _ = await call(
        "DELETE", f"{api.url}/definitions", [two["id"], "no-such-id", three["id"]]
    )
    assert (status, problem["id"]) == (404, "no-such-id")
    assert (await call("GET", f"{api.url}/definitions/{two['id']}"))[0] == 200
    status, _, _ = await call("DELETE", f"{api.url}/definitions", [two["id"], three["id"]])
    assert status == 204
    status, page, _ = await call("GET", f"{api.url}/definitions?name={stem}")
    assert page["total"] == 0


async def test_an_execution_runs_a_task_with_its_input(
    api: Api, events: Events, target: Target
) -> None:
    name = named("executed")
    made = await create(
        api,
        definition(
            target,
            name,
            request={
                "url": f"{target.url}/hook?key={name}",
                "body": {"who": "$(variables.who)", "what": "$(variables.what)"},
            },
            variables={"who": "nobody", "what": "default"},
            successCriteria="body.status == 'created'",
        ),
    )
    status, started, headers = await call(
        "POST",
        f"{api.url}/definitions/name/{name.upper()}/executions",
        {"input": {"who": "someone"}, "tags": ["nightly", "v1"], "comments": "first"},
    )
    assert status == 202, started
    execution_id = started["executionId"]
    assert started == {
        "executionId": execution_id,
        "executionIndex": 1,
        "executionLink": f"{api.url}/tasks/{execution_id}",
    }
    assert headers["Location"] == f"/definitions/{made['id']}/executions/1"

    completed = await events.completed(execution_id)
    assert completed["result"] == "succeeded"
    status, task, _ = await call("GET", started["executionLink"])
    assert (status, task["name"], task["variables"]) == (
        200,
        name,
        {"who": "someone", "what": "default"},
    )
    assert orjson.loads(task["response"]["body"]["body"]) == {"who": "someone", "what": "default"}

    status, execution, _ = await call("GET", api.url + headers["Location"])
    assert status == 200
    assert {k: execution[k] for k in ("executionId", "definitionId", "version", "tags")} == {
        "executionId": execution_id,
        "definitionId": made["id"],
        "version": 1,
        "tags": ["nightly", "v1"],
    }
    assert (execution["state"], execution["result"], execution["executionLink"]) == (
        "completed",
        "succeeded",
        started["executionLink"],
    )

    # GET /tasks finds it by its definition (id, or name in any case) and by its tags.
    for query in (f"definition={made['id']}", f"definition={name.upper()}&tag=nightly"):
        status, page, _ = await call("GET", f"{api.url}/tasks?{query}")
        assert (status, [t["taskId"] for t in page["tasks"]]) == (200, [execution_id]), query
    for query in (f"definition={name}&tag=nope", "tag=nightly-not"):
        status, page, _ = await call("GET", f"{api.url}/tasks?{query}")
        assert (status, page["total"]) == (200, 0), query


async def test_the_same_execution_id_is_the_same_execution(api: Api, target: Target) -> None:
    made = await create(api, definition(target, named("repeated")))
    url = f"{api.url}/definitions/{made['id']}/executions"
    body = {"executionId": f"exec-{uuid.uuid4().hex}", "input": {"a": 1}}
    first = await call("POST", url, body)
    again = await call("POST", url, body)
    assert first[0:2] == again[0:2]
    assert first[1]["executionIndex"] == 1
    status, problem, _ = await call("POST", url, {**body, "input": {"a": 2}})
    assert (status, "names an execution with another request" in problem["detail"]) == (409, True)
    # No body at all: every default, and the next index.
    status, started, _ = await call("POST", url)
    assert (status, started["executionIndex"]) == (202, 2)


async def test_concurrent_executions_get_distinct_indexes(api: Api, target: Target) -> None:
    made = await create(api, definition(target, named("concurrent")))
    url = f"{api.url}/definitions/{made['id']}/executions"
    answers = await asyncio.gather(*(call("POST", url, {}) for _ in range(12)))
    assert [status for status, _, _ in answers] == [202] * 12
    assert sorted(body["executionIndex"] for _, body, _ in answers) == list(range(1, 13))

    status, page, headers = await call(
        "GET", f"{url}?sortType=asc", headers={"Range": "items=10-20"}
    )
    assert (status, headers["Content-Range"]) == (206, "items 10-11/12")
    assert [e["executionIndex"] for e in page["executions"]] == [11, 12]
    status, page, _ = await call("GET", f"{url}?rowsPerPage=3")
    assert [e["executionIndex"] for e in page["executions"]] == [12, 11, 10]
    assert page["total"] == 12
    assert (await call("GET", url, headers={"Range": "items=12-13"}))[0] == 416


async def test_bad_executions_are_refused(api: Api, target: Target) -> None:
    made = await create(api, definition(target, named("refused")))
    url = f"{api.url}/definitions/{made['id']}"
    for path, body, expected, detail in [
        (f"{url}/executions", {"tags": ["no spaces"], "input": []}, 400, "fix: input, tags.0"),
        (f"{url}/executions", {"executionId": "x", "other": 1}, 400, "fix: other"),
        (f"{url}/executions", b'{"input": {"a": 18446744073709551616}}', 400, "64 bits"),
        (f"{url}/executions", b'{"input": {"a": "\\ud800"}}', 400, "not JSON"),
        (f"{api.url}/definitions/no-such-id/executions", {}, 404, "no task definition"),
        (f"{api.url}/definitions/name/no-such/executions", {}, 404, "named 'no-such'"),
    ]:
        status, problem, _ = await call(
            "POST", path if path.startswith("http") else api.url + path, body
        )
        assert (status, detail in problem["detail"]) == (expected, True), problem
    # An id that is an ordinary task's is no execution's.
    status, problem, _ = await call(
        "POST",
        f"{api.url}/tasks",
        {"taskId": "plain-task", "planId": "p", "request": {"url": f"{target.url}/x"}},
    )
    status, problem, _ = await call("POST", f"{url}/executions", {"executionId": "plain-task"})
    assert (status, "a task that no definition made" in problem["detail"]) == (409, True)

    for path, expected in [
        (f"{url}/executions/1", 404),
        (f"{url}/executions/x", 400),
        (f"{url}/executions/0", 400),
        (f"{api.url}/definitions/no-such-id/executions", 404),
    ]:
        status, _, _ = await call("GET", path)
        assert status == expected, path
