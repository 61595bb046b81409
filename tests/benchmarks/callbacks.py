"""Callback throughput of `agentless api` beside a bare baseline measured in the same run.

    python tests/benchmarks/callbacks.py [--tasks 5000] [--concurrency 64] [--rounds 4]
                                         [--timeout 600]

Run on demand, never by pytest. The issue's target: with N tasks waiting for their callbacks and
TaskCompleted posted at concurrency 64, the API reaches at least 60% of the callbacks/s of a bare
aiohttp handler that checks the token and performs one UPDATE, with p99 latency under 50 ms.

How: twice N callback tasks are queued to a local endpoint that keeps each task's AuthToken, and
a real `agentless worker` brings them to `waiting`; then it is stopped, so that its sweeper does
not share the database with the measurement. One set is completed through the baseline (this
file, `--role baseline`, a process of its own), the other through `agentless api`, in rounds that
alternate between the two (only one is posted to at a time), so that whatever else loads the
machine weighs on both alike. Latency is each request's, as the client sees it; throughput is
callbacks over the time spent in that contender's rounds. Every process shares
AGENTLESS_SIGNING_KEY, so the baseline verifies the worker's tokens. Queues, exchange and schema
are unique to the run and removed after it. Exit status: 0 when both targets are met, 1 when one
is missed or a check fails, 2 when the run could not be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

# Run as a script, Python puts this file's directory on sys.path, not the repository's root; an
# installed copy of the package must not be measured in place of this checkout.
SELF: Final = Path(__file__).resolve()
ROOT: Final = SELF.parents[2]
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402
import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import orjson  # noqa: E402
from aiohttp import web  # noqa: E402

from worker.contract.models import Names  # noqa: E402
from worker.contract.tokens import Signer, TokenError  # noqa: E402
from worker.topology import declare_topology  # noqa: E402

AMQP_URL: Final = os.environ.get("AGENTLESS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL: Final = os.environ.get(
    "AGENTLESS_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PLAN: Final = "bench-plan"
HUB: Final = "bench"
TARGET_RATIO: Final = 0.60
P99_LIMIT_MS: Final = 50.0
# The API's own pool size (Store.open): the baseline gets no more connections than it has.
POOL_SIZE: Final = 6
PUBLISH_CHUNK: Final = 500
# Starting a process: interpreter, imports, migrations, broker connection.
START_TIMEOUT: Final = 60.0
# A worker that is stopped with nothing in flight exits within a few seconds.
STOP_TIMEOUT: Final = 30.0
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


# --- the baseline: its own process --------------------------------------------------------------

BASELINE_UPDATE: Final = (
    "UPDATE tasks SET state = 'completed', result = $2 WHERE task_id = $1 AND state = 'waiting'"
)


def key_signer(key: str) -> Signer:
    # As worker/service.py:open_signer derives it from AGENTLESS_SIGNING_KEY, so that a token the
    # worker issued verifies here too.
    return Signer(hashlib.sha256(key.encode()).digest())


async def serve_baseline(port: int) -> int:
    """The least a callback endpoint can do: one token check, one UPDATE."""
    signer = key_signer(os.environ["AGENTLESS_SIGNING_KEY"])
    pool = await asyncpg.create_pool(
        os.environ["AGENTLESS_DATABASE_URL"], min_size=1, max_size=POOL_SIZE
    )

    async def completed(request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            grant = signer.verify(token.strip()) if scheme.lower() == "bearer" else None
        except TokenError:
            grant = None
        if grant is None:
            return web.json_response({"detail": "no valid token"}, status=401)
        event = orjson.loads(await request.read())
        if grant.plan_id != request.match_info["planId"] or grant.task_id != event["taskId"]:
            return web.json_response({"detail": "another task's token"}, status=403)
        status = await pool.execute(BASELINE_UPDATE, grant.task_id, event["result"])
        if status != "UPDATE 1":
            return web.json_response({"detail": "not waiting"}, status=409)
        return web.json_response({"taskId": grant.task_id, "state": "completed"})

    app = web.Application()
    app.router.add_post("/plans/{planId}/events", completed)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await pool.close()
    return 0


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` so far."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    # The command name may hold spaces; the fields after its closing ')' are fixed: utime and
    # stime are the 12th and 13th of them.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Child:
    """A process this benchmark started; its output goes to a file, never to a pipe that fills."""

    name: str
    process: asyncio.subprocess.Process
    log: Path

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise BenchmarkError(
                f"{self.name} exited with {self.process.returncode}; see {self.log}"
            )


class BenchmarkError(Exception):
    """The run cannot give a valid measurement; the message says why."""


async def start(name: str, args: list[str], env: dict[str, str], logs: Path) -> Child:
    log = logs / f"{name}.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    return Child(name, process, log)


async def until(condition: Callable[[], Awaitable[bool]], child: Child, timeout: float) -> None:
    """Poll `condition` (owned by another process) until it holds, while `child` lives."""
    async with asyncio.timeout(timeout):
        while not await condition():
            child.check_alive()
            await asyncio.sleep(0.1)


async def answers(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def listens(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


# --- the waiting tasks -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Waiting:
    task_id: str
    token: str


TOKENS = web.AppKey("tokens", dict[str, str])


async def keep_token(request: web.Request) -> web.Response:
    request.app[TOKENS][request.headers["TaskInstanceId"]] = request.headers["AuthToken"]
    return web.json_response({"status": "accepted"})


@contextlib.asynccontextmanager
async def endpoint() -> AsyncIterator[tuple[str, dict[str, str]]]:
    """The external service the tasks invoke: it keeps each task's token, and calls back later
    (this benchmark does that for it)."""
    app = web.Application()
    app[TOKENS] = {}
    app.router.add_post("/start", keep_token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/start", app[TOKENS]
    finally:
        await runner.cleanup()


async def queue_tasks(names: Names, task_ids: list[str], url: str) -> None:
    connection = await aio_pika.connect(
        AMQP_URL, client_properties={"connection_name": "agentless callbacks benchmark"}
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, names)
        for start_at in range(0, len(task_ids), PUBLISH_CHUNK):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            orjson.dumps(
                                {
                                    "taskId": task_id,
                                    "planId": PLAN,
                                    "hubName": HUB,
                                    "request": {"method": "POST", "url": url},
                                    "waitForCompletion": "callback",
                                    "timeoutSeconds": 3600,
                                }
                            ),
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=task_id,
                        ),
                        routing_key=names.tasks,
                    )
                    for task_id in task_ids[start_at : start_at + PUBLISH_CHUNK]
                )
            )


async def remove_topology(names: Names) -> None:
    connection = await aio_pika.connect(
        AMQP_URL, client_properties={"connection_name": "agentless callbacks benchmark cleanup"}
    )
    async with connection:
        channel = await connection.channel()
        for queue in (names.tasks, names.dead):
            await channel.queue_delete(queue)
        await channel.exchange_delete(names.events)


async def count_states(database_url: str, task_ids: list[str]) -> Counter[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT coalesce(result, state) AS s, count(*) AS n FROM tasks"
            " WHERE task_id = ANY($1::text[]) GROUP BY 1",
            task_ids,
        )
    except asyncpg.UndefinedTableError:
        return Counter()  # the worker has not migrated the schema yet
    finally:
        await conn.close()
    return Counter({row["s"]: row["n"] for row in rows})


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Run:
    """One contender's measurements, summed over its rounds."""

    contender: str
    server: Child
    base_url: str
    waiting: list[Waiting]
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    first_error: str | None = None
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    end_states: Counter[str] = field(default_factory=Counter)
    events_unconfirmed: int = 0

    @property
    def tasks(self) -> int:
        return len(self.latencies_ms)

    @property
    def per_second(self) -> float:
        return self.tasks / self.seconds

    def percentile(self, share: float) -> float:
        """Nearest rank."""
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]

    @property
    def valid(self) -> bool:
        return (
            set(self.statuses) == {200}
            and self.end_states == Counter(succeeded=len(self.waiting))
            and not self.events_unconfirmed
        )


