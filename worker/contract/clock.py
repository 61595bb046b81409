"""The database's clock, as a process reads it.

PostgreSQL's clock is the one clock of a deployment: deadlines, retry and poll due times are set
and swept by its `now()`. What a process must decide by the time of day itself (whether a token has
expired, how late a poll is, how old a task is) it reads from a Clock: its own clock plus the
offset last measured from PostgreSQL's. So a machine whose clock is minutes off still agrees with
the database, to within half the round trip of the query that measured the offset.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of the database's clock, between two readings of this process's."""

    sent: float
    database: float
    received: float

    @property
    def offset(self) -> float:
        """Seconds the database's clock is ahead of this process's (behind, if negative)."""
        return self.database - (self.sent + self.received) / 2

    @property
    def error(self) -> float:
        """The most the offset can be wrong by: the database read its clock somewhere between
        the two readings of ours."""
        return (self.received - self.sent) / 2


def best(samples: Iterable[Sample]) -> Sample:
    """The sample that pins the offset most closely: the one of the shortest round trip."""
    return min(samples, key=lambda s: s.error)


class Clock:
    """The time by the database's clock, read without asking it."""

    def __init__(self, local: Callable[[], float] = time.time) -> None:
        self._local = local
        # Until the first measurement, this process's own clock is all there is.
        self.offset = 0.0
        self.error = float("inf")

    def follow(self, sample: Sample) -> None:
        self.offset = sample.offset
        self.error = sample.error

    def timestamp(self) -> float:
        """Seconds since the epoch, by the database's clock."""
        return self._local() + self.offset

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp(), UTC)
