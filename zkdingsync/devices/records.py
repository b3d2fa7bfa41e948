"""Byte layouts of a ZK terminal's attendance log and user table, and the terminal's time codec.

Pure stdlib. The parsers are linear: they walk the buffer once with precompiled `struct.Struct`
objects over a memoryview (pyzk 0.9 re-slices the remaining buffer per record, which is quadratic and
takes ~20 s at 200,000 records). Anything a terminal sends that does not fit a known layout raises
`RecordFormatError`, never `struct.error`, `UnicodeDecodeError` or `ValueError`.

A buffer, as pyzk's `read_with_buffer()` returns it, is a u32 byte count followed by that many bytes of
fixed-size records. The record size is not announced: it is the byte count divided by the record count
that GET_FREE_SIZES reported, and the two must agree exactly.

Attendance layouts (little-endian):

| size | layout |
|---|---|
| 8  | uid u16, verify u8, time u32, punch u8 (enroll number looked up from uid in the user table) |
| 16 | enroll number u32, time u32, verify u8, punch u8, 2 reserved, workcode u32 |
| 40 | uid u16, enroll number ASCII NUL-padded (24), verify u8, time u32, punch u8, 8 spare |
| 49 | as 40 with 9 more spare bytes (newer firmware) |

User tables: 28 bytes `<HB5s8sIxBhI` (uid, privilege, password, name, card, group, timezone, enroll
number u32) or 72 bytes `<HB8s24sIx7sx24s` (uid, privilege, password, name, card, group, enroll number
ASCII).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping, Sequence

from zkdingsync.errors import RecordFormatError
from zkdingsync.model import AttendanceRecord, TerminalUser

RECORD_SIZES = (8, 16, 40, 49)
USER_TABLE_SIZES = (28, 72)

# The time field is a u32 counting "31-day months" of "12-month years" from 2000-01-01 00:00:00, so
# every decoded value is 2000..2133 with days 1..31 in every month: impossible dates are representable.
_SECONDS_PER_DAY = 86_400
_DAYS_PER_YEAR = 12 * 31
_MAX_TIME = 0xFFFF_FFFF
MAX_YEAR = 2000 + _MAX_TIME // (_DAYS_PER_YEAR * _SECONDS_PER_DAY)  # 2133

_U32 = struct.Struct("<I")
_RECORD_8 = struct.Struct("<HBIB")
_RECORD_16 = struct.Struct("<IIBB2xI")
_RECORD_40 = struct.Struct("<H24sBIB8x")
_RECORD_49 = struct.Struct("<H24sBIB17x")
_USER_28 = struct.Struct("<HB5s8sIxBhI")
_USER_72 = struct.Struct("<HB8s24sIx7sx24s")

_RECORD_STRUCTS = {8: _RECORD_8, 16: _RECORD_16, 40: _RECORD_40, 49: _RECORD_49}
_USER_STRUCTS = {28: _USER_28, 72: _USER_72}


# --------------------------------------------------------------------------------------------- time


def encode_time(year: int, month: int, day: int, hour: int, minute: int, second: int) -> int:
    """Given a terminal wall-clock time, return the terminal's u32 encoding of it.

    Days up to 31 are accepted in every month, because terminals store (and we must re-encode)
    impossible dates such as February 31. Raise ValueError if a field is out of range.
    """
    if not 2000 <= year <= MAX_YEAR:
        raise ValueError(f"year {year} is outside 2000..{MAX_YEAR}")
    if not (
        1 <= month <= 12 and 1 <= day <= 31 and 0 <= hour <= 23 and 0 <= minute <= 59 and 0 <= second <= 59
    ):
        raise ValueError(f"time field out of range: {year}-{month}-{day} {hour}:{minute}:{second}")
    value = (
        ((year - 2000) * _DAYS_PER_YEAR + (month - 1) * 31 + day - 1) * _SECONDS_PER_DAY
        + (hour * 60 + minute) * 60
        + second
    )
    if value > _MAX_TIME:
        raise ValueError(
            f"{year}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d} does not fit in u32"
        )
    return value


def decode_time(value: int) -> tuple[int, int, int, int, int, int]:
    """Given a terminal's u32 time, return (year, month, day, hour, minute, second).

    Every u32 decodes; the result may name an impossible date. Raise ValueError if `value` is not a u32.
    """
    if not 0 <= value <= _MAX_TIME:
        raise ValueError(f"time value {value} is not a u32")
    second = value % 60
    value //= 60
    minute = value % 60
    value //= 60
    hour = value % 24
    value //= 24
    day = value % 31 + 1
    value //= 31
    month = value % 12 + 1
    year = value // 12 + 2000
    return year, month, day, hour, minute, second


def format_local_time(value: int) -> str:
    """Given a terminal's u32 time, return it as "YYYY-MM-DD HH:MM:SS", even for impossible dates."""
    year, month, day, hour, minute, second = decode_time(value)
    return f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}"


