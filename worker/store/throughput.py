"""Completions per minute over the last hour, succeeded or not: the operations page's chart.

One statement: the index led by completed_at (0008_listing.sql) finds the last hour's completions
alone, however many older ones the table keeps, and the minutes come from the database's clock,
the one that stamped completed_at.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from worker.store.errors import Executor

MINUTES = 60

# Every minute of the last `$1` (the current one last, still filling), with or without
# completions. succeededWithIssues counts as succeeded, as Azure counts it: the task passed.
# The range alone reaches the index; the minutes are counted after the scan.
LAST_MINUTES = """
WITH counted AS (
    SELECT date_trunc('minute', completed_at) AS minute,
           count(*) FILTER (WHERE result IN ('succeeded', 'succeededWithIssues')) AS succeeded,
           count(*) FILTER (WHERE result IS DISTINCT FROM 'succeeded'
                              AND result IS DISTINCT FROM 'succeededWithIssues') AS other
    FROM tasks
    WHERE completed_at >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
    GROUP BY 1
)
SELECT m.minute, coalesce(c.succeeded, 0) AS succeeded, coalesce(c.other, 0) AS other
FROM generate_series(
    date_trunc('minute', now()) - make_interval(mins => $1 - 1),
    date_trunc('minute', now()),
    interval '1 minute'
) AS m(minute)
LEFT JOIN counted c ON c.minute = m.minute
ORDER BY m.minute
"""


@dataclass(frozen=True, slots=True)
class MinuteCount:
    """The tasks that completed in one minute, succeeded or with any other result."""

    minute: datetime
    succeeded: int
    other: int


async def last_minutes(conn: asyncpg.Pool | Executor, minutes: int = MINUTES) -> list[MinuteCount]:
    """Each of the last `minutes` minutes, oldest first; the last is the current minute."""
    rows = await conn.fetch(LAST_MINUTES, minutes)
    return [MinuteCount(row["minute"], row["succeeded"], row["other"]) for row in rows]
