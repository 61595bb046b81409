"""Large response bodies: kept as the JSON text that came, read only with room in the process's
byte budget, which is given back once the response is dropped; and the budget itself."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from tests.conftest import DATABASE_URL
from tests.invoke.calls import failed, http_request, succeeded
from worker.budget import ByteBudget
from worker.contract.judging import judge, outputs
from worker.contract.models import EventName, HttpResponse, TaskEvent, UnparsedResponse
from worker.contract.settings import Settings
from worker.invoke import SMALL_BODY, Invoker
from worker.store.storable import response_json

CAP = 1024 * 1024
# Large enough to go through the budget, with a NUL that PostgreSQL cannot hold.
DOCUMENT = {"items": ["ab\u0000"] * 20_000, "status": "created"}
# Valid JSON that orjson reads but will not write: nested deeper than 254 levels.
DEEP = b"[" * 300 + b" " * SMALL_BODY + b"]" * 300
# Numbers JSON allows and PostgreSQL's jsonb does not hold as they are written.
BEYOND = b"[0." + b"1" * 20_000 + b", 1e-20000]"


async def large(request: web.Request) -> web.StreamResponse:
    kind = request.match_info["kind"]
    if kind == "json":
        # Spaced as a server might send it: kept as it came.
        return web.json_response(DOCUMENT, dumps=lambda v: orjson.dumps(v).decode() + "  ")
    if kind == "chunked-json":
        response = web.StreamResponse()
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(orjson.dumps(DOCUMENT))
        await response.write_eof()
        return response
    if kind == "deep":
        # The request's body, sent back as JSON.
        return web.Response(body=await request.read(), content_type="application/json")
    if kind == "beyond":
        return web.Response(body=BEYOND, content_type="application/json")
    if kind == "text":
        return web.Response(text="x" * (SMALL_BODY * 2), content_type="text/plain")
    return web.json_response({"small": True})


@pytest_asyncio.fixture
async def server() -> AsyncIterator[URL]:
    app = web.Application()
    app.router.add_route("*", "/{kind}", large)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    yield test_server.make_url("/")
    await test_server.close()


@pytest_asyncio.fixture
async def invoker() -> AsyncIterator[Invoker]:
    settings = Settings(
        response_timeout=1,
        max_response_bytes=CAP,
        concurrency=8,
        connections=None,
        egress_deny=[],
        egress_allow=[],
    )
    async with Invoker(settings, {}) as made:
        yield made


@pytest.mark.parametrize("kind", ["json", "chunked-json"])
async def test_a_large_json_body_is_kept_as_its_text_and_read_when_needed(
    invoker: Invoker, server: URL, kind: str
) -> None:
    response = succeeded(await invoker.invoke(http_request(server / kind), {}))
    assert isinstance(response, UnparsedResponse)
    assert (response.body, response.body_value()) == (None, DOCUMENT)
    # Criteria and outputs read it; what is stored and published carries it whole.
    judged = judge(response, "body.status == 'created'")
    assert (judged.result, judged.reason) == ("succeeded", "HTTP 200; successCriteria true")
    assert outputs({"n": "length(body.items)"}, response) == {"n": 20_000}
    stored = orjson.loads(response_json(response) or "")
    kept = {"items": ["ab\ufffd"] * 20_000, "status": "created"}
    assert stored == {
        "statusCode": 200,
        "headers": response.headers,
        "body": kept,
        "elapsedMs": response.elapsed_ms,
    }
    event = TaskEvent(
        name=EventName.COMPLETED,
        event_id="t:completed",
        task_id="t",
        plan_id="p",
        job_id="p",
        hub_name="build",
        response=response,
        attempts=1,
        queued_at=datetime(2026, 1, 2, tzinfo=UTC),
    )
    assert orjson.loads(event.json_bytes()) == orjson.loads(event.model_dump_json(by_alias=True))


async def test_a_large_body_that_is_not_json_is_its_text(invoker: Invoker, server: URL) -> None:
    response = succeeded(await invoker.invoke(http_request(server / "text"), {}))
    assert (type(response), response.body) == (HttpResponse, "x" * (SMALL_BODY * 2))


@pytest.mark.parametrize("body", [DEEP, b"[" * 254 + b"]" * 254], ids=["large", "small"])
async def test_json_nested_too_deep_to_be_written_again_is_its_text(
    invoker: Invoker, server: URL, body: bytes
) -> None:
    """Kept as parsed, such a body would fail its TaskCompleted event's serialisation, and so
    the task's every attempt to complete."""
    response = succeeded(
        await invoker.invoke(http_request(server / "deep", body=body.decode()), {})
    )
    assert (type(response), response.body) == (HttpResponse, body.decode())


