"""deploy/compose.yaml: valid by the Compose Specification's schema, consistent with its env file
and its images, and, run as local processes with what it declares, a working deployment."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import pytest
import yaml
from aio_pika.abc import AbstractChannel
from yarl import URL

from tests.conftest import AMQP_URL, Target, free_port, task_message
from tests.deploy.test_container import image_environment, only, stages
from tests.processes import ROOT, Child, wait_until_ready
from tests.task_api import call
from worker.contract.settings import Settings

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
ENV_EXAMPLE = DEPLOY / "agentless.env.example"
SETTINGS = {f"AGENTLESS_{name.upper()}" for name in Settings.model_fields}


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def services() -> dict[str, dict[str, Any]]:
    declared = compose()["services"]
    assert isinstance(declared, dict)
    return declared


def in_profile(service: dict[str, Any], profile: str | None) -> bool:
    """Whether the service runs under `profile`; None is the default deployment, of the services
    that have no profile."""
    profiles = service.get("profiles", [])
    return profile in profiles if profile else not profiles


def agentless_services(profile: str | None = None) -> dict[str, dict[str, Any]]:
    """The services that run the image built from deploy/Dockerfile, in the default deployment
    or in one profile."""
    return {name: s for name, s in services().items() if "build" in s and in_profile(s, profile)}


def command(service: dict[str, Any]) -> list[str]:
    declared = service["command"]
    return shlex.split(declared) if isinstance(declared, str) else [str(w) for w in declared]


def read_env_file(path: Path) -> dict[str, str]:
    """A Compose env file: NAME=value lines, comments and blank lines."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{path.name}: not NAME=value: {line!r}"
        env[name.strip()] = value.strip()
    return env


def declared_environment(service: dict[str, Any]) -> dict[str, str]:
    """What the service's container gets: the image's ENV, then its env_file(s), then its
    environment, each over the one before (Compose's order)."""
    env = image_environment()
    env_files = service.get("env_file", [])
    for entry in [env_files] if isinstance(env_files, str) else env_files:
        path = entry if isinstance(entry, str) else entry["path"]
        env.update(read_env_file(COMPOSE.parent / path))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({str(k): str(v) for k, v in environment.items()})
    return env


def replicas(service: dict[str, Any]) -> int:
    return int(service.get("deploy", {}).get("replicas", 1))


def test_the_first_line_says_how_to_bring_it_up() -> None:
    first = COMPOSE.read_text().splitlines()[0]
    assert first == "# docker compose -f deploy/compose.yaml up --build"


def test_valid_by_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: e.json_path
    )
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)


def test_rabbitmq_and_postgres_with_health_checks() -> None:
    declared = services()
    rabbitmq, postgres = declared["rabbitmq"], declared["postgres"]
    # The management image has the management plugin on.
    assert rabbitmq["image"] == "rabbitmq:4-management"
    assert rabbitmq["healthcheck"]["test"][:4] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert postgres["image"] == "postgres:17"
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in compose()["volumes"], "PostgreSQL's data is on a named volume"


