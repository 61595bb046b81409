"""Plain-text tables for the command line: aligned columns, one line per row, nothing to install."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from worker.text import one_line, shorten

GAP = "  "
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
