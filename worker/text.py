"""How texts and times are shown to people, in tables and on the operations page: cut to fit,
kept on one line, ages in short."""

from __future__ import annotations

ELLIPSIS = "…"


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
