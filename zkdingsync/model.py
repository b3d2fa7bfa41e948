"""The program's own vocabulary: frozen dataclasses and enums shared by every module.

Times are timezone-aware datetimes or integer epoch milliseconds; a terminal's wall-clock time is kept
as the text it encodes ("YYYY-MM-DD HH:MM:SS") because it may be impossible (a 31st of February) and
still has to be stored and shown.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple


class Delivery(str, enum.Enum):
    """Where a stored punch is on its way to DingTalk."""

    PENDING = "pending"  # waiting for (another) upload attempt
    IN_FLIGHT = "in_flight"  # an upload was started; outcome not yet known
    DELIVERED = "delivered"  # DingTalk confirmed it (or a read-back found it)
    PARKED = "parked"  # cannot be delivered until a human fixes something; `retry` re-queues it
    QUARANTINED = "quarantined"  # the punch itself is suspect (impossible or out-of-window time)
    HISTORY = "history"  # recorded before delivery began (first contact or `delivery.since`): kept, not sent


class AttendanceRecord(NamedTuple):
    """One record as parsed from a terminal's attendance log, before any timezone is applied.

    `local_time` is the terminal's wall clock as "YYYY-MM-DD HH:MM:SS"; it may name an impossible date
    (the terminal wrote garbage), which later quarantines the punch instead of failing the whole log.
    A NamedTuple rather than a frozen dataclass: a full log is 200,000 of these, and a tuple is built
    three times faster (measured in bench/bench_polling.py), while staying just as immutable.
    """

    enroll_number: str  # the terminal's user_id (the employee's enroll number), as text
    local_time: str  # terminal wall clock, "YYYY-MM-DD HH:MM:SS"
    verify_mode: int  # how the user verified: 1 finger, 3 password, 4 card, 15 face
    punch_state: int  # 0 check-in, 1 check-out, 2 break-out, 3 break-in, 4/5 overtime, 255 none
    workcode: int = 0
    uid: int | None = None  # the terminal's internal user slot, when the layout carries it


@dataclass(frozen=True)
class TerminalUser:
    """A user enrolled on a terminal."""

    uid: int
    enroll_number: str
    name: str
    privilege: int = 0
    card: int = 0


@dataclass(frozen=True)
class TerminalInfo:
    """What a terminal says about itself (used by polls and by `probe`)."""

    serial: str
    firmware: str
    platform: str
    terminal_time: datetime  # the terminal's clock read in its configured zone, timezone-aware
    users: int
    user_capacity: int
    records: int
    record_capacity: int


@dataclass(frozen=True)
class Punch:
    """A punch as the store keeps it.

    The natural key (serial, enroll_number, local_time, punch_state, verify_mode) makes re-reading a
    whole log harmless. `check_time_ms` is `local_time` read in the terminal's configured zone, as
    epoch milliseconds; None when the local time is impossible.
    """

    device: str  # configured terminal name (shown to HR as device_name)
    serial: str  # terminal serial number (uploaded as device_id)
    enroll_number: str
    local_time: str
    punch_state: int
    verify_mode: int
    check_time_ms: int | None
    workcode: int = 0
    quarantine_reason: str | None = None  # set when the punch must not be uploaded as it is

    @property
    def check_time(self) -> datetime | None:
        """The punch moment as an aware UTC datetime, or None when the local time is impossible."""
        if self.check_time_ms is None:
            return None
        return datetime.fromtimestamp(self.check_time_ms / 1000, tz=timezone.utc)


@dataclass(frozen=True)
class Upload:
    """One punch as DingTalk's attendance upload wants it."""

    userid: str
    device_name: str
    device_id: str
    user_check_time_ms: int


class OutcomeKind(str, enum.Enum):
    """How DingTalk answered an upload (or any call)."""

    DELIVERED = "delivered"  # confirmed
    TRANSIENT = "transient"  # try again after `wait_seconds`
    UNKNOWN = "unknown"  # the request may have arrived, no answer: settle by reading back
    PERMANENT = "permanent"  # this punch can never go as it is: park it with the reason
    NEEDS_HUMAN = "needs_human"  # credentials, permission or quota: pause all delivery, say so once


@dataclass(frozen=True)
class Outcome:
    """The classified answer to one DingTalk call."""

    kind: OutcomeKind
    reason: str = ""
    wait_seconds: float = 0.0
    code: str | None = None  # DingTalk's errcode / sub_code, when there was one
    request_id: str | None = None  # DingTalk's request_id of the answer (kept for delivered punches)


@dataclass(frozen=True)
class Directory:
    """What the DingTalk directory says about its users: job number (工号) -> userid, for the users whose
    job number is unambiguous, and userid -> name (shown in HR's export)."""

    job_numbers: Mapping[str, str]
    names: Mapping[str, str]


@dataclass(frozen=True)
class StoredPunch:
    """A punch as the store returns it: with its row id and delivery state."""

    id: int
    punch: Punch
    delivery: Delivery
    reason: str | None
    attempts: int
    outcome_unknown: bool
    in_flight_since: datetime | None
    userid: str | None = None  # the DingTalk userid it was (last) uploaded as, or delivered to


class PunchResult(str, enum.Enum):
    """What one delivery attempt made of a claimed punch (counted in the `delivery.batch` line)."""

    DELIVERED = "delivered"  # DingTalk confirmed it
    PENDING = "pending"  # back in the queue with a retry time
    PARKED = "parked"  # set aside with its reason
    UNKNOWN = "unknown"  # left in flight, flagged: the next settle reads DingTalk back
    DEFERRED = "deferred"  # claimed but not sent (hold, pause, stop): back in the queue untouched


class HealthState(str, enum.Enum):
    """DingTalk's health as the forwarder last saw it (for `status`)."""

    OK = "ok"  # the last call was answered properly
    PAUSED = "paused"  # delivery is stopped for a human (credentials, permission, quota)
    ERROR = "error"  # calls fail transiently (outage, throttling)


@dataclass(frozen=True)
class DingTalkHealth:
    """DingTalk's health with its reason (plain words, never a token or secret) and when it was seen.

    Kept in the store as text ("ok", "paused: <reason>", "error: <reason>"), which `text`/`parse` convert.
    """

    state: HealthState
    reason: str = ""
    at: datetime | None = None

    def text(self) -> str:
        """Return the health as stored and shown: "ok", or "<state>: <reason>"."""
        return self.state.value if self.state is HealthState.OK else f"{self.state.value}: {self.reason}"

    @classmethod
    def parse(cls, text: str, at: datetime | None = None) -> DingTalkHealth:
        """Given the stored text (and when it was written), return the health; unknown text reads as an
        error with the text as its reason, so nothing a store holds is hidden."""
        state, _, reason = text.partition(":")
        try:
            return cls(HealthState(state.strip()), reason.strip(), at)
        except ValueError:
            return cls(HealthState.ERROR, text.strip(), at)


def utc_now() -> datetime:
    """Return the host's current time, timezone-aware in UTC (the default clock everywhere)."""
    return datetime.now(timezone.utc)
