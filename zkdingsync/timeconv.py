"""Terminal wall-clock time -> the moment it names, and the quarantine rules for suspect punches.

A terminal records its wall clock with no zone ("2024-05-06 07:08:09"); the zone is configured per
terminal. Only that configured zone is used here: the host's own zone (often UTC on servers) never
enters, because every conversion goes through an explicit `ZoneInfo` and aware-datetime arithmetic
(no `time.mktime`, no naive `datetime.timestamp()`).

Daylight-saving edges, decided once and applied everywhere (a terminal has no way to say which one it
meant):

* an ambiguous time (the repeated hour when clocks fall back) is read as its FIRST occurrence, with the
  offset in force before the change (PEP 495 `fold=0`);
* a nonexistent time (the skipped hour when clocks spring forward) is read with the offset in force
  BEFORE the gap (also `fold=0`), so 02:30 on a spring-forward night in New York becomes 07:30 UTC,
  which is 03:30 local after the change. Nothing is dropped and the result is never off by more than
  the size of the gap.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from zkdingsync.model import AttendanceRecord, Punch

# DingTalk accepts uploads whose user_check_time is at most 180 days old (dingtalk-api.md).
DINGTALK_WINDOW = timedelta(days=180)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MILLISECOND = timedelta(milliseconds=1)


def parse_local_time(local_time: str) -> tuple[int, int, int, int, int, int] | None:
    """Given "YYYY-MM-DD HH:MM:SS", return its six fields, or None if the text is not in that shape."""
    if (
        len(local_time) != 19
        or local_time[4] != "-"
        or local_time[7] != "-"
        or local_time[10] != " "
        or local_time[13] != ":"
        or local_time[16] != ":"
    ):
        return None
    parts = (
        local_time[0:4],
        local_time[5:7],
        local_time[8:10],
        local_time[11:13],
        local_time[14:16],
        local_time[17:19],
    )
    if not all(part.isascii() and part.isdigit() for part in parts):
        return None
    year, month, day, hour, minute, second = (int(part) for part in parts)
    return year, month, day, hour, minute, second


def local_to_datetime(local_time: str, tz: ZoneInfo) -> datetime | None:
    """Given a terminal's wall-clock text and its zone, return the aware datetime it names (in `tz`).

    Return None for an impossible date or time (February 31, hour 25, text of the wrong shape). DST
    edges follow the module rules: ambiguous and nonexistent times are read with fold=0.
    """
    fields = parse_local_time(local_time)
    if fields is None:
        return None
    try:
        return datetime(*fields, tzinfo=tz, fold=0)
    except ValueError:
        return None


def local_to_epoch_ms(local_time: str, tz: ZoneInfo) -> int | None:
    """Given a terminal's wall-clock text and its zone, return the moment as epoch milliseconds.

    Return None for an impossible date. Exact integer arithmetic (no float rounding); the host zone is
    never consulted.
    """
    moment = local_to_datetime(local_time, tz)
    if moment is None:
        return None
    return (moment - _EPOCH) // _MILLISECOND


def describe_duration(seconds: float) -> str:
    """Given a length of time in seconds, return it the way an admin reads it: "45 s", "12 min",
    "3 h", "3 h 20 min", "2 d 4 h"."""
    total = int(abs(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"


def quarantine_reason(
    check_time_ms: int | None, local_time: str, now: datetime, future_tolerance_seconds: float
) -> str | None:
    """Given a punch's epoch milliseconds (None when impossible), return why it must not be uploaded as
    it is, or None when it is fine.

    Reasons: "impossible date 2024-02-31 07:00:00", "in the future by 3 h" (more than
    `future_tolerance_seconds` ahead of `now`), "older than DingTalk's 180-day window".
    """
    if check_time_ms is None:
        return f"impossible date {local_time}"
    now_ms = (now - _EPOCH) // _MILLISECOND
    ahead_seconds = (check_time_ms - now_ms) / 1000
    if ahead_seconds > future_tolerance_seconds:
        return f"in the future by {describe_duration(ahead_seconds)}"
    if now_ms - check_time_ms > DINGTALK_WINDOW // _MILLISECOND:
        return "older than DingTalk's 180-day window"
    return None


class Classifier:
    """Turns one poll's records into Punches: `classify` for many records at once.

    Converting 100,000 records one by one through `ZoneInfo` costs about a second, so the UTC offset is
    worked out once per local hour ("YYYY-MM-DD HH") and reused. An hour whose start and end have
    different offsets (a DST change inside it) is converted record by record, exactly.
    """

    def __init__(
        self, *, device: str, serial: str, tz: ZoneInfo, now: datetime, future_tolerance_seconds: float
    ) -> None:
        """Given the terminal (name, serial, clock zone), the host's aware `now` and the future
        tolerance, prepare to classify that terminal's records."""
        self.device = device
        self.serial = serial
        self.tz = tz
        self.now = now
        self.future_tolerance_seconds = future_tolerance_seconds
        self._now_ms = (now - _EPOCH) // _MILLISECOND
        self._latest_ok_ms = self._now_ms + int(future_tolerance_seconds * 1000)
        self._oldest_ok_ms = self._now_ms - DINGTALK_WINDOW // _MILLISECOND
        # "YYYY-MM-DD HH" -> epoch ms of HH:00:00 there, or None when the hour must go the slow way
        self._hours: dict[str, int | None] = {}

    def _hour_base_ms(self, prefix: str) -> int | None:
        """Epoch ms of the hour's start when one offset covers the whole hour, else None."""
        if prefix in self._hours:
            return self._hours[prefix]
        base: int | None = None
        start = local_to_datetime(prefix + ":00:00", self.tz)
        end = local_to_datetime(prefix + ":59:59", self.tz)
        if start is not None and end is not None and start.utcoffset() == end.utcoffset():
            base = (start - _EPOCH) // _MILLISECOND
        self._hours[prefix] = base
        return base

    def epoch_ms(self, local_time: str) -> int | None:
        """Given a terminal wall-clock text, return `local_to_epoch_ms(local_time, tz)` (same result,
        cached by hour)."""
        minute, second = local_time[14:16], local_time[17:19]
        if len(local_time) == 19 and minute.isdigit() and second.isdigit() and local_time[13] == ":":
            base = self._hour_base_ms(local_time[:13])
            if base is not None and int(minute) < 60 and int(second) < 60:
                return base + (int(minute) * 60 + int(second)) * 1000
        return local_to_epoch_ms(local_time, self.tz)

    def reason(self, check_time_ms: int | None, local_time: str) -> str | None:
        """Return the quarantine reason for a punch at `check_time_ms`, or None when it is fine."""
        if check_time_ms is not None and self._oldest_ok_ms <= check_time_ms <= self._latest_ok_ms:
            return None
        return quarantine_reason(check_time_ms, local_time, self.now, self.future_tolerance_seconds)

    def classify(self, record: AttendanceRecord) -> Punch:
        """Given a parsed record, return the Punch to store (quarantined, never dropped, when suspect)."""
        check_time_ms = self.epoch_ms(record.local_time)
        return Punch(
            self.device,
            self.serial,
            record.enroll_number,
            record.local_time,
            record.punch_state,
            record.verify_mode,
            check_time_ms,
            record.workcode,
            self.reason(check_time_ms, record.local_time),
        )

    def classify_all(self, records: Iterable[AttendanceRecord]) -> list[Punch]:
        """Given parsed records, return their Punches in the same order."""
        return [self.classify(record) for record in records]


def classify(
    record: AttendanceRecord,
    *,
    device: str,
    serial: str,
    tz: ZoneInfo,
    now: datetime,
    future_tolerance_seconds: float,
) -> Punch:
    """Given a parsed record from terminal `device` (serial `serial`, clock zone `tz`), return the Punch
    to store: its epoch milliseconds and, when it is suspect, a quarantine reason.

    A suspect punch is still returned (stored as quarantined, shown by `status`), never dropped. `now`
    must be timezone-aware. For many records use `Classifier`, which gives the same results faster.
    """
    check_time_ms = local_to_epoch_ms(record.local_time, tz)
    return Punch(
        device=device,
        serial=serial,
        enroll_number=record.enroll_number,
        local_time=record.local_time,
        punch_state=record.punch_state,
        verify_mode=record.verify_mode,
        check_time_ms=check_time_ms,
        workcode=record.workcode,
        quarantine_reason=quarantine_reason(check_time_ms, record.local_time, now, future_tolerance_seconds),
    )
