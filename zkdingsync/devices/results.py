"""What reading a terminal yields: its state, and the log read (whole, a tail, or nothing new)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from zkdingsync.devices.records import parse_records
from zkdingsync.model import AttendanceRecord, TerminalInfo

# A terminal reporting more records than this is refused before anything is downloaded: no terminal
# we know of holds more, and a download is sized by the count (a garbled count must not size it).
MAX_RECORDS = 1_000_000


@dataclass(frozen=True)
class LogTail:
    """The end of a terminal's log as the store holds it: enough to read only what is new next time."""

    serial: str
    record_size: int
    record_count: int
    last_record: bytes  # the raw bytes of the last record stored


@dataclass(frozen=True)
class LogDigest:
    """A fingerprint of a downloaded log: lets the next download skip re-parsing the records it
    already delivered to the store, after proving by hash that they are byte for byte unchanged."""

    serial: str
    record_size: int
    record_count: int
    digest: bytes


@dataclass(frozen=True)
class KnownLog:
    """What the daemon already knows of a terminal's log, handed to `read_log`; each field lets the
    read skip work, and `KnownLog.NOTHING` (a terminal never read) skips nothing.

    `serial` and `count`: when the terminal reports both unchanged (and its log is not full), the log
    is not read at all; `count=None` asks for a whole-log read (a tail read needs it too). `digest`:
    a whole read does not return again the prefix it proves byte-identical. `tail`: only the records
    after the stored last one are read. `offset_reads=False`: the firmware does not serve reads from
    an offset, so no tail read is tried.
    """

    NOTHING: ClassVar[KnownLog]

    serial: str | None = None
    count: int | None = None
    digest: LogDigest | None = None
    tail: LogTail | None = None
    offset_reads: bool = True


KnownLog.NOTHING = KnownLog()


@dataclass(frozen=True)
class TerminalState:
    """What one session learned about a terminal. `clock` is None when the terminal's clock names an
    impossible date; `firmware`/`platform` are None when the session did not ask (an unchanged poll)."""

    serial: str
    users: int
    user_capacity: int
    record_count: int
    record_capacity: int
    clock_text: str  # the terminal's wall clock as it reports it
    clock: datetime | None  # that wall clock read in the configured zone
    read_at: datetime  # host time (UTC) right after the clock was read
    firmware: str | None = None
    platform: str | None = None

    @property
    def drift_seconds(self) -> float | None:
        """Terminal clock minus host clock in seconds (positive: the terminal is ahead), or None."""
        if self.clock is None:
            return None
        return (self.clock - self.read_at).total_seconds()

    @property
    def log_full(self) -> bool:
        """True when the log is at capacity: the count then says nothing about new punches (terminals
        that rotate a full log keep the count constant), so the log must be read anyway."""
        return self.record_capacity > 0 and self.record_count >= self.record_capacity

    @property
    def info(self) -> TerminalInfo | None:
        """The state as the shared `TerminalInfo`, or None if firmware/platform were not read or the
        clock is unreadable."""
        if self.firmware is None or self.platform is None or self.clock is None:
            return None
        return TerminalInfo(
            serial=self.serial,
            firmware=self.firmware,
            platform=self.platform,
            terminal_time=self.clock,
            users=self.users,
            user_capacity=self.user_capacity,
            records=self.record_count,
            record_capacity=self.record_capacity,
        )


@dataclass(frozen=True)
class LogRead:
    """The outcome of `read_log`.

    `downloaded` is False when nothing had to be read (serial and count unchanged, or the last record
    of a full log is still the one stored) and when `needs_full` says a whole-log read is due but was
    not allowed. Otherwise `body` holds the raw records from index `first_index` on: everything after
    a proven-unchanged prefix (`full`: the whole log was read) or just the new records of a tail read.
    `tail` describes the log's end for the next tail read. `offset_reads` is what this read learned
    about the firmware (None: nothing), with `offset_problem` saying why when False.
    """

    state: TerminalState
    downloaded: bool
    record_size: int | None = None
    body: bytes | bytearray | memoryview = b""
    first_index: int = 0
    digest: LogDigest | None = None
    # 8-byte logs only: the user table read with the log (uid -> enroll number).
    users_by_uid: dict[int, str] | None = None
    full: bool = False
    tail: LogTail | None = None
    needs_full: bool = False
    offset_reads: bool | None = None
    offset_problem: str = ""
    log_bytes: int = 0  # bytes of the log read from the terminal (the whole buffer or the tail ranges)

    @property
    def new_count(self) -> int:
        """How many records `body` holds."""
        return len(self.body) // self.record_size if self.record_size else 0

    def batches(self, size: int) -> Iterator[list[AttendanceRecord]]:
        """Yield the records of `body` parsed, at most `size` at a time, in log order (8-byte records
        carry the enroll numbers of `users_by_uid`, str(uid) when the uid is not in it)."""
        record_size = self.record_size
        if not record_size:
            return
        step = max(1, size) * record_size
        view = memoryview(self.body)
        for start in range(0, len(view), step):
            yield parse_records(view[start : start + step], record_size, self.users_by_uid)

    @property
    def records(self) -> list[AttendanceRecord]:
        """All the records of `body`, parsed."""
        return [record for batch in self.batches(len(self.body) or 1) for record in batch]
