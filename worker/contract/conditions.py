"""Azure Pipelines condition expressions, parsed once and evaluated against a response body.

The body is bound to `root`, so `and(eq(root['status'], 'done'), gt(length(root.items), 0))`
reads as it would in a pipeline. Evaluation never raises: where Azure would fail at run time
(a cast that cannot be made, an ordering of arrays) the comparison is simply false, because a
success criterion that crashes the worker helps no one. Syntax errors, unknown functions and
wrong argument counts are caught by `compile_condition`, before any request is made.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Eval = Callable[[object], object]
_Impl = Callable[[Sequence[Eval], object], object]

_MAX_DEPTH = 50  # Azure's own nesting limit; it also keeps the recursive parser off the stack limit
_NUMBER = re.compile(r"[-+]?(?:0[xX][0-9A-Fa-f]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)")
_IDENT = re.compile(r"[A-Za-z0-9_-]+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(\d+)\}")


class ConditionError(ValueError):
    """A condition that cannot be compiled; the message names the problem and its column."""


@dataclass(frozen=True)
class Condition:
    source: str
    _run: Eval = field(repr=False, compare=False)

    def holds(self, root: object) -> bool:
        return _truthy(self._run(root))


# --- Azure's casting rules -------------------------------------------------------------------
# A cast returns None where Azure's table says "not convertible"; no cast yields null, so None
# cannot be mistaken for a value.


def _truthy(value: object) -> bool:
    # Arrays and objects are truthy even when empty, unlike Python's rule.
    if value is None or value is False or value == "":
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return not (value == 0 or math.isnan(value))
    return True


def _parse_number(text: str) -> int | float | None:
    text = text.strip()
    if not text:
        return 0  # Azure casts the empty string to 0
    if not _NUMBER.fullmatch(text):
        return None  # float() alone would also take 'nan', 'inf' and '1_000'
    body = text.lstrip("+-")
    if body[:2].lower() == "0x":
        magnitude = int(body, 16)
        return -magnitude if text.startswith("-") else magnitude
    if any(c in body for c in ".eE"):
        return float(text)
    return int(text)


def _to_number(value: object) -> int | float | None:
    if value is None:
        return 0
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return _parse_number(value)
    return None


def _to_string(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, float):
        return None
    if math.isnan(value) or math.isinf(value):
        return {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[str(value)]
    # Integers print without '.0', as .NET prints them; 1e15 and above keep exponent form.
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _text(value: object) -> str:
    # String functions given an array or object see the empty string rather than failing.
    return _to_string(value) or ""


def _compare(left: object, right: object) -> int | None:
    """Order `right` against `left` after casting it to left's type; None when it cannot be cast."""
    if left is None:
        # Azure casts only null and '' to null, so those are the only values equal to null.
        return 0 if right is None or right == "" else None
    if isinstance(left, bool):
        return int(left) - int(_truthy(right))
    if isinstance(left, int | float):
        number = _to_number(right)
        if number is None or math.isnan(left) or math.isnan(number):
            return None
        return (left > number) - (left < number)
    if isinstance(left, str) and (text := _to_string(right)) is not None:
        a, b = left.casefold(), text.casefold()  # ordinal, ignoring case
        return (a > b) - (a < b)
    return None  # a failed cast; arrays and objects have no order either


def _equal(left: object, right: object) -> bool:
    # Arrays and objects are equal only to themselves, as Azure compares them by reference.
    if isinstance(left, list | dict):
        return left is right
    return _compare(left, right) == 0


def _index(container: object, key: object) -> object:
    if isinstance(container, dict):
        name = _to_string(key)
        if name is None:
            return None
        if name in container:
            return container[name]
        # Azure's dictionaries ignore case; an exact match still wins when both exist.
        folded = name.casefold()
        return next((v for k, v in container.items() if str(k).casefold() == folded), None)
    if isinstance(container, list):
        number = None if key is None or key == "" else _to_number(key)
        if number is None or (isinstance(number, float) and not number.is_integer()):
            return None
        position = int(number)
        return container[position] if 0 <= position < len(container) else None
    return None


# --- Functions -------------------------------------------------------------------------------
# Each takes its unevaluated arguments, so and/or/iif/coalesce evaluate only what they need.


def _values(args: Sequence[Eval], root: object) -> list[object]:
    return [arg(root) for arg in args]


