"""One connection to one terminal over pyzk's framing: open, the commands we send, clean-up.

A fresh `ZK` object per session, discarded after it (after a timeout the late reply stays in the socket
and every later call would read the wrong answer), with our own `GuardedSocket` under it. Buffered
reads are our own too (prepare, read any byte range in chunks, free), so a tail of the log can be read
and a download is sized by the record count before a byte of it arrives.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from zk import ZK
from zk.exception import ZKErrorResponse

from zkdingsync.devices import pyzk_private as pyzk
from zkdingsync.devices.guard import (
    LIBRARY_ERRORS,
    DeviceLike,
    GuardedSocket,
    MalformedReply,
    OffsetUnsupported,
    TooMuchData,
    open_socket,
    translate,
)
from zkdingsync.devices.records import format_local_time, parse_user_table
from zkdingsync.devices.results import TerminalState
from zkdingsync.errors import TerminalError
from zkdingsync.hosts import check_host
from zkdingsync.model import TerminalUser
from zkdingsync.timeconv import local_to_datetime

log = structlog.get_logger(__name__)

# Command codes (zk.const in pyzk 0.9).
_CMD_GET_FREE_SIZES = 50
_CMD_GET_TIME = 201
_CMD_PREPARE_BUFFER = 1503
_CMD_READ_BUFFER = 1504
_CMD_DATA = 1501
CMD_ATTLOG_RRQ = 13
CMD_USERTEMP_RRQ = 9
FCT_USER = 5

_FREE_SIZES = struct.Struct("<20i")
_U32 = struct.Struct("<I")
_LARGEST_USER = 72
_TCP_CHUNK = 0xFFC0  # the largest READ_BUFFER chunk pyzk asks for over TCP
_UDP_CHUNK = 16 * 1024
_CANCELLED_CLEANUP_SECONDS = 2.0  # re-enabling on shutdown must fit in systemd's stop timeout


def validate_host(host: str) -> str:
    """Given a configured host, return it if it is an IP address or a DNS host name. Raise ValueError
    otherwise (it never reaches a shell, but a value like "1.2.3.4; rm -rf /" is a config mistake).
    The rule is the configuration's own, checked again here because a Config can be built in code."""
    problem = check_host(host)
    if problem is not None:
        raise ValueError(f"host {host!r} {problem}")
    return host


