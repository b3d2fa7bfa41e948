"""Parking at scale: the pending punches of employees nobody mapped are parked in bulk.

On a first start (or after a `retry`) tens of thousands of punches may belong to enroll numbers missing
from `users.map`. Sending each through the upload pipeline only to park it there costs a batch per twenty
and a journal line per batch; instead, before a batch is claimed, the pending punches are grouped by
enroll number, and each unmapped one is parked in one statement with one journal line (its count), with no
wait for the rate limit. A sweep runs when new punches were stored, and once a minute for what `retry` or
`backfill` queued; never while the job number table is due or being fetched (it may know them), and never
more often than ten times its own duration, so that a large mapped backlog does not pay for it each batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

import structlog

from zkdingsync.delivery.ports import DeliveryStore, Resolver

log = structlog.get_logger(__name__)

SWEEP_EVERY = timedelta(minutes=1)
_COST_FACTOR = 10  # a sweep waits at least this many times its own duration before the next one
# One transaction parks whole enroll numbers up to about this many punches (one commit, not one each), and
# a sweep stops after about a second (the rest waits for the next step): the store is shared with the
# polls, and the batch after the sweep is where a just-read punch goes out.
CHUNK_PUNCHES = 10_000
SWEEP_SECONDS = 1.0


class UnmappedParking:
    """Parks the pending punches of unmapped enroll numbers, one statement and one line per number."""

    def __init__(
        self,
        store: DeliveryStore,
        mapper: Resolver,
        refreshing: Callable[[], bool],
        *,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        """Given the store, the user mapper and whether the job number table is being fetched, build it."""
        self._store = store
        self._mapper = mapper
        self._refreshing = refreshing
        self._timer = timer
        self._new = threading.Event()
        self._last_at: datetime | None = None
        self._cost = timedelta()
        self._unfinished = False  # the last sweep stopped at its time limit

    def new_punches(self) -> None:
        """New punches were stored: look at the next step (thread-safe)."""
        self._new.set()

    def due(self, now: datetime) -> bool:
        """True when a sweep should run at `now`."""
        if self._refreshing() or self._mapper.refresh_due():
            return False  # the job number table being (or about to be) fetched may know them
        last = self._last_at
        if last is None or self._unfinished:
            return True
        if now - last < self._cost * _COST_FACTOR:
            return False  # the last sweep was too recent for what it cost
        return self._new.is_set() or now - last >= SWEEP_EVERY

    def sweep(self, now: datetime) -> int:
        """Park the pending punches of the enroll numbers that resolve to nobody (for about a second at
        most); return how many."""
        self._new.clear()
        started = self._timer()
        waiting = self._store.pending_enroll_numbers()
        unmapped = [number for number in sorted(waiting) if self._mapper.resolve(number) is None]
        parked = 0
        self._unfinished = False
        for chunk in _chunks(unmapped, waiting):
            if self._timer() - started > SWEEP_SECONDS:
                self._unfinished = True
                break
            reasons = {number: self._mapper.report_unmapped(number) for number in chunk}
            for enroll_number, count in self._store.park_enroll_numbers(reasons).items():
                if count:
                    parked += count
                    log.info(
                        "delivery.parked_unmapped",
                        enroll_number=enroll_number,
                        punches=count,
                        reason=reasons[enroll_number],
                    )
        self._cost = timedelta(seconds=self._timer() - started)
        self._last_at = now
        return parked


def _chunks(numbers: list[str], sizes: Mapping[str, int]) -> list[list[str]]:
    """Cut enroll numbers into groups of about CHUNK_PUNCHES pending punches (a number is never split)."""
    chunks: list[list[str]] = []
    total = CHUNK_PUNCHES
    for number in numbers:
        if total + sizes[number] > CHUNK_PUNCHES and total > 0:
            chunks.append([])
            total = 0
        chunks[-1].append(number)
        total += sizes[number]
    return chunks