async def post_round(
    session: aiohttp.ClientSession, run: Run, waiting: list[Waiting], concurrency: int
) -> None:
    """TaskCompleted for each of `waiting`, `concurrency` in flight."""
    pending: Iterator[Waiting] = iter(waiting)
    url = f"{run.base_url}/plans/{PLAN}/events"

    async def lane() -> None:
        # The lanes share one iterator: each takes the next task as soon as it is free.
        for task in pending:
            body = orjson.dumps(
                {"name": "TaskCompleted", "taskId": task.task_id, "result": "succeeded"}
            )
            headers = {"Authorization": f"Bearer {task.token}", "Content-Type": "application/json"}
            began = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    text = await response.read()
                    status = response.status
            except aiohttp.ClientError as exc:
                status, text = 0, repr(exc).encode()
            run.latencies_ms.append((time.perf_counter() - began) * 1000)
            run.statuses[status] += 1
            if status != 200 and run.first_error is None:
                run.first_error = f"HTTP {status}: {text[:300].decode(errors='replace')}"

    server_cpu, client_cpu = cpu_seconds(run.server.process.pid), time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    run.seconds += time.perf_counter() - began
    run.server_cpu_s += cpu_seconds(run.server.process.pid) - server_cpu
    run.client_cpu_s += time.process_time() - client_cpu


