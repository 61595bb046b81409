"""Callback latency of `agentless api` under abuse, beside the quiet figure of the same run.

    python tests/benchmarks/callback_load.py [--tasks 5000] [--concurrency 64] [--rounds 4]
                                             [--slow 300] [--connections 1000] [--timeout 600]

Run on demand, never by pytest. The issue's target: while slow-loris clients and 1,000 concurrent
connections abuse it, the API keeps answering valid callbacks within its p99 budget (50 ms).

How: as tests/benchmarks/callbacks.py (whose parts this uses), twice N callback tasks are brought
to `waiting` by a real worker, which is then stopped; one `agentless api` serves both sets. One set
is completed quietly, the other under abuse, in rounds that alternate between the two. Before each
abused round an abuser process (this file, `--role abuser`) opens the slow-loris clients of
tests/abusers.py (idle, dripped headers, stalled bodies with a real token and with a forged one;
`--slow` of them in all) and `--connections` keep-alive connections that each send a request
about once a second (GET /healthz or a forged TaskCompleted); the round starts once every one of
them is connected and each connection has been answered twice (so that the crowd's requests are
spread out as they stay), and the abuser is stopped after it. The abuser shares the machine. The
API runs with its real deadlines (75 s idle, 30 s for a body), which are longer than a round: the
slow clients hold their connections throughout. Exit status: 0 when the p99 under abuse is under
50 ms and every callback completed its task, 1 when not, 2 when the run could not be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

# Run as a script, Python puts this file's directory on sys.path, not the repository's root.
SELF: Final = Path(__file__).resolve()
ROOT: Final = SELF.parents[2]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import orjson  # noqa: E402

from tests.abusers import SLOW_KINDS, Crowd, SlowClients  # noqa: E402
from tests.benchmarks.callbacks import (  # noqa: E402
    DATABASE_URL,
    P99_LIMIT_MS,
    PLAN,
    START_TIMEOUT,
    BenchmarkError,
    Child,
    Run,
    Setting,
    answers,
    check_ends,
    free_port,
    new_setting,
    positive,
    post_round,
    remove_topology,
    seed,
    start,
    until,
)
from worker.contract.tokens import Signer, new_key  # noqa: E402

TOKEN_VARIABLE: Final = "CALLBACK_LOAD_TOKEN"
# Those still unpublished after this long are reported as unconfirmed.
EVENTS_TIMEOUT: Final = 10.0
ABUSE_FIGURES: Final = (
    "slow connections opened",
    "slow connections cut off by the server",
    "crowd answers HTTP 200",
    "crowd answers HTTP 401",
    "crowd connections broken",
)


# --- the abuser: its own process -----------------------------------------------------------------


async def abuse(port: int, slow: int, connections: int, ready: Path) -> int:
    """Slow clients and a crowd of connections on the API at `port`, until SIGTERM; then what the
    server did to them, as one JSON line."""
    forged = Signer(new_key()).issue("forged", PLAN, time.time() + 3600)
    slow_clients = SlowClients(
        "127.0.0.1",
        port,
        os.environ[TOKEN_VARIABLE],
        forged,
        per_kind=max(1, slow // len(SLOW_KINDS)),
        give_up_seconds=3600,
    )
    crowd = Crowd("127.0.0.1", port, forged, connections)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    slow_running = asyncio.create_task(slow_clients.run())
    crowd_running = asyncio.create_task(crowd.run())
    await slow_clients.everyone_connected.wait()
    await crowd.everyone_connected.wait()
    # Every connection answered twice: the crowd's requests are spread out by now, as they stay.
    await crowd.answered(2 * connections)
    mark_ready(ready)
    await stop.wait()
    crowd.stop.set()
    async with asyncio.timeout(10):
        await crowd_running
    # The slow clients would wait for the server to cut them off (up to 75 s): they just go.
    slow_running.cancel()
    await asyncio.gather(slow_running, return_exceptions=True)
    figures = {
        "slowOpened": slow_clients.opened,
        "slowCut": sum(slow_clients.outcomes.values()),
        "crowdAnswers": {str(status): n for status, n in crowd.answers.items()},
        "crowdBroken": sum(crowd.broken.values()),
    }
    print(orjson.dumps(figures).decode(), flush=True)
    return 0


def mark_ready(path: Path) -> None:
    path.write_text("ready\n")


def last_line(log: Path) -> dict[str, Any]:
    """The abuser's figures: the last line it wrote."""
    parsed: dict[str, Any] = orjson.loads(log.read_text().strip().splitlines()[-1])
    return parsed


