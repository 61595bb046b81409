"""Peak memory of a worker whose tasks all answer bodies at the size cap at once.

    python tests/benchmarks/memory.py [--tasks 256] [--kinds strings,integers,string,text]
                                      [--modes apiResponse,callback] [--size 5242880]

Run on demand, never by pytest. For each kind of body and each mode, N tasks are queued, then
one `agentless worker` process (concurrency N, cap `--size`) takes them all; each endpoint holds
its answer until every request has arrived, so that every body is in flight at once. Printed per
run: the worker's peak RSS (VmHWM), the time until every task was recorded (completed for
apiResponse, waiting for callback), and the tasks' results; beside it, in the same run, the peak
RSS of a bare baseline: one aiohttp session in a process of its own that fetches the same bodies
at once, reads each whole and parses it with orjson, and holds every body's bytes (not its parsed
value, which for 256 bodies of small JSON values would take the machine's memory) until the last
has come: the least a worker that reads whole bodies without a budget holds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import aio_pika
import aiohttp
import asyncpg
import orjson
from aiohttp.test_utils import TestServer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests import processes  # noqa: E402
from tests.faults.big_bodies import Endpoints, Kind, peak_rss_mb  # noqa: E402
from worker.contract.models import Names  # noqa: E402
from worker.contract.settings import Settings  # noqa: E402
from worker.topology import declare_topology  # noqa: E402

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


async def one_run(kind: Kind, mode: str, tasks: int, size: int) -> dict[str, object]:
    name = f"mem_{uuid.uuid4().hex[:8]}"
    settings = Settings(
        amqp_url=AMQP_URL,
        database_url=f"{DATABASE_URL}?search_path={name}",
        prefix=f"agentless-bench.{name}",
        max_response_bytes=size,
        concurrency=tasks,
        worker_port=0,
        log_format="json",
        connections=None,
    )
    endpoints = Endpoints(size, tasks)
    server = TestServer(endpoints.app(), host="127.0.0.1")
    await server.start_server()
    names = Names(settings.prefix)
    connection = await aio_pika.connect(AMQP_URL)
    db: asyncpg.Connection = await asyncpg.connect(DATABASE_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, names)
        for i in range(tasks):
            task = {
                "taskId": f"{kind}-{i}",
                "planId": "plan-m",
                "waitForCompletion": mode,
                "request": {"method": "GET", "url": str(server.make_url(f"/{kind}/{i}"))},
            }
            message = aio_pika.Message(orjson.dumps(task), delivery_mode=2)
            await channel.default_exchange.publish(message, routing_key=names.tasks)
        started = time.perf_counter()
        child = await processes.start(settings, "worker")
        goal = "completed" if mode == "apiResponse" else "waiting"
        try:
            async with asyncio.timeout(300):
                while True:
                    await asyncio.sleep(0.5)
                    assert child.process.returncode is None, child.logs()[-3000:]
                    try:
                        done = await db.fetchval(
                            f'SELECT count(*) FROM "{name}".tasks WHERE state IN ($1, $2)',
                            goal,
                            "completed",
                        )
                    except asyncpg.UndefinedTableError:
                        continue
                    if done >= tasks:
                        break
            seconds = time.perf_counter() - started
            peak = peak_rss_mb(child.process.pid)
        finally:
            child.process.send_signal(signal.SIGTERM)
            await child.process.wait()
        rows = await db.fetch(f'SELECT state, result, reason FROM "{name}".tasks')
        outcomes = Counter(f"{r['state']}/{r['result']}/{r['reason']}" for r in rows)
        return {
            "kind": kind.value,
            "mode": mode,
            "peakRssMiB": round(peak),
            "seconds": round(seconds, 1),
            "outcomes": dict(outcomes),
        }
    finally:
        await db.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await db.close()
        channel = await connection.channel()
        for queue in (names.tasks, names.dead):
            await channel.queue_delete(queue)
        await channel.exchange_delete(names.events)
        await connection.close()
        await server.close()


async def baseline_run(kind: Kind, tasks: int, size: int) -> float:
    """The bare baseline's peak RSS in MiB, on a server of its own that answers the same bodies."""
    endpoints = Endpoints(size, tasks)
    server = TestServer(endpoints.app(), host="127.0.0.1")
    await server.start_server()
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--bare",
            str(server.make_url(f"/{kind}")),
            "--tasks",
            str(tasks),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(child.communicate(), 300)
        return float(out)
    finally:
        await server.close()


async def bare(url: str, tasks: int) -> None:
    """The baseline itself: prints its peak RSS in MiB once it holds every parsed body."""

    async def fetch(session: aiohttp.ClientSession, i: int) -> bytes:
        async with session.get(f"{url}/{i}") as response:
            body = await response.read()
        with contextlib.suppress(orjson.JSONDecodeError):
            orjson.loads(body)
        return body

    connector = aiohttp.TCPConnector(limit=tasks)
    async with aiohttp.ClientSession(connector=connector) as session:
        held = await asyncio.gather(*(fetch(session, i) for i in range(tasks)))
    print(round(peak_rss_mb(os.getpid())), flush=True)
    del held


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=256)
    parser.add_argument("--size", type=int, default=5 * 1024 * 1024)
    parser.add_argument("--kinds", default=",".join(Kind))
    parser.add_argument("--modes", default="apiResponse,callback")
    parser.add_argument("--bare", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        await bare(args.bare, args.tasks)
        return
    for kind in args.kinds.split(","):
        baseline = await baseline_run(Kind(kind), args.tasks, args.size)
        for mode in args.modes.split(","):
            result = await one_run(Kind(kind), mode, args.tasks, args.size)
            result["baselinePeakRssMiB"] = round(baseline)
            print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
