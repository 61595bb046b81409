"""Reads at scale: `agentless api`'s listings with a million completed tasks, beside a bare handler.

    python tests/benchmarks/listing.py [--completed 1000000] [--waiting 100000] [--requests 200]
                                       [--clients 4] [--keep] [--schema NAME] [--only TEXT]

Run on demand, never by pytest. The issue's target: with 1,000,000 completed and 100,000 waiting
tasks in the table, every order and filter of `GET /tasks` (SPEC §6), as a first page and as a
deep one (offset 10,000, by pageNumber and by Range), `GET /queue`, `GET /workers`, the operations
page, `GET /metrics` and `GET /tasks/{taskId}` answer with a p99 under 50 ms.

How: a private schema, migrated by the project's own migrations, is filled in SQL
(generate_series) with completed tasks as the worker records them (their message and response
jsonb of a realistic size, mixed results, modes, hubs and many plans, a few log lines), the
waiting callback tasks, and a few queued, running and polling ones; then VACUUM ANALYZE, as
autovacuum would leave a table that has stopped growing. A real `agentless api` process serves
it. Each kind of request is sent `--requests` times by `--clients` concurrent clients (one aiohttp
session), and its p50/p99 printed beside those of a bare aiohttp handler (a process of its own
that answers a fixed page of 50 tasks) measured with the same client in the same run, before and
after the API's requests. `--keep` keeps the filled schema (and `--schema NAME` fills or reuses
that one), so that queries can be changed and measured again in seconds. Exit status: 0 when
every p99 is under the target, 1 when one is not, 2 when the run could not be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

# Run as a script, Python puts this file's directory on sys.path, not the repository's root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from tests.benchmarks.callbacks import (
    DATABASE_URL,
    BenchmarkError,
    Child,
    answers,
    free_port,
    remove_topology,
    start,
    until,
)
from tests.benchmarks.throughput import host_ticks, until_signalled
from worker.contract.models import Names
from worker.store.schema import migrate

SELF: Final = Path(__file__).resolve()
AMQP_URL: Final = os.environ.get("AGENTLESS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
P99_LIMIT_MS: Final = 50.0
START_TIMEOUT: Final = 60.0
TOKEN: Final = "listing-benchmark-token"
ROWS: Final = 50
DEEP_OFFSET: Final = 10_000
# What the fill makes besides the completed and waiting tasks: a deployment at work has some.
QUEUED, RUNNING, POLLING = 500, 100, 500
# Callback tasks (completed) whose service posted log lines, and the lines each posted.
LOGGED_EVERY, LOG_LINES = 500, 5
# The plan that holds one completed task in fifty; listed in another case than its own.
BIG_PLAN: Final = "Nightly-Release"
HUBS: Final = ("build", "release", "deploy", "test", "Infra", "security", "data", "mobile")
# With the orders and results of SPEC §6 (worker/store/queries.py, worker/contract/models.py).
ORDER_FIELDS: Final = (
    "taskId",
    "planId",
    "hubName",
    "name",
    "state",
    "result",
    "attempts",
    "queuedAt",
    "startedAt",
    "completedAt",
)
STATES: Final = ("queued", "running", "waiting", "polling", "completed")
RESULTS: Final = (
    "succeeded",
    "succeededWithIssues",
    "failed",
    "canceled",
    "skipped",
    "abandoned",
)


# --- the fill --------------------------------------------------------------------------------

# One completed task per i, as the worker records one: the message as queued (a secret header
# redacted), the endpoint's response, the outputs. Times spread over the last week, in order of
# i with some jitter; a plan holds five tasks (its jobs), but for one long-lived plan that holds
# one task in fifty (a nightly pipeline's), and ids look like an orchestrator's.
COMPLETED_ROWS: Final = """
INSERT INTO tasks (task_id, plan_id, job_id, hub_name, project_id, name, mode, state, result,
                   reason, attempts, digest, message, response, outputs, worker_id, queued_at,
                   started_at, completed_at, updated_at, completed_by, external_started_at,
                   waiting_since)
