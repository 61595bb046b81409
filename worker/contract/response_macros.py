"""`$(response.statusCode)`, `$(response.headers.NAME)` and `$(response.body.PATH)`: what a poll
request is told of its task's start response (SPEC §4), resolved once when polling starts."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import orjson
from pydantic import JsonValue

from worker.contract.requests import REDACTED

_MACRO: Final = re.compile(r"\$\((response(?:\.[^()\s]*)?)\)", re.IGNORECASE)
# One step of a body path: a name, then any number of [n] indexes; or indexes alone.
_STEP: Final = re.compile(r"([^.\[\]]+)?((?:\[\d+\])*)")
_INDEX: Final = re.compile(r"\[(\d+)\]")

_FORMS: Final = "$(response.statusCode), $(response.headers.NAME) or $(response.body.PATH)"


class UnresolvedMacro(ValueError):
    """A response macro that the start response cannot fill; the message names it and says why."""


def _parts(name: str) -> tuple[str, str]:
    """('statuscode' | 'headers' | 'body', the rest), or ValueError if `name` is malformed."""
    _, _, rest = name.partition(".")
    kind, _, tail = rest.partition(".")
    kind = kind.lower()
    if kind == "statuscode" and not tail:
        return kind, ""
    if kind == "headers" and tail:
        return kind, tail
    if kind == "body":
        if tail and not all(_STEP.fullmatch(step) for step in tail.split(".")):
            raise ValueError(f"$({name}) has a malformed path: {tail!r}")
        return kind, tail
    raise ValueError(f"$({name}) is not a response macro: use {_FORMS}")


def check(texts: Iterable[str]) -> None:
    """Raise ValueError unless every response macro in `texts` is well formed."""
    for text in texts:
        if "$(" in text:
            for match in _MACRO.finditer(text):
                _parts(match[1])


def _steps(path: str) -> list[str | int]:
    steps: list[str | int] = []
    for step in path.split("."):
        match = _STEP.fullmatch(step)
        assert match is not None  # checked at submission
        if match[1]:
            steps.append(match[1])
        steps.extend(int(index) for index in _INDEX.findall(match[2]))
    return steps


def _text(value: JsonValue) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _value(name: str, status: int, headers: Mapping[str, str], body: JsonValue) -> str:
    kind, rest = _parts(name)
    if kind == "statuscode":
        return str(status)
    if kind == "headers":
        found = headers.get(rest.lower())
        if found is None:
            raise UnresolvedMacro(f"$({name}): the start response has no {rest} header")
        if found == REDACTED:
            # Its value was never kept; a poll sent with the placeholder would only be refused.
            raise UnresolvedMacro(
                f"$({name}): the start response's {rest} header is secret, and is not passed on; "
                "give the poll request its own credentials, or a service connection"
            )
        return found
    value = body
    walked = "body"
    for step in _steps(rest) if rest else []:
        if isinstance(step, int):
            if not isinstance(value, list) or step >= len(value):
                raise UnresolvedMacro(f"$({name}): {walked} has no item [{step}]")
            value = value[step]
            walked += f"[{step}]"
        else:
            if not isinstance(value, dict) or step not in value:
                raise UnresolvedMacro(f"$({name}): {walked} has no {step!r}")
            value = value[step]
            walked += f".{step}"
    if value is None:
        raise UnresolvedMacro(f"$({name}): {walked} is null")
    return _text(value)


def resolve(text: str, status: int, headers: Mapping[str, str], body: JsonValue) -> str:
    """`text` with every response macro filled from the start response; UnresolvedMacro when one
    cannot be."""
    if "$(" not in text:
        return text
    return _MACRO.sub(lambda match: _value(match[1], status, headers, body), text)


def map_strings(value: JsonValue, fill: Callable[[str], str]) -> JsonValue:
    """`value` with `fill` applied to every string in it, keys aside (for macros of any kind)."""
    if isinstance(value, str):
        return fill(value)
    if isinstance(value, list):
        return [map_strings(item, fill) for item in value]
    if isinstance(value, dict):
        return {key: map_strings(item, fill) for key, item in value.items()}
    return value


def strings(value: JsonValue) -> Iterable[str]:
    """Every string in a JSON value, keys aside."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
