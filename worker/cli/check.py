"""`agentless check`: whether the agentless processes of this machine are ready, for a container's
HEALTHCHECK. It asks GET /readyz of the worker's probe server (AGENTLESS_WORKER_HOST and _PORT)
and of the API (AGENTLESS_API_HOST and _PORT), each that is not turned off (port 0):

- a port that refuses the connection is not this process's: it is skipped;
- ready (exit 0) when at least one answers 200 and none anything else;
- not ready (exit 1) when one answers anything else (503: its broker or database is out of
  reach, or the broker blocks publishes; the answer's `reason` is printed), or accepts the
  connection but does not answer within the timeout;
- exit 4 when no port accepts the connection at all: nothing runs here.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from enum import StrEnum

import aiohttp
from yarl import URL

from worker.cli.exits import EXIT_DONE, EXIT_NOT_SUCCEEDED
from worker.contract.errors import ConfigError, Unavailable
from worker.contract.settings import Settings

# A health check runs often and must not pile up: each answer gets this long.
TIMEOUT_SECONDS = 2.0

# Where a server listening on every address is reached from the same machine.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104


class Answer(StrEnum):
    READY = "ready"
    NOT_READY = "not ready"
    REFUSED = "not listening"


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    setting: str
    url: URL


def targets(settings: Settings) -> list[Target]:
    """The readiness URLs of the servers that are not turned off."""
    found = []
    for name, setting, host, port in (
        ("worker", "AGENTLESS_WORKER_PORT", settings.worker_host, settings.worker_port),
        ("api", "AGENTLESS_API_PORT", settings.api_host, settings.api_port),
    ):
        if port:
            address = _LOOPBACK.get(host, host)
            found.append(
                Target(
                    name, setting, URL.build(scheme="http", host=address, port=port, path="/readyz")
                )
            )
    return found


def cmd_check(settings: Settings, _: argparse.Namespace) -> int:
    probed = targets(settings)
    if not probed:
        raise ConfigError(
            "AGENTLESS_WORKER_PORT and AGENTLESS_API_PORT are both 0: there is nothing to check"
        )
    answers = asyncio.run(_ask_all(probed))
    for target, (answer, detail) in zip(probed, answers, strict=True):
        print(f"{target.name} {target.url}: {answer.value}{detail}")
    if all(answer is Answer.REFUSED for answer, _ in answers):
        listed = " or ".join(f"{t.url} ({t.setting})" for t in probed)
        raise Unavailable(f"nothing answers at {listed}: is agentless running here?")
    if any(answer is Answer.NOT_READY for answer, _ in answers):
        return EXIT_NOT_SUCCEEDED
    return EXIT_DONE


async def _ask_all(probed: list[Target]) -> list[tuple[Answer, str]]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(_ask(session, t.url) for t in probed)))


async def _ask(session: aiohttp.ClientSession, url: URL) -> tuple[Answer, str]:
    """The answer, and what there is to say of it beyond ready."""
    try:
        async with session.get(url, allow_redirects=False) as response:
            reason = await _reason(response)
            if response.status == 200:
                return Answer.READY, f" ({reason})" if reason else ""
            return Answer.NOT_READY, f" (HTTP {response.status}: {reason})" if reason else (
                f" (HTTP {response.status})"
            )
    except aiohttp.ClientConnectorError:
        return Answer.REFUSED, ""
    except TimeoutError:
        return Answer.NOT_READY, f" (no answer within {TIMEOUT_SECONDS:g} s)"
    except aiohttp.ClientError as exc:
        return Answer.NOT_READY, f" ({exc or type(exc).__name__})"


async def _reason(response: aiohttp.ClientResponse) -> str:
    """The `reason` a readiness answer gives (why not ready, or what a ready API refuses)."""
    try:
        answer = await response.json(content_type=None)
    except (aiohttp.ClientError, ValueError):
        return ""
    reason = answer.get("reason") if isinstance(answer, dict) else None
    return reason if isinstance(reason, str) else ""