async def compare(runs: list[Run], concurrency: int, rounds: int) -> None:
    """Alternate rounds between the contenders, so that whatever else loads the machine meanwhile
    weighs on both alike; one client session throughout."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for number in range(rounds):
            # ABBA: neither contender always goes first, after the other has warmed the database.
            for run in runs if number % 2 == 0 else runs[::-1]:
                share = run.waiting[number::rounds]
                await post_round(session, run, share, concurrency)
                run.server.check_alive()


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Setting:
    """One run's names, shared by every process it starts."""

    names: Names
    schema: str
    database_url: str
    signing_key: str
    logs: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLESS_")}
        env.update(
            AGENTLESS_AMQP_URL=AMQP_URL,
            AGENTLESS_DATABASE_URL=self.database_url,
            AGENTLESS_PREFIX=self.names.prefix,
            AGENTLESS_SIGNING_KEY=self.signing_key,
            AGENTLESS_WORKER_PORT="0",
            AGENTLESS_LOG_FORMAT="json",
        )
        env.update(extra)
        return env


def new_setting(logs: Path) -> Setting:
    run = uuid.uuid4().hex[:10]
    schema = f"bench_callbacks_{run}"
    joiner = "&" if "?" in DATABASE_URL else "?"
    return Setting(
        names=Names(f"agentless-bench.callbacks.{run}"),
        schema=schema,
        database_url=f"{DATABASE_URL}{joiner}search_path={schema}",
        signing_key=secrets.token_urlsafe(32),
        logs=logs,
    )


async def seed(setting: Setting, task_ids: list[str], api_url: str) -> tuple[list[Waiting], float]:
    """Every task brought to `waiting` by a real worker; with the token each was given."""
    async with endpoint() as (url, tokens):
        began = time.perf_counter()
        await queue_tasks(setting.names, task_ids, url)
        worker = await start(
            "worker",
            ["-m", "worker", "--log-level", "warning", "worker"],
            setting.env(AGENTLESS_PUBLIC_URL=api_url),
            setting.logs,
        )
        try:

            async def all_waiting() -> bool:
                states = await count_states(setting.database_url, task_ids)
                if set(states) - {"running", "waiting"}:
                    raise BenchmarkError(f"tasks did not all wait: {dict(states)}")
                return states["waiting"] == len(task_ids)

            await until(all_waiting, worker, timeout=START_TIMEOUT + len(task_ids) / 50)
            seconds = time.perf_counter() - began
        finally:
            # Stopped before measuring: its sweeper must not share the database with the run.
            code = await worker.stop()
        if code != 0:
            raise BenchmarkError(f"the worker exited with {code}; see {worker.log}")
        missing = [task_id for task_id in task_ids if task_id not in tokens]
        if missing:
            raise BenchmarkError(f"{len(missing)} tasks never invoked the endpoint")
        return [Waiting(task_id, tokens[task_id]) for task_id in task_ids], seconds


async def check_ends(setting: Setting, run: Run) -> None:
    task_ids = [task.task_id for task in run.waiting]
    run.end_states = await count_states(setting.database_url, task_ids)
    conn = await asyncpg.connect(setting.database_url)
    try:
        # The API publishes each TaskCompleted right after it answers, and marks it published once
        # confirmed: the last ones of the run are given a few seconds before they count as lost.
        deadline = time.monotonic() + 10
        while True:
            run.events_unconfirmed = await conn.fetchval(
                "SELECT count(*) FROM event_outbox WHERE task_id = ANY($1::text[])",
                task_ids,
            )
            if not run.events_unconfirmed or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def bench(tasks: int, concurrency: int, rounds: int, logs: Path) -> tuple[list[Run], str]:
    setting = new_setting(logs)
    sets = {name: [f"{name}-{i:05d}" for i in range(tasks)] for name in ("baseline", "agentless")}
    api_port, baseline_port = free_port(), free_port()
    servers: list[Child] = []
    try:
        waiting, seconds = await seed(
            setting, sets["baseline"] + sets["agentless"], f"http://127.0.0.1:{api_port}"
        )
        seeding = (
            f"waiting tasks: {len(waiting):,} brought to `waiting` the real way (queued to a "
            f"local endpoint that keeps each AuthToken; `agentless worker` ran them) in "
            f"{seconds:.1f} s; the worker was then stopped"
        )
        print(seeding, file=sys.stderr, flush=True)
        by_id = {task.task_id: task for task in waiting}
        baseline = await start(
            "baseline",
            [str(SELF), "--role", "baseline", "--port", str(baseline_port)],
            setting.env(),
            logs,
        )
        servers.append(baseline)
        api = await start(
            "api", ["-m", "worker", "api"], setting.env(AGENTLESS_API_PORT=str(api_port)), logs
        )
        servers.append(api)
        await until(lambda: listens(baseline_port), baseline, START_TIMEOUT)
        await until(lambda: answers(f"http://127.0.0.1:{api_port}/readyz"), api, START_TIMEOUT)
        runs = [
            Run(
                "baseline (aiohttp + token + 1 UPDATE)",
                baseline,
                f"http://127.0.0.1:{baseline_port}",
                [by_id[task_id] for task_id in sets["baseline"]],
            ),
            Run(
                "agentless api",
                api,
                f"http://127.0.0.1:{api_port}",
                [by_id[task_id] for task_id in sets["agentless"]],
            ),
        ]
        # The client's own collector pauses would count as the contenders' latency.
        gc.collect()
        gc.freeze()
        await compare(runs, concurrency, rounds)
        for run in runs:
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
    return runs, seeding