SELECT id, plan, job, hub, project, name, mode, 'completed', result,
       CASE result
           WHEN 'succeeded' THEN 'HTTP 201; successCriteria true'
           WHEN 'succeededWithIssues' THEN 'callback: succeededWithIssues'
           WHEN 'failed' THEN 'HTTP 500; successCriteria false'
           WHEN 'canceled' THEN 'canceled by request'
           WHEN 'skipped' THEN 'callback: skipped'
           ELSE 'timed out waiting for callback' END,
       CASE WHEN i % 17 = 0 THEN 2 ELSE 1 END,
       decode(md5(id) || md5(plan), 'hex'),
       ('{"taskId": "' || id || '", "planId": "' || plan || '", "jobId": "' || job
        || '", "hubName": "' || hub || '", "projectId": "' || project || '", "name": "' || name
        || '", "request": {"method": "POST", "url": "https://deploy.example.com/api/v2/'
        || 'pipelines/' || (i % 977) || '/runs", "headers": {"Content-Type": '
        || '"application/json", "Authorization": "***"}, "body": {"ref": "refs/heads/main", '
        || '"commit": "' || md5(plan) || '", "environment": "staging"}}, '
        || '"waitForCompletion": "' || mode || '", "successCriteria": '
        || '"statusCode == `201`", "timeoutSeconds": 600, '
        || '"variables": {"build.buildId": "' || (i / 5) || '"}}')::jsonb,
       ('{"statusCode": ' || CASE WHEN result = 'failed' THEN 500 ELSE 201 END
        || ', "headers": {"content-type": "application/json; charset=utf-8", "date": "'
        || to_char(done, 'Dy, DD Mon YYYY HH24:MI:SS') || ' GMT", "server": "nginx"}, '
        || '"body": {"id": ' || i || ', "status": "'
        || CASE WHEN result = 'failed' THEN 'error' ELSE 'created' END
        || '", "createdAt": "' || to_char(done, 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
        || '"}, "elapsedMs": ' || (i % 300) || '}')::jsonb,
       CASE WHEN i % 4 = 0 THEN ('{"runId": ' || i || '}')::jsonb ELSE '{}' END,
       1 + i % 3, queued, queued + interval '40 ms', done, done,
       CASE WHEN mode = 'callback' THEN 'callback' ELSE 'worker' END,
       CASE WHEN mode = 'callback' THEN queued + interval '1 s' END,
       CASE WHEN mode <> 'apiResponse' THEN queued + interval '100 ms' END
FROM (
    SELECT i, md5(i::text)::uuid::text AS id,
           CASE WHEN i % 50 = 0 THEN $4::text ELSE md5((i / 5)::text)::uuid::text END AS plan,
           md5(i::text || 'job')::uuid::text AS job,
           ($3::text[])[1 + (i * 7 + i / 13) % array_length($3::text[], 1)] AS hub,
           md5((i % 40)::text)::uuid::text AS project,
           'Deploy service ' || (i % 977) || ' to staging' AS name,
           CASE WHEN i % 4 = 1 THEN 'callback' WHEN i % 20 = 2 THEN 'poll'
                ELSE 'apiResponse' END AS mode,
           CASE WHEN i % 100 < 84 THEN 'succeeded' WHEN i % 100 < 87 THEN 'succeededWithIssues'
                WHEN i % 100 < 95 THEN 'failed' WHEN i % 100 < 97 THEN 'canceled'
                WHEN i % 100 < 98 THEN 'skipped' ELSE 'abandoned' END AS result,
           q AS queued,
           q + make_interval(secs => 0.05 + (i % 1000) / 100.0) AS done
    FROM generate_series(1, $1) AS i,
         LATERAL (SELECT now() - interval '1 hour'
                         - make_interval(secs => ($1 - i) * $2 + (i % 7) * 0.01) AS q) t
) AS s
"""

# Callback tasks waiting for their TaskCompleted (as WAIT leaves them), deadlines hours away so
# that no sweep takes them during the run; and a few queued, running and polling tasks.
UNFINISHED_ROWS: Final = """
INSERT INTO tasks (task_id, plan_id, job_id, hub_name, project_id, name, mode, state, attempts,
                   digest, message, response, queued_at, started_at, deadline, waiting_since,
                   next_poll_at, lease_until, updated_at)
SELECT id, plan, md5(id || 'job')::uuid::text, hub, md5((i % 40)::text)::uuid::text,
       'Approval gate ' || (i % 211), mode, state, 1, decode(md5(id) || md5(plan), 'hex'),
       ('{"taskId": "' || id || '", "planId": "' || plan || '", "hubName": "' || hub
        || '", "name": "Approval gate ' || (i % 211) || '", "request": {"method": "POST", '
        || '"url": "https://approvals.example.com/api/gates", "headers": {"Content-Type": '
        || '"application/json", "Authorization": "***"}, "body": {"gate": ' || (i % 211)
        || ', "requestedBy": "release-bot", "callbackUrl": "{{PlanUrl}}"}}, '
        || '"waitForCompletion": "' || mode || '", "timeoutSeconds": 86400, '
        || '"variables": {"system.teamProject": "platform"}}')::jsonb,
       CASE WHEN state IN ('waiting', 'polling') THEN
           ('{"statusCode": 202, "headers": {"content-type": "application/json"}, "body": '
            || '{"accepted": true, "ticket": "' || md5(id) || '"}, "elapsedMs": 31}')::jsonb END,
       queued, CASE WHEN state <> 'queued' THEN queued + interval '30 ms' END,
       CASE WHEN state IN ('waiting', 'polling')
            THEN now() + interval '2 hours' + make_interval(secs => i % 79200) END,
       CASE WHEN state IN ('waiting', 'polling') THEN queued + interval '60 ms' END,
       CASE WHEN state = 'polling' THEN now() + interval '2 hours' END,
       CASE WHEN state = 'running' THEN now() + interval '2 hours' END,
       queued
FROM (
    SELECT i, md5('u' || i)::uuid::text AS id, md5('up' || (i / 3))::uuid::text AS plan,
           ($4::text[])[1 + i % array_length($4::text[], 1)] AS hub,
           CASE WHEN i <= $1::int THEN 'waiting' WHEN i <= $1::int + $2::int THEN 'queued'
                WHEN i <= $1::int + $2::int + $3::int THEN 'running' ELSE 'polling' END AS state,
           CASE WHEN i <= $1::int THEN 'callback'
                WHEN i <= $1::int + $2::int + $3::int THEN 'apiResponse' ELSE 'poll' END AS mode,
           now() - interval '50 minutes' + make_interval(secs => i * 0.02) AS queued
    FROM generate_series(1, $1::int + $2::int + $3::int + $5::int) AS i
) AS s
"""

LOG_ROWS: Final = """
INSERT INTO task_logs (task_id, at, line)
SELECT t.task_id, t.completed_at, 'step ' || n || ': ' || repeat('output ', 8)
FROM tasks t, generate_series(1, $2) AS n
WHERE t.mode = 'callback' AND t.state = 'completed' AND hashtext(t.task_id) % $1 = 0
"""


async def fill(conn: asyncpg.Connection, completed: int, waiting: int) -> float:
    """Every row of the run, in seconds. The non-unique indexes are dropped for the insert and
    made again from their definitions after it (faster than a million index updates each)."""
    began = time.perf_counter()
    await conn.execute("SET synchronous_commit = off; SET maintenance_work_mem = '512MB'")
    indexes = await conn.fetch(
        """SELECT indexname, indexdef FROM pg_indexes
           WHERE schemaname = current_schema() AND tablename = 'tasks'
             AND indexname NOT IN (SELECT conname FROM pg_constraint)"""
    )
    async with conn.transaction():
        for index in indexes:
            await conn.execute(f'DROP INDEX "{index["indexname"]}"')
        # A week's completions, at the rate `completed` of them make.
        spacing = 7 * 86_400 / max(completed, 1)
        await conn.execute(COMPLETED_ROWS, completed, spacing, list(HUBS), BIG_PLAN)
        await conn.execute(UNFINISHED_ROWS, waiting, QUEUED, RUNNING, list(HUBS), POLLING)
        await conn.execute(LOG_ROWS, LOGGED_EVERY, LOG_LINES)
        for index in indexes:
            await conn.execute(index["indexdef"])
    await conn.execute("VACUUM ANALYZE tasks")
    await conn.execute("VACUUM ANALYZE task_logs")
    return time.perf_counter() - began


# --- the baseline: a process of its own ------------------------------------------------------


async def serve_baseline(port: int) -> int:
    """The least an HTTP listing can cost: a page of 50 tasks, made once, sent as it is."""
    summary = {
        "taskId": str(uuid.uuid4()),
        "planId": str(uuid.uuid4()),
        "jobId": str(uuid.uuid4()),
        "hubName": "build",
        "name": "Deploy service 1 to staging",
        "mode": "apiResponse",
        "state": "completed",
        "result": "succeeded",
        "reason": "HTTP 201; successCriteria true",
        "attempts": 1,
        "queuedAt": "2026-01-01T00:00:00Z",
        "startedAt": "2026-01-01T00:00:00.04Z",
        "completedAt": "2026-01-01T00:00:01Z",
    }
    body = orjson.dumps({"tasks": [summary] * ROWS, "total": 1_000_000})

    async def page(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/tasks", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await until_signalled()
    finally:
        await runner.cleanup()
    return 0


# --- the requests ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of request: its label, its path and query, its headers."""

    label: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()


def list_kinds(plan: str, task_id: str) -> list[Kind]:
    """Every order in both directions, every filter in the default order and by completedAt
    desc; each as a first page, a deep page by pageNumber, and the same by Range."""
    deep_page = DEEP_OFFSET // ROWS + 1
    queries: list[str] = [
        f"orderField={order}&sortType={direction}"
        for order in ORDER_FIELDS
        for direction in ("asc", "desc")
    ]
    filters = [f"state={state}" for state in STATES]
    filters += [f"result={result}" for result in RESULTS]
    filters += [f"planId={plan}", f"planId={BIG_PLAN.lower()}", "hubName=RELEASE"]
    filters += ["state=completed&result=failed", "hubName=deploy&result=failed"]
    filters += [f"planId={plan}&state=completed"]
    for given in filters:
        queries += [given, f"{given}&orderField=completedAt&sortType=desc"]
    kinds: list[Kind] = []
    for query in queries:
        kinds.append(Kind(f"{query} [first]", f"/tasks?{query}&rowsPerPage={ROWS}"))
        kinds.append(
            Kind(
                f"{query} [page {deep_page}]",
                f"/tasks?{query}&rowsPerPage={ROWS}&pageNumber={deep_page}",
            )
        )
        kinds.append(
            Kind(
                f"{query} [Range {DEEP_OFFSET}-]",
                f"/tasks?{query}",
                (("Range", f"items={DEEP_OFFSET}-{DEEP_OFFSET + ROWS - 1}"),),
            )
        )
    kinds += [
        Kind("GET /tasks (no parameters)", "/tasks"),
        Kind("GET /queue", "/queue"),
        Kind("GET /workers", "/workers"),
        Kind("GET / (operations page)", "/", (("Accept", "text/html"),)),
        Kind("GET /metrics", "/metrics"),
        Kind("GET /tasks/{taskId}", f"/tasks/{task_id}"),
    ]
    return kinds


@dataclass
class Measured:
    kind: Kind
    took_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    rows: int | None = None
    total: str = ""

    def percentile(self, share: float) -> float:
        ordered = sorted(self.took_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


async def measure(
    session: aiohttp.ClientSession, base: str, kind: Kind, requests: int, clients: int
) -> Measured:
    measured = Measured(kind)
    headers = {"Authorization": f"Bearer {TOKEN}", **dict(kind.headers)}
    left = requests

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            began = time.perf_counter()
            async with session.get(base + kind.path, headers=headers) as response:
                body = await response.read()
            measured.took_ms.append((time.perf_counter() - began) * 1000)
            measured.statuses[response.status] = measured.statuses.get(response.status, 0) + 1
            if measured.rows is None and response.content_type == "application/json":
                answer = orjson.loads(body)
                if isinstance(answer, dict) and "tasks" in answer:
                    measured.rows = len(answer["tasks"])
                    exact = "" if answer.get("totalExact", True) else "~"
                    measured.total = f"{exact}{answer.get('total')}"
                measured.total = response.headers.get("Content-Range", measured.total)

    await asyncio.gather(*(client() for _ in range(clients)))
    return measured


def expected_status(measured: Measured) -> bool:
    """200, 206 for a Range, or 416 for a Range past the end of a short list."""
    allowed = {200}
    if any(name == "Range" for name, _ in measured.kind.headers):
        allowed = {206, 416}
    return set(measured.statuses) <= allowed


# --- the run ---------------------------------------------------------------------------------


def api_env(database_url: str, prefix: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLESS_")}
    env.update(
        AGENTLESS_AMQP_URL=AMQP_URL,
        AGENTLESS_DATABASE_URL=database_url,
        AGENTLESS_PREFIX=prefix,
        AGENTLESS_API_PORT=str(port),
        AGENTLESS_API_TOKENS=TOKEN,
        AGENTLESS_LOG_FORMAT="json",
        AGENTLESS_SIGNING_KEY="listing-benchmark-signing-key-0123456789",
        # The fill spans a week: the default retention would start deleting it mid-run.
        AGENTLESS_RETENTION="0",
    )
    return env


@dataclass
class Outcome:
    fill: str
    baseline: list[Measured]
    measured: list[Measured]
    busy_percent: float


async def bench(args: argparse.Namespace, logs: Path) -> Outcome:
    schema = args.schema or f"bench_listing_{uuid.uuid4().hex[:10]}"
    joiner = "&" if "?" in DATABASE_URL else "?"
    database_url = f"{DATABASE_URL}{joiner}search_path={schema}"
    prefix = f"agentless-bench.listing.{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(database_url)
    servers: list[Child] = []
    try:
        await migrate(conn)
        present = await conn.fetchval("SELECT count(*) FROM tasks")
        if present == 0:
            seconds = await fill(conn, args.completed, args.waiting)
            done = f"filled in {seconds:.0f} s"
        else:
            # Migrations applied to the kept rows may have made indexes on expressions, whose
            # statistics only ANALYZE gathers.
            await conn.execute("ANALYZE tasks")
            done = "reused"
        size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('tasks'))")
        counts: dict[str, int] = {
            row["state"]: row["n"]
            for row in await conn.fetch("SELECT state, count(*) AS n FROM tasks GROUP BY state")
        }
        filled = f"schema {schema} ({done}): tasks {size}, " + ", ".join(
            f"{state} {n:,}" for state, n in sorted(counts.items())
        )
        print(filled, file=sys.stderr, flush=True)
        plan = await conn.fetchval(
            "SELECT plan_id FROM tasks WHERE state = 'completed' AND plan_id <> $1 LIMIT 1",
            BIG_PLAN,
        )
        task_id = await conn.fetchval(
            "SELECT task_id FROM tasks WHERE state = 'completed' OFFSET 1000 LIMIT 1"
        )
        api_port, baseline_port = free_port(), free_port()
        baseline = await start(
            "baseline",
            [str(SELF), "--role", "baseline", "--port", str(baseline_port)],
            {**os.environ},
            logs,
        )
        servers.append(baseline)
        # Started from --api-root: a process run with `-m` imports the package from its
        # working directory first, so a commit exported there is what answers.
        api = await start(
            "api",
            [
                "-c",
                "import os, runpy, sys; os.chdir(sys.argv[1]); sys.path.insert(0, sys.argv[1]); "
                "sys.argv = ['worker', 'api']; runpy.run_module('worker', run_name='__main__')",
                str(args.api_root),
            ],
            api_env(database_url, prefix, api_port),
            logs,
        )
        servers.append(api)
        await until(
            lambda: answers(f"http://127.0.0.1:{baseline_port}/tasks"), baseline, START_TIMEOUT
        )
        await until(lambda: answers(f"http://127.0.0.1:{api_port}/readyz"), api, START_TIMEOUT)
        kinds = [k for k in list_kinds(plan, task_id) if args.only.search(k.label)]
        gc.collect()
        gc.freeze()
        base = f"http://127.0.0.1:{api_port}"
        baseline_url = f"http://127.0.0.1:{baseline_port}"
        connector = aiohttp.TCPConnector(limit=args.clients)
        async with aiohttp.ClientSession(connector=connector) as session:
            bare = Kind("bare aiohttp handler, 50 tasks", "/tasks")
            baselines = [await measure(session, baseline_url, bare, args.requests, args.clients)]
            # Each kind once before it counts: a first request warms its statement's plan cache
            # and the pages it reads, which every later request finds warm.
            for kind in kinds:
                await measure(session, base, kind, args.clients, args.clients)
            busy0, total0 = host_ticks()
            measured = []
            for kind in kinds:
                api.check_alive()
                measured.append(await measure(session, base, kind, args.requests, args.clients))
                if args.verbose:
                    m = measured[-1]
                    print(
                        f"{m.percentile(0.5):8.1f} {m.percentile(0.99):8.1f}  {kind.label}",
                        file=sys.stderr,
                        flush=True,
                    )
            busy1, total1 = host_ticks()
            baselines.append(
                await measure(session, baseline_url, bare, args.requests, args.clients)
            )
        busy = 100 * (busy1 - busy0) / max(total1 - total0, 1)
        return Outcome(filled, baselines, measured, busy)
    finally:
        for server in servers:
            await server.stop()
        await remove_topology(Names(prefix))
        if not args.keep:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        else:
            print(f"kept schema {schema} (--schema {schema} reuses it)", file=sys.stderr)
        await conn.close()


def report(outcome: Outcome, args: argparse.Namespace) -> tuple[str, bool]:
    lines = [
        outcome.fill,
        f"{args.requests} requests per kind from {args.clients} concurrent clients; host CPU "
        f"{outcome.busy_percent:.0f}% busy while the API was measured; target p99 < "
        f"{P99_LIMIT_MS:.0f} ms",
        "",
        f"{'request':<78} {'p50 ms':>7} {'p99 ms':>7}  {'status':<10} {'rows':>4}  total",
    ]
    lines += [
        f"{bare.kind.label:<78} {bare.percentile(0.5):7.1f} {bare.percentile(0.99):7.1f}"
        for bare in outcome.baseline
    ]
    passed = True
    for m in outcome.measured:
        p99 = m.percentile(0.99)
        ok = p99 < P99_LIMIT_MS and expected_status(m)
        passed &= ok
        statuses = ",".join(f"{status}" for status in sorted(m.statuses))
        lines.append(
            f"{m.kind.label:<78} {m.percentile(0.5):7.1f} {p99:7.1f}  {statuses:<10} "
            f"{'' if m.rows is None else m.rows:>4}  {m.total}{'' if ok else '  <- MISSED'}"
        )
    worst = max(outcome.measured, key=lambda m: m.percentile(0.99))
    lines.append(
        f"\nworst p99: {worst.percentile(0.99):.1f} ms ({worst.kind.label}); "
        f"{'every p99 under' if passed else 'NOT every p99 under'} {P99_LIMIT_MS:.0f} ms"
    )
    return "\n".join(lines), passed


def count(text: str) -> int:
    value = int(text.replace("_", "").replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="p50/p99 of the API's listings at a million tasks, beside a bare handler."
    )
    parser.add_argument("--completed", type=count, default=1_000_000, help="(1000000)")
    parser.add_argument("--waiting", type=count, default=100_000, help="(100000)")
    parser.add_argument("--requests", type=count, default=200, help="per kind (200)")
    parser.add_argument("--clients", type=count, default=4, help="concurrent clients (4)")
    parser.add_argument("--keep", action="store_true", help="keep the filled schema")
    parser.add_argument("--schema", help="fill this schema, or reuse it if it has tasks")
    parser.add_argument(
        "--only",
        type=re.compile,
        default=re.compile(""),
        help="only the kinds whose label matches this regular expression",
    )
    parser.add_argument(
        "--api-root",
        type=Path,
        default=Path(__file__).resolve().parents[2],
        metavar="DIR",
        help="the checkout whose API to measure, e.g. a commit exported with `git archive` "
        "(default: this one)",
    )
    parser.add_argument("--verbose", action="store_true", help="print each kind as measured")
    parser.add_argument("--timeout", type=count, default=3600, help="seconds (3600)")
    parser.add_argument("--role", choices=["bench", "baseline"], default="bench")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "baseline":
        return asyncio.run(serve_baseline(args.port))
    logs = Path(tempfile.mkdtemp(prefix="agentless-listing-"))

    async def bounded() -> Outcome:
        async with asyncio.timeout(args.timeout):
            return await bench(args, logs)

    try:
        outcome = asyncio.run(bounded())
    except (BenchmarkError, TimeoutError) as exc:
        print(f"benchmark failed: {exc or 'timed out'}; logs in {logs}", file=sys.stderr)
        return 2
    text, passed = report(outcome, args)
    print(text)
    print(f"\nprocess logs: {logs}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