def encode_local_time(text: str) -> int:
    """Given "YYYY-MM-DD HH:MM:SS" (possibly an impossible date), return the terminal's u32 time.

    Raise ValueError if the text is not in that shape or a field is out of range.
    """
    if (
        len(text) != 19
        or text[4] != "-"
        or text[7] != "-"
        or text[10] != " "
        or text[13] != ":"
        or text[16] != ":"
    ):
        raise ValueError(f"not a 'YYYY-MM-DD HH:MM:SS' time: {text!r}")
    fields = (text[0:4], text[5:7], text[8:10], text[11:13], text[14:16], text[17:19])
    if not all(part.isascii() and part.isdigit() for part in fields):
        raise ValueError(f"not a 'YYYY-MM-DD HH:MM:SS' time: {text!r}")
    year, month, day, hour, minute, second = (int(part) for part in fields)
    return encode_time(year, month, day, hour, minute, second)


def _time_formatter() -> Callable[[int], str]:
    """Return a memoizing `format_local_time` for one parse: logs repeat the same second rarely, but
    the date prefix repeats constantly, so cache per day and format only the clock part."""
    days: dict[int, str] = {}
    # Clock parts repeat too in a large log (at most 86,400 of them): formatting each once saves a
    # fifth of the parse.
    clocks: dict[int, str] = {}

    def format_time(value: int) -> str:
        day_number, seconds = divmod(value, _SECONDS_PER_DAY)
        prefix = days.get(day_number)
        if prefix is None:
            year, month, day, _, _, _ = decode_time(day_number * _SECONDS_PER_DAY)
            prefix = f"{year:04d}-{month:02d}-{day:02d} "
            days[day_number] = prefix
        clock = clocks.get(seconds)
        if clock is None:
            minutes, second = divmod(seconds, 60)
            hour, minute = divmod(minutes, 60)
            clock = clocks[seconds] = f"{hour:02d}:{minute:02d}:{second:02d}"
        return prefix + clock

    return format_time


# ---------------------------------------------------------------------------------------------- text


