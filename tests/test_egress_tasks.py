"""Tasks whose URL spells a denied address in another form fail with the egress reason, through a
real worker, and the endpoint behind that address is never called."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Events, Target, publish, task_message
from worker.contract.settings import Settings
from worker.service import Worker

LOOPBACK = "which is in the denied range 127.0.0.0/8"
METADATA = "which is in the denied range 169.254.0.0/16"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The target listens on loopback: denying it shows that no spelling reaches it. The first hop
    # of a redirect is let through by name.
    return settings.model_copy(
        update={"egress_deny": ["127.0.0.0/8", "::1/128"], "egress_allow": ["localhost"]}
    )


@pytest_asyncio.fixture
async def redirector() -> AsyncIterator[str]:
    """An endpoint that redirects to its `to` query parameter."""

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    app = web.Application()
    app.router.add_get("/", redirect)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://localhost:{server.port}/"
    await server.close()


async def reasons(
    channel: AbstractChannel,
    settings: Settings,
    events: Events,
    tasks: dict[str, dict[str, object]],
) -> dict[str, object]:
    for task in tasks.values():
        await publish(channel, settings, task)
    completed = await asyncio.gather(
        *(events.completed(str(task["taskId"])) for task in tasks.values())
    )
    return {
        name: (event["result"], event["reason"])
        for name, event in zip(tasks, completed, strict=True)
    }


async def test_every_spelling_of_a_denied_address_fails_its_task(
    settings: Settings,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    worker: Worker,
    redirector: str,
) -> None:
    port = target.url.rsplit(":", 1)[1]
    loopback = {
        "2130706433": f"2130706433 is 127.0.0.1, {LOOPBACK}",
        "0177.0.0.1": f"0177.0.0.1 is 127.0.0.1, {LOOPBACK}",
        "0x7f000001": f"0x7f000001 is 127.0.0.1, {LOOPBACK}",
        "0x7f.1": f"0x7f.1 is 127.0.0.1, {LOOPBACK}",
        "127.1": f"127.1 is 127.0.0.1, {LOOPBACK}",
        "[::ffff:127.0.0.1]": "127.0.0.1 is in the denied range 127.0.0.0/8",
        "[::127.0.0.1]": (
            f"::7f00:1 reaches 127.0.0.1 through IPv4-compatible addressing, {LOOPBACK}"
        ),
    }
    metadata = {
        "2852039166": f"2852039166 is 169.254.169.254, {METADATA}",
        "0xA9.0xFE.0xA9.0xFE": f"0xa9.0xfe.0xa9.0xfe is 169.254.169.254, {METADATA}",
        "[64:ff9b::169.254.169.254]": (
            f"64:ff9b::a9fe:a9fe reaches 169.254.169.254 through NAT64, {METADATA}"
        ),
        "[2002:a9fe:a9fe::1]": (
            f"2002:a9fe:a9fe::1 reaches 169.254.169.254 through 6to4, {METADATA}"
        ),
    }
    keys = {host: uuid.uuid4().hex for host in loopback}
    tasks = {
        host: task_message(target, request={"url": f"http://{host}:{port}/hook?key={key}"})
        for host, key in keys.items()
    }
    tasks |= {host: task_message(target, request={"url": f"http://{host}/"}) for host in metadata}
    # Checked on every hop, not only the first.
    tasks["redirect"] = task_message(
        target, request={"method": "GET", "url": f"{redirector}?to=http://0xa9fea9fe/latest/"}
    )
    keys["callback"] = uuid.uuid4().hex
    tasks["callback"] = task_message(
        target,
        waitForCompletion="callback",
        request={"url": f"http://0x7f.0.0.1:{port}/hook?key={keys['callback']}"},
    )

    got = await reasons(channel, settings, events, tasks)

    refusals = loopback | metadata
    refusals["redirect"] = f"0xa9fea9fe is 169.254.169.254, {METADATA}"
    refusals["callback"] = f"0x7f.0.0.1 is 127.0.0.1, {LOOPBACK}"
    assert got == {name: ("failed", f"egress refused: {why}") for name, why in refusals.items()}
    assert {name: target.calls[key] for name, key in keys.items()} == dict.fromkeys(keys, 0)