class Session:
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
        self.guard: GuardedSocket | None = None
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
            sock = open_socket(device.host, device.port, udp, wait)
            pyzk.socket_of(zk).close()  # the unused UDP socket pyzk made in __init__
            self.guard = GuardedSocket(sock, timeout=self.timeout, deadline=deadline, cancel=self.cancel)
            pyzk.set_socket(zk, self.guard)

        pyzk.set_socket_factory(zk, create_socket)
        pyzk.skip_size_probe(zk)
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
                except (*LIBRARY_ERRORS, AttributeError) as error:
                    enable_error = self.translate(error)
                    standing = False
            if standing and not failed:
                try:
                    self.zk.disconnect()
                except (*LIBRARY_ERRORS, AttributeError) as error:
                    log.debug("terminal.disconnect_failed", device=self.device.name, error=str(error))
            guard.close()
        elif self.zk is not None:
            with contextlib.suppress(OSError, AttributeError):
                pyzk.socket_of(self.zk).close()
        if self.disabled:
            # The connection broke while the terminal was disabled (it dropped mid-download, or the
            # enable itself failed): try once more on a new connection rather than leave it refusing
            # punches until the next poll.
            enable_error = enable_on_new_connection(self.device, budget) or None
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

    def translate(self, error: BaseException) -> str:
        """Given what pyzk or the socket raised, return a one-line reason an admin understands."""
        return translate(
            error,
            self.device,
            timeout=self.timeout,
            deadline_seconds=self.deadline_seconds,
            downloading=self.downloading,
        )

    # -------------------------------------------------------------------- commands

    def _command(self, command: int, payload: bytes = b"", response_size: int = 1024) -> bytes:
        """Send one command through pyzk's framing and return the reply payload; raise on a non-OK."""
        reply, data = pyzk.send_command(self.zk, command, payload, response_size)
        if not reply.get("status"):
            raise ZKErrorResponse(f"command {command} answered with code {reply.get('code')}")
        return data

    def read_sizes(self) -> tuple[int, int, int, int]:
        """Return (users, user capacity, records, record capacity) from GET_FREE_SIZES.

        Read here rather than with pyzk's read_sizes(), which silently reports 0 records when the reply
        is short (and 0 would look like a cleared log).
        """
        data = self._command(_CMD_GET_FREE_SIZES, b"", 1024)
        if len(data) < _FREE_SIZES.size:
            raise MalformedReply(f"the memory-usage reply has {len(data)} bytes, fewer than 80")
        fields = _FREE_SIZES.unpack_from(data)
        users, records, user_capacity, record_capacity = fields[4], fields[8], fields[15], fields[16]
        if min(users, records, user_capacity, record_capacity) < 0:
            raise MalformedReply(f"negative counts in the memory-usage reply: {fields}")
        return users, user_capacity, records, record_capacity

    def read_clock_text(self) -> str:
        """Return the terminal's wall clock as "YYYY-MM-DD HH:MM:SS" (possibly an impossible date;
        pyzk's get_time() would raise ValueError on those)."""
        data = self._command(_CMD_GET_TIME, b"", 1032)
        if len(data) < 4:
            raise MalformedReply(f"the clock reply has {len(data)} bytes, fewer than 4")
        return format_local_time(_U32.unpack_from(data)[0])

    def read_state(self, now: Callable[[], datetime], *, details: bool) -> TerminalState:
        """Read serial, sizes and clock (and firmware/platform when `details`)."""
        serial = str(self.zk.get_serialnumber()).strip()
        if not serial:
            raise MalformedReply("the terminal reports an empty serial number")
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
        buffer = self.read_buffer(CMD_USERTEMP_RRQ, FCT_USER, 4 + users * _LARGEST_USER)
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

    def prepare(self, table: int, fct: int) -> bytes | int:
        """PREPARE_BUFFER for `table`: return the buffer's size in bytes, or the buffer itself when the
        terminal sends a small one inline."""
        data = self._command(_CMD_PREPARE_BUFFER, struct.pack("<bhii", 1, table, fct, 0), 1024)
        if pyzk.last_response(self.zk) == _CMD_DATA:
            return bytes(data)
        if len(data) < 5:
            raise MalformedReply(f"the buffer size reply has {len(data)} bytes, fewer than 5")
        size: int = _U32.unpack_from(data, 1)[0]
        return size

    def read_range(self, start: int, length: int, *, aligned: bool = False) -> bytearray:
        """Read bytes [start, start + length) of the prepared buffer, in chunks, into one buffer (no
        copy of the whole). Raise OffsetUnsupported when the terminal answers a read from a non-zero
        offset with an error or the wrong length (unless `aligned`: a whole-buffer read at chunk
        offsets, which every firmware serves)."""
        assert self.guard is not None  # noqa: S101 - open() set it
        chunk = _UDP_CHUNK if self.device.protocol.lower() == "udp" else _TCP_CHUNK
        # A firmware that ignores the offset may send a whole chunk (or the whole buffer) back.
        self.guard.allow_bytes(max(length, chunk) + length // 8 + 4096)
        out = bytearray(length)
        for offset in range(start, start + length, chunk):
            size = min(chunk, start + length - offset)
            try:
                data = pyzk.read_chunk(self.zk, offset, size)
            except (ZKErrorResponse, TooMuchData) as error:
                if offset and not aligned:
                    raise OffsetUnsupported("it refuses buffered reads from an offset") from error
                raise
            if data is None or len(data) != size:
                got = "nothing" if data is None else f"{len(data)} bytes"
                if offset and not aligned:
                    raise OffsetUnsupported(f"it answered {got} to a read of {size} bytes at offset {offset}")
                raise MalformedReply(f"the terminal sent {got} for a chunk of {size} bytes")
            out[offset - start : offset - start + size] = data
        self.guard.byte_limit = None
        return out

    def free(self) -> None:
        """FREE_DATA: the terminal may drop the prepared buffer."""
        self.zk.free_data()


def enable_on_new_connection(device: DeviceLike, budget: float) -> str:
    """Open a short new session only to send ENABLEDEVICE; return "" on success, else the reason."""
    session = Session(device, budget, budget, None)
    try:
        session.open()
        session.zk.enable_device()
    except (*LIBRARY_ERRORS, AttributeError) as error:
        return session.translate(error)
    finally:
        if session.guard is not None:
            if not session.guard.peer_closed:
                # The terminal is enabled (or not): a failed goodbye changes nothing.
                with contextlib.suppress(*LIBRARY_ERRORS, AttributeError):
                    session.zk.disconnect()
            session.guard.close()
    return ""