async def test_large_json_numbers_beyond_postgresql_are_stored_as_orjson_writes_them(
    invoker: Invoker, server: URL
) -> None:
    response = succeeded(await invoker.invoke(http_request(server / "beyond"), {}))
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        stored = await conn.fetchval("SELECT ($1::jsonb -> 'body')::text", response.json_text())
    finally:
        await conn.close()
    assert stored == "[0.1111111111111111, 0.0]"


async def test_a_large_body_holds_its_bytes_until_its_response_is_dropped(
    invoker: Invoker, server: URL
) -> None:
    budget = invoker.budget
    response: HttpResponse | None = succeeded(
        await invoker.invoke(http_request(server / "json"), {})
    )
    held = budget.total - budget.free
    del response
    gc.collect()
    assert (held, budget.free) == (len(orjson.dumps(DOCUMENT)) + 2, budget.total)


async def test_waiting_for_room_does_not_count_against_the_response_timeout(
    invoker: Invoker, server: URL
) -> None:
    budget = invoker.budget
    taken = await budget.take(budget.total)
    call = asyncio.create_task(invoker.invoke(http_request(server / "json"), {}))
    async with asyncio.timeout(5):
        while budget.waiting == 0:
            await asyncio.sleep(0.01)
    # A small body needs no room: it is answered while the large one waits.
    small = succeeded(await invoker.invoke(http_request(server / "small"), {}))
    assert small.body == {"small": True}
    # Past the 1 s response timeout, spent waiting for room.
    await asyncio.sleep(1.5)
    budget.give(taken)
    response = succeeded(await call)
    assert response.body_value() == DOCUMENT


async def test_a_call_timed_out_while_reading_gives_its_room_back(invoker: Invoker) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = CAP
        await response.prepare(request)
        await response.write(b"[" + b" " * SMALL_BODY)
        await asyncio.sleep(5)
        return response

    app = web.Application()
    app.router.add_get("/", slow)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    try:
        reason = failed(await invoker.invoke(http_request(test_server.make_url("/")), {}))
    finally:
        await test_server.close()
    assert (reason, invoker.budget.free) == (
        "no complete response within 1 s",
        invoker.budget.total,
    )


async def test_the_budget_serves_takers_in_order_and_skips_the_cancelled() -> None:
    budget = ByteBudget(10)
    assert await budget.take(8) == 8
    order: list[str] = []

    async def taker(name: str, wanted: int) -> None:
        await budget.take(wanted)
        order.append(name)

    big = asyncio.create_task(taker("big", 6))
    gone = asyncio.create_task(taker("gone", 1))
    small = asyncio.create_task(taker("small", 1))
    async with asyncio.timeout(5):
        while budget.waiting < 3:
            await asyncio.sleep(0)
    # First come, first served: the small taker waits behind the big one, though 2 bytes are
    # free; a cancelled taker is passed over.
    assert (order, budget.free) == ([], 2)
    gone.cancel()
    budget.give(8)
    await asyncio.gather(big, small)
    assert (order, budget.free) == (["big", "small"], 3)
    # More than the whole budget is taken as the whole budget: a body never waits forever.
    budget.give(7)
    assert (await budget.take(50), budget.free) == (10, 0)
