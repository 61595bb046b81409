"""Duties over the store: deadlines of waiting and polling tasks, polls of dead workers, and cancel
requests.

Every worker sweeps all three; every API process sweeps deadlines, so that they are kept while no
worker runs (a deployment scaled to its API alone). SKIP LOCKED in the statements lets any number
sweep at once without two acting on one task.
"""

from __future__ import annotations

import asyncio
import logging
import time

from worker.broker import Broker
from worker.completions import publish_completions
from worker.contract.macros import build_macros
from worker.contract.models import TaskMessage
from worker.contract.records import TaskRecord
from worker.contract.requests import REDACTED, TaskRequest
from worker.contract.tokens import GRACE_SECONDS, Signer
from worker.invoke import InvokeFailure, Invoker
from worker.logs import bind_task
from worker.metrics import Metrics
from worker.store.database import Store
from worker.store.errors import DB_UNAVAILABLE

log = logging.getLogger(__name__)

# How often deadlines are checked, from the start of one sweep to the next: a task times out
# within this (and a statement) of its deadline.
SWEEP_INTERVAL = 0.5
# Tasks timed out per statement, of each kind of deadline. A sweep that fills it goes again at
# once: a burst of deadlines is not served this many per interval.
SWEEP_LIMIT = 100
# How often polls in flight on dead workers are looked for.
RESCUE_INTERVAL = 2.0


class Sweeper:
    def __init__(
        self,
        store: Store,
        broker: Broker,
        *,
        metrics: Metrics,
        invoker: Invoker | None,
        signer: Signer,
        public_url: str,
    ) -> None:
        """Without an `invoker` (the API), only deadlines are swept: rescued polls and cancel
        requests are for workers to make."""
        self._store = store
        self._broker = broker
        self._metrics = metrics
        self._invoker = invoker
        self._signer = signer
        self._public_url = public_url
        self._rescued_at = 0.0

    async def run(self) -> None:
        while True:
            began = time.monotonic()
            full = False
            try:
                full = await self.sweep_once()
            except DB_UNAVAILABLE as exc:
                log.warning("sweep skipped: database unavailable (%s)", exc)
            if not full:
                # Publishing the completions waits for the broker: that wait is part of the
                # interval, not added to it.
                await asyncio.sleep(max(0.0, SWEEP_INTERVAL - (time.monotonic() - began)))

    async def sweep_once(self) -> bool:
        """One sweep; whether it timed out as many tasks as one statement may (more may be due)."""
        timed_out = await self._store.sweep(SWEEP_LIMIT)
        for record in timed_out:
            self._metrics.record_completed(record)
            log.info(
                "task completed",
                extra={
                    "taskId": record.task_id,
                    "planId": record.plan_id,
                    "result": record.result,
                    "reason": record.reason,
                },
            )
        await publish_completions(self._broker, self._store, timed_out)
        full = len(timed_out) >= SWEEP_LIMIT
        if self._invoker is None:
            return full
        now = time.monotonic()
        if now - self._rescued_at >= RESCUE_INTERVAL:
            self._rescued_at = now
            if rescued := await self._store.polls.rescue():
                log.info("polls of workers that died are due again", extra={"count": rescued})
        requests = await self._store.take_cancel_requests()
        if requests:
            await asyncio.gather(*(self._invoke_cancel_request(self._invoker, r) for r in requests))
        return full

    async def _invoke_cancel_request(self, invoker: Invoker, record: TaskRecord) -> None:
        """Best effort, once: the outcome is logged, and changes nothing about the task."""
        bind_task(record.task_id, record.plan_id)
        task = TaskMessage.model_validate_json(record.message)
        request = task.cancel_request
        if request is None:
            return
        kept = {name: value for name, value in request.headers.items() if value != REDACTED}
        if len(kept) < len(request.headers):
            # Secret header values are never stored; credentials belong in a service connection.
            log.warning("cancelRequest sent without its secret headers, which are not kept")
            request = TaskRequest.model_validate(
                request.model_dump(by_alias=True) | {"headers": kept}
            )
        # By the database's clock, which the API checks expiry against.
        completed = record.completed_at or self._store.clock.now()
        token = self._signer.issue(
            task.task_id, task.plan_id, completed.timestamp() + GRACE_SECONDS
        )
        answer = await invoker.invoke(request, build_macros(task, self._public_url, token))
        if isinstance(answer, InvokeFailure):
            log.warning("cancelRequest failed: %s", answer.reason)
        else:
            log.info("cancelRequest sent", extra={"statusCode": answer.status_code})
