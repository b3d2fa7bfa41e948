"""Reading a terminal's attendance log over an open session: the whole log, or only its new tail.

A buffered read is two steps: PREPARE_BUFFER (the terminal answers with the buffer's size) and
READ_BUFFER of any byte range. Records are in the order they were recorded, so the new ones are at the
end, record i at bytes `4 + size*i`. With the last record the store holds (`LogTail`):

* the count grew by k: read the last k records plus the stored last one as an overlap; when the overlap
  is byte for byte the stored record, the k records are new. Otherwise the log was cleared and refilled,
  rotated or edited: read it whole.
* the log is full (it refuses new punches, or rotates: drops its oldest record for each new one, so the
  count never moves): read the last record; when it is the stored one nothing is new. Otherwise read a
  growing tail (doubling, at most `TAIL_SEARCH_BYTES`) until the stored record is found, and take what
  follows it; not found within the bound: read the log whole.

The terminal is disabled around every read of the log, and re-enabled by the session's clean-up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog

from zkdingsync.devices.records import RECORD_SIZES, needs_user_table, parse_user_table
from zkdingsync.devices.results import MAX_RECORDS, LogDigest, LogRead, LogTail, TerminalState
from zkdingsync.devices.session import CMD_ATTLOG_RRQ, CMD_USERTEMP_RRQ, FCT_USER, Session
from zkdingsync.errors import RecordFormatError, TerminalError

log = structlog.get_logger(__name__)

TAIL_SEARCH_BYTES = 64 * 1024  # the most a full log's tail is searched for the stored last record
# A whole read of a log this small (400 KB of 40-byte records) needs none of the few full-read slots.
SMALL_LOG_RECORDS = 10_000
_LARGEST_RECORD = max(RECORD_SIZES)
_LARGEST_USER = 72
_DOWNLOAD_ATTEMPTS = 2  # a log that moves under a disabled terminal twice in a row is left for next poll


@dataclass(frozen=True)
class TailMiss:
    """A tail read that did not find the stored last record: the first range read (start, bytes), kept
    to tell afterwards whether the firmware ignored the offset."""

    start: int
    data: bytes


def check_count(device: str, state: TerminalState) -> None:
    """Refuse (TerminalError) a record count above the terminal's own capacity or above `MAX_RECORDS`:
    a download is sized by the count, and a garbled one must not size it."""
    count, capacity = state.record_count, state.record_capacity
    if count > MAX_RECORDS:
        raise TerminalError(
            device,
            f"reports {count:,} records, more than any terminal holds (at most {MAX_RECORDS:,} are read); "
            "its log is not downloaded",
        )
    if capacity and count > capacity:
        raise TerminalError(
            device,
            f"reports {count:,} records, more than its capacity of {capacity:,}; its log is not downloaded",
        )


def usable_tail(known: LogTail | None, state: TerminalState) -> LogTail | None:
    """Return `known` when a tail read can find what is new after it: same serial, a record stored, and
    a log that grew or is full (a shrunken log was cleared: it is read whole)."""
    if known is None or known.serial != state.serial or known.record_count <= 0 or not known.last_record:
        return None
    if len(known.last_record) != known.record_size or state.record_count <= 0:
        return None
    if state.record_count > known.record_count or state.log_full:
        return known
    return None


def read_tail(session: Session, known: LogTail, state: TerminalState) -> LogRead | TailMiss:
    """Read only what follows the stored last record (see the module docstring). Return the read, or
    a TailMiss when a whole-log read is needed. Raise OffsetUnsupported, or library errors."""
    size = known.record_size
    session.disable()
    session.downloading = True
    prepared = session.prepare(CMD_ATTLOG_RRQ, 0)
    if isinstance(prepared, bytes):
        session.free()
        return TailMiss(0, b"")  # small enough to come inline: it is read whole anyway
    total = prepared
    if total < 4 or (total - 4) % size or (total - 4) // size > MAX_RECORDS:
        session.free()
        return TailMiss(0, b"")  # another record size, or the log moved: read it whole
    count = (total - 4) // size
    read_bytes = 0
    first_range: tuple[int, bytes] | None = None

    def read(first: int, last: int) -> bytes:
        nonlocal read_bytes, first_range
        data = bytes(session.read_range(4 + first * size, (last - first) * size))
        read_bytes += len(data)
        if first_range is None:
            first_range = (4 + first * size, data)
        return data

    found: bytes | None = None
    if count > known.record_count:
        data = read(known.record_count - 1, count)
        if data[:size] == known.last_record:
            found = data[size:]
    if found is None and state.log_full:
        found = _search(read, known.last_record, size, count)
    session.free()
    if found is None:
        start, data = first_range or (0, b"")
        return TailMiss(start, data)
    users_by_uid: dict[int, str] | None = None
    if found and needs_user_table(size) and state.users > 0:
        buffer = session.read_buffer(CMD_USERTEMP_RRQ, FCT_USER, 4 + state.users * _LARGEST_USER)
        users_by_uid = _users_by_uid(session.device.name, buffer, state.users)
    last = found[-size:] if found else known.last_record
    return LogRead(
        users_by_uid=users_by_uid,
        state=replace(state, record_count=count),
        downloaded=bool(found),
        record_size=size,
        body=found,
        first_index=count - len(found) // size,
        tail=LogTail(state.serial, size, count, last),
        offset_reads=True,
        log_bytes=read_bytes,
    )


def _search(read: Callable[[int, int], bytes], last_record: bytes, size: int, count: int) -> bytes | None:
    """Look for `last_record` in a tail growing from 1 record, doubling up to `TAIL_SEARCH_BYTES`;
    return the records after the latest copy of it, or None. `read(first, last)` reads records."""
    limit = min(count, max(1, TAIL_SEARCH_BYTES // size))
    have = b""
    held = 0
    while held < limit:
        wanted = min(limit, max(1, held * 2))
        older = read(count - wanted, count - held)
        have = older + have
        for index in range(wanted - held - 1, -1, -1):  # newest first within the part just read
            if have[index * size : (index + 1) * size] == last_record:
                return have[(index + 1) * size :]
        held = wanted
    return None


def download(
    session: Session, state: TerminalState, known: LogDigest | None, miss: TailMiss | None
) -> LogRead:
    """Disable the terminal, read the whole log (and the user table for 8-byte records), check the
    count did not move. Raise TerminalError or library errors."""
    session.disable()
    session.downloading = True
    name = session.device.name
    for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
        users, _, count, capacity = session.read_sizes()
        check_count(name, replace(state, record_count=count, record_capacity=capacity))
        if count == 0:
            return LogRead(state=replace(state, record_count=0), downloaded=True, full=True)
        buffer = _read_whole(session, count)
        body = len(buffer) - 4
        user_buffer: bytes | None = None
        if body > 0 and body % count == 0 and needs_user_table(body // count) and users > 0:
            user_buffer = session.read_buffer(CMD_USERTEMP_RRQ, FCT_USER, 4 + users * _LARGEST_USER)
        _, _, count_after, _ = session.read_sizes()
        if count_after != count:
            log.warning(
                "terminal.log_moved",
                device=name,
                attempt=attempt,
                before=count,
                after=count_after,
                hint="a punch landed during the download although the terminal was disabled",
            )
            continue
        read = _parse(name, replace(state, record_count=count), buffer, users, user_buffer, known)
        problem = _offset_ignored(buffer, miss)
        return replace(read, offset_reads=False, offset_problem=problem) if problem else read
    raise TerminalError(
        name,
        "record count and buffer disagree: the log kept changing during the download; retrying next poll",
    )


def _read_whole(session: Session, count: int) -> bytes | bytearray:
    """Prepare and read the whole log buffer, refusing one larger than `count` records can take."""
    prepared = session.prepare(CMD_ATTLOG_RRQ, 0)
    if isinstance(prepared, bytes):
        return prepared
    if prepared > 4 + count * _LARGEST_RECORD:
        raise TerminalError(
            session.device.name,
            f"announces a log of {prepared:,} bytes, more than {count:,} records take; "
            "its log is not downloaded",
        )
    buffer = session.read_range(0, prepared, aligned=True)
    session.free()
    return buffer


def _offset_ignored(buffer: bytes | bytearray, miss: TailMiss | None) -> str:
    """After a tail read missed and the whole log was read: did the firmware serve the tail from the
    start of the buffer instead of the offset asked? Then say so (the terminal is read whole from now)."""
    if miss is None or not miss.data or not miss.start:
        return ""
    length = len(miss.data)
    if miss.data == buffer[:length] and miss.data != buffer[miss.start : miss.start + length]:
        return "it answers reads from an offset with the buffer's start"
    return ""


def _users_by_uid(name: str, buffer: bytes, users: int) -> dict[int, str]:
    """The user table as uid -> enroll number (8-byte records name only the uid)."""
    try:
        return {user.uid: user.enroll_number for user in parse_user_table(buffer, users)}
    except RecordFormatError as error:
        raise TerminalError(name, f"malformed user table: {error}") from error


def _parse(
    name: str,
    state: TerminalState,
    buffer: bytes | bytearray,
    users: int,
    user_buffer: bytes | None,
    known: LogDigest | None,
) -> LogRead:
    """Check the framing, skip a prefix proven unchanged by `known`, keep the rest as the body."""
    count = state.record_count
    if len(buffer) < 4 or int.from_bytes(buffer[:4], "little") != len(buffer) - 4:
        raise TerminalError(name, "record count and buffer disagree: the downloaded log is truncated")
    body = len(buffer) - 4
    if body % count or body // count not in RECORD_SIZES:
        raise TerminalError(
            name,
            f"record count and buffer disagree: {body} bytes for {count} records "
            f"is not one of the known record sizes {', '.join(map(str, RECORD_SIZES))}",
        )
    size = body // count
    users_by_uid = None if user_buffer is None else _users_by_uid(name, user_buffer, users)
    view = memoryview(buffer)
    hasher = hashlib.blake2b(digest_size=16)
    first = 0
    if (
        known is not None
        and known.serial == state.serial
        and known.record_size == size
        and 0 < known.record_count <= count
    ):
        hasher.update(view[4 : 4 + known.record_count * size])
        if hasher.digest() == known.digest:
            first = known.record_count
        else:
            hasher = hashlib.blake2b(digest_size=16)
    hasher.update(view[4 + first * size :])
    return LogRead(
        state=state,
        downloaded=True,
        record_size=size,
        body=view[4 + first * size :],  # no copy: the records stay in the downloaded buffer
        first_index=first,
        digest=LogDigest(state.serial, size, count, hasher.digest()),
        users_by_uid=users_by_uid,
        full=True,
        tail=LogTail(state.serial, size, count, bytes(view[len(buffer) - size :])),
        log_bytes=len(buffer),
    )