def _format(pattern: str, values: Sequence[object]) -> str:
    # A malformed placeholder, or a .NET format specifier such as {0:yyyy}, is kept as written
    # rather than failing; a placeholder past the last argument becomes ''.
    def fill(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return match.group()[0]  # '{{' or '}}'
        position = int(match.group(1))
        return _text(values[position]) if position < len(values) else ""

    return _PLACEHOLDER.sub(fill, pattern)


def _contains(haystack: object, needle: object) -> bool:
    text, part = _to_string(haystack), _to_string(needle)
    return text is not None and part is not None and part.casefold() in text.casefold()


def _contains_value(collection: object, value: object) -> bool:
    items = list(collection.values()) if isinstance(collection, dict) else collection
    return isinstance(items, list) and any(_equal(item, value) for item in items)


def _in(args: Sequence[Eval], root: object) -> bool:
    value = args[0](root)
    return any(_equal(value, other(root)) for other in args[1:])


def _affix(args: Sequence[Eval], root: object, at_start: bool) -> bool:
    text, part = (_to_string(v) for v in _values(args, root))
    if text is None or part is None:
        return False
    text, part = text.casefold(), part.casefold()
    return text.startswith(part) if at_start else text.endswith(part)


def _length(value: object) -> int:
    # Azure documents strings, arrays and objects; other scalars count their string form.
    return len(value) if isinstance(value, list | dict | str) else len(_text(value))


def _replace(args: Sequence[Eval], root: object) -> str:
    text, old, new = (_text(v) for v in _values(args, root))
    return text.replace(old, new) if old else text  # Python would insert at every position


def _split(args: Sequence[Eval], root: object) -> list[str]:
    text, separator = (_text(v) for v in _values(args, root))
    return text.split(separator) if separator else [text]


def _join(args: Sequence[Eval], root: object) -> str:
    separator, items = _values(args, root)
    if not isinstance(items, list):
        return _text(items)
    # Azure joins the string form of each item; nested arrays and objects become ''.
    return _text(separator).join(_text(item) for item in items)


def _coalesce(args: Sequence[Eval], root: object) -> object:
    for arg in args:
        value = arg(root)
        if value is not None and value != "":
            return value
    return None


def _ordering(test: Callable[[int], bool]) -> _Impl:
    def impl(args: Sequence[Eval], root: object) -> bool:
        order = _compare(args[0](root), args[1](root))
        return order is not None and test(order)

    return impl


# name as documented, fewest arguments, most arguments (None: any number), implementation
_TABLE: list[tuple[str, int, int | None, _Impl]] = [
    ("and", 2, None, lambda a, r: all(_truthy(x(r)) for x in a)),
    ("or", 2, None, lambda a, r: any(_truthy(x(r)) for x in a)),
    ("not", 1, 1, lambda a, r: not _truthy(a[0](r))),
    ("xor", 2, 2, lambda a, r: _truthy(a[0](r)) != _truthy(a[1](r))),
    ("eq", 2, 2, lambda a, r: _equal(a[0](r), a[1](r))),
    ("ne", 2, 2, lambda a, r: not _equal(a[0](r), a[1](r))),
    ("gt", 2, 2, _ordering(lambda o: o > 0)),
    ("ge", 2, 2, _ordering(lambda o: o >= 0)),
    ("lt", 2, 2, _ordering(lambda o: o < 0)),
    ("le", 2, 2, _ordering(lambda o: o <= 0)),
    ("contains", 2, 2, lambda a, r: _contains(a[0](r), a[1](r))),
    ("containsValue", 2, 2, lambda a, r: _contains_value(a[0](r), a[1](r))),
    ("startsWith", 2, 2, lambda a, r: _affix(a, r, at_start=True)),
    ("endsWith", 2, 2, lambda a, r: _affix(a, r, at_start=False)),
    ("in", 2, None, _in),
    ("notIn", 2, None, lambda a, r: not _in(a, r)),
    ("coalesce", 1, None, _coalesce),
    ("length", 1, 1, lambda a, r: _length(a[0](r))),
    ("lower", 1, 1, lambda a, r: _text(a[0](r)).lower()),
    ("upper", 1, 1, lambda a, r: _text(a[0](r)).upper()),
    ("trim", 1, 1, lambda a, r: _text(a[0](r)).strip()),
    ("replace", 3, 3, _replace),
    ("split", 2, 2, _split),
    ("join", 2, 2, _join),
    ("format", 1, None, lambda a, r: _format(_text(a[0](r)), _values(a[1:], r))),
    ("iif", 3, 3, lambda a, r: a[1](r) if _truthy(a[0](r)) else a[2](r)),
    ("convertToJson", 1, 1, lambda a, r: json.dumps(a[0](r), indent=2)),
]
_FUNCTIONS = {entry[0].lower(): entry for entry in _TABLE}  # Azure's names ignore case


# --- Parser ----------------------------------------------------------------------------------
# Scannerless recursive descent: a '.' means a number only where an expression starts and a
# property only after one, which is easier to tell apart here than in a separate tokenizer.


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, problem: str, pos: int | None = None) -> ConditionError:
        return ConditionError(f"{problem} at column {(self.pos if pos is None else pos) + 1}")

    def peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.text[self.pos : self.pos + 1]

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.fail(f"expected '{char}'")
        self.pos += 1

    def parse(self) -> Eval:
        run = self.expression(0)
        if self.peek():
            raise self.fail(f"unexpected '{self.peek()}'")
        return run

    def expression(self, depth: int) -> Eval:
        if depth > _MAX_DEPTH:
            raise self.fail(f"nesting deeper than {_MAX_DEPTH}")
        run = self.primary(depth)
        while (char := self.peek()) in ("[", "."):
            self.pos += 1
            if char == "[":
                key = self.expression(depth + 1)
                self.expect("]")
            else:
                self.peek()
                match = _IDENT.match(self.text, self.pos)
                if not match:
                    raise self.fail("expected a property name")
                self.pos = match.end()
                key = _constant(match.group())
            run = _indexer(run, key)
        return run

    def primary(self, depth: int) -> Eval:
        char, start = self.peek(), self.pos
        if not char:
            raise self.fail("expected an expression")
        if char == "'":
            return _constant(self.string())
        if char in "-." or char.isdigit():  # as Azure's literals do; a leading '+' is no number
            match = _NUMBER.match(self.text, start)
            end = match.end() if match else start
            if not match or _IDENT.match(self.text, end) or self.text[end : end + 1] == ".":
                bad = re.match(r"[-+.\w]+", self.text[start:])
                raise self.fail(f"invalid number '{bad.group() if bad else char}'", start)
            self.pos = end
            return _constant(_parse_number(match.group()))
        match = _NAME.match(self.text, start)
        if not match:
            raise self.fail("expected an expression" if char in ")]," else f"unexpected '{char}'")
        self.pos = match.end()
        word = match.group()
        if self.peek() == "(":
            return self.call(word, start, depth)
        lowered = word.lower()
        if lowered in ("true", "false"):
            return _constant(lowered == "true")
        if lowered == "null":
            return _constant(None)
        if lowered == "root":
            return lambda root: root
        raise self.fail(f"unknown name '{word}'", start)

    def string(self) -> str:
        start, self.pos, parts = self.pos, self.pos + 1, []
        while True:
            end = self.text.find("'", self.pos)
            if end < 0:
                raise self.fail("unterminated string", start)
            parts.append(self.text[self.pos : end])
            self.pos = end + 1
            if self.text[self.pos : self.pos + 1] != "'":
                return "'".join(parts)  # a doubled quote stands for one quote
            self.pos += 1

    def call(self, word: str, start: int, depth: int) -> Eval:
        entry = _FUNCTIONS.get(word.lower())
        if entry is None:
            raise self.fail(f"unknown function '{word}'", start)
        name, low, high, impl = entry
        self.pos += 1  # the '('
        args: list[Eval] = []
        if self.peek() != ")":
            args.append(self.expression(depth + 1))
            while self.peek() == ",":
                self.pos += 1
                args.append(self.expression(depth + 1))
        self.expect(")")
        if len(args) < low or (high is not None and len(args) > high):
            wanted = (
                f"{low}" if low == high else f"at least {low}" if high is None else f"{low}-{high}"
            )
            raise self.fail(f"'{name}' takes {wanted} arguments, not {len(args)}", start)
        frozen = tuple(args)
        return lambda root: impl(frozen, root)


def _constant(value: object) -> Eval:
    return lambda _root: value


def _indexer(run: Eval, key: Eval) -> Eval:
    # A function, not a lambda in the parser's loop, so each step keeps its own `run` and `key`.
    return lambda root: _index(run(root), key(root))


@functools.lru_cache(maxsize=1024)
def compile_condition(text: str) -> Condition:
    """Parse `text` once; the same text compiles to the same shared `Condition`."""
    return Condition(text, _Parser(text).parse())
