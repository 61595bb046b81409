"""How the command line's tables and texts are shown: columns that fit, texts cut and kept on
one line, ages in short."""

from __future__ import annotations

import pytest

from worker.cli.tables import Column, render
from worker.text import duration, one_line, shorten


@pytest.mark.parametrize(
    ("width", "expected"),
    [
        (
            None,
            [
                "ID   N  REASON                          BODY",
                'a    1  a long reason here, it goes on  {"x": 1, "y": [1, 2, 3]}',
                "bb  22  short",
            ],
        ),
        (
            50,
            [
                "ID   N  REASON                        BODY",
                'a    1  a long reason here, it goes…  {"x": 1, "y…',
                "bb  22  short",
            ],
        ),
        (
            20,
            [
                "ID   N  REASON        BODY",
                'a    1  a long reas…  {"x": 1, "y…',
                "bb  22  short",
            ],
        ),
    ],
    ids=["unbounded", "last-column-gives-way-first", "floor"],
)
def test_render(width: int | None, expected: list[str]) -> None:
    columns = [
        Column("ID"),
        Column("N", right=True),
        Column("REASON", squeeze=True),
        Column("BODY", squeeze=True),
    ]
    rows = [
        ("a", "1", "a long reason here, it goes on", '{"x": 1, "y": [1, 2, 3]}'),
        ("bb", "22", "short", ""),
    ]
    assert render(columns, rows, width=width).splitlines() == expected


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [("abc", 3, "abc"), ("abcd", 3, "ab…"), ("abcd", 1, "…"), ("", 0, "")],
)
def test_shorten(text: str, limit: int, expected: str) -> None:
    assert shorten(text, limit) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("plain text", "plain text"), ("a\nb\tc", "a\\nb\\tc"), ("\x1b[2J", "\\x1b[2J"), ("é", "é")],
)
def test_one_line(text: str, expected: str) -> None:
    assert one_line(text) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(-1, "0s"), (0.9, "0s"), (42, "42s"), (307, "5m07s"), (12_000, "3h20m"), (187_200, "2d04h")],
)
def test_duration(seconds: float, expected: str) -> None:
    assert duration(seconds) == expected