def table(
    runs: list[Run], concurrency: int, rounds: int, seeding: str, load: tuple[float, float]
) -> tuple[str, bool]:
    baseline = runs[0]
    header = (
        f"{'contender':<38} {'callbacks/s':>11} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'vs baseline':>11}  {'≥60% thr.':<9}  {'p99<50ms':<8}"
    )
    lines = [
        f"callbacks: {len(baseline.waiting):,} waiting tasks per contender, TaskCompleted posted "
        f"at concurrency {concurrency} over one aiohttp ClientSession, in {rounds} alternating "
        f"rounds",
        seeding,
        f"machine: {os.cpu_count()} CPUs; load average {load[0]:.2f} before, {load[1]:.2f} after",
        "",
        header,
        "-" * len(header),
    ]
    passed = True
    for run in runs:
        ratio = run.per_second / baseline.per_second
        p99 = run.percentile(0.99)
        if run is baseline:
            verdicts = ("-", "-")
        else:
            throughput_ok, latency_ok = ratio >= TARGET_RATIO, p99 < P99_LIMIT_MS
            passed = passed and throughput_ok and latency_ok
            verdicts = ("PASS" if throughput_ok else "FAIL", "PASS" if latency_ok else "FAIL")
        lines.append(
            f"{run.contender:<38} {run.per_second:>11,.0f} {run.percentile(0.50):>8.1f} "
            f"{p99:>8.1f} {ratio:>11.0%}  {verdicts[0]:<9}  {verdicts[1]:<8}"
        )
    lines += ["", "CPU while measured: the server's per callback, and each side's share of a core:"]
    lines += [
        f"  {run.contender:<38} server {run.server_cpu_s / run.tasks * 1000:.2f} ms/callback, "
        f"{run.server_cpu_s / run.seconds:.2f} of a core; client "
        f"{run.client_cpu_s / run.seconds:.2f} of a core (measured {run.seconds:.2f} s)"
        for run in runs
    ]
    lines += ["", "checks:"]
    for run in runs:
        answered = ", ".join(f"{n} x HTTP {status}" for status, n in sorted(run.statuses.items()))
        ends = ", ".join(f"{n} {state}" for state, n in sorted(run.end_states.items()))
        extra = f"; events unconfirmed: {run.events_unconfirmed}" if run is not baseline else ""
        lines.append(
            f"  {run.contender:<38} answers {answered}; tasks {ends}{extra}"
            f" -> {'OK' if run.valid else 'INVALID'}"
        )
        if run.first_error:
            lines.append(f"    first error: {run.first_error}")
    return "\n".join(lines), passed and all(run.valid for run in runs)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Callbacks/s and latency of `agentless api` beside a bare baseline."
    )
    parser.add_argument("--tasks", type=positive, default=5000, help="per contender (5000)")
    parser.add_argument("--concurrency", type=positive, default=64, help="default 64")
    parser.add_argument("--rounds", type=positive, default=4, help="alternating rounds (4)")
    parser.add_argument(
        "--timeout", type=positive, default=600, help="seconds for the whole run (600)"
    )
    parser.add_argument("--role", choices=["bench", "baseline"], default="bench")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "baseline":
        return asyncio.run(serve_baseline(args.port))
    if not Path("/proc/self/stat").exists():
        parser.error("this benchmark reads CPU time from /proc: it runs on Linux only")
    logs = Path(tempfile.mkdtemp(prefix="agentless-callbacks-"))

    async def bounded() -> tuple[list[Run], str]:
        async with asyncio.timeout(args.timeout):
            return await bench(args.tasks, args.concurrency, args.rounds, logs)

    load_before = os.getloadavg()[0]
    try:
        runs, seeding = asyncio.run(bounded())
    except (BenchmarkError, TimeoutError) as exc:
        print(f"benchmark failed: {exc or 'timed out'}; logs in {logs}", file=sys.stderr)
        return 2
    report, passed = table(
        runs, args.concurrency, args.rounds, seeding, (load_before, os.getloadavg()[0])
    )
    print(report)
    print(f"\nprocess logs: {logs}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
