"""Measuring PostgreSQL's clock for a process's Clock (worker/contract/clock.py): when the store
opens, and again every little while, so that a clock stepped or drifting since is followed."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

import asyncpg

from worker.contract.clock import Clock, Sample, best
from worker.store.errors import DB_UNAVAILABLE

log = logging.getLogger(__name__)

# Readings per measurement; the one of the shortest round trip is kept.
SAMPLES = 3
REMEASURE_SECONDS = 30.0
# A measurement this uncertain is kept only if the last one was no better: a busy moment of the
# database should not spoil a good reading.
GOOD_ENOUGH_ERROR = 0.05
# Clocks apart by more than this are worth an operator's notice (NTP is not doing its job).
NOTABLE_OFFSET = 1.0


async def measure(pool: asyncpg.Pool) -> Sample:
    async with pool.acquire() as conn:
        samples = []
        for _ in range(SAMPLES):
            sent = time.time()
            database: datetime = await conn.fetchval("SELECT clock_timestamp()")
            received = time.time()
            samples.append(Sample(sent, database.timestamp(), received))
    return best(samples)


def follow(clock: Clock, sample: Sample) -> None:
    """Let `clock` follow `sample`, saying so when this machine's clock is notably off."""
    if sample.error > GOOD_ENOUGH_ERROR and sample.error > clock.error:
        return
    moved = abs(sample.offset - clock.offset) > NOTABLE_OFFSET
    clock.follow(sample)
    if moved and abs(sample.offset) > NOTABLE_OFFSET:
        log.warning(
            "this machine's clock is %.1f s %s PostgreSQL's; deadlines, token expiry and ages "
            "follow PostgreSQL's clock",
            abs(sample.offset),
            "behind" if sample.offset > 0 else "ahead of",
            extra={"clockOffsetSeconds": round(sample.offset, 3)},
        )


async def keep_measuring(pool: asyncpg.Pool, clock: Clock) -> None:
    while True:
        await asyncio.sleep(REMEASURE_SECONDS)
        try:
            follow(clock, await measure(pool))
        except DB_UNAVAILABLE as exc:
            # The last offset holds meanwhile: clocks drift by milliseconds a day, not a minute.
            log.warning("database clock not measured: %s", exc)