# An id (enroll number) whose bytes are not UTF-8 is kept as this prefix and the bytes in hex: U+FFFD
# in their place could never be told apart or mapped; "hex:c4e3" maps in users.map and encodes back.
HEX_ID_PREFIX = "hex:"
# The widest enroll number a layout carries: the text field of the 40/49-byte records and the 72-byte
# users (the 16-byte records and 28-byte users carry a u32, at most 10 digits).
ID_FIELD_BYTES = 24
_HEX_ID = re.compile(r"hex:(?:[0-9a-f]{2}){1,24}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def unreportable_id(text: str) -> str | None:
    """Given an enroll number as the config names it, return why no terminal could report it ("it is
    empty", "it is longer than 24 bytes", "it holds a control character"), or None when one can: any
    text of at most 24 bytes in UTF-8 (as `_decode_id_field` gives it), or an id that is not text as
    "hex:" and its bytes."""
    if _HEX_ID.fullmatch(text):
        return None
    if not text:
        return "it is empty"
    if _CONTROL.search(text):
        return "it holds a control character"
    if len(text.encode("utf-8", errors="surrogatepass")) > ID_FIELD_BYTES:
        return f"it is longer than the {ID_FIELD_BYTES} bytes (UTF-8) a terminal's enroll number holds"
    return None


def _decode_id_field(raw: bytes) -> str:
    """Decode a NUL-padded id field (terminals write garbage past the first NUL): its UTF-8 text, else
    HEX_ID_PREFIX and its bytes in hex."""
    data = raw.split(b"\x00", 1)[0]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return HEX_ID_PREFIX + data.hex()


def _encode_id_field(text: str, width: int, what: str) -> bytes:
    """The bytes of an id field: the inverse of `_decode_id_field` (a "hex:..." id is its raw bytes)."""
    if text.startswith(HEX_ID_PREFIX):
        try:
            data = bytes.fromhex(text[len(HEX_ID_PREFIX) :])
            data.decode("utf-8")
        except UnicodeDecodeError:
            if b"\x00" not in data and len(data) <= width:
                return data
        except ValueError:
            pass  # not hex: an id that merely starts with "hex:"
    return _encode_text_field(text, width, what)


def _decode_name(raw: bytes) -> str:
    """Decode a user name: UTF-8 if it is valid, else GBK (Chinese-market firmware), never raising."""
    text = raw.split(b"\x00", 1)[0]
    try:
        return text.decode("utf-8").strip()
    except UnicodeDecodeError:
        return text.decode("gbk", errors="replace").strip()


def _encode_text_field(text: str, width: int, what: str, encoding: str = "utf-8") -> bytes:
    """Encode text into a NUL-padded field; raise ValueError if it does not fit or contains NUL."""
    data = text.encode(encoding)
    if b"\x00" in data:
        raise ValueError(f"{what} {text!r} contains NUL")
    if len(data) > width:
        raise ValueError(f"{what} {text!r} is longer than {width} bytes")
    return data


# ------------------------------------------------------------------------------------------- buffers


def _split_buffer(buffer: bytes, count: int, sizes: Sequence[int], what: str) -> tuple[int, memoryview]:
    """Check a "u32 byte count + records" buffer against `count`; return (item size, records view)."""
    if count < 0:
        raise RecordFormatError(f"{what}: negative count {count}")
    if len(buffer) < 4:
        raise RecordFormatError(f"{what}: buffer of {len(buffer)} bytes has no u32 length prefix")
    (total,) = _U32.unpack_from(buffer, 0)
    available = len(buffer) - 4
    if total != available:
        raise RecordFormatError(
            f"{what}: length prefix says {total} bytes but {available} bytes follow it "
            "(truncated or framing error)"
        )
    if total % count != 0:
        raise RecordFormatError(
            f"{what}: {total} bytes do not divide into {count} records "
            "(did a punch arrive between the size query and the download?)"
        )
    size = total // count
    if size not in sizes:
        raise RecordFormatError(
            f"{what}: {total} bytes / {count} records = {size} bytes per record, "
            f"not one of the known layouts {', '.join(map(str, sizes))}"
        )
    return size, memoryview(buffer)[4:]


def needs_user_table(record_size: int) -> bool:
    """Given a record size, return True if its records carry only the uid (8 bytes), so the user table
    is needed to learn each punch's enroll number."""
    return record_size == 8


def parse_attendance_buffer(
    buffer: bytes, record_count: int, users_by_uid: Mapping[int, str] | None = None
) -> tuple[int, list[AttendanceRecord]]:
    """Given a downloaded attendance buffer and the record count from GET_FREE_SIZES, return
    (record size, records) in log order.

    `users_by_uid` maps a terminal uid to its enroll number; it is only used by the 8-byte layout,
    where an unknown uid falls back to str(uid). A record count of 0 returns (0, []). Raise
    RecordFormatError if the buffer is truncated, its size does not divide into the count, or the
    record size is not 8, 16, 40 or 49.
    """
    if record_count == 0:
        return 0, []
    size, view = _split_buffer(buffer, record_count, RECORD_SIZES, "attendance log")
    try:
        return size, parse_records(view, size, users_by_uid)
    finally:
        view.release()


def parse_records(
    body: bytes | memoryview, size: int, users_by_uid: Mapping[int, str] | None = None
) -> list[AttendanceRecord]:
    """Given raw records of `size` bytes back to back (no length prefix; a whole number of them), return
    them parsed, in order. `users_by_uid` as for `parse_attendance_buffer`. Raise RecordFormatError for
    an unknown size or a partial record."""
    if size not in RECORD_SIZES or len(body) % size:
        raise RecordFormatError(f"attendance log: {len(body)} bytes are not whole records of {size} bytes")
    format_time = _time_formatter()
    records: list[AttendanceRecord] = []
    append = records.append
    if size == 8:
        users = users_by_uid or {}
        for uid, verify, when, punch in _RECORD_8.iter_unpack(body):
            enroll = users.get(uid)
            append(
                AttendanceRecord(
                    enroll if enroll is not None else str(uid), format_time(when), verify, punch, 0, uid
                )
            )
    elif size == 16:
        for user_id, when, verify, punch, workcode in _RECORD_16.iter_unpack(body):
            append(AttendanceRecord(str(user_id), format_time(when), verify, punch, workcode, None))
    else:
        # Enroll numbers repeat across the log: decode each distinct raw field once.
        names: dict[bytes, str] = {}
        for uid, raw_user, verify, when, punch in _RECORD_STRUCTS[size].iter_unpack(body):
            enroll = names.get(raw_user)
            if enroll is None:
                enroll = names[raw_user] = _decode_id_field(raw_user)
            append(AttendanceRecord(enroll, format_time(when), verify, punch, 0, uid))
    return records


def parse_user_table(buffer: bytes, user_count: int) -> list[TerminalUser]:
    """Given a downloaded user-table buffer and the user count from GET_FREE_SIZES, return the users.

    Handles the 28-byte (numeric enroll number) and 72-byte (text enroll number) layouts; names are
    UTF-8 or GBK. A user count of 0 returns []. Raise RecordFormatError if the buffer does not fit.
    """
    if user_count == 0:
        return []
    size, view = _split_buffer(buffer, user_count, USER_TABLE_SIZES, "user table")
    users: list[TerminalUser] = []
    try:
        if size == 28:
            for uid, privilege, _password, name, card, _group, _zone, user_id in _USER_28.iter_unpack(view):
                users.append(TerminalUser(uid, str(user_id), _decode_name(name), privilege, card))
        else:
            for uid, privilege, _password, name, card, _group, user_id in _USER_72.iter_unpack(view):
                users.append(
                    TerminalUser(uid, _decode_id_field(user_id), _decode_name(name), privilege, card)
                )
    finally:
        view.release()
    return users


# ------------------------------------------------------------------------------------------ encoders


def _u32_enroll(record_enroll: str) -> int:
    """The 16-byte and 28-byte layouts carry the enroll number as a u32."""
    if not (record_enroll.isascii() and record_enroll.isdigit()) or int(record_enroll) > _MAX_TIME:
        raise ValueError(f"enroll number {record_enroll!r} is not a u32 decimal, as this layout needs")
    return int(record_enroll)


def encode_record(record: AttendanceRecord, size: int, time_value: int | None = None) -> bytes:
    """Given a record, return its bytes in the `size` layout.

    `time_value` overrides the encoded time (a raw u32, e.g. for records a terminal garbled). The 8-byte
    layout stores `record.uid` (or the enroll number as uid when uid is None). Raise ValueError if the
    record cannot be represented in that layout.
    """
    try:
        return _pack_record(
            record, size, encode_local_time(record.local_time) if time_value is None else time_value
        )
    except struct.error as error:
        raise ValueError(f"record {record} does not fit the {size}-byte layout: {error}") from error


def _pack_record(record: AttendanceRecord, size: int, when: int) -> bytes:
    """Pack one record; struct.error if a number does not fit its field."""
    if size == 8:
        uid = record.uid if record.uid is not None else int(record.enroll_number)
        return _RECORD_8.pack(uid, record.verify_mode, when, record.punch_state)
    if size == 16:
        return _RECORD_16.pack(
            _u32_enroll(record.enroll_number), when, record.verify_mode, record.punch_state, record.workcode
        )
    if size in (40, 49):
        enroll = _encode_id_field(record.enroll_number, 24, "enroll number")
        uid = record.uid if record.uid is not None else 0
        return _RECORD_STRUCTS[size].pack(uid, enroll, record.verify_mode, when, record.punch_state)
    raise ValueError(f"unknown record size {size}")


def encode_records(records: Sequence[AttendanceRecord], size: int) -> bytes:
    """Given records, return them encoded in the `size` layout (8, 16, 40 or 49), without a length
    prefix. Raise ValueError if a record cannot be represented in that layout."""
    if size not in RECORD_SIZES:
        raise ValueError(f"unknown record size {size}")
    return b"".join(encode_record(record, size) for record in records)


def with_length_prefix(data: bytes) -> bytes:
    """Return `data` as a terminal buffer: a u32 byte count followed by the bytes."""
    return _U32.pack(len(data)) + data


def encode_attendance_buffer(records: Sequence[AttendanceRecord], size: int) -> bytes:
    """Given records, return the attendance buffer a terminal sends: u32 byte count, then the records."""
    return with_length_prefix(encode_records(records, size))


def encode_user(user: TerminalUser, size: int, name_encoding: str = "utf-8") -> bytes:
    """Given a user, return its user-table entry in the `size` layout (28 or 72).

    Raise ValueError if the user cannot be represented (name too long, non-numeric enroll number for 28).
    """
    try:
        return _pack_user(user, size, name_encoding)
    except struct.error as error:
        raise ValueError(f"user {user} does not fit the {size}-byte layout: {error}") from error


def _pack_user(user: TerminalUser, size: int, name_encoding: str) -> bytes:
    """Pack one user-table entry; struct.error if a number does not fit its field."""
    if size == 28:
        name = _encode_text_field(user.name, 8, "name", name_encoding)
        return _USER_28.pack(
            user.uid, user.privilege, b"", name, user.card, 1, 0, _u32_enroll(user.enroll_number)
        )
    if size == 72:
        name = _encode_text_field(user.name, 24, "name", name_encoding)
        enroll = _encode_id_field(user.enroll_number, 24, "enroll number")
        return _USER_72.pack(user.uid, user.privilege, b"", name, user.card, b"1", enroll)
    raise ValueError(f"unknown user table size {size}")


def encode_user_table(users: Sequence[TerminalUser], size: int, name_encoding: str = "utf-8") -> bytes:
    """Given users, return them encoded in the `size` layout (28 or 72), without a length prefix."""
    if size not in USER_TABLE_SIZES:
        raise ValueError(f"unknown user table size {size}")
    return b"".join(encode_user(user, size, name_encoding) for user in users)


def encode_user_table_buffer(users: Sequence[TerminalUser], size: int, name_encoding: str = "utf-8") -> bytes:
    """Given users, return the user-table buffer a terminal sends: u32 byte count, then the entries."""
    return with_length_prefix(encode_user_table(users, size, name_encoding))
