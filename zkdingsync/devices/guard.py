"""The socket under pyzk and the errors a session can meet, with the one-line reasons an admin reads.

`GuardedSocket` replaces pyzk's socket: its `recv` raises on end of file (pyzk 0.9 loops forever at
100 % CPU when a terminal closes the connection in the middle of a buffered read), and it enforces a
per-reply timeout, a deadline over the whole session, a byte budget and a cancel event.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from typing import Any, Protocol

from zk import ZK
from zk.exception import ZKError, ZKErrorResponse, ZKNetworkError

from zkdingsync.errors import RecordFormatError

_SLICE_SECONDS = 0.25  # how often a blocked receive looks at the cancel event


class DeviceLike(Protocol):
    """What a session needs of a configured terminal (`config.DeviceConfig` fits)."""

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


class OffsetUnsupported(Exception):
    """The terminal does not serve a buffered read from a start offset (it answered an error, or a
    length other than the one asked); `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _PeerClosed(ConnectionError):
    """The terminal closed the connection (recv returned end of file)."""


class _DeadlineExceeded(TimeoutError):
    """The whole session took longer than its deadline."""


class TooMuchData(ConnectionError):
    """The terminal sent more bytes than its record count allows."""


class _Cancelled(Exception):
    """The caller's cancel event was set."""


class MalformedReply(Exception):
    """A reply that does not have the shape the protocol promises."""


# What a session can raise besides TerminalError. OSError covers TimeoutError, ConnectionError and
# socket.gaierror; pyzk raises the others on garbage (struct.error on short replies, TypeError joining a
# None chunk, UnicodeDecodeError decoding a serial, ...).
LIBRARY_ERRORS = (
    ZKError,
    OSError,
    struct.error,
    ValueError,
    IndexError,
    TypeError,
    RecordFormatError,
    MalformedReply,
    _Cancelled,
)


def pyzk_incompatible(error: BaseException) -> bool:
    """True when `error` says a pyzk object lacks an attribute we (or pyzk itself) use: this module
    reaches into pyzk 0.9's private attributes, and a different pyzk must fail as a clean
    TerminalError, not a traceback. Any other AttributeError is a bug and stays one."""
    return isinstance(error, AttributeError) and isinstance(getattr(error, "obj", None), ZK)


class GuardedSocket:
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
            raise TooMuchData("the terminal sent more data than its record count allows")
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


def open_socket(host: str, port: int, udp: bool, timeout: float) -> socket.socket:
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


def translate(
    error: BaseException, device: DeviceLike, *, timeout: float, deadline_seconds: float, downloading: bool
) -> str:
    """Given what pyzk or the socket raised in a session with `device`, return a one-line reason an
    admin understands."""
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
            return f"took longer than {_format_seconds(deadline_seconds)} s in total (too slow a reply)"
        if isinstance(cause, TooMuchData):
            return "sent more data than its record count allows (garbage from the terminal?)"
        if isinstance(cause, (_PeerClosed, ConnectionResetError, BrokenPipeError)):
            if downloading:
                return "connection dropped mid-download"
            return f"connection closed by the terminal at {where}"
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused at {where}"
        if isinstance(cause, TimeoutError):
            return f"timed out after {_format_seconds(timeout)} s waiting for {where}"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve host name {device.host!r} ({cause.strerror})"
        if isinstance(cause, OSError) and cause.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return f"{device.host} is unreachable ({cause.strerror})"
        if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
            return f"connection refused at {where}"
    for cause in chain:
        if pyzk_incompatible(cause):
            name = getattr(cause, "name", None) or "an attribute it needs"
            return f"the installed pyzk lacks {name!r}, which zkdingsync relies on (install pyzk 0.9)"
        if isinstance(cause, ZKErrorResponse) and "Unauthenticated" in str(cause):
            return "wrong comm key (the terminal rejected it; check comm_key)"
        if isinstance(cause, MalformedReply):
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


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g}"
