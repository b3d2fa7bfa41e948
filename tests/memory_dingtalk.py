"""An in-memory DingTalk for the forwarder's unit tests: the `delivery.ports.Uploader` port without HTTP.

It keeps what it accepted, answers read-backs from it, and plays scripted answers (a queue of outcomes, an
outage switch) so the forwarder's breaker, pause and budget can be driven thousands of times a second.
The HTTP fake (`zkdingsync/dingtalk/fake.py`) stays for the client's own tests and the end-to-end ones.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from datetime import datetime, timezone, tzinfo
from typing import Any, Protocol

from zkdingsync.dingtalk.client import DingTalkError
from zkdingsync.model import Outcome, OutcomeKind, Upload, utc_now
from zkdingsync.quota import call_month

DELIVERED = Outcome(OutcomeKind.DELIVERED)
UNREACHABLE = Outcome(OutcomeKind.TRANSIENT, "DingTalk cannot be reached", 5.0)


class CallCounter(Protocol):
    """The store's call counter (optional: without it the fake counts only in memory)."""

    def count_calls(self, month: str, n: int = 1) -> int: ...


class MemoryDingTalk:
    """Accepts uploads into a list; `down` makes every call fail as an outage; `script` queues answers."""

    def __init__(
        self,
        *,
        store: CallCounter | None = None,
        clock: Callable[[], datetime] = utc_now,
        zone: tzinfo = timezone.utc,
    ) -> None:
        """Given the store to count calls in (like the client), the clock and the organisation's zone."""
        self._store = store
        self._clock = clock
        self._zone = zone
        self._lock = threading.Lock()
        self.accepted: list[Upload] = []
        self.calls: Counter[str] = Counter()
        self.down: Outcome | None = None  # while set, every call answers this
        self._script: deque[Outcome] = deque()

    def script(self, *outcomes: Outcome) -> None:
        """Answer the next uploads with these outcomes (a DELIVERED one is accepted), then normally."""
        with self._lock:
            self._script.extend(outcomes)

    def upload(self, upload: Upload) -> Outcome:
        """Accept the upload, or answer what the script or the outage says."""
        with self._lock:
            self.calls["upload"] += 1
            self._count()
            if self.down is not None:
                return self.down
            outcome = self._script.popleft() if self._script else DELIVERED
            if outcome.kind is OutcomeKind.DELIVERED or (
                outcome.kind is OutcomeKind.UNKNOWN and outcome.code
            ):
                # An unknown outcome with a code stands for "it arrived, the answer was lost".
                self.accepted.append(upload)
            return outcome

    def list_records(self, userids: Sequence[str], start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Return the accepted punches of these users between two moments, as listRecord would."""
        with self._lock:
            self.calls["list_records"] += 1
            self._count()
            if self.down is not None:
                raise DingTalkError("listRecord", self.down)
            low, high = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
            return [
                {"userId": u.userid, "userCheckTime": u.user_check_time_ms, "deviceId": u.device_id}
                for u in self.accepted
                if u.userid in userids and low <= u.user_check_time_ms <= high
            ]

    def flush_call_counts(self) -> None:
        """Nothing to flush: calls are counted at once."""

    def month_of(self, at: datetime) -> str:
        """Return the month calls made at `at` count in."""
        return call_month(at, self._zone)

    def accepted_counts(self) -> Counter[tuple[str, int, str]]:
        """How many times each (userid, time ms, device id) was accepted (all 1: exactly once)."""
        with self._lock:
            return Counter((u.userid, u.user_check_time_ms, u.device_id) for u in self.accepted)

    def _count(self) -> None:
        if self._store is not None:
            self._store.count_calls(call_month(self._clock(), self._zone))
