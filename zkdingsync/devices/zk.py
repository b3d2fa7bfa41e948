"""The pyzk adapter: the only module that imports `zk`.

Everything a terminal can do wrong (refuse, time out, drop the connection, send garbage, reject the comm
key) leaves this module as ONE `TerminalError(device, reason)` whose reason an admin understands.

pyzk 0.9 is used for framing and the session handshake only, with its traps closed here:

* `ommit_ping=True` always: otherwise pyzk hands the host string to a shell to `ping` it.
* pyzk's own socket set-up (`connect_ex`, errors ignored, plus a throw-away probe connection with a
  hard-coded 10 s timeout) is replaced by ours, so "connection refused" is reported as that and not as
  pyzk's "Broken pipe".
* That socket is wrapped in `_GuardedSocket`, whose `recv` raises on end of file. pyzk 0.9 loops forever
  at 100 % CPU when a terminal closes the connection in the middle of a buffered read (its raw receive
  loop keeps getting b'' and never leaves `while size > 0`). The wrapper also enforces a deadline over the
  whole session (a terminal that drips bytes cannot hold a worker forever), a cap on how many bytes a
  download may bring (a terminal announcing a 4 GB buffer cannot exhaust memory), and a cancel event.
* A fresh `ZK` object per session, discarded after it: after a timeout the late reply stays in the
  socket and every later call would read the wrong answer.
* The log is parsed by `records.parse_attendance_buffer` (linear), never `get_attendance()` (quadratic,
  wrong on 49-byte records, and one bad date fails the whole log).
* The terminal is disabled around the download so no punch lands between the size query and the read;
  the record count is read again after the download and must not have moved.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import structlog
from zk import ZK
from zk.exception import ZKError, ZKErrorResponse, ZKNetworkError

from zkdingsync.devices.records import (
    RECORD_SIZES,
    format_local_time,
    needs_user_table,
    parse_attendance_buffer,
    parse_user_table,
    with_length_prefix,
)
from zkdingsync.errors import RecordFormatError, TerminalError
from zkdingsync.hosts import check_host
from zkdingsync.model import AttendanceRecord, TerminalInfo, TerminalUser, utc_now
from zkdingsync.timeconv import local_to_datetime

log = structlog.get_logger(__name__)

# Command codes pyzk sends for us (zk.const in pyzk 0.9).
_CMD_GET_FREE_SIZES = 50
_CMD_GET_TIME = 201
_CMD_ATTLOG_RRQ = 13
_CMD_USERTEMP_RRQ = 9
_FCT_USER = 5

_FREE_SIZES = struct.Struct("<20i")
_U32 = struct.Struct("<I")
_LARGEST_RECORD = max(RECORD_SIZES)
_LARGEST_USER = 72
_DOWNLOAD_ATTEMPTS = 2  # a log that moves under a disabled terminal twice in a row is left for next poll
_SLICE_SECONDS = 0.25  # how often a blocked receive looks at the cancel event
_CANCELLED_CLEANUP_SECONDS = 2.0  # re-enabling on shutdown must fit in systemd's stop timeout


def default_deadline_seconds(timeout_seconds: float) -> float:
    """Given the per-reply timeout, return the default limit on a whole session: generous enough for a
    200,000-record download from a slow terminal, finite so a terminal that drips bytes cannot hold a
    worker forever."""
    return max(120.0, 12 * timeout_seconds)


class DeviceLike(Protocol):
    """What this module needs of a configured terminal (`config.DeviceConfig` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def comm_key(self) -> int: ...
    @property
    def timezone(self) -> str: ...
    @property
    def protocol(self) -> str: ...


class TerminalCancelled(TerminalError):
    """The session was abandoned because the caller set its cancel event (shutdown); the terminal
    itself is not at fault."""


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class LogDigest:
    """A fingerprint of a downloaded log: lets the next download skip re-parsing the records it
    already delivered to the store, after proving by hash that they are byte for byte unchanged."""

    serial: str
    record_size: int
    record_count: int
    digest: bytes


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

    `downloaded` is False when serial and record count were unchanged (no download happened).
    `records` are the log's records from index `first_index` on: 0 for a full parse, or the length of
    a prefix proven unchanged against `known_digest` (those records were stored by an earlier poll).
    """

    state: TerminalState
    downloaded: bool
    record_size: int | None = None
    records: list[AttendanceRecord] = field(default_factory=list)
    first_index: int = 0
    digest: LogDigest | None = None
    # 8-byte logs only: the user table read with the log (uid -> enroll number). `records` already
    # carry these enroll numbers (str(uid) when the uid is not in the table).
    users_by_uid: dict[int, str] | None = None


# ----------------------------------------------------------------------------------------- the host


def validate_host(host: str) -> str:
    """Given a configured host, return it if it is an IP address or a DNS host name. Raise ValueError
    otherwise (it never reaches a shell, but a value like "1.2.3.4; rm -rf /" is a config mistake).
    The rule is the configuration's own, checked again here because a Config can be built in code."""
    problem = check_host(host)
    if problem is not None:
        raise ValueError(f"host {host!r} {problem}")
    return host


# ------------------------------------------------------------------------------- the guarded socket


class _PeerClosed(ConnectionError):
    """The terminal closed the connection (recv returned end of file)."""


class _DeadlineExceeded(TimeoutError):
    """The whole session took longer than its deadline."""


class _TooMuchData(ConnectionError):
    """The terminal sent more bytes than its record count allows."""


class _Cancelled(Exception):
    """The caller's cancel event was set."""


class _MalformedReply(Exception):
    """A reply that does not have the shape the protocol promises."""


# What a session can raise besides TerminalError. OSError covers TimeoutError, ConnectionError and
# socket.gaierror; pyzk raises the others on garbage (struct.error on short replies, TypeError joining a
# None chunk, UnicodeDecodeError decoding a serial, ...).
_LIBRARY_ERRORS = (
    ZKError,
    OSError,
    struct.error,
    ValueError,
    IndexError,
    TypeError,
    RecordFormatError,
    _MalformedReply,
    _Cancelled,
)


def _pyzk_incompatible(error: BaseException) -> bool:
    """True when `error` says a pyzk object lacks an attribute we (or pyzk itself) use: this module
    reaches into pyzk 0.9's private attributes, and a different pyzk must fail as a clean
    TerminalError, not a traceback. Any other AttributeError is a bug and stays one."""
    return isinstance(error, AttributeError) and isinstance(getattr(error, "obj", None), ZK)


class _GuardedSocket:
    """pyzk's socket, with end of file made an error, a per-reply timeout, a session deadline, a byte
    budget and a cancel event. pyzk only calls send, sendto, recv, settimeout and close."""

    def __init__(
        self, sock: socket.socket, *, timeout: float, deadline: float, cancel: threading.Event | None
    ) -> None:
        self._sock = sock
        self.timeout = timeout
        self.deadline = deadline  # time.monotonic() value
        self.cancel = cancel
        self.peer_closed = False
        self.received = 0
        self.byte_limit: int | None = None

    def allow_bytes(self, count: int) -> None:
        """Allow `count` more bytes to be received from now on."""
        self.byte_limit = self.received + count

    def _remaining(self) -> float:
        if self.cancel is not None and self.cancel.is_set():
            raise _Cancelled
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlineExceeded
        return remaining

    def recv(self, size: int, flags: int = 0) -> bytes:
        """Receive up to `size` bytes; raise _PeerClosed on end of file, TimeoutError after `timeout`."""
        reply_deadline = time.monotonic() + self.timeout
        while True:
            wait = min(reply_deadline - time.monotonic(), self._remaining())
            if wait <= 0:
                raise TimeoutError("timed out")
            if self.cancel is not None:
                wait = min(wait, _SLICE_SECONDS)  # so a shutdown does not wait a whole timeout
            self._sock.settimeout(wait)
            try:
                data = self._sock.recv(size, flags)
            except TimeoutError:
                continue  # re-checks cancel, the reply timeout and the session deadline
            break
        if not data and size > 0:
            self.peer_closed = True
            raise _PeerClosed("the terminal closed the connection")
        self.received += len(data)
        if self.byte_limit is not None and self.received > self.byte_limit:
            raise _TooMuchData("the terminal sent more data than its record count allows")
        return data

    def send(self, data: bytes, flags: int = 0) -> int:
        """Send all of `data` (pyzk writes one packet per call and assumes it all went)."""
        self._sock.settimeout(min(self.timeout, self._remaining()))
        self._sock.sendall(data, flags)
        return len(data)

    def sendto(self, data: bytes, address: Any) -> int:
        """Send a UDP packet; the socket is already connected to the terminal's address."""
        return self.send(data)

    def settimeout(self, value: float | None) -> None:
        """Accept pyzk's timeout changes for the per-reply timeout; the session deadline stays."""
        if value is not None and value > 0:
            self.timeout = value

    def close(self) -> None:
        """Close the real socket."""
        self._sock.close()


def _open_socket(host: str, port: int, udp: bool, timeout: float) -> socket.socket:
    """Connect a TCP socket (or a connected UDP socket, so ICMP "port unreachable" surfaces as
    ConnectionRefusedError instead of a timeout). Raise OSError subclasses."""
    if not udp:
        sock = socket.create_connection((host, port), timeout=timeout)
        # Without it each small request waits on Nagle's algorithm against the terminal's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    family, kind, proto, _, address = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------------------- the session


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g}"


