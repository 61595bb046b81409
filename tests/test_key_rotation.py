"""Signing key rotation: AGENTLESS_SIGNING_KEY lists keys, tokens are signed with the first and
accepted with any, so that a key can be rotated while tasks wait on tokens signed with the old one;
what was sealed under a listed key stays readable; a removed key's tokens are refused."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from aio_pika.abc import AbstractChannel
from aiohttp import web
from pydantic import AnyUrl, SecretStr

from callback_api.app import create_app, worker_key
from callback_api.server import Deadlines
from tests.callbacks import callback_task, post
from tests.conftest import Api, Events, Target, free_port, publish, task_message
from worker.contract.errors import ConfigError
from worker.contract.sealing import Sealer, SealError
from worker.contract.settings import Settings, load_settings
from worker.contract.tokens import Signer, TokenError

OLD = "old-key-" + secrets.token_urlsafe(32)
NEW = "new-key-" + secrets.token_urlsafe(32)
WAITING = 100
FORGED = 10_000


@asynccontextmanager
async def serving(settings: Settings, keys: str) -> AsyncIterator[Api]:
    """`agentless run` in this process with AGENTLESS_SIGNING_KEY=`keys`, until the block ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    served = settings.model_copy(
        update={"api_port": port, "public_url": AnyUrl(url), "signing_key": SecretStr(keys)}
    )
    app = create_app(served, worker=True, deadlines=Deadlines())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        worker = app[worker_key]
        await asyncio.wait_for(worker.consumer.consuming.wait(), 10)
        yield Api(url, served, worker)
    finally:
        await runner.cleanup()


async def queue_waiting(
    api: Api, channel: AbstractChannel, events: Events, target: Target, count: int
) -> dict[str, str]:
    """Queue `count` callback tasks and wait until each waits: their tokens, by task id."""
    tasks = [callback_task(target) for _ in range(count)]
    for task in tasks:
        await publish(channel, api.settings, task)
    ids = {str(task["taskId"]) for task in tasks}
    async with asyncio.timeout(30), events.changed:
        await events.changed.wait_for(
            lambda: ids <= {str(e["taskId"]) for e in events.named("TaskWaiting")}
        )
    return {task_id: target.headers[task_id][-1]["AuthToken"] for task_id in ids}


def completed(task_id: str) -> dict[str, str]:
    return {"name": "TaskCompleted", "taskId": task_id, "result": "succeeded"}