@contextlib.asynccontextmanager
async def abused(
    setting: Setting, port: int, token: str, number: int, slow: int, connections: int
) -> AsyncIterator[Counter[str]]:
    """An abuser on the API for as long as this lasts; what it saw is added to the counter."""
    ready = setting.logs / f"abuser-{number}.ready"
    abuser = await start(
        f"abuser-{number}",
        [
            str(SELF),
            "--role",
            "abuser",
            "--port",
            str(port),
            "--slow",
            str(slow),
            "--connections",
            str(connections),
            "--ready",
            str(ready),
        ],
        {**setting.env(), TOKEN_VARIABLE: token},
        setting.logs,
    )

    async def is_ready() -> bool:
        return ready.exists()

    seen: Counter[str] = Counter()
    try:
        await until(is_ready, abuser, START_TIMEOUT)
        yield seen
    finally:
        code = await abuser.stop()
    if code != 0:
        raise BenchmarkError(f"the abuser exited with {code}; see {abuser.log}")
    figures = last_line(abuser.log)
    seen["slow connections opened"] += figures["slowOpened"]
    seen["slow connections cut off by the server"] += figures["slowCut"]
    for status, n in figures["crowdAnswers"].items():
        seen[f"crowd answers HTTP {status}"] += n
    seen["crowd connections broken"] += figures["crowdBroken"]


# --- the run -------------------------------------------------------------------------------------


async def events_published(setting: Setting, api: Child) -> None:
    """Wait (a little) for the API to publish the TaskCompleted events of the last callbacks: it
    answers once a completion is committed, and publishes right after."""

    async def none_pending() -> bool:
        conn = await asyncpg.connect(setting.database_url)
        try:
            pending: int = await conn.fetchval("SELECT count(*) FROM event_outbox")
        finally:
            await conn.close()
        return pending == 0

    with contextlib.suppress(TimeoutError):
        await until(none_pending, api, EVENTS_TIMEOUT)


async def bench(
    tasks: int, concurrency: int, rounds: int, slow: int, connections: int, logs: Path
) -> tuple[list[Run], Counter[str], str]:
    setting = new_setting(logs)
    sets = {name: [f"{name}-{i:05d}" for i in range(tasks)] for name in ("quiet", "abused")}
    api_port = free_port()
    servers: list[Child] = []
    seen: Counter[str] = Counter()
    try:
        waiting, seconds = await seed(
            setting,
            [*sets["quiet"], *sets["abused"], "victim"],
            f"http://127.0.0.1:{api_port}",
        )
        seeding = (
            f"waiting tasks: {len(waiting):,} brought to `waiting` the real way in {seconds:.1f} s "
            f"(one is the stalled bodies' victim); the worker was then stopped"
        )
        print(seeding, file=sys.stderr, flush=True)
        by_id = {task.task_id: task for task in waiting}
        api = await start(
            "api",
            ["-m", "worker", "api"],
            setting.env(AGENTLESS_API_PORT=str(api_port)),
            logs,
        )
        servers.append(api)
        base_url = f"http://127.0.0.1:{api_port}"
        await until(lambda: answers(f"{base_url}/readyz"), api, START_TIMEOUT)
        quiet = Run("agentless api, quiet", api, base_url, [by_id[i] for i in sets["quiet"]])
        loaded = Run(
            f"agentless api, under abuse ({slow} slow, {connections:,} busy connections)",
            api,
            base_url,
            [by_id[i] for i in sets["abused"]],
        )
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            for number in range(rounds):
                # ABBA, as callbacks.py does: neither phase always goes first.
                for run in (quiet, loaded) if number % 2 == 0 else (loaded, quiet):
                    share = run.waiting[number::rounds]
                    if run is quiet:
                        await post_round(session, run, share, concurrency)
                    else:
                        victim = by_id["victim"].token
                        async with abused(
                            setting, api_port, victim, number, slow, connections
                        ) as round_seen:
                            await post_round(session, run, share, concurrency)
                        seen += round_seen
                    api.check_alive()
        await events_published(setting, api)
        for run in (quiet, loaded):
            await check_ends(setting, run)
    finally:
        for server in servers:
            await server.stop()
        await remove_topology(setting.names)
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{setting.schema}" CASCADE')
        finally:
            await conn.close()
    return [quiet, loaded], seen, seeding


