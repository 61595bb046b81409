"""Prometheus metrics: one registry per process.

Every process counts what it does itself (tasks it took, completions it recorded, calls it made).
What belongs to no process (tasks by state, the oldest waiting task, the live workers, the queue)
is read from the database and the broker at each scrape by the API alone (`ClusterGauges`), so
that no worker exports a false 0 and a sum over processes stays true.
"""

from __future__ import annotations

import platform
from collections.abc import Awaitable, Callable
from datetime import datetime

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from worker import __version__
from worker.contract.models import Mode, State
from worker.contract.records import ClusterState, CompletedBy, TaskRecord

# Invocations run from milliseconds to the 20 s response timeout.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 60)
# A task's life: from milliseconds (apiResponse) to a day (a callback task's longest wait).
_LIFE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 20, 60, 300, 1800, 3600, 21600, 86400)

# Who completed a task, as the metrics name it: a timeout is the deadline's doing.
_BY = {
    CompletedBy.WORKER: "worker",
    CompletedBy.CALLBACK: "callback",
    CompletedBy.CANCEL: "cancel",
    CompletedBy.TIMEOUT: "deadline",
}
# The states a task is in before it completes: the ones the state gauge exports.
UNFINISHED = (State.QUEUED, State.RUNNING, State.WAITING, State.POLLING)