async def test_rotation_keeps_every_waiting_token_until_its_key_is_removed(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(settings, OLD) as api:
        old_tokens = await queue_waiting(api, channel, events, target, WAITING + 1)
    kept_back, *rotated = sorted(old_tokens)

    # The new key first, the old one still listed: every token out there is still good.
    async with serving(settings, f"{NEW},{OLD}") as api:
        answers = await asyncio.gather(
            *(
                post(f"{api.url}/plans/plan-1/events", completed(task_id), old_tokens[task_id])
                for task_id in rotated
            )
        )
        assert [(status, body["result"]) for status, body, _ in answers] == [
            (200, "succeeded")
        ] * WAITING
        await events.completed_count(WAITING, timeout=30)
        # Tokens handed out from now on are signed with the new key.
        new_tokens = await queue_waiting(api, channel, events, target, 1)
    (fresh, new_token), *_ = new_tokens.items()
    assert Signer(_key(NEW)).verify(new_token).task_id == fresh
    with pytest.raises(TokenError):
        Signer(_key(OLD)).verify(new_token)

    # The old key removed: its tokens are refused, the new key's still accepted.
    async with serving(settings, NEW) as api:
        status, problem, _ = await post(
            f"{api.url}/plans/plan-1/events", completed(kept_back), old_tokens[kept_back]
        )
        assert (status, problem) == (
            401,
            {
                "type": "about:blank",
                "title": "Unauthorized",
                "status": 401,
                "detail": "the token's signature is not valid; use the AuthToken sent with "
                "this task",
            },
        )
        status, body, _ = await post(f"{api.url}/plans/plan-1/events", completed(fresh), new_token)
        assert (status, body) == (
            200,
            {"taskId": fresh, "state": "completed", "result": "succeeded"},
        )
    states = await db.fetch("SELECT state, count(*) AS n FROM tasks GROUP BY state ORDER BY state")
    assert [tuple(row) for row in states] == [("completed", WAITING + 1), ("waiting", 1)]
    # Three processes' worth of logs, the refusal's among them: no key in any line.
    assert ("task completed" in caplog.text, OLD in caplog.text, NEW in caplog.text) == (
        True,
        False,
        False,
    )


async def test_poll_headers_sealed_under_the_old_key_are_opened_after_rotation(
    settings: Settings,
    channel: AbstractChannel,
    db: asyncpg.Connection,
    events: Events,
    target: Target,
) -> None:
    key = f"pr-{uuid.uuid4().hex}"
    secret = f"Bearer {secrets.token_hex(8)}"
    task = task_message(
        target,
        waitForCompletion="poll",
        poll={
            # Far off: the poll is made due by hand once the worker that sealed it has stopped.
            "intervalSeconds": 600,
            "request": {
                "method": "GET",
                "url": f"{target.url}/jobs/1?key={key}",
                "headers": {"Authorization": secret},
            },
        },
    )
    task_id = str(task["taskId"])
    async with serving(settings, OLD) as api:
        await publish(channel, api.settings, task)
        async with asyncio.timeout(10):
            while (
                await db.fetchval(
                    "SELECT poll_secrets IS NOT NULL FROM tasks WHERE task_id = $1", task_id
                )
                is not True
            ):
                await asyncio.sleep(0.05)
    assert target.calls[key] == 0
    await db.execute("UPDATE tasks SET next_poll_at = now() WHERE task_id = $1", task_id)

    async with serving(settings, f"{NEW},{OLD}"):
        event = await events.completed(task_id)
    assert (event["result"], target.calls[key], target.headers[key][-1]["Authorization"]) == (
        "succeeded",
        1,
        secret,
    )


def _key(text: str) -> bytes:
    # As the service makes a key of each listed one.
    return hashlib.sha256(text.encode()).digest()


def test_a_signer_signs_with_its_first_key_and_accepts_any() -> None:
    old, new, stranger = (Signer(_key(k)) for k in (OLD, NEW, "stranger-" + "x" * 32))
    rotated = Signer(_key(NEW), _key(OLD))
    expires = time.time() + 60
    from_old, from_rotated = old.issue("t", "p", expires), rotated.issue("t", "p", expires)
    outcomes = {
        name: _verdict(signer, token)
        for name, signer, token in [
            ("old token, rotated signer", rotated, from_old),
            ("rotated token, new signer", new, from_rotated),
            ("rotated token, old signer", old, from_rotated),
            ("stranger's token, rotated signer", rotated, stranger.issue("t", "p", expires)),
        ]
    }
    assert outcomes == {
        "old token, rotated signer": "t of p",
        "rotated token, new signer": "t of p",
        "rotated token, old signer": "the token's signature is not valid",
        "stranger's token, rotated signer": "the token's signature is not valid",
    }


def _verdict(signer: Signer, token: str) -> str:
    try:
        grant = signer.verify(token)
    except TokenError as exc:
        return str(exc)
    return f"{grant.task_id} of {grant.plan_id}"


def test_forged_tokens_are_refused_by_every_key_without_io() -> None:
    """Verification is pure (the contract layer does no I/O); with two keys it costs two HMACs."""
    forger = Signer(_key("forger-" + "y" * 32))
    forged = [forger.issue(f"t{n}", "p", time.time() + 60) for n in range(FORGED)]
    timings = {}
    for name, signer in {
        "one key": Signer(_key(NEW)),
        "two keys": Signer(_key(NEW), _key(OLD)),
    }.items():
        refused = 0
        started = time.perf_counter()
        for token in forged:
            try:
                signer.verify(token)
            except TokenError:
                refused += 1
        timings[name] = (time.perf_counter() - started) / FORGED * 1e6
        assert refused == FORGED
    print(
        f"forged-token verification: {timings['one key']:.1f} µs with one key, "
        f"{timings['two keys']:.1f} µs with two"
    )


def test_sealed_headers_open_under_any_listed_key_and_no_other() -> None:
    headers = {"Authorization": "Bearer s3cret"}
    under_old = Sealer(Signer(_key(OLD))).seal(headers, "t")
    rotated = Sealer(Signer(_key(NEW), _key(OLD)))
    under_rotated = rotated.seal(headers, "t")
    assert (
        rotated.unseal(under_old, "t"),
        Sealer(Signer(_key(NEW))).unseal(under_rotated, "t"),
    ) == (headers, headers)
    for sealer, sealed, bound_to in [
        (Sealer(Signer(_key(NEW))), under_old, "t"),
        (Sealer(Signer(_key(OLD))), under_rotated, "t"),
        (rotated, under_old, "another task"),
    ]:
        with pytest.raises(SealError, match="cannot be opened with any of the signing keys"):
            sealer.unseal(sealed, bound_to)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        pytest.param(
            "short",
            "AGENTLESS_SIGNING_KEY: Value error, the key is 5 bytes long, and every key must be "
            "at least 32 bytes (`openssl rand -base64 32` makes one)",
            id="one-short-key",
        ),
        pytest.param(
            f"{NEW},short",
            "AGENTLESS_SIGNING_KEY: Value error, key 2 of 2 is 5 bytes long, and every key must "
            "be at least 32 bytes (`openssl rand -base64 32` makes one)",
            id="a-short-key-listed",
        ),
        pytest.param(
            f"{NEW},,{OLD}",
            "AGENTLESS_SIGNING_KEY: Value error, key 2 of 3 is empty: list keys separated by "
            "single commas, or leave the setting unset to use the key kept in the database",
            id="an-empty-entry",
        ),
        pytest.param(
            f"{NEW},",
            "AGENTLESS_SIGNING_KEY: Value error, key 2 of 2 is empty: list keys separated by "
            "single commas, or leave the setting unset to use the key kept in the database",
            id="a-trailing-comma",
        ),
    ],
)
def test_signing_keys_are_checked_and_never_shown(
    monkeypatch: pytest.MonkeyPatch, value: str, error: str
) -> None:
    monkeypatch.setenv("AGENTLESS_SIGNING_KEY", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == f"invalid configuration: {error}"
    # Not in the message, nor in the validation error it was made from (a traceback shows it).
    assert NEW not in str(caught.value.__cause__)


def test_listed_keys_in_order_never_in_a_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTLESS_SIGNING_KEY", f" {NEW} , {OLD} ")
    settings = load_settings()
    signer = Signer(_key(NEW), _key(OLD))
    assert settings.signing_keys == (NEW, OLD)
    shown = " ".join(map(repr, (settings, signer, Sealer(signer))))
    assert (NEW in shown, OLD in shown, repr(signer)) == (False, False, "<Signer of 2 key(s)>")
