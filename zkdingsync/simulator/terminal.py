"""One fake ZK terminal: its state (users, attendance log, clock, enabled flag), the protocol it speaks
over TCP and UDP on one port, and the faults it can be told to show.

The terminal's state is guarded by a lock, so tests may call its methods from any thread while the
simulator's event loop serves clients. Everything about sockets runs on that loop.

Protocol facts come from `/work/shared/reference/zk-protocol.md`. Behaviour worth knowing:

- A comm key other than 0 makes CONNECT answer ACK_UNAUTH; AUTH must then carry
  make_commkey(key, session) (any ticks byte), otherwise ACK_UNAUTH again. Commands from a session that
  is not connected and authenticated get ACK_UNAUTH.
- DISABLEDEVICE keeps the terminal disabled until some session sends ENABLEDEVICE (a disconnect does not
  re-enable it), so a test can see a client that forgot to re-enable. While disabled, nobody can punch:
  punches added through the API are held in `pending_punches` and land in the log on ENABLEDEVICE.
- PREPARE_BUFFER snapshots the table; READ_BUFFER serves chunks of that snapshot until FREE_DATA.
- A client's ACK_OK (its acknowledgement of a live event) is never answered; every other command is
  (unknown ones with ACK_UNKNOWN).
- Live events go one per packet, the next only after the client acknowledged the previous one (or
  after `EVENT_ACK_TIMEOUT_SECONDS`).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import random
import socket
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar
from zoneinfo import ZoneInfo

import structlog

from zkdingsync.devices import records as codec
from zkdingsync.model import AttendanceRecord, TerminalUser
from zkdingsync.simulator import protocol as p

log = structlog.get_logger(__name__)

EVENT_ACK_TIMEOUT_SECONDS = 1.0
UDP_SESSION_IDLE_SECONDS = 300.0
MAX_TCP_PACKET = 1 << 20
DEFAULT_FIRST_PUNCH = "2024-01-01 08:00:00"


def make_users(count: int) -> list[TerminalUser]:
    """Return `count` deterministic users: uid i (from 1), enroll number str(1000 + i), a short name
    that fits both user-table layouts."""
    return [
        TerminalUser(uid=i, enroll_number=str(1000 + i), name=f"User{i}" if i < 10_000 else f"U{i}")
        for i in range(1, count + 1)
    ]


def history_start(count: int, timezone: str = "Asia/Shanghai", step_seconds: int = 60) -> str:
    """Return the wall-clock start (in `timezone`) of `count` punches `step_seconds` apart that end about
    now: a history DingTalk accepts (its window is 180 days), for the demo and `simulate`."""
    start = datetime.now(ZoneInfo(timezone)) - timedelta(seconds=step_seconds * (count + 1))
    return start.strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class TerminalSpec:
    """How to build a fake terminal. `users` is a list of users or a count for `make_users`; `records`
    is the number of deterministic punches it starts with; `port` 0 picks a free port (TCP and UDP)."""

    serial: str = "SIM0000001"
    name: str = ""  # ~DeviceName; defaults to the serial
    record_size: int = 40  # 8, 16, 40 or 49
    user_table_size: int = 72  # 28 or 72
    users: Sequence[TerminalUser] | int = 10
    records: int = 0
    comm_key: int = 0
    capacity: int = 100_000
    user_capacity: int = 10_000
    timezone: str = "Asia/Shanghai"
    clock_offset_seconds: float = 0.0
    port: int = 0
    firmware: str = "Ver 6.60 Apr 28 2017"
    platform: str = "ZMM220_TFT"
    mac: str = ""  # defaults to one derived from the serial
    inline_buffers: bool = False  # answer PREPARE_BUFFER with CMD_DATA inline when the buffer is small
    first_punch: str = DEFAULT_FIRST_PUNCH  # wall-clock time of the first of `records` (see history_start)
    overwrite_when_full: bool = False  # a full log drops its oldest record for a new punch (else refuses)

    def __post_init__(self) -> None:
        if self.record_size not in codec.RECORD_SIZES:
            raise ValueError(f"record_size must be one of {codec.RECORD_SIZES}, not {self.record_size}")
        if self.user_table_size not in codec.USER_TABLE_SIZES:
            raise ValueError(f"user_table_size must be 28 or 72, not {self.user_table_size}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range")
        if self.capacity < 0 or self.records > self.capacity:
            raise ValueError(f"records ({self.records}) must be between 0 and capacity ({self.capacity})")
        ZoneInfo(self.timezone)  # fail early on an unknown zone


class FaultKind(str, enum.Enum):
    """What a fault does (see `Fault`)."""

    DELAY = "delay"
    DROP_MID_DOWNLOAD = "drop_mid_download"
    REFUSE = "refuse"
    GARBAGE = "garbage"
    PUNCH_DURING_DOWNLOAD = "punch_during_download"


@dataclass(frozen=True)
class Fault:
    """A misbehaviour to switch on with `FakeTerminal.set_fault()`; use the constructors.

    - `Fault.delay(seconds, command=None)`: wait `seconds` before answering (only `command`, e.g.
      `protocol.CMD_READ_BUFFER`, when given). Beyond the client's timeout the client sees a timeout and
      the late reply then sits in its socket.
    - `Fault.drop_mid_download(after_bytes=1000)`: on READ_BUFFER send PREPARE_DATA and the first
      `after_bytes` bytes of the chunk, then close the connection (TCP: FIN; UDP: stop sending). This is
      a terminal losing power mid-download; pyzk 0.9 spins forever on it.
    - `Fault.refuse()`: accept TCP connections and close them at once; ignore UDP datagrams. (To stop
      listening altogether use `FakeTerminal.power_off()`.)
    - `Fault.garbage(command=None, raw=False)`: corrupt replies. raw=False keeps the framing and fills
      the payload with random bytes (READ_BUFFER: the data chunk; a plain ACK gets 16 stray payload
      bytes); raw=True sends random unframed bytes instead of the reply.
    - `Fault.punch_during_download(enroll_number)`: when a session that asked GET_FREE_SIZES then asks
      PREPARE_BUFFER for the log, a punch is added just before the snapshot, so the count and the bytes
      disagree. Like any punch it is held back while the terminal is disabled.

    `once=True` makes the fault fire a single time, then clear itself.
    """

    kind: FaultKind
    command: int | None = None
    seconds: float = 0.0
    after_bytes: int = 1000
    raw: bool = False
    enroll_number: str = ""
    once: bool = False

    @classmethod
    def delay(cls, seconds: float, command: int | None = None, once: bool = False) -> Fault:
        """Answer late: wait `seconds` before replying (to `command` only, when given)."""
        return cls(FaultKind.DELAY, command=command, seconds=seconds, once=once)

    @classmethod
    def drop_mid_download(cls, after_bytes: int = 1000, once: bool = False) -> Fault:
        """Close the connection after sending `after_bytes` bytes of a READ_BUFFER chunk."""
        return cls(FaultKind.DROP_MID_DOWNLOAD, command=p.CMD_READ_BUFFER, after_bytes=after_bytes, once=once)

    @classmethod
    def refuse(cls) -> Fault:
        """Close every TCP connection as soon as it is accepted; ignore UDP."""
        return cls(FaultKind.REFUSE)

    @classmethod
    def garbage(cls, command: int | None = None, raw: bool = False, once: bool = False) -> Fault:
        """Answer with random bytes (framed with a garbage payload, or raw unframed bytes)."""
        return cls(FaultKind.GARBAGE, command=command, raw=raw, once=once)

    @classmethod
    def punch_during_download(cls, enroll_number: str, once: bool = True) -> Fault:
        """Add a punch between the size query and the log snapshot of a download."""
        return cls(
            FaultKind.PUNCH_DURING_DOWNLOAD,
            command=p.CMD_PREPARE_BUFFER,
            enroll_number=enroll_number,
            once=once,
        )


@dataclass(eq=False)  # identity: sessions live in sets
class _Session:
    """One client conversation: a TCP connection, or a UDP peer address."""

    send: Callable[[bytes], None]  # send one packet (the transport adds the TCP prefix)
    udp: bool
    session_id: int = 0
    connected: bool = False  # CONNECT seen
    authenticated: bool = False
    buffer: bytes | None = None  # PREPARE_BUFFER snapshot
    sizes_answered: bool = False
    registered: bool = False  # REG_EVENT with the attendance flag
    events: deque[bytes] = field(default_factory=deque)
    awaiting_ack: asyncio.TimerHandle | None = None
    last_seen: float = 0.0
    inbox: asyncio.Queue[bytes] | None = None  # UDP: datagrams waiting to be answered in order


@dataclass
class _Reply:
    """What the protocol layer wants sent for one request."""

    packets: list[bytes]
    close_after: bool = False


class FakeTerminal:
    """A fake ZK terminal listening on one port (TCP and UDP). Build it with `Simulator.add_terminal()`.

    Public attributes and methods are safe to use from any thread.
    """

    def __init__(self, spec: TerminalSpec, loop: asyncio.AbstractEventLoop, host: str) -> None:
        self.spec = spec
        self.host = host
        self._loop = loop
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
        self._connections = 0
        self._command_counts: dict[int, int] = {}
        self._random = random.Random(spec.serial)
        self._session_ids = itertools.count(self._random.randint(1, 30000))
        self._sessions: set[_Session] = set()  # loop thread only
        self._udp_sessions: dict[tuple[str, int], _Session] = {}  # loop thread only
        self._servers: list[asyncio.AbstractServer] = []
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._punch_timer: asyncio.TimerHandle | None = None
        self._punch_cycle = 0
        self.port = spec.port
        if spec.records:
            self.add_punches(spec.records, first=spec.first_punch)

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

    @property
    def active_sessions(self) -> int:
        """Sessions currently open (TCP connections after CONNECT, UDP peers not yet gone)."""
        return sum(1 for s in list(self._sessions) if s.connected)

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
        base = codec.encode_local_time(first)
        base_day, base_second = divmod(base, 86_400)
        base_date = datetime(*codec.decode_time(base_day * 86_400)).date()  # noqa: DTZ001 - wall clock
        day_values: dict[int, int] = {}
        size = self.spec.record_size
        chunks: list[bytes] = []
        for i in range(start, start + count):
            user = users[i % len(users)]
            # Walk real calendar days (the encoding has 31-day months), caching each day's encoding.
            day_offset, second = divmod(base_second + step_seconds * i, 86_400)
            day_value = day_values.get(day_offset)
            if day_value is None:
                day = base_date + timedelta(days=day_offset)
                day_value = day_values[day_offset] = codec.encode_time(day.year, day.month, day.day, 0, 0, 0)
            record = AttendanceRecord(user.enroll_number, first, 1, i % 2, 0, user.uid)
            chunks.append(codec.encode_record(record, size, time_value=day_value + second))
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

    def swap(self, serial: str, records: int = 0) -> None:
        """Behave as a replacement unit: new serial, a log of `records` fresh punches (default empty),
        every open session dropped, enabled again. Users are kept."""
        with self._lock:
            self._serial = serial
            self._log.clear()
            self._pending.clear()
            self._enabled = True
        if records:
            self.add_punches(records)
        self._run_in_loop(self._drop_sessions)

    def set_fault(self, fault: Fault) -> None:
        """Switch a fault on (see `Fault`). Several may be active at once."""
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        """Switch every fault off."""
        with self._lock:
            self._faults.clear()

    def punch_every(self, seconds: float, enroll_numbers: Sequence[str] | None = None) -> None:
        """Make a punch every `seconds` at the terminal's clock, users (or `enroll_numbers`) in turn,
        until `stop_punching()`."""
        cycle = list(enroll_numbers) if enroll_numbers else [u.enroll_number for u in self.users] or ["1"]

        def tick() -> None:
            enroll = cycle[self._punch_cycle % len(cycle)]
            self._punch_cycle += 1
            self.add_punch(enroll, punch_state=self._punch_cycle % 2)
            self._punch_timer = self._loop.call_later(seconds, tick)

        def start() -> None:
            if self._punch_timer is not None:
                self._punch_timer.cancel()
            self._punch_timer = self._loop.call_later(seconds, tick)

        self._run_in_loop(start)

    def stop_punching(self) -> None:
        """Stop the punches started by `punch_every`."""

        def stop() -> None:
            if self._punch_timer is not None:
                self._punch_timer.cancel()
                self._punch_timer = None

        self._run_in_loop(stop)

    def power_off(self) -> None:
        """Stop listening and drop every connection (connecting then fails with "connection refused")."""
        asyncio.run_coroutine_threadsafe(self._stop_listening(), self._loop).result(timeout=10)

    def power_on(self) -> None:
        """Listen again on the same port."""
        asyncio.run_coroutine_threadsafe(self.start_listening(), self._loop).result(timeout=10)

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
            self._run_in_loop(lambda: self._broadcast(stored))
        return not full

    def _run_in_loop(self, callback: Callable[[], None]) -> None:
        if self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            callback()
        else:
            self._loop.call_soon_threadsafe(callback)

    def _take_fault(self, kind: FaultKind, command: int | None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind is kind and (
                    fault.command is None or command is None or fault.command == command
                ):
                    if fault.once:
                        self._faults.remove(fault)
                    return fault
        return None

    # -------------------------------------------------------------------------------- live events

    def _event_payload(self, data: bytes) -> bytes:
        """Turn one stored record into a live-event payload of the layout that goes with the record size."""
        size = self.spec.record_size
        users = {u.uid: u.enroll_number for u in self._users}
        record = codec.parse_attendance_buffer(codec.with_length_prefix(data), 1, users)[1][0]
        when = p.encode_event_time(*codec.decode_time(codec.encode_local_time(record.local_time)))
        if size == 8:
            return struct.pack("<HBB6s", record.uid or 0, record.verify_mode, record.punch_state, when)
        if size == 16:
            return struct.pack(
                "<IBB6s", int(record.enroll_number), record.verify_mode, record.punch_state, when
            )
        user_id = record.enroll_number.encode("utf-8")
        if size == 40:
            return struct.pack("<24sBB6s", user_id, record.verify_mode, record.punch_state, when)
        return struct.pack("<24sBB6s20s", user_id, record.verify_mode, record.punch_state, when, b"")

    def _broadcast(self, stored: list[bytes]) -> None:
        """Queue a live event for each registered session (loop thread)."""
        targets = [s for s in self._sessions if s.registered]
        if not targets:
            return
        payloads = [self._event_payload(data) for data in stored]
        for session in targets:
            for payload in payloads:
                session.events.append(p.build_packet(p.CMD_REG_EVENT, p.EVENT_ATTENDANCE, 0, payload))
            self._pump_events(session)

    def _pump_events(self, session: _Session) -> None:
        """Send the next queued event unless one is waiting for its acknowledgement."""
        if session.awaiting_ack is not None or not session.events:
            return
        if not session.registered:
            session.events.clear()
            return
        session.send(session.events.popleft())

        def timed_out() -> None:
            session.awaiting_ack = None
            self._pump_events(session)

        session.awaiting_ack = self._loop.call_later(EVENT_ACK_TIMEOUT_SECONDS, timed_out)

    def _event_acknowledged(self, session: _Session) -> None:
        if session.awaiting_ack is not None:
            session.awaiting_ack.cancel()
            session.awaiting_ack = None
        self._pump_events(session)

    # ------------------------------------------------------------------------------------ protocol

    def _reply(self, session: _Session, command: int, reply_id: int, payload: bytes = b"") -> bytes:
        return p.build_packet(command, session.session_id, reply_id, payload)

    def _handle(self, session: _Session, command: int, reply_id: int, payload: bytes) -> _Reply:
        """Answer one request (loop thread). Returns the packets to send, in order."""
        with self._lock:
            self._command_counts[command] = self._command_counts.get(command, 0) + 1

        def ok(data: bytes = b"") -> _Reply:
            return _Reply([self._reply(session, p.CMD_ACK_OK, reply_id, data)])

        def answer(code: int) -> _Reply:
            return _Reply([self._reply(session, code, reply_id)])

        if command == p.CMD_CONNECT:
            session.session_id = next(self._session_ids) % 0xFFFE + 1
            session.connected = True
            session.authenticated = self.spec.comm_key == 0
            session.buffer = None
            if not session.authenticated:
                return answer(p.CMD_ACK_UNAUTH)
            self._count_connection()
            return ok()
        if command == p.CMD_AUTH:
            if session.connected and p.commkey_matches(payload, self.spec.comm_key, session.session_id):
                if not session.authenticated:
                    session.authenticated = True
                    self._count_connection()
                return ok()
            return answer(p.CMD_ACK_UNAUTH)
        if command == p.CMD_EXIT:
            reply = ok()
            reply.close_after = True
            return reply
        if not (session.connected and session.authenticated):
            return answer(p.CMD_ACK_UNAUTH)
        handler = self._handlers.get(command)
        if handler is None:
            return answer(p.CMD_ACK_UNKNOWN)
        return handler(self, session, reply_id, payload)

    def _count_connection(self) -> None:
        with self._lock:
            self._connections += 1

    def _on_enable(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        with self._lock:
            self._enabled = True
            pending, self._pending = self._pending, []
        if pending:
            self._store(pending)
        return _Reply([self._reply(session, p.CMD_ACK_OK, reply_id)])

    def _on_disable(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        with self._lock:
            self._enabled = False
        return _Reply([self._reply(session, p.CMD_ACK_OK, reply_id)])

    def _on_version(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        return _Reply([self._reply(session, p.CMD_ACK_OK, reply_id, self.spec.firmware.encode() + b"\x00")])

    def _options(self) -> dict[str, str]:
        # A stable, plausible MAC (ZKTeco's OUI) derived from the serial.
        mac = self.spec.mac or ":".join(
            f"{b:02x}" for b in b"\x00\x17\x61" + zlib.crc32(self._serial.encode()).to_bytes(4, "little")[:3]
        )
        return {
            "~SerialNumber": self._serial,
            "~DeviceName": self.spec.name or self._serial,
            "~Platform": self.spec.platform,
            "MAC": mac,
            "~ZKFPVersion": "10",
        }

    def _on_options(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        key = payload.split(b"\x00", 1)[0].decode("ascii", errors="replace")
        with self._lock:
            value = self._options().get(key)
        if value is None:
            return _Reply([self._reply(session, p.CMD_ACK_ERROR, reply_id)])
        return _Reply([self._reply(session, p.CMD_ACK_OK, reply_id, f"{key}={value}\x00".encode())])

    def _on_get_time(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        now = self.terminal_time()
        try:
            value = codec.encode_time(now.year, now.month, now.day, now.hour, now.minute, now.second)
        except ValueError:
            return _Reply([self._reply(session, p.CMD_ACK_ERROR, reply_id)])
        return _Reply([self._reply(session, p.CMD_ACK_OK, reply_id, struct.pack("<I", value))])

    def _on_set_time(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        try:
            (value,) = struct.unpack_from("<I", payload)
            wanted = datetime(*codec.decode_time(value))  # noqa: DTZ001 - terminal wall clock, naive
        except (struct.error, ValueError):
            return _Reply([self._reply(session, p.CMD_ACK_ERROR, reply_id)])
        host_local = datetime.now(self._zone).replace(tzinfo=None)
        self.set_clock_offset(round((wanted - host_local).total_seconds()))
        return _Reply([self._reply(session, p.CMD_ACK_OK, reply_id)])

    def _on_free_sizes(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        fields = [0] * 23
        with self._lock:
            records = self._record_count()
            users = len(self._users)
        fields[4] = users
        fields[8] = records
        fields[14] = 3000  # finger capacity
        fields[15] = self.spec.user_capacity
        fields[16] = self.spec.capacity
        fields[17] = 3000
        fields[18] = max(0, self.spec.user_capacity - users)
        fields[19] = max(0, self.spec.capacity - records)
        fields[22] = 0  # face capacity
        session.sizes_answered = True
        return _Reply([self._reply(session, p.CMD_ACK_OK, reply_id, struct.pack("<23i", *fields))])

    def _on_prepare_buffer(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        try:
            _, table, _fct, _ext = struct.unpack_from("<bhii", payload)
        except struct.error:
            return _Reply([self._reply(session, p.CMD_ACK_ERROR, reply_id)])
        if table == p.BUFFER_ATTENDANCE_LOG:
            fault = self._take_fault(FaultKind.PUNCH_DURING_DOWNLOAD, p.CMD_PREPARE_BUFFER)
            if fault is not None and session.sizes_answered:
                self.add_punch(fault.enroll_number or "1")
            with self._lock:
                buffer = codec.with_length_prefix(bytes(self._log))
        elif table == p.BUFFER_USER_TABLE:
            with self._lock:
                buffer = codec.encode_user_table_buffer(self._users, self.spec.user_table_size)
        else:
            return _Reply([self._reply(session, p.CMD_ACK_ERROR, reply_id)])
        if self.spec.inline_buffers and len(buffer) <= p.UDP_DATA_PAYLOAD - 8:
            session.buffer = None
            return _Reply([self._reply(session, p.CMD_DATA, reply_id, buffer)])
        session.buffer = buffer
        return _Reply(
            [self._reply(session, p.CMD_ACK_OK, reply_id, struct.pack("<BIII", 0, len(buffer), 0, 0))]
        )

    def _on_read_buffer(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        try:
            start, size = struct.unpack_from("<ii", payload)
        except struct.error:
            return _Reply([self._reply(session, p.CMD_ACK_ERROR, reply_id)])
        buffer = session.buffer
        limit = p.MAX_UDP_CHUNK if session.udp else p.MAX_TCP_CHUNK
        if buffer is None or start < 0 or size <= 0 or size > limit or start >= len(buffer):
            return _Reply([self._reply(session, p.CMD_ACK_ERROR, reply_id)])
        chunk = buffer[start : start + size]
        packets = [self._reply(session, p.CMD_PREPARE_DATA, reply_id, struct.pack("<II", len(chunk), 0))]
        if session.udp:
            for offset in range(0, len(chunk), p.UDP_DATA_PAYLOAD):
                part = chunk[offset : offset + p.UDP_DATA_PAYLOAD]
                packets.append(self._reply(session, p.CMD_DATA, reply_id, part))
        else:
            packets.append(self._reply(session, p.CMD_DATA, reply_id, chunk))
        packets.append(self._reply(session, p.CMD_ACK_OK, reply_id))
        return _Reply(packets)

    def _on_free_data(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        session.buffer = None
        return _Reply([self._reply(session, p.CMD_ACK_OK, reply_id)])

    def _on_clear_log(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        with self._lock:
            self._log.clear()
        return _Reply([self._reply(session, p.CMD_ACK_OK, reply_id)])

    def _on_reg_event(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        flags = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
        session.registered = bool(flags & p.EVENT_ATTENDANCE)
        if not session.registered:
            session.events.clear()
        return _Reply([self._reply(session, p.CMD_ACK_OK, reply_id)])

    def _on_plain_ok(self, session: _Session, reply_id: int, payload: bytes) -> _Reply:
        return _Reply([self._reply(session, p.CMD_ACK_OK, reply_id)])

    _handlers: ClassVar[dict[int, Callable[[FakeTerminal, _Session, int, bytes], _Reply]]] = {
        p.CMD_ENABLEDEVICE: _on_enable,
        p.CMD_DISABLEDEVICE: _on_disable,
        p.CMD_GET_VERSION: _on_version,
        p.CMD_OPTIONS_RRQ: _on_options,
        p.CMD_GET_TIME: _on_get_time,
        p.CMD_SET_TIME: _on_set_time,
        p.CMD_GET_FREE_SIZES: _on_free_sizes,
        p.CMD_PREPARE_BUFFER: _on_prepare_buffer,
        p.CMD_READ_BUFFER: _on_read_buffer,
        p.CMD_FREE_DATA: _on_free_data,
        p.CMD_CLEAR_ATTLOG: _on_clear_log,
        p.CMD_REG_EVENT: _on_reg_event,
        p.CMD_CANCELCAPTURE: _on_plain_ok,
        p.CMD_STARTVERIFY: _on_plain_ok,
    }

    def _garbage(self, packets: list[bytes], raw: bool, command: int) -> list[bytes]:
        """Replace a reply with random bytes, keeping the framing unless `raw`."""
        if raw:
            return [self._random.randbytes(self._random.randint(16, 64))]
        corrupted = []
        for packet in packets:
            code, _, session_id, reply_id, payload = p.parse_header(packet)
            if command == p.CMD_READ_BUFFER and code != p.CMD_DATA:
                corrupted.append(packet)  # keep the chunk framing intact, spoil only the data
                continue
            junk = self._random.randbytes(len(payload) or 16)
            corrupted.append(p.build_packet(code, session_id, reply_id, junk))
        return corrupted

    # ---------------------------------------------------------------------------------- transports

    async def start_listening(self) -> None:
        """Bind TCP and UDP on the same port (a free one when the spec says 0) and serve (loop thread)."""
        last_error: OSError | None = None
        for _attempt in range(50):
            server = await asyncio.start_server(
                self._serve_tcp, self.host, self.port, reuse_address=True, backlog=128
            )
            port = server.sockets[0].getsockname()[1]
            try:
                transport, _ = await self._loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(self.host, port)
                )
            except OSError as error:  # the UDP side of a free TCP port can be taken: try another port
                server.close()
                last_error = error
                if self.port:
                    raise
                continue
            self.port = port
            self._servers = [server]
            self._udp_transport = transport
            return
        raise OSError(f"no port free for both TCP and UDP: {last_error}")

    async def _stop_listening(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []
        if self._udp_transport is not None:
            self._udp_transport.close()
            self._udp_transport = None
        self._drop_sessions()

    async def close(self) -> None:
        """Stop listening, drop every connection, cancel timers and tasks (loop thread)."""
        if self._punch_timer is not None:
            self._punch_timer.cancel()
        await self._stop_listening()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _drop_sessions(self) -> None:
        for writer in list(self._tcp_writers):
            writer.close()
        self._tcp_writers.clear()
        for session in list(self._sessions):
            if session.awaiting_ack is not None:
                session.awaiting_ack.cancel()
            session.registered = False
        self._sessions.clear()
        self._udp_sessions.clear()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One TCP connection: read framed requests, answer each in order."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Without it every chunk of a buffered read waits ~45 ms on Nagle + delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._take_fault(FaultKind.REFUSE, None) is not None:
            writer.close()
            if task is not None:
                self._tasks.discard(task)
            return
        self._tcp_writers.add(writer)

        def send(packet: bytes) -> None:
            if not writer.is_closing():
                writer.write(p.tcp_frame(packet))

        session = _Session(send=send, udp=False)
        self._sessions.add(session)
        try:
            while True:
                prefix = await reader.readexactly(p.TCP_PREFIX.size)
                magic, length = p.TCP_PREFIX.unpack(prefix)
                if magic != p.TCP_MAGIC or not p.HEADER.size <= length <= MAX_TCP_PACKET:
                    log.debug("simulator.bad_frame", serial=self._serial, port=self.port)
                    break
                packet = await reader.readexactly(length)
                if not await self._serve_request(session, packet, writer):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away (pyzk's probe connection does this on purpose)
        except asyncio.CancelledError:
            # The terminal is closing. This is the task's top frame: ending quietly keeps asyncio's
            # stream callback (which calls task.exception()) from logging a spurious traceback.
            pass
        finally:
            self._end_session(session)
            self._tcp_writers.discard(writer)
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _end_session(self, session: _Session) -> None:
        if session.awaiting_ack is not None:
            session.awaiting_ack.cancel()
            session.awaiting_ack = None
        session.registered = False
        self._sessions.discard(session)

    async def _serve_request(
        self, session: _Session, packet: bytes, writer: asyncio.StreamWriter | None
    ) -> bool:
        """Answer one request, applying faults. Returns False when the conversation is over."""
        command, _check, _session_id, reply_id, payload = p.parse_header(packet)
        session.last_seen = time.monotonic()
        if command == p.CMD_ACK_OK:
            self._event_acknowledged(session)  # a client acknowledging a live event: never answered
            return True
        delay = self._take_fault(FaultKind.DELAY, command)
        if delay is not None:
            await asyncio.sleep(delay.seconds)
        reply = self._handle(session, command, reply_id, payload)
        packets = reply.packets
        garbage = self._take_fault(FaultKind.GARBAGE, command)
        if garbage is not None:
            packets = self._garbage(packets, garbage.raw, command)
        if command == p.CMD_READ_BUFFER and len(packets) > 2:
            drop = self._take_fault(FaultKind.DROP_MID_DOWNLOAD, command)
            if drop is not None:
                self._send_partial(session, packets, drop.after_bytes, writer)
                return False
        for out in packets:
            session.send(out)
        if reply.close_after:
            self._end_session(session)
            return False
        return True

    def _send_partial(
        self, session: _Session, packets: list[bytes], after_bytes: int, writer: asyncio.StreamWriter | None
    ) -> None:
        """Send PREPARE_DATA and `after_bytes` bytes of the chunk, then stop (the drop fault)."""
        session.send(packets[0])
        if writer is not None:
            data = b"".join(p.tcp_frame(packet) for packet in packets[1:-1])
            writer.write(data[: p.TCP_PREFIX.size + p.HEADER.size + max(0, after_bytes)])
            writer.close()
        else:
            sent = 0
            for packet in packets[1:-1]:
                if sent >= after_bytes:
                    break
                session.send(packet)
                sent += len(packet) - p.HEADER.size
        self._end_session(session)

    # UDP --------------------------------------------------------------------------------------

    def _udp_datagram(
        self, data: bytes, address: tuple[str, int], transport: asyncio.DatagramTransport
    ) -> None:
        if self._take_fault(FaultKind.REFUSE, None) is not None:
            return
        now = time.monotonic()
        session = self._udp_sessions.get(address)
        if session is None:
            self._expire_udp_sessions(now)

            def send(packet: bytes) -> None:
                if not transport.is_closing():
                    transport.sendto(packet, address)

            session = _Session(send=send, udp=True, last_seen=now, inbox=asyncio.Queue())
            self._udp_sessions[address] = session
            self._sessions.add(session)
            task = self._loop.create_task(self._serve_udp(session, address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if session.inbox is not None:
            session.inbox.put_nowait(data)

    async def _serve_udp(self, session: _Session, address: tuple[str, int]) -> None:
        """One UDP peer: answer its datagrams in order (a delay fault must hold back later ones too)."""
        inbox = session.inbox
        if inbox is None:
            return
        try:
            while self._udp_sessions.get(address) is session:
                try:
                    packet = await asyncio.wait_for(inbox.get(), timeout=UDP_SESSION_IDLE_SECONDS)
                except asyncio.TimeoutError:
                    break
                try:
                    keep = await self._serve_request(session, packet, None)
                except ValueError:
                    continue  # shorter than a header: ignore, as a terminal would
                if not keep:
                    break
        finally:
            if self._udp_sessions.get(address) is session:
                del self._udp_sessions[address]
            self._end_session(session)

    def _expire_udp_sessions(self, now: float) -> None:
        for address, session in list(self._udp_sessions.items()):
            if now - session.last_seen > UDP_SESSION_IDLE_SECONDS:
                del self._udp_sessions[address]
                self._end_session(session)


class _UdpProtocol(asyncio.DatagramProtocol):
    """Hands every datagram to the terminal (loop thread)."""

    def __init__(self, terminal: FakeTerminal) -> None:
        self.terminal = terminal
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.terminal._udp_datagram(data, addr, self.transport)
