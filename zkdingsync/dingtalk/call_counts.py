"""The call count: every upload and read-back call that may have reached DingTalk.

Counted in the store under the organisation's month ("2026-11"; token and contacts calls are free,
QPS-rejected calls are not counted by DingTalk either), and under its day for `status`'s forecast. One
committed (fsynced) transaction per call would cost as much as the call's own bookkeeping, so counts reach
the store in small groups: at COUNT_FLUSH_CALLS calls, after COUNT_FLUSH_SECONDS, or when the forwarder
flushes (before every budget check). A crash forgets at most one group.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import structlog

from zkdingsync.errors import StoreError

log = structlog.get_logger(__name__)

COUNT_FLUSH_CALLS = 50
COUNT_FLUSH_SECONDS = 5.0


class CallCountStore(Protocol):
    """The store's call counter."""

    def count_calls(self, month: str, n: int = 1, *, day: str | None = None) -> int: ...


class CallCounter:
    """Counts calls in memory and writes them to the store in groups. Thread-safe."""

    def __init__(
        self,
        store: CallCountStore,
        *,
        month_of: Callable[[datetime], str],
        clock: Callable[[], datetime],
        day_of: Callable[[datetime], str] | None = None,
    ) -> None:
        """Given the store, the month (and the day, when given) a moment's calls count in, and the clock."""
        self._store = store
        self._month_of = month_of
        self._day_of = day_of
        self._clock = clock
        self._lock = threading.Lock()
        self._unsaved: Counter[tuple[str, str | None]] = Counter()  # (month, day)
        self._unsaved_since: datetime | None = None
        self._failing = False

    def count(self) -> None:
        """Count one call against the month it is made in."""
        now = self._clock()
        with self._lock:
            self._unsaved[(self._month_of(now), self._day_of(now) if self._day_of else None)] += 1
            if self._unsaved_since is None:
                self._unsaved_since = now
            due = (
                sum(self._unsaved.values()) >= COUNT_FLUSH_CALLS
                or (now - self._unsaved_since).total_seconds() >= COUNT_FLUSH_SECONDS
            )
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the calls counted since the last flush to the store (a failure keeps them for later)."""
        with self._lock:
            counts, self._unsaved = self._unsaved, Counter()
            self._unsaved_since = None
            try:
                for (month, day), calls in counts.items():
                    self._store.count_calls(month, calls, day=day)
                    counts[(month, day)] = 0
            except StoreError as error:
                # Losing a count is better than losing the outcome of a call that DingTalk may have taken.
                if not self._failing:  # once per outage, not once per call
                    log.warning("dingtalk.call_count_failed", error=str(error))
                self._failing = True
                self._unsaved.update(+counts)
                self._unsaved_since = self._clock()
            else:
                self._failing = False
