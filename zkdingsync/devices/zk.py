"""The pyzk adapter: the only package that imports `zk` (here, `session.py` and `guard.py`).

Everything a terminal can do wrong (refuse, time out, drop the connection, send garbage, reject the comm
key, claim an absurd record count) leaves this module as ONE `TerminalError(device, reason)` whose
reason an admin understands.

pyzk 0.9 is used for framing and the session handshake only, with its traps closed:

* `ommit_ping=True` always: otherwise pyzk hands the host string to a shell to `ping` it.
* pyzk's own socket set-up (`connect_ex`, errors ignored, plus a throw-away probe connection with a
  hard-coded 10 s timeout) is replaced by ours, so "connection refused" is reported as that and not as
  pyzk's "Broken pipe".
* That socket is wrapped in `guard.GuardedSocket`, whose `recv` raises on end of file (pyzk 0.9 loops
  forever at 100 % CPU when a terminal closes the connection in the middle of a buffered read), with a
  deadline over the whole session, a byte budget per read and a cancel event.
* A fresh `ZK` object per session, discarded after it: after a timeout the late reply stays in the
  socket and every later call would read the wrong answer.
* The log is read with our own buffered reads (`download.py`): only the new tail when the store's last
  record is found where expected, the whole log otherwise; never `get_attendance()` (it downloads the
  whole log every call, its parser is quadratic, wrong on 49-byte records, and one bad date fails it).
  A record count above the terminal's capacity or above `MAX_RECORDS` is refused before any download,
  and a buffer larger than the count allows is never read.
* Firmware that does not serve a read from an offset is detected (`LogRead.offset_reads` False): the
  same poll then reads the whole log, and the caller reads that terminal whole from then on.
* The terminal is disabled around every read of the log so no punch lands between the size query and
  the read, and re-enabled in the session's clean-up (over a new connection when this one broke).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from zoneinfo import ZoneInfo

from zkdingsync.devices.download import (
    SMALL_LOG_RECORDS,
    TailMiss,
    check_count,
    download,
    read_tail,
    usable_tail,
)
from zkdingsync.devices.guard import LIBRARY_ERRORS, DeviceLike, OffsetUnsupported, pyzk_incompatible
from zkdingsync.devices.results import MAX_RECORDS, KnownLog, LogDigest, LogRead, LogTail, TerminalState
from zkdingsync.devices.session import CMD_ATTLOG_RRQ, Session, validate_host
from zkdingsync.errors import TerminalError
from zkdingsync.model import TerminalUser, utc_now

__all__ = [
    "MAX_RECORDS",
    "DeviceLike",
    "KnownLog",
    "LogDigest",
    "LogRead",
    "LogTail",
    "TerminalCancelled",
    "TerminalState",
    "ZkReader",
    "read_info",
    "read_log",
    "read_users",
    "set_time",
    "validate_host",
]


def default_deadline_seconds(timeout_seconds: float) -> float:
    """Given the per-reply timeout, return the default limit on a whole session: generous enough for a
    200,000-record download from a slow terminal, finite so a terminal that drips bytes cannot hold a
    worker forever."""
    return max(120.0, 12 * timeout_seconds)


class TerminalCancelled(TerminalError):
    """The session was abandoned because the caller set its cancel event (shutdown); the terminal
    itself is not at fault."""


# ------------------------------------------------------------------------------------- sessions


@contextmanager
def _session(
    device: DeviceLike, timeout: float, deadline_seconds: float | None, cancel: threading.Event | None
) -> Iterator[Session]:
    """Open a session, yield it, always clean up; every failure leaves as one TerminalError."""
    session = Session(
        device, timeout, deadline_seconds if deadline_seconds else default_deadline_seconds(timeout), cancel
    )
    try:
        session.open()
        yield session
    except TerminalError as error:
        _close_after_failure(session, error, desynced=False)
        raise
    except BaseException as error:
        if not isinstance(error, LIBRARY_ERRORS) and not pyzk_incompatible(error):
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


def _close_after_failure(session: Session, error: TerminalError, *, desynced: bool) -> None:
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
    known: KnownLog = KnownLog.NOTHING,
    allow_full: bool = True,
    ensure_enabled: bool = False,
    details: bool = False,
    now: Callable[[], datetime] = utc_now,
    deadline_seconds: float | None = None,
    cancel: threading.Event | None = None,
) -> LogRead:
    """Given a terminal and what the store holds of its log (`known`, see `KnownLog`), read what is
    new in its log in ONE connection.

    Reads serial, record count and clock first. When serial and count are the known ones and the log
    is not full, return without reading the log (`downloaded=False`). With a known tail (and offset
    reads), read only the records after the stored last one (see `download.py`); when that is not
    possible read the whole log, or, unless `allow_full` (or the log holds at most
    `SMALL_LOG_RECORDS`: cheap whatever happens), return `needs_full=True` without reading it. With a
    known digest a prefix of a whole log proven byte-identical is not returned again (`first_index`).
    Firmware and platform are read when `details` is set or something changed. `ensure_enabled` sends
    ENABLEDEVICE first (after a failed poll that may have left the terminal disabled). Raise
    TerminalError (TerminalCancelled when `cancel` was set) with a one-line reason; on any error
    nothing partial is returned.
    """
    seen: list[TerminalState] = []
    try:
        with _session(device, timeout_seconds, deadline_seconds, cancel) as session:
            state = _read_state(session, seen, ensure_enabled=ensure_enabled, details=details, now=now)
            return _read_new(session, state, known, allow_full=allow_full, details=details)
    except OffsetUnsupported as finding:
        if not allow_full and seen[0].record_count > SMALL_LOG_RECORDS:
            return LogRead(
                state=seen[0],
                downloaded=False,
                needs_full=True,
                offset_reads=False,
                offset_problem=finding.reason,
            )
        whole = read_log(
            device,
            timeout_seconds,
            known=replace(known, offset_reads=False),
            details=details,
            now=now,
            deadline_seconds=deadline_seconds,
            cancel=cancel,
        )
        return replace(whole, offset_reads=False, offset_problem=finding.reason)


def _read_state(
    session: Session,
    seen: list[TerminalState],
    *,
    ensure_enabled: bool,
    details: bool,
    now: Callable[[], datetime],
) -> TerminalState:
    """Open a read of the log over `session`: re-enable the terminal if asked, read its state, refuse
    an absurd record count; append the state to `seen` (the caller's fallback needs it)."""
    if ensure_enabled:
        session.zk.enable_device()
    state = session.read_state(now, details=details)
    check_count(session.device.name, state)
    seen.append(state)
    return state


def _read_new(
    session: Session, state: TerminalState, known: KnownLog, *, allow_full: bool, details: bool
) -> LogRead:
    """Given the terminal's state and what is known of its log, decide what to read (nothing, the
    tail, the whole log, or a refusal when a whole read is not allowed), read it and return it."""
    if (
        known.serial is not None
        and state.serial == known.serial
        and state.record_count == known.count
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
        return LogRead(state=state, downloaded=True, full=True)
    tail = usable_tail(known.tail, state) if known.count is not None and known.offset_reads else None
    miss: TailMiss | None = None
    if tail is not None:
        found = read_tail(session, tail, state)
        if isinstance(found, LogRead):
            return found
        miss = found
    if not allow_full and state.record_count > SMALL_LOG_RECORDS:
        return LogRead(state=state, downloaded=False, needs_full=True)
    return download(session, state, known.digest, miss)


def probe_offset_reads(
    device: DeviceLike,
    timeout_seconds: float,
    *,
    deadline_seconds: float | None = None,
    cancel: threading.Event | None = None,
) -> str:
    """Given a terminal, find out whether it serves reads of its log from an offset (what tail reads
    need): read the first record from offset 4 and compare it with a read from the start. Return
    "yes", "no (why)", or "untested (why)". Reads a few dozen bytes; the terminal stays enabled.
    Raise TerminalError."""
    with _session(device, timeout_seconds, deadline_seconds, cancel) as session:
        state = session.read_state(utc_now, details=False)
        check_count(device.name, state)
        if state.record_count == 0:
            return "untested (the log is empty)"
        prepared = session.prepare(CMD_ATTLOG_RRQ, 0)
        if isinstance(prepared, bytes):
            session.free()
            return "untested (the log is small enough to come whole)"
        size = (prepared - 4) // state.record_count if prepared > 4 else 0
        if size <= 0 or prepared != 4 + size * state.record_count:
            session.free()
            return "untested (the log moved while it was looked at)"
        try:
            head = session.read_range(0, 4 + size, aligned=True)
            at_offset = session.read_range(4, size)
        except OffsetUnsupported as finding:
            return f"no ({finding.reason})"
        session.free()
    if at_offset != head[4:]:
        return "no (it answers reads from an offset with the buffer's start)"
    return "yes"


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
    """The production reader the poller uses: `read_log`, `read_users` and `set_time` of this module."""

    def __init__(self, *, deadline_seconds: float | None = None) -> None:
        """Optionally override the per-session deadline (default: `default_deadline_seconds`)."""
        self.deadline_seconds = deadline_seconds

    def read_users(
        self, device: DeviceLike, *, timeout_seconds: float, cancel: threading.Event | None
    ) -> list[TerminalUser]:
        """See `read_users`."""
        return read_users(device, timeout_seconds, deadline_seconds=self.deadline_seconds, cancel=cancel)

    def read_log(
        self,
        device: DeviceLike,
        *,
        timeout_seconds: float,
        known: KnownLog,
        ensure_enabled: bool,
        now: Callable[[], datetime],
        cancel: threading.Event | None,
        allow_full: bool = True,
    ) -> LogRead:
        """See `read_log`."""
        return read_log(
            device,
            timeout_seconds,
            known=known,
            allow_full=allow_full,
            ensure_enabled=ensure_enabled,
            now=now,
            deadline_seconds=self.deadline_seconds,
            cancel=cancel,
        )

    def set_time(self, device: DeviceLike, *, timeout_seconds: float, at: datetime) -> None:
        """See `set_time`."""
        set_time(device, timeout_seconds, at=at, deadline_seconds=self.deadline_seconds)
