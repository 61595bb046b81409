"""What a worker recorded in its last few seconds, kept to be recorded again after a failover.

A replica promoted before it received the primary's last commits (asynchronous replication)
loses them: a result the worker recorded, published and acknowledged would be gone, its task back
to `running` with nobody to run it (a wait or a poll's start likewise, its task then run again by
a takeover: the service called twice, the job started twice). The worker's lock vanishes with the
old primary, so a worker that takes its lock again may be on a new one: it then writes again what
it recorded in the window the replica may have missed. Each write is fenced as it was the first
time (the task still running the same attempt, under this worker's lock), so on a database that
lost nothing it changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from worker.store import batches, polls
from worker.store.changes import Completion, PollStarted, Waited
from worker.store.errors import Executor

log = logging.getLogger(__name__)

# Longer than a replica ever lags behind a healthy primary: one further behind is an outage of
# its own, to be promoted only with care.
RECENT_SECONDS = 30.0
# The response text kept, at most: the oldest writes go first past it.
RECENT_CHARS = 16 * 1024 * 1024


class RecentWrites:
    def __init__(self) -> None:
        self._writes: deque[tuple[float, Completion | PollStarted | Waited]] = deque()
        self._chars = 0

    def add(self, write: Completion | PollStarted | Waited) -> None:
        now = time.monotonic()
        self._writes.append((now, write))
        self._chars += len(write.response_json or "")
        while self._writes and (
            self._writes[0][0] < now - RECENT_SECONDS or self._chars > RECENT_CHARS
        ):
            _, old = self._writes.popleft()
            self._chars -= len(old.response_json or "")

    async def write_again(self, conn: Executor, worker_id: int, lock_namespace: int) -> int:
        """Record again what was recorded in the RECENT_SECONDS before the last write (the
        worker writes nothing while it holds no lock, however long the failover takes); how
        many writes found their task as they had left it no longer (lost, now restored)."""
        writes = [write for _, write in self._writes]
        completions = [w for w in writes if isinstance(w, Completion)]
        restored = len(await batches.complete(conn, completions, worker_id, lock_namespace))
        for write in writes:
            if isinstance(write, Waited):
                restored += await batches.wait(conn, write, worker_id, lock_namespace)
            elif isinstance(write, PollStarted):
                # Its deadline and first poll run from now, a few seconds later than the first
                # time: the job it started is polled, rather than started again by a takeover.
                restored += await polls.started(conn, write, worker_id, lock_namespace)
        if restored:
            log.warning(
                "recorded again %d results, waits and poll starts that the database had lost "
                "(a failover to a replica that had not received them)",
                restored,
                extra={"workerId": worker_id},
            )
        return restored
