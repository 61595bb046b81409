"""Plain-text tables for the command line: aligned columns, one line per row, nothing to install."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

GAP = "  "
ELLIPSIS = "…"
# A squeezed column keeps at least this many characters: below that a cell says nothing.
MIN_SQUEEZED = 12


@dataclass(frozen=True, slots=True)
class Column:
    title: str
    # Numbers line up on their last digit.
    right: bool = False
    # Free text that gives way when the table is wider than the terminal; of several such
    # columns, the last gives way first.
    squeeze: bool = False


def render(
    columns: Sequence[Column], rows: Iterable[Sequence[str]], *, width: int | None = None
) -> str:
    """The table, titles first; with `width`, squeezable columns are cut so that lines fit."""
    cells = [[column.title for column in columns]]
    cells.extend([one_line(cell) for cell in row] for row in rows)
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    if width is not None:
        excess = sum(widths) + len(GAP) * (len(columns) - 1) - width
        for i in reversed(range(len(columns))):
            if excess <= 0:
                break
            if columns[i].squeeze:
                floor = max(MIN_SQUEEZED, len(columns[i].title))
                cut = min(excess, max(widths[i] - floor, 0))
                widths[i] -= cut
                excess -= cut
    lines = []
    for row in cells:
        parts = []
        for cell, size, column in zip(row, widths, columns, strict=True):
            text = shorten(cell, size)
            parts.append(text.rjust(size) if column.right else text.ljust(size))
        lines.append(GAP.join(parts).rstrip())
    return "\n".join(lines)


def shorten(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters with an ellipsis that shows it was cut."""
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)] + ELLIPSIS


def one_line(text: str) -> str:
    """`text` with line breaks and control characters escaped: message bodies and reasons come
    from outside, and must neither break a table's lines nor drive the terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def duration(seconds: float) -> str:
    """A short, rounded-down age: 42s, 5m07s, 3h20m, 2d04h."""
    whole = max(int(seconds), 0)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