def test_one_image_for_the_api_and_two_workers_started_on_health() -> None:
    mine = agentless_services()
    assert {s["image"] for s in mine.values()} == {"agentless:local"}
    for name, service in mine.items():
        build = service["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile", name
        assert service["depends_on"] == {
            "rabbitmq": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
        }
        assert service["healthcheck"]["test"] == ["CMD", "agentless", "check"]
    commands = [command(s)[0] for s in mine.values() for _ in range(replicas(s))]
    assert sorted(commands) == ["api", "worker", "worker"]
    api = next(s for s in mine.values() if command(s) == ["api"])
    assert any(str(port).endswith(":8080") for port in api["ports"])


@pytest.mark.parametrize("profile", [None, "cluster"])
def test_the_env_file_names_real_settings_that_reach_the_other_services(
    profile: str | None,
) -> None:
    declared = services()
    for name, service in agentless_services(profile).items():
        env = declared_environment(service)
        assert set(env) - {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"} <= SETTINGS
        for required in ("AMQP_URL", "DATABASE_URL", "API_TOKENS", "SIGNING_KEY", "PUBLIC_URL"):
            assert env.get(f"AGENTLESS_{required}"), f"{name}: AGENTLESS_{required}"
        # The URLs name the compose services of the same deployment, with the users those
        # services create.
        for each in env["AGENTLESS_AMQP_URL"].split(","):
            amqp = URL(each)
            broker = declared[str(amqp.host)]
            assert in_profile(broker, profile), f"{name}: {amqp.host}"
            assert (amqp.user, amqp.password) == (
                broker["environment"]["RABBITMQ_DEFAULT_USER"],
                broker["environment"]["RABBITMQ_DEFAULT_PASS"],
            )
        database = URL(env["AGENTLESS_DATABASE_URL"])
        store = declared[str(database.host)]["environment"]
        assert (database.user, database.password, database.path) == (
            store["POSTGRES_USER"],
            store["POSTGRES_PASSWORD"],
            f"/{store['POSTGRES_DB']}",
        )
        Settings.model_validate({k[10:].lower(): v for k, v in env.items() if k in SETTINGS})


def test_the_example_env_file_lists_every_setting() -> None:
    text = ENV_EXAMPLE.read_text()
    listed = {
        line.lstrip("# ").split("=", 1)[0]
        for line in text.splitlines()
        if line.lstrip("# ").startswith("AGENTLESS_") and "=" in line
    }
    assert listed == SETTINGS


# The live test: each agentless service as a local process.


def local_environment(
    service: dict[str, Any], settings: Settings, api_port: int, worker_port: int
) -> dict[str, str]:
    """The service's declared environment with what one machine needs instead of a compose
    project: local RabbitMQ and PostgreSQL, this test's prefix and schema, its own ports."""
    env = declared_environment(service)
    declared = services()
    amqp = URL(env["AGENTLESS_AMQP_URL"])
    assert amqp.host in declared
    local_amqp = URL(AMQP_URL)
    env["AGENTLESS_AMQP_URL"] = str(local_amqp.with_path(amqp.path).with_query(amqp.query))
    database = URL(env["AGENTLESS_DATABASE_URL"])
    assert database.host in declared
    local_db = URL(settings.database_url)
    env["AGENTLESS_DATABASE_URL"] = str(local_db.update_query(database.query))
    env["AGENTLESS_PREFIX"] = settings.prefix
    env["AGENTLESS_API_PORT"] = str(api_port)
    env["AGENTLESS_WORKER_PORT"] = str(worker_port)
    # The rest of the image's environment (PATH…) describes the container, not this machine.
    outside = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLESS_")}
    return outside | {k: v for k, v in env.items() if k.startswith("AGENTLESS_")}


async def health_check(service: dict[str, Any], env: dict[str, str]) -> tuple[int, str]:
    """The service's declared health check, run as its container would run it."""
    kind, program, *argv = service["healthcheck"]["test"]
    assert (kind, program) == ("CMD", "agentless")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *argv,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(15):
        out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


@asynccontextmanager
async def started(argv: list[str], env: dict[str, str]) -> AsyncIterator[Child]:
    """`agentless ARGV…` with exactly `env`, killed if the test leaves it running."""
    handle, name = tempfile.mkstemp(prefix="agentless-compose-", suffix=".log")
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            *argv,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=handle,
            stderr=handle,
        )
    finally:
        os.close(handle)
    child = Child(process, Path(name))
    try:
        yield child
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        child.log.unlink(missing_ok=True)


async def stopped(child: Child) -> int:
    child.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        return await child.process.wait()


@dataclass
class Replica:
    """One container of an agentless service, as a local process."""

    name: str
    service: dict[str, Any]
    env: dict[str, str]
    child: Child | None = None

    @property
    def ready_url(self) -> str:
        setting = (
            "AGENTLESS_API_PORT" if command(self.service) == ["api"] else "AGENTLESS_WORKER_PORT"
        )
        return f"http://127.0.0.1:{self.env[setting]}/readyz"

    def running(self) -> Child:
        assert self.child is not None
        return self.child


def replicas_on_one_machine(settings: Settings, api_port: int) -> list[Replica]:
    """Every container the compose file starts from the agentless image. In compose each has
    its own network: here each process gets its own ports, and only the API's is the one
    AGENTLESS_PUBLIC_URL names."""
    found = []
    for name, service in agentless_services().items():
        for number in range(1, replicas(service) + 1):
            own_api_port = api_port if command(service) == ["api"] else free_port()
            env = local_environment(service, settings, own_api_port, free_port())
            env["AGENTLESS_PUBLIC_URL"] = f"http://127.0.0.1:{api_port}"
            found.append(Replica(f"{name}-{number}", service, env))
    return found


@pytest.mark.timeout(60)
async def test_the_compose_services_run_a_task_end_to_end(
    settings: Settings, channel: AbstractChannel, db: asyncpg.Connection, target: Target
) -> None:
    assert only(stages()[-1], "ENTRYPOINT").exec_form() == ["agentless"]
    api_port = free_port()
    containers = replicas_on_one_machine(settings, api_port)
    async with AsyncExitStack() as stack:
        for replica in containers:
            argv = command(replica.service)
            replica.child = await stack.enter_async_context(started(argv, replica.env))
        for replica in containers:
            await wait_until_ready(replica.ready_url, replica.running())
        # What the containers' health checks run says so too.
        checked = await asyncio.gather(*(health_check(r.service, r.env) for r in containers))
        for replica, (code, out) in zip(containers, checked, strict=True):
            assert code == 0, f"{replica.name}: {out}\n{replica.running().logs()}"

        api = f"http://127.0.0.1:{api_port}"
        token = containers[0].env["AGENTLESS_API_TOKENS"].split(",")[0]
        bearer = {"Authorization": f"Bearer {token}"}
        task = task_message(target)
        # Off loopback the API takes the declared token, and nothing without it.
        assert (await call("POST", f"{api}/tasks", task))[0] == 401
        status, body, _ = await call("POST", f"{api}/tasks", task, bearer)
        assert status == 202, body
        async with asyncio.timeout(10):
            while True:
                status, detail, _ = await call("GET", f"{api}/tasks/{task['taskId']}", None, bearer)
                assert status == 200, detail
                if detail["state"] == "completed":
                    break
                await asyncio.sleep(0.05)
        assert detail["result"] == "succeeded", detail
        assert target.calls[str(task["taskId"])] == 1

        # Both workers are live, sharing the queue and the database.
        workers = {r.running().process.pid for r in containers if command(r.service) == ["worker"]}
        assert len(workers) == 2
        status, live, _ = await call("GET", f"{api}/workers", None, bearer)
        assert status == 200, live
        assert workers <= {w["pid"] for w in live}

        codes = await asyncio.gather(*(stopped(r.running()) for r in containers))
        for replica, code in zip(containers, codes, strict=True):
            assert code == 0, f"{replica.name}: {replica.running().logs()}"
        checked = await asyncio.gather(*(health_check(r.service, r.env) for r in containers))
        for replica, (code, out) in zip(containers, checked, strict=True):
            assert code != 0, f"{replica.name}: healthy once stopped: {out}"
