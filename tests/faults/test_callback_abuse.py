"""Abuse of the callback API: forged tokens by the thousand, hostile bodies. Each is refused with
a 4xx problem, forged tokens cost no database read, and valid callbacks still get through."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aio_pika.abc import AbstractChannel

from tests.callbacks import waiting
from tests.conftest import Api, Events, Target
from worker.contract.tokens import Signer, new_key

FORGED = 10_000

STORE_READS = (
    "complete_by_callback",
    "external_started",
    "in_plan",
    "append_log_lines",
    "create_log",
    "merge_outputs",
    "get",
)


async def test_forged_tokens_cost_no_database_read(
    monkeypatch: pytest.MonkeyPatch,
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
) -> None:
    task, headers = await waiting(api, channel, events, target)
    reads: Counter[str] = Counter()
    store = api.worker.store
    for name in STORE_READS:
        original = getattr(store, name)

        def counting(
            *args: Any, _name: str = name, _original: Callable[..., Any] = original
        ) -> Any:
            reads[_name] += 1
            return _original(*args)

        monkeypatch.setattr(store, name, counting)

    # Well-formed tokens, signed with a key that is not the service's: the strongest forgery.
    forger = Signer(new_key())
    body = {"name": "TaskCompleted", "taskId": task["taskId"], "result": "succeeded"}
    statuses: Counter[int] = Counter()
    limit = asyncio.Semaphore(100)

    async def forge(session: aiohttp.ClientSession, n: int) -> None:
        token = forger.issue(str(task["taskId"]), "plan-1", time.time() + 3600 + n)
        async with (
            limit,
            session.post(
                f"{api.url}/plans/plan-1/events",
                json=body,
                headers={"Authorization": f"Bearer {token}"},
            ) as response,
        ):
            statuses[response.status] += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(forge(session, n) for n in range(FORGED)))
    assert statuses == Counter({401: FORGED})
    assert sum(reads.values()) == 0

    # The real service still gets through.
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{api.url}/plans/plan-1/events",
            json=body,
            headers={"Authorization": f"Bearer {headers['AuthToken']}"},
        ) as response,
    ):
        assert response.status == 200
    assert reads["complete_by_callback"] == 1


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"[" * 30_000 + b"]" * 30_000, 400),
        (b'{"name": "TaskCompleted", "taskId": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400),
        (b'{"name": "TaskCompleted", "taskId": "\xff\xfe", "result": "succeeded"}', 400),
        (
            b'{"name": "TaskCompleted", "taskId": "t", "result": "succeeded", "pad": "'
            + b"x" * 70_000
            + b'"}',
            413,
        ),
        (b"\x00" * 1000, 400),
    ],
    ids=["nested-array", "nested-task-id", "invalid-utf8", "oversized", "binary"],
)
async def test_hostile_bodies_are_refused_with_a_problem(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    body: bytes,
    status: int,
) -> None:
    task, headers = await waiting(api, channel, events, target)
    auth = {"Authorization": f"Bearer {headers['AuthToken']}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.post(f"{api.url}/plans/plan-1/events", data=body) as response:
            assert response.status == status
            assert response.content_type == "application/problem+json"
        good = {"name": "TaskCompleted", "taskId": task["taskId"], "result": "succeeded"}
        async with session.post(f"{api.url}/plans/plan-1/events", json=good) as response:
            assert response.status == 200