class _Session:
    """One connection to one terminal: a fresh ZK object, our guarded socket, and the clean-up rules
    (re-enable if we disabled and the connection still stands, then disconnect)."""

    def __init__(
        self,
        device: DeviceLike,
        timeout: float,
        deadline_seconds: float,
        cancel: threading.Event | None,
    ) -> None:
        self.device = device
        self.timeout = timeout
        self.deadline_seconds = deadline_seconds
        self.cancel = cancel
        self.guard: _GuardedSocket | None = None
        self.disabled = False
        self.downloading = False
        self.zk: Any = None

    # -------------------------------------------------------------------- open / close

    def open(self) -> None:
        """Connect and authenticate (raises library exceptions; `translate` turns them into ours)."""
        device = self.device
        try:
            validate_host(device.host)
        except ValueError as error:
            raise TerminalError(device.name, str(error)) from error
        if not 0 < device.port < 65536:
            raise TerminalError(device.name, f"port {device.port} is out of range")
        udp = device.protocol.lower() == "udp"
        deadline = time.monotonic() + self.deadline_seconds
        zk = ZK(
            device.host,
            port=device.port,
            timeout=self.timeout,
            password=device.comm_key,
            force_udp=udp,
            ommit_ping=True,  # never let pyzk run `ping` through a shell with the host string
        )

        def create_socket() -> None:
            # Replaces pyzk's __create_socket, which ignores connect errors (connect_ex).
            wait = min(self.timeout, max(deadline - time.monotonic(), 0.001))
            sock = _open_socket(device.host, device.port, udp, wait)
            zk._ZK__sock.close()  # the unused UDP socket pyzk made in __init__
            self.guard = _GuardedSocket(sock, timeout=self.timeout, deadline=deadline, cancel=self.cancel)
            zk._ZK__sock = self.guard

        zk._ZK__create_socket = create_socket
        # pyzk opens and closes a probe connection (hard-coded 10 s timeout) only to guess the user
        # record size, which we never use: skip it.
        zk.helper.test_tcp = lambda: 0
        self.zk = zk
        zk.connect()

    def close(self, failed: bool, desynced: bool = False) -> str | None:
        """Re-enable the terminal if we disabled it, say goodbye, close the socket. Return why
        re-enabling failed, or None. Never raises.

        After a timeout or a garbled reply (`desynced`) the session cannot be trusted: a late reply
        would be read as the answer to ENABLEDEVICE, and closing with unread data resets the
        connection, which can make the terminal drop our ENABLEDEVICE unread. So the terminal is then
        re-enabled over a new connection, as it is when this one is gone.
        """
        guard = self.guard
        enable_error: str | None = None
        budget = self.timeout
        if guard is not None:
            # Clean-up gets its own budget and ignores the cancel event: a shutdown must not leave a
            # terminal disabled, but must still fit in systemd's stop timeout.
            if guard.cancel is not None and guard.cancel.is_set():
                budget = min(self.timeout, _CANCELLED_CLEANUP_SECONDS)
            guard.cancel = None
            guard.byte_limit = None
            guard.deadline = time.monotonic() + budget
            standing = not guard.peer_closed and not desynced
            if self.disabled and standing:
                try:
                    self.zk.enable_device()
                    self.disabled = False
                except (*_LIBRARY_ERRORS, AttributeError) as error:
                    enable_error = self.translate(error)
                    standing = False
            if standing and not failed:
                try:
                    self.zk.disconnect()
                except (*_LIBRARY_ERRORS, AttributeError) as error:
                    log.debug("terminal.disconnect_failed", device=self.device.name, error=str(error))
            guard.close()
        elif self.zk is not None:
            with contextlib.suppress(OSError, AttributeError):
                self.zk._ZK__sock.close()
        if self.disabled:
            # The connection broke while the terminal was disabled (it dropped mid-download, or the
            # enable itself failed): try once more on a new connection rather than leave it refusing
            # punches until the next poll.
            enable_error = _enable_on_new_connection(self.device, budget) or None
            if enable_error is None:
                self.disabled = False
            else:
                log.error(
                    "terminal.enable_failed",
                    device=self.device.name,
                    reason=enable_error,
                    hint="the terminal may refuse punches until the next poll re-enables it",
                )
        return enable_error

    # -------------------------------------------------------------------- errors

    def translate(self, error: BaseException) -> str:
        """Given what pyzk or the socket raised, return a one-line reason an admin understands."""
        device = self.device
        where = f"{device.host}:{device.port}"
        chain: list[BaseException] = []
        current: BaseException | None = error
        while current is not None and current not in chain:
            chain.append(current)
            current = current.__cause__ or current.__context__
        for cause in chain:
            if isinstance(cause, _Cancelled):
                return "poll cancelled (shutting down)"
            if isinstance(cause, _DeadlineExceeded):
                return (
                    f"took longer than {_format_seconds(self.deadline_seconds)} s in total (too slow a reply)"
                )
            if isinstance(cause, _TooMuchData):
                return "sent more data than its record count allows (garbage from the terminal?)"
            if isinstance(cause, (_PeerClosed, ConnectionResetError, BrokenPipeError)):
                if self.downloading:
                    return "connection dropped mid-download"
                return f"connection closed by the terminal at {where}"
            if isinstance(cause, ConnectionRefusedError):
                return f"connection refused at {where}"
            if isinstance(cause, TimeoutError):
                return f"timed out after {_format_seconds(self.timeout)} s waiting for {where}"
            if isinstance(cause, socket.gaierror):
                return f"cannot resolve host name {device.host!r} ({cause.strerror})"
            if isinstance(cause, OSError) and cause.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return f"{device.host} is unreachable ({cause.strerror})"
            if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
                return f"connection refused at {where}"
        for cause in chain:
            if _pyzk_incompatible(cause):
                name = getattr(cause, "name", None) or "an attribute it needs"
                return f"the installed pyzk lacks {name!r}, which zkdingsync relies on (install pyzk 0.9)"
            if isinstance(cause, ZKErrorResponse) and "Unauthenticated" in str(cause):
                return "wrong comm key (the terminal rejected it; check comm_key)"
            if isinstance(cause, _MalformedReply):
                return f"malformed reply: {cause}"
            if isinstance(cause, RecordFormatError):
                return f"malformed data: {cause}"
            if isinstance(cause, ZKNetworkError) and "Broken pipe" in str(cause):
                return f"connection refused at {where}"  # pyzk's way of saying it, kept for safety
            if isinstance(cause, ZKNetworkError) and "TCP packet invalid" in str(cause):
                return "invalid reply (not a ZK terminal, or the wrong protocol: tcp/udp?)"
            if isinstance(cause, ZKErrorResponse):
                return f"the terminal refused the request ({cause})"
            if isinstance(cause, OSError):
                return f"network error talking to {where}: {cause.strerror or cause}"
        return f"malformed reply ({type(error).__name__}: {error})"

    # -------------------------------------------------------------------- commands

    def _command(self, command: int, payload: bytes = b"", response_size: int = 1024) -> bytes:
        """Send one command through pyzk's framing and return the reply payload; raise on a non-OK."""
        reply = self.zk._ZK__send_command(command, payload, response_size)
        if not reply.get("status"):
            raise ZKErrorResponse(f"command {command} answered with code {reply.get('code')}")
        data: bytes = self.zk._ZK__data
        return data

    def read_sizes(self) -> tuple[int, int, int, int]:
        """Return (users, user capacity, records, record capacity) from GET_FREE_SIZES.

        Read here rather than with pyzk's read_sizes(), which silently reports 0 records when the reply
        is short (and 0 would look like a cleared log).
        """
        data = self._command(_CMD_GET_FREE_SIZES, b"", 1024)
        if len(data) < _FREE_SIZES.size:
            raise _MalformedReply(f"the memory-usage reply has {len(data)} bytes, fewer than 80")
        fields = _FREE_SIZES.unpack_from(data)
        users, records, user_capacity, record_capacity = fields[4], fields[8], fields[15], fields[16]
        if min(users, records, user_capacity, record_capacity) < 0:
            raise _MalformedReply(f"negative counts in the memory-usage reply: {fields}")
        return users, user_capacity, records, record_capacity

    def read_clock_text(self) -> str:
        """Return the terminal's wall clock as "YYYY-MM-DD HH:MM:SS" (possibly an impossible date;
        pyzk's get_time() would raise ValueError on those)."""
        data = self._command(_CMD_GET_TIME, b"", 1032)
        if len(data) < 4:
            raise _MalformedReply(f"the clock reply has {len(data)} bytes, fewer than 4")
        return format_local_time(_U32.unpack_from(data)[0])

    def read_state(self, now: Callable[[], datetime], *, details: bool) -> TerminalState:
        """Read serial, sizes and clock (and firmware/platform when `details`)."""
        serial = str(self.zk.get_serialnumber()).strip()
        if not serial:
            raise _MalformedReply("the terminal reports an empty serial number")
        users, user_capacity, records, record_capacity = self.read_sizes()
        clock_text = self.read_clock_text()
        read_at = now()
        firmware = platform = None
        if details:
            firmware = str(self.zk.get_firmware_version())
            platform = str(self.zk.get_platform())
        return TerminalState(
            serial=serial,
            users=users,
            user_capacity=user_capacity,
            record_count=records,
            record_capacity=record_capacity,
            clock_text=clock_text,
            clock=local_to_datetime(clock_text, ZoneInfo(self.device.timezone)),
            read_at=read_at,
            firmware=firmware,
            platform=platform,
        )

    def read_users(self) -> list[TerminalUser]:
        """Read the enrolled users (the user table; no need to disable the terminal for it)."""
        users, _, _, _ = self.read_sizes()
        if users == 0:
            return []
        buffer = self.read_buffer(_CMD_USERTEMP_RRQ, _FCT_USER, 4 + users * _LARGEST_USER)
        return parse_user_table(buffer, users)

    def disable(self) -> None:
        """Disable the terminal (no punches while we read); `close` re-enables it."""
        self.disabled = True  # set first: a timeout on the reply may still have disabled it
        self.zk.disable_device()

    def read_buffer(self, command: int, fct: int, max_bytes: int) -> bytes:
        """Buffered read of one table, at most `max_bytes` (plus protocol overhead) from the terminal."""
        assert self.guard is not None  # noqa: S101 - open() set it
        self.guard.allow_bytes(max_bytes + max_bytes // 8 + 65_536)
        data, _ = self.zk.read_with_buffer(command, fct)
        self.guard.byte_limit = None
        return bytes(data)

    def download(self, serial: str, known: LogDigest | None) -> _Download:
        """Disable the terminal, read the log (and the user table for 8-byte records), check the count
        did not move, parse. Raise TerminalError or library exceptions."""
        self.disable()
        self.downloading = True
        for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
            users, _, count, _ = self.read_sizes()
            if count == 0:
                return _Download(0, None, [], 0, None, None)
            buffer = self.read_buffer(_CMD_ATTLOG_RRQ, 0, 4 + count * _LARGEST_RECORD)
            body = len(buffer) - 4
            user_buffer: bytes | None = None
            if body > 0 and body % count == 0 and needs_user_table(body // count) and users > 0:
                user_buffer = self.read_buffer(_CMD_USERTEMP_RRQ, _FCT_USER, 4 + users * _LARGEST_USER)
            _, _, count_after, _ = self.read_sizes()
            if count_after != count:
                log.warning(
                    "terminal.log_moved",
                    device=self.device.name,
                    attempt=attempt,
                    before=count,
                    after=count_after,
                    hint="a punch landed during the download although the terminal was disabled",
                )
                continue
            return self._parse(serial, buffer, count, users, user_buffer, known)
        raise TerminalError(
            self.device.name,
            "record count and buffer disagree: the log kept changing during the download; retrying next poll",
        )

    def _parse(
        self,
        serial: str,
        buffer: bytes,
        count: int,
        users: int,
        user_buffer: bytes | None,
        known: LogDigest | None,
    ) -> _Download:
        """Check the framing, skip a prefix proven unchanged by `known`, parse the rest."""
        name = self.device.name
        if len(buffer) < 4 or _U32.unpack_from(buffer)[0] != len(buffer) - 4:
            raise TerminalError(name, "record count and buffer disagree: the downloaded log is truncated")
        body = len(buffer) - 4
        if body % count or body // count not in RECORD_SIZES:
            raise TerminalError(
                name,
                f"record count and buffer disagree: {body} bytes for {count} records "
                f"is not one of the known record sizes {', '.join(map(str, RECORD_SIZES))}",
            )
        size = body // count
        users_by_uid: dict[int, str] | None = None
        if user_buffer is not None:
            try:
                users_by_uid = {user.uid: user.enroll_number for user in parse_user_table(user_buffer, users)}
            except RecordFormatError as error:
                raise TerminalError(name, f"malformed user table: {error}") from error
        with memoryview(buffer) as view:
            hasher = hashlib.blake2b(digest_size=16)
            first = 0
            if (
                known is not None
                and known.serial == serial
                and known.record_size == size
                and 0 < known.record_count <= count
            ):
                hasher.update(view[4 : 4 + known.record_count * size])
                if hasher.digest() == known.digest:
                    first = known.record_count
                else:
                    hasher = hashlib.blake2b(digest_size=16)
            hasher.update(view[4 + first * size :])
            tail = buffer if first == 0 else with_length_prefix(bytes(view[4 + first * size :]))
        try:
            _, records = parse_attendance_buffer(tail, count - first, users_by_uid)
        except RecordFormatError as error:
            raise TerminalError(name, f"record count and buffer disagree: {error}") from error
        return _Download(
            count, size, records, first, LogDigest(serial, size, count, hasher.digest()), users_by_uid
        )


@dataclass(frozen=True)
class _Download:
    """A parsed download: the count it was checked against, record size, records from `first` on."""

    count: int
    record_size: int | None
    records: list[AttendanceRecord]
    first: int
    digest: LogDigest | None
    users_by_uid: dict[int, str] | None


@contextmanager
def _session(
    device: DeviceLike, timeout: float, deadline_seconds: float | None, cancel: threading.Event | None
) -> Iterator[_Session]:
    """Open a session, yield it, always clean up; every failure leaves as one TerminalError."""
    session = _Session(
        device, timeout, deadline_seconds if deadline_seconds else default_deadline_seconds(timeout), cancel
    )
    try:
        session.open()
        yield session
    except TerminalError as error:
        _close_after_failure(session, error, desynced=False)
        raise
    except BaseException as error:
        if not isinstance(error, _LIBRARY_ERRORS) and not _pyzk_incompatible(error):
            # A bug of ours, or KeyboardInterrupt: still re-enable the terminal.
            session.close(failed=True, desynced=True)
            raise
        reason = session.translate(error)
        kind = TerminalCancelled if reason.startswith("poll cancelled") else TerminalError
        translated = kind(device.name, reason)
        _close_after_failure(session, translated, desynced=True)
        raise translated from error
    enable_error = session.close(failed=False)
    if enable_error is not None:
        raise TerminalError(
            device.name,
            f"could not re-enable the terminal after reading it ({enable_error}); "
            "it may refuse punches until the next poll",
        )


def _enable_on_new_connection(device: DeviceLike, budget: float) -> str:
    """Open a short new session only to send ENABLEDEVICE; return "" on success, else the reason."""
    session = _Session(device, budget, budget, None)
    try:
        session.open()
        session.zk.enable_device()
    except (*_LIBRARY_ERRORS, AttributeError) as error:
        return session.translate(error)
    finally:
        if session.guard is not None:
            if not session.guard.peer_closed:
                # The terminal is enabled (or not): a failed goodbye changes nothing.
                with contextlib.suppress(*_LIBRARY_ERRORS, AttributeError):
                    session.zk.disconnect()
            session.guard.close()
    return ""


def _close_after_failure(session: _Session, error: TerminalError, *, desynced: bool) -> None:
    """Clean up after a failed session; mention it in the reason when re-enabling failed too."""
    if session.close(failed=True, desynced=desynced) is not None:
        error.reason = f"{error.reason}; re-enabling the terminal failed too"
        error.args = (f"terminal {error.device}: {error.reason}",)


# ------------------------------------------------------------------------------------- public API


def read_info(
    device: DeviceLike,
    timeout_seconds: float,
    *,
    now: Callable[[], datetime] = utc_now,
    deadline_seconds: float | None = None,
    cancel: threading.Event | None = None,
) -> TerminalState:
    """Given a terminal, return what it says about itself: serial, firmware, platform, clock, users,
    records and capacities (one short connection, nothing downloaded). Raise TerminalError."""
    with _session(device, timeout_seconds, deadline_seconds, cancel) as session:
        return session.read_state(now, details=True)


def read_users(
    device: DeviceLike,
    timeout_seconds: float,
    *,
    deadline_seconds: float | None = None,
    cancel: threading.Event | None = None,
) -> list[TerminalUser]:
    """Given a terminal, return its enrolled users (enroll number, name), for setting up `users.map`.
    Raise TerminalError."""
    with _session(device, timeout_seconds, deadline_seconds, cancel) as session:
        return session.read_users()


def read_log(
    device: DeviceLike,
    timeout_seconds: float,
    *,
    known_serial: str | None,
    known_count: int | None,
    known_digest: LogDigest | None = None,
    ensure_enabled: bool = False,
    details: bool = False,
    now: Callable[[], datetime] = utc_now,
    deadline_seconds: float | None = None,
    cancel: threading.Event | None = None,
) -> LogRead:
    """Given a terminal and what the last successful poll saw, read its log in ONE connection.

    Reads serial, record count and clock first. When serial and count equal `known_serial` and
    `known_count` and the log is not full, return without downloading (`downloaded=False`). Otherwise
    disable the terminal, download the log (plus the user table for 8-byte records), check the count
    did not move, re-enable it, and parse. With `known_digest` from the previous successful poll, a
    prefix proven byte-identical is not parsed again (`first_index`). Firmware and platform are read
    when `details` is set or something changed. `ensure_enabled` sends ENABLEDEVICE first (after a
    failed poll that may have left the terminal disabled). Raise TerminalError (TerminalCancelled when
    `cancel` was set) with a one-line reason; on any error nothing partial is returned.
    """
    with _session(device, timeout_seconds, deadline_seconds, cancel) as session:
        if ensure_enabled:
            session.zk.enable_device()
        state = session.read_state(now, details=details)
        if (
            known_serial is not None
            and state.serial == known_serial
            and state.record_count == known_count
            and not state.log_full
        ):
            return LogRead(state=state, downloaded=False)
        if not details:
            state = replace(
                state,
                firmware=str(session.zk.get_firmware_version()),
                platform=str(session.zk.get_platform()),
            )
        if state.record_count == 0:
            return LogRead(state=state, downloaded=True)
        download = session.download(state.serial, known_digest)
    # The count may have moved between the first look and the (disabled) download: report the one that
    # matches the records returned.
    return LogRead(
        state=replace(state, record_count=download.count),
        downloaded=True,
        record_size=download.record_size,
        records=download.records,
        first_index=download.first,
        digest=download.digest,
        users_by_uid=download.users_by_uid,
    )


def set_time(
    device: DeviceLike,
    timeout_seconds: float,
    *,
    at: datetime,
    deadline_seconds: float | None = None,
) -> None:
    """Given a terminal and an aware moment, set the terminal's clock to that moment's wall-clock time
    in the terminal's configured zone. Raise TerminalError."""
    local = at.astimezone(ZoneInfo(device.timezone)).replace(tzinfo=None)
    with _session(device, timeout_seconds, deadline_seconds, None) as session:
        session.zk.set_time(local)


class ZkReader:
    """The production reader the poller uses: `read_log` and `set_time` of this module."""

    def __init__(self, *, deadline_seconds: float | None = None) -> None:
        """Optionally override the per-session deadline (default: `default_deadline_seconds`)."""
        self.deadline_seconds = deadline_seconds

    def read_log(
        self,
        device: DeviceLike,
        *,
        timeout_seconds: float,
        known_serial: str | None,
        known_count: int | None,
        known_digest: LogDigest | None,
        ensure_enabled: bool,
        now: Callable[[], datetime],
        cancel: threading.Event | None,
    ) -> LogRead:
        """See `read_log`."""
        return read_log(
            device,
            timeout_seconds,
            known_serial=known_serial,
            known_count=known_count,
            known_digest=known_digest,
            ensure_enabled=ensure_enabled,
            now=now,
            deadline_seconds=self.deadline_seconds,
            cancel=cancel,
        )

    def set_time(self, device: DeviceLike, *, timeout_seconds: float, at: datetime) -> None:
        """See `set_time`."""
        set_time(device, timeout_seconds, at=at, deadline_seconds=self.deadline_seconds)
