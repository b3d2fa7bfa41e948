"""What delivery needs from the store, the DingTalk client and the user mapper, and a few shared helpers."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from zkdingsync.model import Delivery, DingTalkHealth, Outcome, Punch, StoredPunch, Upload


class DeliveryStore(Protocol):
    """The store as delivery uses it."""

    def claim_due(
        self, now: datetime, limit: int, *, fresh_since: datetime | None = None, fresh_limit: int = 0
    ) -> Sequence[StoredPunch]: ...

    def pending_enroll_numbers(self) -> Mapping[str, int]: ...

    def park_enroll_numbers(self, reasons: Mapping[str, str]) -> Mapping[str, int]: ...

    def mark_delivered(
        self,
        punch_id: int,
        *,
        at: datetime,
        userid: str,
        request_id: str | None = None,
        record_id: str | None = None,
    ) -> None: ...

    def make_pending_due(self, now: datetime) -> int: ...

    def record_upload_userids(self, userids: Mapping[int, str]) -> None: ...

    def mark_pending(
        self, punch_id: int, *, retry_at: datetime, reason: str, outcome_unknown: bool = False
    ) -> None: ...

    def mark_unknown(self, punch_id: int, *, reason: str) -> None: ...

    def park(self, punch_id: int, *, reason: str) -> None: ...

    def in_flight(self) -> Sequence[StoredPunch]: ...

    def calls_in_month(self, month: str) -> int: ...

    def delivery_counts(self) -> Mapping[Delivery, int]: ...

    def set_dingtalk_health(self, health: DingTalkHealth) -> None: ...

    def clear_dingtalk_health(self) -> None: ...

    def take_mapping_refresh_request(self) -> bool: ...

    def probe_writable(self, at: datetime) -> None: ...


class Uploader(Protocol):
    """The DingTalk client as delivery uses it."""

    def upload(self, upload: Upload) -> Outcome: ...

    def list_records(
        self, userids: Sequence[str], start: datetime, end: datetime
    ) -> list[dict[str, Any]]: ...

    def flush_call_counts(self) -> None: ...

    def month_of(self, at: datetime) -> str: ...


class Resolver(Protocol):
    """The user mapper as delivery uses it."""

    def resolve(self, enroll_number: str) -> str | None: ...

    def report_unmapped(self, enroll_number: str) -> str: ...

    def refresh_due(self) -> bool: ...

    def maybe_refresh(self) -> bool: ...

    def request_refresh(self) -> None: ...


SECOND_MS = 1000


def ms_to_datetime(ms: int) -> datetime:
    """Given epoch milliseconds, return the aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def invalid_moment(punch: Punch) -> str:
    """The park reason of a punch whose local time names no real moment (it can never be uploaded)."""
    return f"the punch time {punch.local_time!r} is not a valid moment"


class SentUnder:
    """Punch id -> the userid its upload went out under, while its outcome is not settled.

    A read-back must look under that userid even if users.map changed since (a reload while it was in
    flight). Shared by the dispatch workers and the settler; thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._userids: dict[int, str] = {}

    def remember(self, punch_id: int, userid: str) -> None:
        """Note the userid an upload is about to go out under."""
        with self._lock:
            self._userids[punch_id] = userid

    def get(self, punch_id: int) -> str | None:
        """Return the userid the punch's unsettled upload went out under, if this process sent it."""
        with self._lock:
            return self._userids.get(punch_id)

    def forget(self, punch_id: int) -> None:
        """The punch's outcome is settled."""
        with self._lock:
            self._userids.pop(punch_id, None)
