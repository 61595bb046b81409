"""The broker connection's settings, decided before any connection is made."""

from __future__ import annotations

import pytest

from worker.amqp import DEFAULT_HEARTBEAT, with_heartbeat


@pytest.mark.parametrize(
    ("given", "url", "heartbeat"),
    [
        (
            "amqp://guest:guest@127.0.0.1:5672/",
            f"amqp://guest:guest@127.0.0.1:5672/?heartbeat={DEFAULT_HEARTBEAT}",
            DEFAULT_HEARTBEAT,
        ),
        (
            "amqps://u:p@mq.example.com/%2F?name=w",
            f"amqps://u:p@mq.example.com/%2F?name=w&heartbeat={DEFAULT_HEARTBEAT}",
            DEFAULT_HEARTBEAT,
        ),
        ("amqp://mq/?heartbeat=30", "amqp://mq/?heartbeat=30", 30),
        ("amqp://mq/?heartbeat=0", "amqp://mq/?heartbeat=0", 0),
        ("amqp://mq/?heartbeat=often", "amqp://mq/?heartbeat=often", 0),
        ("amqp://mq/?heartbeat=70000", "amqp://mq/?heartbeat=70000", 0),
    ],
)
def test_a_heartbeat_unless_the_url_names_one(given: str, url: str, heartbeat: int) -> None:
    assert with_heartbeat(given) == (url, heartbeat)
