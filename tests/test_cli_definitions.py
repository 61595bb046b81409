"""`agentless definitions apply|list|show|delete` and `agentless execute` as an operator runs
them. The commands run in a thread of this process (each runs a loop of its own), which spares
a second of interpreter start-up each; one runs as its own process, for the exit code `main`
gives a usage error."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import asyncpg
import pytest

from tests import processes
from tests.conftest import Target
from worker.cli.execute import parse_inputs
from worker.cli.exits import EXIT_USAGE
from worker.cli.main import COMMANDS
from worker.cli.parser import build_parser
from worker.contract.definitions import DefinitionSpec
from worker.contract.errors import UsageError
from worker.contract.settings import Settings
from worker.service import Worker
from worker.store.database import Store


async def agentless(
    settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    """`agentless ARGV…` as `main` runs it, in a thread: exit code, stdout, stderr."""
    args = build_parser().parse_args(list(argv))
    try:
        code = await asyncio.to_thread(COMMANDS[args.command], settings, args)
    except UsageError as exc:
        print(f"agentless: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    out, err = capsys.readouterr()
    return code, out, err


def definition(target: Target, **fields: object) -> dict[str, object]:
    """A definition that calls `target`, its body the `commit` variable (default main)."""
    data: dict[str, object] = {
        "name": "tag-build",
        "description": "Tag a build",
        "request": {
            "url": f"{target.url}/hook?key=$(variables.key)",
            "body": {"commit": "$(variables.commit)"},
        },
        "variables": {"commit": "main", "key": "tag-build"},
    }
    data.update(fields)
    return data


def write(path: Path, content: object) -> str:
    path.write_text(json.dumps(content))
    return str(path)


@pytest.mark.parametrize(
    "command",
    [
        ["definitions"],
        ["definitions", "apply"],
        ["definitions", "list"],
        ["definitions", "show"],
        ["definitions", "delete"],
        ["execute"],
    ],
)
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command, "--help"])
    out = capsys.readouterr().out
    assert (exited.value.code, out.startswith(f"usage: agentless {' '.join(command)} ")) == (
        0,
        True,
    )
    assert ("exit codes:" in out) == (command != ["definitions"] and command[-1] != "list")


@pytest.mark.parametrize(
    ("items", "inputs"),
    [
        ([], {}),
        (
            ["n=7", "ok=true", "none=null", "list=[1, 2]"],
            {"n": 7, "ok": True, "none": None, "list": [1, 2]},
        ),
        (['obj={"a": 1}', 'quoted="7"'], {"obj": {"a": 1}, "quoted": "7"}),
        # Not JSON: the text as it is, spaces and = included.
        (
            ["v=v1.2", "empty=", "sentence=a b", "eq=a=b", " spaced = x "],
            {"v": "v1.2", "empty": "", "sentence": "a b", "eq": "a=b", "spaced": " x "},
        ),
        (["commit=abc", "commit=def"], {"commit": "def"}),
    ],
)
def test_inputs_are_json_when_they_parse_else_text(
    items: list[str], inputs: dict[str, object]
) -> None:
    assert parse_inputs(items) == inputs


@pytest.mark.parametrize("item", ["novalue", "=7", " =7"])
def test_an_input_without_a_name_is_refused(item: str) -> None:
    with pytest.raises(UsageError, match="is not of the form NAME=VALUE"):
        parse_inputs([item])


async def test_apply_creates_then_updates_only_what_changed(
    settings: Settings,
    db: asyncpg.Connection,
    target: Target,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write(tmp_path / "tag.json", definition(target))
    code, out, err = await agentless(settings, capsys, "definitions", "apply", path)
    assert (code, err) == (0, "")
    identifier = await db.fetchval("SELECT id FROM definitions WHERE name = 'tag-build'")
    assert out == f"tag-build: created (version 1, id {identifier})\n"

    # Applying it again changes nothing; the version stays.
    assert await agentless(settings, capsys, "definitions", "apply", path) == (
        0,
        "tag-build: unchanged (version 1)\n",
        "",
    )

    # A replacement: what the file leaves out takes its default (the description is gone).
    changed = definition(target, successCriteria="statusCode == `200`", name="TAG-build")
    del changed["description"]
    path = write(tmp_path / "tag.json", changed)
    second = write(tmp_path / "other.json", [definition(target, name="other")])
    code, out, err = await agentless(settings, capsys, "definitions", "apply", path, second)
    assert (code, err) == (0, "")
    assert (
        out.splitlines()[0]
        == "TAG-build: updated to version 2 (description, name, successCriteria)"
    )
    assert out.splitlines()[1].startswith("other: created (version 1, id ")

    code, out, _ = await agentless(settings, capsys, "definitions", "show", "tag-build", "--json")
    assert code == 0
    shown = json.loads(out)
    assert {k: shown[k] for k in ("id", "name", "version", "description")} == {
        "id": identifier,
        "name": "TAG-build",
        "version": 2,
        "description": "",
    }
    assert shown["successCriteria"] == "statusCode == `200`"


async def test_the_same_definitions_applied_twice_at_once_are_created_once(
    settings: Settings, db: asyncpg.Connection, target: Target
) -> None:
    specs = [DefinitionSpec.model_validate(definition(target, name=n)) for n in ("a", "b")]
    async with Store.open(settings.database_url, pool_size=2) as store:
        both = await asyncio.gather(*(store.definitions.apply(specs) for _ in range(2)))
    # Whichever came second found them, or lost the race to create them and tried again.
    created = [[each.previous is None for each in applied] for applied in both]
    assert sorted(created) == [[False, False], [True, True]]
    assert {each.definition.version for applied in both for each in applied} == {1}
    assert await db.fetchval("SELECT count(*) FROM definitions") == 2


async def test_an_invalid_file_applies_nothing_and_lists_every_bad_field(
    settings: Settings, db: asyncpg.Connection, target: Target, tmp_path: Path
) -> None:
    bad = write(
        tmp_path / "bad.json",
        [
            definition(target, name="fine"),
            definition(
                target,
                name="not a name",
                request={"url": "ftp://x"},
                successCriteria="a ==",
                timeoutSeconds=0,
            ),
            definition(target, name="FINE"),
        ],
    )
    good = write(tmp_path / "good.json", definition(target, name="good"))
    code, out, err = await processes.run(
        settings, "definitions", "apply", bad, good, AGENTLESS_LOG_LEVEL="warning"
    )
    assert code == 2
    assert out == "good: created (version 1, id " + out.split(" id ", 1)[1]
    problems = err.splitlines()
    assert problems[0] == f"agentless: {bad}: nothing in it was applied; fix:"
    assert [line.split(":", 1)[0].strip() for line in problems[1:]] == [
        "[1].name",
        "[1].request.url",
        "[1].successCriteria",
        "[1].timeoutSeconds",
        "[2].name",
    ]
    assert "[2].name: 'FINE' is also the name of [0]" in err
    assert await db.fetchval("SELECT array_agg(name) FROM definitions") == ["good"]


async def test_list_show_and_delete(
    settings: Settings,
    db: asyncpg.Connection,
    target: Target,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write(
        tmp_path / "all.json",
        [definition(target, name=name, description=f"the {name} one") for name in ("b", "a", "c")],
    )
    assert (await agentless(settings, capsys, "definitions", "apply", path))[0] == 0

    code, out, err = await agentless(settings, capsys, "definitions", "list", "--limit", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "UPDATED", "LAST", "EXECUTION", "DESCRIPTION"]
    assert [
        re.fullmatch(r"(\w) +1 +\d+s ago +- +the \1 one", line) is not None for line in lines[1:]
    ] == [True, True]
    assert [line[0] for line in lines[1:]] == ["a", "b"]
    assert err == "2 of 3 definitions shown; --limit shows more\n"
    code, out, _ = await agentless(settings, capsys, "definitions", "list", "--json", "--name", "C")
    assert [(d["name"], d["version"]) for d in json.loads(out)] == [("c", 1)]

    code, out, _ = await agentless(settings, capsys, "definitions", "show", "B")
    assert code == 0
    shown = dict(line.split(maxsplit=1) for line in out.splitlines())
    assert {k: shown[k] for k in ("name", "version", "description", "request", "executions")} == {
        "name": "b",
        "version": "1",
        "description": "the b one",
        "request": f"POST {target.url}/hook?key=$(variables.key)",
        "executions": "0",
    }
    code, out, err = await agentless(settings, capsys, "definitions", "show", "nothing")
    assert (code, out, err) == (
        1,
        "",
        "agentless: no definition is named 'nothing' or has that id\n",
    )

    # By name or id; one that is not there is said so, the others are deleted.
    identifier = await db.fetchval("SELECT id FROM definitions WHERE name = 'c'")
    code, out, err = await agentless(
        settings, capsys, "definitions", "delete", "A", identifier, "gone"
    )
    assert (code, out) == (
        1,
        "a: deleted (its executions stay readable)\nc: deleted (its executions stay readable)\n",
    )
    assert err == "agentless: no definition is named 'gone' or has that id\n"
    assert await db.fetchval("SELECT array_agg(name) FROM definitions") == ["b"]


async def test_execute_waits_for_the_task_its_input_made(
    worker: Worker,
    settings: Settings,
    db: asyncpg.Connection,
    target: Target,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = f"exec-{tmp_path.name}"
    made = definition(
        target,
        variables={"commit": "main", "key": key},
        successCriteria="contains(body.body, 'abc123')",
    )
    path = write(tmp_path / "tag.json", made)
    assert (await agentless(settings, capsys, "definitions", "apply", path))[0] == 0

    code, out, err = await agentless(
        settings,
        capsys,
        "execute",
        "tag-build",
        "--input",
        "commit=abc123",
        "--input",
        "build=7",
        "--tag",
        "nightly",
        "--comments",
        "from the test",
        "--execution-id",
        "run-1",
        "--wait",
    )
    assert code == 0, err
    completed = json.loads(out)
    assert (completed["taskId"], completed["result"]) == ("run-1", "succeeded")
    assert completed["variables"] == {"commit": "abc123", "key": key, "build": 7}
    assert err == (
        "tag-build execution #1 (version 1): task run-1, http://127.0.0.1:8080/tasks/run-1\n"
    )
    assert target.calls[key] == 1
    recorded = await db.fetchrow(
        "SELECT execution_index, tags, comments, source FROM tasks WHERE task_id = 'run-1'"
    )
    assert recorded is not None
    assert dict(recorded) == {
        "execution_index": 1,
        "tags": ["nightly"],
        "comments": "from the test",
        "source": "cli",
    }

    # Without --wait: queued, and its execution told; a second execution takes index 2.
    code, out, err = await agentless(settings, capsys, "execute", "TAG-BUILD")
    assert (code, err) == (0, "")
    started = json.loads(out)
    assert started["executionIndex"] == 2
    assert started["executionLink"] == f"http://127.0.0.1:8080/tasks/{started['executionId']}"

    # The input failed the criterion: exit 1, as submit --wait.
    code, out, _ = await agentless(
        settings, capsys, "execute", "tag-build", "-i", "commit=other", "--wait"
    )
    assert (code, json.loads(out)["result"]) == (1, "failed")

    code, out, err = await agentless(settings, capsys, "execute", "nothing")
    assert (code, out, err) == (
        1,
        "",
        "agentless: no definition is named 'nothing' or has that id\n",
    )
    code, _, err = await agentless(settings, capsys, "execute", "tag-build", "--tag", "a b")
    assert (code, err) == (
        2,
        "agentless: --tag 'a b' is not an id (1-128 of A-Z a-z 0-9 . _ : -)\n",
    )
