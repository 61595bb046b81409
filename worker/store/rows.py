"""asyncpg rows made into the typed records of worker/contract/records.py: rows go no further."""

from __future__ import annotations

import asyncpg

from worker.contract.models import Mode, Result, State
from worker.contract.records import (
    CompletedBy,
    DeadLetterRecord,
    TaskRecord,
    TaskSummaryRecord,
    WorkerRecord,
)


def task_record(row: asyncpg.Record) -> TaskRecord:
    return TaskRecord(
        task_id=row["task_id"],
        plan_id=row["plan_id"],
        job_id=row["job_id"],
        hub_name=row["hub_name"],
        state=State(row["state"]),
        result=Result(row["result"]) if row["result"] else None,
        reason=row["reason"],
        attempts=row["attempts"],
        digest=row["digest"],
        message=row["message"],
        response=row["response"],
        outputs=row["outputs"],
        worker_id=row["worker_id"],
        lease_until=row["lease_until"],
        queued_at=row["queued_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        mode=Mode(row["mode"]),
        completed_by=CompletedBy(row["completed_by"]) if row["completed_by"] else None,
        deadline=row["deadline"],
        reply_to=row["reply_to"],
        correlation_id=row["correlation_id"],
        external_started_at=row["external_started_at"],
        variables=row["variables"],
        history=row["history"],
        retries=row["retries"],
        retry_at=row["retry_at"],
        worker_alive=row.get("worker_alive", False),
        polls=row["polls"],
        next_poll_at=row["next_poll_at"],
        waiting_since=row["waiting_since"],
    )


def task_summary(row: asyncpg.Record) -> TaskSummaryRecord:
    return TaskSummaryRecord(
        task_id=row["task_id"],
        plan_id=row["plan_id"],
        job_id=row["job_id"],
        hub_name=row["hub_name"],
        name=row["name"],
        mode=Mode(row["mode"]),
        state=State(row["state"]),
        result=Result(row["result"]) if row["result"] else None,
        reason=row["reason"],
        attempts=row["attempts"],
        queued_at=row["queued_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        deadline=row["deadline"],
        polls=row["polls"],
    )


def worker_record(row: asyncpg.Record) -> WorkerRecord:
    return WorkerRecord(**row)


def dead_letter(row: asyncpg.Record) -> DeadLetterRecord:
    return DeadLetterRecord(**row)
