"""What a person can act on when a process cannot start or a command cannot reach what it needs:
one line naming the setting or the address and what to do, the exit code of SPEC §8, never a
traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests import processes
from tests.conftest import free_port
from worker.contract.settings import Settings

CLOSED_BROKER = "amqp://guest:secret@127.0.0.1:1/"
CLOSED_DATABASE = "postgresql://postgres:secret@127.0.0.1:1/postgres"


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _one_line(err: str) -> str:
    """The one line that says what went wrong; the process's own log lines (JSON: migrations
    applied before the broker was found out of reach) may come before it."""
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if not line.startswith('{"time"')]
    assert len(said) == 1, err
    assert err.endswith(said[0] + "\n")
    return said[0]


@pytest.mark.parametrize(
    ("command", "setting"),
    [
        ("run", "AGENTLESS_WORKER_PORT"),
        ("worker", "AGENTLESS_WORKER_PORT"),
        ("run", "AGENTLESS_API_PORT"),
        ("api", "AGENTLESS_API_PORT"),
    ],
)
async def test_a_port_in_use_is_named_with_its_setting(
    settings: Settings, taken: int, command: str, setting: str
) -> None:
    ports = {"AGENTLESS_WORKER_PORT": "0", "AGENTLESS_API_PORT": str(free_port())}
    ports[setting] = str(taken)
    code, _, err = await processes.run(settings, command, timeout=30, **ports)
    assert code == 2
    expected = (
        f"agentless: port {taken} ({setting}) on 127.0.0.1 is in use by another process; "
        f"set {setting} to a free port"
    )
    if setting == "AGENTLESS_WORKER_PORT":
        expected += ", or 0 to turn the worker's probe server off"
    assert _one_line(err) == expected


async def test_a_host_that_is_not_this_machines(settings: Settings) -> None:
    code, _, err = await processes.run(
        settings,
        "worker",
        AGENTLESS_WORKER_PORT=str(free_port()),
        AGENTLESS_WORKER_HOST="192.0.2.1",
    )
    assert code == 2
    assert _one_line(err).startswith(
        "agentless: AGENTLESS_WORKER_HOST '192.0.2.1' is not an address of this machine"
    )


async def test_a_setting_out_of_range(settings: Settings) -> None:
    code, _, err = await processes.run(settings, "run", AGENTLESS_API_PORT="70000")
    assert code == 2
    assert _one_line(err) == (
        "agentless: invalid configuration: AGENTLESS_API_PORT: "
        "Input should be less than or equal to 65535"
    )


@pytest.mark.parametrize("command", ["worker", "run", "api"])
@pytest.mark.parametrize("unreachable", ["broker", "database"])
async def test_an_unreachable_broker_or_database_at_start_up(
    settings: Settings, command: str, unreachable: str
) -> None:
    env = (
        {"AGENTLESS_AMQP_URL": CLOSED_BROKER}
        if unreachable == "broker"
        else {"AGENTLESS_DATABASE_URL": CLOSED_DATABASE}
    )
    code, _, err = await processes.run(
        settings, command, AGENTLESS_API_PORT=str(free_port()), timeout=30, **env
    )
    assert code == 4
    line = _one_line(err)
    if unreachable == "broker":
        assert line.startswith("agentless: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/")
        assert line.endswith(
            "check that RabbitMQ is running there and that AGENTLESS_AMQP_URL is right, "
            "then try again"
        )
    else:
        assert line.startswith(
            "agentless: cannot reach PostgreSQL at postgresql://postgres:***@127.0.0.1:1/postgres"
        )
        assert line.endswith("AGENTLESS_DATABASE_URL is right, then try again")
    assert "secret" not in err


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["submit", "--url", "http://127.0.0.1/"], {"AGENTLESS_AMQP_URL": CLOSED_BROKER}),
        (["events"], {"AGENTLESS_AMQP_URL": CLOSED_BROKER}),
        (["status"], {"AGENTLESS_DATABASE_URL": CLOSED_DATABASE}),
        (["dead", "list"], {"AGENTLESS_AMQP_URL": CLOSED_BROKER}),
        (["task", "t-1"], {"AGENTLESS_DATABASE_URL": CLOSED_DATABASE}),
        (["cancel", "t-1"], {"AGENTLESS_DATABASE_URL": CLOSED_DATABASE}),
        (["logs", "t-1"], {"AGENTLESS_DATABASE_URL": CLOSED_DATABASE}),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
async def test_every_command_exits_4_when_what_it_needs_does_not_answer(
    settings: Settings, args: list[str], env: dict[str, str]
) -> None:
    code, out, err = await processes.run(settings, *args, timeout=30, **env)
    assert (code, out) == (4, "")
    line = _one_line(err)
    assert line.startswith("agentless: cannot reach ")
    assert "127.0.0.1:1" in line
    assert "secret" not in line
