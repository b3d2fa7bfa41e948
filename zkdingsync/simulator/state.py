"""A fake terminal's memory: users, attendance log, clock, enabled flag, counters and the faults
switched on. Guarded by a lock, so tests may change it from any thread while the event loop serves
clients from it. Protocol and sockets live elsewhere (`dispatch.py`, `transport.py`).

While the terminal is disabled nobody can punch: punches are held in `pending_punches` and land in
the log on ENABLEDEVICE. A full log refuses a punch, or drops its oldest record for it
(`TerminalSpec.overwrite_when_full`).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from zkdingsync.devices import records as codec
from zkdingsync.model import AttendanceRecord, TerminalUser
from zkdingsync.simulator.faults import Fault, FaultKind
from zkdingsync.simulator.spec import DEFAULT_FIRST_PUNCH, TerminalSpec, make_users


class TerminalData:
    """The state of one fake terminal (see the module docstring). Public members are thread-safe."""

    def __init__(self, spec: TerminalSpec) -> None:
        self.spec = spec
        self._lock = threading.RLock()
        self._zone = ZoneInfo(spec.timezone)
        self._serial = spec.serial
        self._users: list[TerminalUser] = list(
            make_users(spec.users) if isinstance(spec.users, int) else spec.users
        )
        codec.encode_user_table(self._users, spec.user_table_size)  # fail early on unrepresentable users
        self._log = bytearray()
        self._pending: list[bytes] = []
        self._enabled = True
        self._clock_offset = spec.clock_offset_seconds
        self._faults: list[Fault] = []
        self._rejected = 0
        self._disabled_at: float | None = None  # monotonic time of the DISABLEDEVICE now in force
        self._last_disabled = 0.0
        self._connections = 0
        self._command_counts: dict[int, int] = {}
        self.random = random.Random(spec.serial)
        if spec.records:
            self.add_punches(spec.records, first=spec.first_punch)

    def announce(self, stored: list[bytes]) -> None:
        """Called (outside the lock) with the records just appended to the log; the terminal pushes
        live events from here."""

    # ------------------------------------------------------------------------------ state for tests

    @property
    def serial(self) -> str:
        """The serial number the terminal reports (changes with `swap`)."""
        with self._lock:
            return self._serial

    @property
    def enabled(self) -> bool:
        """False between a client's DISABLEDEVICE and the next ENABLEDEVICE."""
        with self._lock:
            return self._enabled

    @property
    def records(self) -> list[AttendanceRecord]:
        """A copy of the attendance log, parsed (8-byte records resolve enroll numbers via the users)."""
        with self._lock:
            data, count = bytes(self._log), self._record_count()
            users = {u.uid: u.enroll_number for u in self._users}
        return codec.parse_attendance_buffer(codec.with_length_prefix(data), count, users)[1]

    @property
    def record_count(self) -> int:
        """Number of records in the log."""
        with self._lock:
            return self._record_count()

    @property
    def last_disabled_seconds(self) -> float:
        """How long the terminal was disabled the last time a client disabled and re-enabled it."""
        with self._lock:
            return self._last_disabled

    @property
    def pending_punches(self) -> int:
        """Punches made while the terminal was disabled, waiting for ENABLEDEVICE."""
        with self._lock:
            return len(self._pending)

    @property
    def rejected_punches(self) -> int:
        """Punches refused because the log was full."""
        with self._lock:
            return self._rejected

    @property
    def users(self) -> list[TerminalUser]:
        """A copy of the enrolled users."""
        with self._lock:
            return list(self._users)

    @property
    def connections(self) -> int:
        """How many sessions have connected (and authenticated) so far."""
        with self._lock:
            return self._connections

    def command_count(self, command: int) -> int:
        """How many requests with this command code the terminal has received."""
        with self._lock:
            return self._command_counts.get(command, 0)

    def terminal_time(self) -> datetime:
        """The terminal's clock now: host time in the terminal's zone plus the offset, naive."""
        with self._lock:
            offset = self._clock_offset
        return datetime.now(self._zone).replace(tzinfo=None) + timedelta(seconds=offset)

    # ---------------------------------------------------------------------------- control for tests

    # ---------------------------------------------------------------------------- control for tests

    def set_clock_offset(self, seconds: float) -> None:
        """Make the terminal clock run `seconds` ahead of (negative: behind) the host clock."""
        with self._lock:
            self._clock_offset = seconds

    def add_punch(
        self,
        enroll_number: str,
        local_time: str | datetime | None = None,
        verify_mode: int = 1,
        punch_state: int = 0,
        workcode: int = 0,
    ) -> AttendanceRecord | None:
        """Record a punch as if made at the terminal, and push a live event to registered clients.

        `local_time` is the terminal's wall clock (text or naive datetime); an aware datetime is
        converted to the terminal's zone; None means the terminal clock now. Returns the record, or
        None when the log is full (the punch is rejected, counted in `rejected_punches`; with
        `overwrite_when_full` the oldest record makes room instead). While the
        terminal is disabled the punch waits in `pending_punches`. Raise ValueError if the punch
        cannot be represented in this terminal's layout.
        """
        text = self._local_text(local_time)
        record = AttendanceRecord(
            enroll_number, text, verify_mode, punch_state, workcode, self._uid_for(enroll_number)
        )
        data = codec.encode_record(record, self.spec.record_size)
        return record if self._store([data]) else None

    def add_raw_record(
        self, enroll_number: str, time_value: int, verify_mode: int = 1, punch_state: int = 0
    ) -> None:
        """Append a record whose time is the raw u32 `time_value` (e.g. an impossible date such as
        encode_time(2024, 2, 31, ...)), bypassing the enabled and capacity checks, without an event."""
        record = AttendanceRecord(
            enroll_number, "2000-01-01 00:00:00", verify_mode, punch_state, 0, self._uid_for(enroll_number)
        )
        data = codec.encode_record(record, self.spec.record_size, time_value=time_value)
        with self._lock:
            self._log += data

    def add_punches(self, count: int, first: str = DEFAULT_FIRST_PUNCH, step_seconds: int = 60) -> int:
        """Append `count` deterministic punches quickly (no events, ignores the enabled flag): users in
        turn (or enroll numbers "1".."100" without users), times `step_seconds` apart starting at
        `first` + step * (records already in the log), punch states cycling 0/1. Stops at capacity;
        returns how many were added."""
        with self._lock:
            count = max(0, min(count, self.spec.capacity - self._record_count()))
            start = self._record_count()
            users = self._users or [TerminalUser(i, str(i), "") for i in range(1, 101)]
        chunks = _deterministic_records(
            users, first, step_seconds, range(start, start + count), self.spec.record_size
        )
        with self._lock:
            self._log += b"".join(chunks)
        return count

    def fill_log(self) -> int:
        """Fill the log to capacity (a full terminal); returns how many punches were added."""
        return self.add_punches(self.spec.capacity)

    def clear_log(self) -> None:
        """Empty the attendance log (and any pending punches)."""
        with self._lock:
            self._log.clear()
            self._pending.clear()

    def set_users(self, users: Sequence[TerminalUser]) -> None:
        """Replace the enrolled users, as an admin deleting or re-enrolling users at the terminal does
        (the log keeps its records; on 8-byte logs a record names only its uid). Raise ValueError if a
        user cannot be represented in this terminal's user table."""
        codec.encode_user_table(users, self.spec.user_table_size)
        with self._lock:
            self._users = list(users)

    def set_fault(self, fault: Fault) -> None:
        """Switch a fault on (see `Fault`). Several may be active at once."""
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        """Switch every fault off."""
        with self._lock:
            self._faults.clear()

    # ---------------------------------------------------------------------- for the protocol layer

    def log_buffer(self) -> bytes:
        """A snapshot of the log as a buffered read serves it (u32 byte count, then the records)."""
        with self._lock:
            return codec.with_length_prefix(bytes(self._log))

    def user_buffer(self) -> bytes:
        """A snapshot of the user table as a buffered read serves it."""
        with self._lock:
            return codec.encode_user_table_buffer(self._users, self.spec.user_table_size)

    def set_enabled(self, enabled: bool) -> None:
        """ENABLEDEVICE / DISABLEDEVICE: enabling lands the punches held while disabled."""
        with self._lock:
            if not enabled and self._enabled:
                self._disabled_at = time.monotonic()
            elif enabled and self._disabled_at is not None:
                self._last_disabled, self._disabled_at = time.monotonic() - self._disabled_at, None
            self._enabled = enabled
            pending, self._pending = (self._pending, []) if enabled else ([], self._pending)
        if pending:
            self._store(pending)

    def set_clock(self, wanted: datetime) -> None:
        """SET_TIME: make the terminal clock show `wanted` (naive terminal wall clock) now."""
        host_local = datetime.now(self._zone).replace(tzinfo=None)
        self.set_clock_offset(round((wanted - host_local).total_seconds()))

    def count_command(self, command: int) -> None:
        """Count one request (see `command_count`)."""
        with self._lock:
            self._command_counts[command] = self._command_counts.get(command, 0) + 1

    def count_connection(self) -> None:
        """Count one authenticated session (see `connections`)."""
        with self._lock:
            self._connections += 1

    def sizes(self) -> tuple[int, int]:
        """(users, records) as GET_FREE_SIZES reports them."""
        with self._lock:
            return len(self._users), self._record_count()

    # ---------------------------------------------------------------------------------- internals

    def _record_count(self) -> int:
        return len(self._log) // self.spec.record_size

    def _local_text(self, local_time: str | datetime | None) -> str:
        if local_time is None:
            local_time = self.terminal_time()
        if isinstance(local_time, datetime):
            if local_time.tzinfo is not None:
                local_time = local_time.astimezone(self._zone).replace(tzinfo=None)
            return local_time.strftime("%Y-%m-%d %H:%M:%S")
        codec.encode_local_time(local_time)  # validate the shape
        return local_time

    def _uid_for(self, enroll_number: str) -> int | None:
        with self._lock:
            for user in self._users:
                if user.enroll_number == enroll_number:
                    return user.uid
        return int(enroll_number) if enroll_number.isdigit() and int(enroll_number) <= 0xFFFF else None

    def _store(self, encoded: Iterable[bytes]) -> bool:
        """Append punches (or hold them while disabled) and announce them; False if the log is full."""
        stored: list[bytes] = []
        full = False
        with self._lock:
            for data in encoded:
                if not self._enabled:
                    self._pending.append(data)
                elif self._record_count() >= self.spec.capacity and not (
                    self.spec.overwrite_when_full and self.spec.capacity
                ):
                    self._rejected += 1
                    full = True
                elif self._record_count() >= self.spec.capacity:
                    del self._log[: self.spec.record_size]  # firmware that rotates a full log
                    self._log += data
                    stored.append(data)
                else:
                    self._log += data
                    stored.append(data)
        if stored:
            self.announce(stored)
        return not full

    def take_fault(self, kind: FaultKind, command: int | None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind is kind and (
                    fault.command is None or command is None or fault.command == command
                ):
                    if fault.once:
                        self._faults.remove(fault)
                    return fault
        return None


def _deterministic_records(
    users: Sequence[TerminalUser], first: str, step_seconds: int, indexes: range, size: int
) -> list[bytes]:
    """Encode the deterministic punches `indexes` of `add_punches` (user i % len(users), time first +
    step * i walking real calendar days, punch state i % 2)."""
    base = codec.encode_local_time(first)
    base_day, base_second = divmod(base, 86_400)
    base_date = datetime(*codec.decode_time(base_day * 86_400)).date()  # noqa: DTZ001 - wall clock
    day_values: dict[int, int] = {}
    chunks: list[bytes] = []
    for i in indexes:
        user = users[i % len(users)]
        # Walk real calendar days (the encoding has 31-day months), caching each day's encoding.
        day_offset, second = divmod(base_second + step_seconds * i, 86_400)
        day_value = day_values.get(day_offset)
        if day_value is None:
            day = base_date + timedelta(days=day_offset)
            day_value = day_values[day_offset] = codec.encode_time(day.year, day.month, day.day, 0, 0, 0)
        record = AttendanceRecord(user.enroll_number, first, 1, i % 2, 0, user.uid)
        chunks.append(codec.encode_record(record, size, time_value=day_value + second))
    return chunks
