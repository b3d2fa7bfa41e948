"""May delivery send now? The delivery-wide conditions as a small state machine: no I/O, no logging.

- A pause (credentials, permission, quota: needs a human) stops every call until its recheck time.
- A hold (an outage, throttling) stops every call until the back-off has passed.
- Calls are numbered as they are issued; the barrier is the last number issued when a failure or pause
  was last seen. Only a later call (a probe) may end a hold or a pause, or escalate the back-off: the
  answers of calls that were already under way say nothing new.

The caller (`health.Health`) turns the transitions this returns into log lines, alerts and health.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from zkdingsync.backoff import Backoff


@dataclass(frozen=True)
class Pause:
    """Delivery stopped for a human."""

    reason: str
    code: str | None
    since: datetime
    recheck_at: datetime


@dataclass(frozen=True)
class Held:
    """What a transient failure did: the wait for the failed punch, and whether an outage began."""

    wait_seconds: float
    failures: int
    began: bool


@dataclass(frozen=True)
class Recovered:
    """What a proper answer ended: the outage (since when) and the pause, each None if there was none."""

    outage_since: datetime | None
    pause: Pause | None


@dataclass(frozen=True)
class Paused:
    """What an answer that needs a human did: the recheck time, and whether the pause is new (or changed)."""

    recheck_at: datetime
    changed: bool


class DeliveryGate:
    """Pause, hold and the call barrier, shared by the delivery workers (thread-safe)."""

    def __init__(self, backoff: Backoff) -> None:
        """Given the back-off policy of holds, build an open gate."""
        self.backoff = backoff
        self._lock = threading.Lock()
        self._pause: Pause | None = None
        self._hold_until: datetime | None = None
        self._hold_reason = ""
        self._failures = 0
        self._outage_since: datetime | None = None
        self._calls_issued = 0
        self._barrier = 0

    @property
    def pause(self) -> Pause | None:
        """The pause in force, or None."""
        return self._pause

    @property
    def hold_until(self) -> datetime | None:
        """Until when delivery holds back after transient failures, or None."""
        return self._hold_until

    def _blocker(self, now: datetime) -> tuple[str, datetime] | None:
        """Why delivery may not send at `now` and until when, or None (call with the lock held)."""
        if self._pause is not None and now < self._pause.recheck_at:
            return f"delivery paused: {self._pause.reason}", self._pause.recheck_at
        if self._hold_until is not None and now < self._hold_until:
            return f"delivery held: {self._hold_reason}", self._hold_until
        return None

    def blocked_for(self, now: datetime) -> float:
        """Seconds until delivery may send again (pause or hold), 0 when it may send now."""
        with self._lock:
            blocker = self._blocker(now)
        return 0.0 if blocker is None else (blocker[1] - now).total_seconds()

    def why_not(self, now: datetime) -> str | None:
        """Why delivery may not send at `now`, or None when it may."""
        with self._lock:
            blocker = self._blocker(now)
        return None if blocker is None else blocker[0]

    def permit(self, now: datetime) -> int | str:
        """Return the number of a call that may go out now, or why none may. Checking and numbering under
        one lock: a failure seen in between would otherwise let a call numbered after it (and sent before
        the hold) end that hold."""
        with self._lock:
            blocker = self._blocker(now)
            if blocker is not None:
                return blocker[0]
            self._calls_issued += 1
            return self._calls_issued

    def next_call(self) -> int:
        """Number a call as it is issued (a read-back, which the settler checks itself)."""
        with self._lock:
            self._calls_issued += 1
            return self._calls_issued

    def probing(self) -> bool:
        """After a pause or an outage, one punch goes first to see whether the cause has gone."""
        with self._lock:
            return self._pause is not None or self._failures > 0

    def resume_at(self, now: datetime) -> datetime:
        """The earliest moment delivery may send again (`now` when it may now)."""
        with self._lock:
            moments = [now]
            if self._pause is not None:
                moments.append(self._pause.recheck_at)
            if self._hold_until is not None:
                moments.append(self._hold_until)
        return max(moments)

    def failed(self, reason: str, wait_hint: float, now: datetime, call: int) -> Held:
        """A transient failure or an unknown outcome of call number `call`: hold all delivery for at least
        `wait_hint` seconds (what the answer asked for) and the back-off."""
        with self._lock:
            if call > self._barrier:
                self._failures += 1
            self._barrier = self._calls_issued
            wait = max(wait_hint, self.backoff.seconds(self._failures))
            until = now + timedelta(seconds=wait)
            if self._hold_until is None or until > self._hold_until:
                self._hold_until = until
                self._hold_reason = reason
            began = self._outage_since is None
            if began:
                self._outage_since = now
            return Held(wait, self._failures, began)

    def answered(self, call: int, *, ends_pause: bool = True) -> Recovered | None:
        """DingTalk answered call `call` properly: end a hold, and (`ends_pause`) a pause. Return what
        ended, or None when the call went out before the last failure was seen (it proves nothing)."""
        with self._lock:
            if call <= self._barrier:
                return None
            ended = Recovered(self._outage_since, self._pause if ends_pause else None)
            self._failures = 0
            self._hold_until = None
            self._outage_since = None
            if ends_pause:
                self._pause = None
            return ended

    def needs_human(
        self, reason: str, code: str | None, wait_seconds: float, now: datetime, call: int
    ) -> Paused:
        """An answer that needs a human: pause all delivery, rechecking after `wait_seconds` (at least 1)."""
        recheck_at = now + timedelta(seconds=max(wait_seconds, 1.0))
        with self._lock:
            self._barrier = max(self._barrier, call, self._calls_issued)
            previous = self._pause
            changed = previous is None or previous.code != code or previous.reason != reason
            since = now if previous is None else previous.since
            self._pause = Pause(reason, code, since, recheck_at)
        return Paused(recheck_at, changed)
