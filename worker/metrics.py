"""Prometheus metrics of one process; each process has its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Invocations run from milliseconds to the 20 s response timeout.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tasks_received = Counter(
            "agentless_tasks_received",
            "Task messages taken from the queue.",
            registry=self.registry,
        )
        self.tasks_completed = Counter(
            "agentless_tasks_completed",
            "Tasks whose result this process recorded, by result and mode.",
            ["result", "mode"],
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
            "Time from sending a task's request to having its whole response.",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.end_to_end_duration = Histogram(
            "agentless_task_duration_seconds",
            "Time from a task's queueing to its completion, by mode.",
            ["mode"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 20, 60, 300, 1800, 3600, 21600, 86400),
            registry=self.registry,
        )
        self.tasks_waiting = Gauge(
            "agentless_tasks_waiting",
            "Callback tasks waiting for their TaskCompleted, across all processes.",
            registry=self.registry,
        )
        self.callbacks = Counter(
            "agentless_callbacks",
            "Requests from external services to the callback API, by HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.tasks_in_flight = Gauge(
            "agentless_tasks_in_flight",
            "Task messages this process holds and has not yet acknowledged.",
            registry=self.registry,
        )

        self.polls = Counter(
            "agentless_polls",
            "Polls this process made and recorded, by what followed: again, a result, or "
            "superseded (a newer poll, a cancel or the deadline got there first).",
            ["outcome"],
            registry=self.registry,
        )
        self.poll_lateness = Histogram(
            "agentless_poll_lateness_seconds",
            "Time from when a poll was due to when this process took it.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.tasks_polling = Gauge(
            "agentless_tasks_polling",
            "Poll tasks waiting for their next poll, across all processes.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
