"""Helpers for the model-based test and the crash tests: a fake clock, simulated process death, and
the bookkeeping that decides whether DingTalk got every punch exactly once.

`SimulatedCrash` derives from BaseException on purpose: like the SIGKILL it stands for, it must not be
caught by the `except Exception` edges of the poller and forwarder threads, so it leaves the step in
progress exactly where it struck.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

# (userid, user_check_time in epoch ms, device_id): how a punch is recognised in DingTalk.
UploadKey = tuple[str, int, str]


def expected_ms(local_time: str, zone: str) -> int:
    """Given a terminal wall-clock text and the terminal's IANA zone, return the epoch milliseconds
    DingTalk must receive (computed independently of `zkdingsync.timeconv`)."""
    naive = datetime.strptime(local_time, "%Y-%m-%d %H:%M:%S")  # noqa: DTZ007 - zone attached below
    return int(naive.replace(tzinfo=ZoneInfo(zone)).timestamp() * 1000)


def upload_key(upload: Mapping[str, Any]) -> UploadKey:
    """Given an upload the fake DingTalk accepted, return its (userid, check time ms, device_id)."""
    return (str(upload["userid"]), int(upload["user_check_time"]), str(upload["device_id"]))


def duplicates(uploads: Iterable[Mapping[str, Any]]) -> dict[UploadKey, int]:
    """Given accepted uploads, return every key accepted more than once with how many times."""
    counts = Counter(upload_key(upload) for upload in uploads)
    return {key: n for key, n in counts.items() if n > 1}


class FakeClock:
    """Aware UTC time that moves only when told: `now()` for every `clock=`, `advance(s)` as `sleep=`."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(timezone.utc)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        """Return the current fake time."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds` (negative values are ignored): the injected sleep."""
        with self._lock:
            self._now += timedelta(seconds=max(0.0, float(seconds)))


class SimulatedCrash(BaseException):
    """The process died here (kill -9): nothing after this point happens, nothing uncommitted survives."""


@dataclass
class _CrashPoint:
    method: str
    when: str  # "before" the call happens, or "after" it returned (its commit is durable)
    remaining: int  # strike at the nth matching call


class Mortality:
    """Shared fate of one simulated process: arm a crash point; once struck, every call through a
    `Dying` proxy of this process raises SimulatedCrash (a dead process neither writes nor uploads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._point: _CrashPoint | None = None
        self.dead = False
        self.struck_at: str | None = None

    def arm(self, method: str, when: str, nth: int = 1) -> None:
        """Die at the `nth` call of `method` (on any proxy of this process), `before` or `after` it."""
        if when not in ("before", "after"):
            raise ValueError("when must be 'before' or 'after'")
        with self._lock:
            self._point = _CrashPoint(method, when, nth)

    def disarm(self) -> None:
        """Forget an armed crash point that was never reached."""
        with self._lock:
            self._point = None

    def kill(self) -> None:
        """Die now (kill -9 between two calls)."""
        with self._lock:
            self.dead = True
            self.struck_at = self.struck_at or "killed"
            self._point = None

    def check(self, method: str, when: str) -> None:
        """Raise SimulatedCrash if this process is dead or this is the armed point."""
        with self._lock:
            point = self._point
            if not self.dead and point is not None and point.method == method and point.when == when:
                point.remaining -= 1
                if point.remaining <= 0:
                    self.dead = True
                    self.struck_at = f"{when} {method}"
                    self._point = None
            if self.dead:
                raise SimulatedCrash(self.struck_at or "dead")


class Dying:
    """A proxy of a store or client that belongs to a mortal process: every public method call checks
    the process's fate before and after the real call. Attributes pass through unchanged."""

    def __init__(self, target: Any, mortality: Mortality) -> None:
        self._target = target
        self._mortality = mortality

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if name.startswith("_") or not callable(attribute):
            return attribute
        mortality = self._mortality

        def call(*args: Any, **kwargs: Any) -> Any:
            mortality.check(name, "before")
            result = attribute(*args, **kwargs)
            mortality.check(name, "after")
            return result

        return call
