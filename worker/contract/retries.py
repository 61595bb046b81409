"""When a failed attempt is tried again, and after how long (SPEC §4 `retry`).

Only failures that another try may cure are retried: no connection, a connection lost, no
complete response in time, HTTP 429 and 503. Any other answer, 4xx above all, is the endpoint's
verdict and final.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

from worker.contract.models import Outcome, Result
from worker.contract.requests import MAX_RETRY_DELAY, RetryPolicy

RETRY_STATUSES: Final = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class Retry:
    """Try the task again: retry number `number` (from 1), `delay` seconds from now."""

    number: int
    delay: float


@dataclass(frozen=True, slots=True)
class NoRetry:
    """A retryable failure that is not retried; `reason` says why, for the task's record."""

    reason: str


def plan(policy: RetryPolicy | None, outcome: Outcome, retries: int) -> Retry | NoRetry | None:
    """What follows `outcome`, the attempt after `retries` earlier retries: a retry, a refusal
    with its reason, or None when the outcome is not one that retries could change."""
    if policy is None or outcome.result is not Result.FAILED:
        return None
    response = outcome.response
    if response is None:
        if not outcome.transient:
            return None
        asked = None
    elif response.status_code in RETRY_STATUSES:
        asked = asked_delay(response.headers)
    else:
        return None
    if retries + 1 >= policy.attempts:
        return NoRetry(f"{outcome.reason}; gave up after {retries + 1} attempts")
    delay = policy.delay(retries + 1)
    if asked is not None:
        if asked > MAX_RETRY_DELAY:
            return NoRetry(
                f"{outcome.reason}; Retry-After asks for {asked:g} s, "
                f"beyond the {MAX_RETRY_DELAY}-s limit of a retry"
            )
        delay = max(delay, asked)
    return Retry(retries + 1, delay)


def asked_delay(headers: Mapping[str, str]) -> float | None:
    """Seconds that a response's Retry-After asks for, or None. A date in it is counted from the
    response's own Date: both are the endpoint's clock, so that neither its clock nor ours being
    off changes the delay."""
    sent = headers.get("date")
    return retry_after(headers.get("retry-after"), None if sent is None else _http_date(sent))


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds that a Retry-After header asks for (delay-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    when = _http_date(value)
    if when is None:
        return None
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(seconds, 0.0)


def _http_date(value: str) -> datetime | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def bucket(seconds: float) -> int:
    """`seconds` rounded up to a delay queue's TTL: whole seconds to 100, then two significant
    figures, so that a few dozen queues serve every delay."""
    whole = math.ceil(seconds)
    if whole <= 100:
        return whole
    step = 10 ** (len(str(whole)) - 2)
    return int(math.ceil(whole / step) * step)
