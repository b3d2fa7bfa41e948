"""The token bucket that spaces DingTalk calls."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class RateLimiter:
    """A token bucket of depth one: calls leave at most `rate_per_second` a second, evenly spaced.

    Depth one (no burst) keeps every one-second window at or below the rate, which is what DingTalk's
    per-second limit counts. `acquire` waits through `sleep`, so a stop interrupts it.
    """

    def __init__(
        self, rate_per_second: float, *, monotonic: Callable[[], float], sleep: Callable[[float], Any]
    ) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        # A hair over 1/rate, so that float rounding never fits rate + 1 calls into one second.
        self.interval = 1.001 / rate_per_second
        self._monotonic = monotonic
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = float("-inf")

    def acquire(self) -> float:
        """Wait for the next slot; return how long this call waited (seconds)."""
        with self._lock:
            now = self._monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        wait = slot - now
        if wait > 0:
            self._sleep(wait)
        return wait