Scrape = Callable[[], Awaitable[None]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # prometheus-client's own handler: text or OpenMetrics, as the scraper asks.
        self.exposition: Handler = make_aiohttp_handler(self.registry)
        # The default collectors belong to the global registry; each process's own gets its own.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info(
            "agentless_build", "The agentless release this process runs.", registry=self.registry
        ).info({"version": __version__, "python": platform.python_version()})
        self.dependency_up = Gauge(
            "agentless_dependency_up",
            "Whether this process reaches RabbitMQ (broker) and PostgreSQL (database), read at "
            "each scrape.",
            ["dependency"],
            registry=self.registry,
        )
        self.tasks_received = Counter(
            "agentless_tasks_received",
            "Task messages this process took from the queue.",
            registry=self.registry,
        )
        self.tasks_completed = Counter(
            "agentless_tasks_completed",
            "Tasks whose result this process recorded, by result, mode and whose word completed "
            "them: worker (the response or the polls), callback, cancel, deadline.",
            ["result", "mode", "completed_by"],
            registry=self.registry,
        )
        self.tasks_retried = Counter(
            "agentless_tasks_retried",
            "Failed attempts that this process queued to be tried again.",
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "agentless_dead_letters",
            "Messages this process dead-lettered, by kind of reason.",
            ["reason"],
            registry=self.registry,
        )
        self.invocation_duration = Histogram(
            "agentless_invocation_duration_seconds",
            "Time from sending a task's request (or a poll) to having its whole response.",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.task_duration = Histogram(
            "agentless_task_duration_seconds",
            "Time from a task's queueing to its completion, by mode, for the tasks this process "
            "completed.",
            ["mode"],
            buckets=_LIFE_BUCKETS,
            registry=self.registry,
        )
        self.wait_duration = Histogram(
            "agentless_task_wait_duration_seconds",
            "Time from a callback or poll task's start of waiting to its completion, by mode, for "
            "the tasks this process completed.",
            ["mode"],
            buckets=_LIFE_BUCKETS,
            registry=self.registry,
        )
        self.tasks_in_flight = Gauge(
            "agentless_tasks_in_flight",
            "Task messages this process holds and has not yet acknowledged.",
            registry=self.registry,
        )
        self.callbacks = Counter(
            "agentless_callbacks",
            "Requests from external services to the callback API, by HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.polls = Counter(
            "agentless_polls",
            "Polls this process made and recorded, by what followed: again, a result, or "
            "superseded (a newer poll, a cancel or the deadline got there first).",
            ["outcome"],
            registry=self.registry,
        )
        self.purged = Counter(
            "agentless_purged",
            "Rows this process deleted past AGENTLESS_RETENTION, by kind: tasks (with their log "
            "lines), dead_letters, and tombstones (what was kept of purged tasks).",
            ["kind"],
            registry=self.registry,
        )
        self.poll_lateness = Histogram(
            "agentless_poll_lateness_seconds",
            "Time from when a poll was due to when this process took it.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )

    def completed(
        self,
        mode: Mode,
        result: str,
        by: CompletedBy,
        *,
        queued_at: datetime,
        completed_at: datetime,
        waiting_since: datetime | None = None,
    ) -> None:
        """One completion, counted by the process that recorded it, and only once."""
        self.tasks_completed.labels(result, mode.value, _BY[by]).inc()
        self.task_duration.labels(mode.value).observe((completed_at - queued_at).total_seconds())
        if waiting_since is not None:
            self.wait_duration.labels(mode.value).observe(
                (completed_at - waiting_since).total_seconds()
            )

    def record_completed(self, record: TaskRecord) -> None:
        """A completion from the task's record, as the store returned it on completing it."""
        assert record.result is not None
        assert record.completed_by is not None
        assert record.completed_at is not None
        self.completed(
            record.mode,
            record.result.value,
            record.completed_by,
            queued_at=record.queued_at,
            completed_at=record.completed_at,
            waiting_since=record.waiting_since,
        )

    def show_dependencies(self, *, broker: bool, database: bool) -> None:
        self.dependency_up.labels("broker").set(broker)
        self.dependency_up.labels("database").set(database)

    def handler(self, before_scrape: Scrape) -> Handler:
        """GET /metrics, after `before_scrape` has read what is read at scrape time."""

        async def get_metrics(request: web.Request) -> web.StreamResponse:
            await before_scrape()
            return await self.exposition(request)

        return get_metrics


class ClusterGauges:
    """What the API exports of the whole deployment, read at each scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tasks = Gauge(
            "agentless_tasks",
            "Tasks not yet completed, by state, across all processes: exact up to 10,000 a "
            "state, past which the database planner's estimate.",
            ["state"],
            registry=registry,
        )
        self.oldest_queued_age = Gauge(
            "agentless_oldest_queued_task_age_seconds",
            "Age of the oldest queued task (0 when none is queued).",
            registry=registry,
        )
        self.oldest_waiting_age = Gauge(
            "agentless_oldest_waiting_task_age_seconds",
            "Time the longest-waiting callback or poll task has waited (0 when none waits).",
            registry=registry,
        )
        self.overdue = Gauge(
            "agentless_tasks_overdue",
            "Waiting or polling tasks past their deadline by more than the sweep allows: above 0, "
            "deadlines are not being swept (exact up to 10,000, an estimate past it).",
            registry=registry,
        )
        self.workers = Gauge(
            "agentless_workers",
            "Live worker processes (their heartbeats are recent).",
            registry=registry,
        )
        self.queue_messages = Gauge(
            "agentless_queue_messages",
            "Messages ready in the task queue and in the dead-letter queue.",
            ["queue"],
            registry=registry,
        )
        self.queue_consumers = Gauge(
            "agentless_queue_consumers",
            "Consumers of the task queue.",
            registry=registry,
        )

    def show(self, state: ClusterState, now: datetime) -> None:
        for name in UNFINISHED:
            self.tasks.labels(name.value).set(state.states.get(name, 0))
        self.oldest_queued_age.set(_age(state.oldest_queued_at, now))
        self.oldest_waiting_age.set(_age(state.oldest_waiting_since, now))
        self.overdue.set(state.overdue)
        self.workers.set(state.workers)

    def show_queue(self, ready: int, dead: int, consumers: int) -> None:
        self.queue_messages.labels("tasks").set(ready)
        self.queue_messages.labels("dead").set(dead)
        self.queue_consumers.set(consumers)


def _age(since: datetime | None, now: datetime) -> float:
    return 0.0 if since is None else max(0.0, (now - since).total_seconds())