def table(
    runs: list[Run],
    seen: Counter[str],
    concurrency: int,
    rounds: int,
    seeding: str,
    load: tuple[float, float],
) -> tuple[str, bool]:
    quiet, loaded = runs
    header = (
        f"{'phase':<58} {'callbacks/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'vs quiet':>9}  "
        f"{'p99<50ms':<8}"
    )
    lines = [
        f"callback load: {len(quiet.waiting):,} waiting tasks per phase, TaskCompleted posted at "
        f"concurrency {concurrency} over one aiohttp ClientSession, in {rounds} alternating "
        f"rounds; the abuser runs during the abused rounds only",
        seeding,
        f"machine: {os.cpu_count()} CPUs; load average {load[0]:.2f} before, {load[1]:.2f} after",
        "",
        header,
        "-" * len(header),
    ]
    for run in runs:
        p99 = run.percentile(0.99)
        lines.append(
            f"{run.contender:<58} {run.per_second:>11,.0f} {run.percentile(0.50):>8.1f} "
            f"{p99:>8.1f} {run.per_second / quiet.per_second:>9.0%}  "
            f"{'PASS' if p99 < P99_LIMIT_MS else 'FAIL':<8}"
        )
    lines += ["", "CPU while measured: the API's per callback, and each side's share of a core:"]
    lines += [
        f"  {run.contender:<58} API {run.server_cpu_s / run.tasks * 1000:.2f} ms/callback, "
        f"{run.server_cpu_s / run.seconds:.2f} of a core; client "
        f"{run.client_cpu_s / run.seconds:.2f} of a core (measured {run.seconds:.2f} s)"
        for run in runs
    ]
    lines += ["", "checks:"]
    for run in runs:
        answered = ", ".join(f"{n} x HTTP {status}" for status, n in sorted(run.statuses.items()))
        ends = ", ".join(f"{n} {state}" for state, n in sorted(run.end_states.items()))
        lost = len(run.waiting) - run.end_states["succeeded"]
        lines.append(
            f"  {run.contender:<58} submitted {len(run.waiting)}; answers {answered}; tasks "
            f"{ends}; lost {lost}; events unconfirmed {run.events_unconfirmed}"
            f" -> {'OK' if run.valid else 'INVALID'}"
        )
        if run.first_error:
            lines.append(f"    first error: {run.first_error}")
    lines += ["", "the abuse, over all abused rounds:"]
    lines += [f"  {what}: {seen[what]:,}" for what in ABUSE_FIGURES]
    lines += [f"  {what}: {n:,}" for what, n in sorted(seen.items()) if what not in ABUSE_FIGURES]
    passed = all(run.valid for run in runs) and loaded.percentile(0.99) < P99_LIMIT_MS
    return "\n".join(lines), passed and not seen["crowd connections broken"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Callback latency of `agentless api`, quiet and under abuse."
    )
    parser.add_argument("--tasks", type=positive, default=5000, help="per phase (5000)")
    parser.add_argument("--concurrency", type=positive, default=64, help="default 64")
    parser.add_argument("--rounds", type=positive, default=4, help="alternating rounds (4)")
    parser.add_argument("--slow", type=positive, default=300, help="slow-loris clients (300)")
    parser.add_argument(
        "--connections", type=positive, default=1000, help="busy keep-alive connections (1000)"
    )
    parser.add_argument(
        "--timeout", type=positive, default=600, help="seconds for the whole run (600)"
    )
    parser.add_argument("--role", choices=["bench", "abuser"], default="bench")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "abuser":
        return asyncio.run(abuse(args.port, args.slow, args.connections, args.ready))
    if not Path("/proc/self/stat").exists():
        parser.error("this benchmark reads CPU time from /proc: it runs on Linux only")
    logs = Path(tempfile.mkdtemp(prefix="agentless-callback-load-"))

    async def bounded() -> tuple[list[Run], Counter[str], str]:
        async with asyncio.timeout(args.timeout):
            return await bench(
                args.tasks, args.concurrency, args.rounds, args.slow, args.connections, logs
            )

    load_before = os.getloadavg()[0]
    try:
        runs, seen, seeding = asyncio.run(bounded())
    except (BenchmarkError, TimeoutError) as exc:
        print(f"benchmark failed: {exc or 'timed out'}; logs in {logs}", file=sys.stderr)
        return 2
    report, passed = table(
        runs, seen, args.concurrency, args.rounds, seeding, (load_before, os.getloadavg()[0])
    )
    print(report)
    print(f"\nprocess logs: {logs}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
