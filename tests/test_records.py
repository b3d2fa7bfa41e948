"""The record codec: time encoding, attendance and user-table layouts, tolerance of garbage."""

from __future__ import annotations

import contextlib
import re
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zkdingsync.devices import records
from zkdingsync.devices.records import (
    RECORD_SIZES,
    USER_TABLE_SIZES,
    decode_time,
    encode_attendance_buffer,
    encode_local_time,
    encode_records,
    encode_time,
    encode_user_table_buffer,
    format_local_time,
    needs_user_table,
    parse_attendance_buffer,
    parse_user_table,
    with_length_prefix,
)
from zkdingsync.errors import RecordFormatError
from zkdingsync.model import AttendanceRecord, TerminalUser

# ---------------------------------------------------------------------------------------------- time


def test_time_matches_reference_example() -> None:
    assert encode_time(2024, 5, 6, 7, 8, 9) == 782550489
    assert decode_time(782550489) == (2024, 5, 6, 7, 8, 9)
    assert format_local_time(782550489) == "2024-05-06 07:08:09"
    assert encode_local_time("2024-05-06 07:08:09") == 782550489


def test_impossible_dates_are_representable() -> None:
    value = encode_local_time("2023-02-31 23:59:59")
    assert format_local_time(value) == "2023-02-31 23:59:59"
    assert format_local_time(0) == "2000-01-01 00:00:00"
    assert format_local_time(0xFFFFFFFF).startswith("2133-")


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_every_u32_decodes_and_reencodes(value: int) -> None:
    assert encode_time(*decode_time(value)) == value
    assert encode_local_time(format_local_time(value)) == value


@given(
    st.integers(2000, 2099),
    st.integers(1, 12),
    st.integers(1, 31),
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
)
def test_time_fields_round_trip(y: int, mo: int, d: int, h: int, mi: int, s: int) -> None:
    assert decode_time(encode_time(y, mo, d, h, mi, s)) == (y, mo, d, h, mi, s)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2024-05-06",
        "2024-05-06T07:08:09",
        "1999-12-31 23:59:59",
        "2024-13-01 00:00:00",
        "2024-05-06 24:00:00",
        "２０２４-05-06 07:08:09",
        "2024-05-00 07:08:09",
    ],
)
def test_bad_time_text_is_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        encode_local_time(text)


# ------------------------------------------------------------------------------------ attendance log

_times = st.integers(min_value=0, max_value=0xFFFFFFFF).map(format_local_time)
_byte = st.integers(0, 255)
_ascii_enroll = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=24
)


def _records_for(size: int) -> st.SearchStrategy[list[AttendanceRecord]]:
    if size == 8:
        one = st.builds(
            lambda uid, t, v, p: AttendanceRecord(f"E{uid}", t, v, p, 0, uid),
            st.integers(0, 0xFFFF),
            _times,
            _byte,
            _byte,
        )
    elif size == 16:
        one = st.builds(
            lambda e, t, v, p, w: AttendanceRecord(str(e), t, v, p, w, None),
            st.integers(0, 0xFFFFFFFF),
            _times,
            _byte,
            _byte,
            st.integers(0, 0xFFFFFFFF),
        )
    else:
        one = st.builds(
            lambda uid, e, t, v, p: AttendanceRecord(e, t, v, p, 0, uid),
            st.integers(0, 0xFFFF),
            _ascii_enroll,
            _times,
            _byte,
            _byte,
        )
    return st.lists(one, max_size=40)


@pytest.mark.parametrize("size", [8, 16, 40, 49])
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_records_round_trip(size: int, data: st.DataObject) -> None:
    original = data.draw(_records_for(size))
    buffer = encode_attendance_buffer(original, size)
    assert len(buffer) == 4 + size * len(original)
    users = {r.uid: r.enroll_number for r in original if r.uid is not None} if size == 8 else None
    parsed_size, parsed = parse_attendance_buffer(buffer, len(original), users)
    assert parsed == original
    assert parsed_size == (size if original else 0)


def test_eight_byte_layout_falls_back_to_uid_without_user_table() -> None:
    record = AttendanceRecord("1001", "2024-05-06 07:08:09", 1, 0, 0, 7)
    size, parsed = parse_attendance_buffer(encode_attendance_buffer([record], 8), 1)
    assert size == 8
    assert parsed[0].enroll_number == "7"
    assert needs_user_table(8) and not needs_user_table(16) and not needs_user_table(40)


def test_record_count_zero_is_empty() -> None:
    assert parse_attendance_buffer(b"", 0) == (0, [])
    assert parse_attendance_buffer(b"\xff" * 17, 0) == (0, [])


@pytest.mark.parametrize(
    ("buffer", "count", "message"),
    [
        (b"", 1, "no u32 length prefix"),
        (struct.pack("<I", 80) + b"\0" * 40, 2, "truncated"),
        (struct.pack("<I", 80) + b"\0" * 80, 3, "do not divide"),
        (struct.pack("<I", 60) + b"\0" * 60, 2, "30 bytes per record"),
        (struct.pack("<I", 0), 1, "0 bytes per record"),
        (struct.pack("<I", 8) + b"\0" * 8, -1, "negative"),
    ],
)
def test_malformed_buffers_say_why(buffer: bytes, count: int, message: str) -> None:
    with pytest.raises(RecordFormatError, match=message):
        parse_attendance_buffer(buffer, count)


@settings(max_examples=300)
@given(st.binary(max_size=600), st.integers(min_value=-5, max_value=100), st.booleans())
def test_garbage_never_raises_anything_but_record_format_error(
    buffer: bytes, count: int, fix_prefix: bool
) -> None:
    if fix_prefix and len(buffer) >= 4:
        # Make the length prefix right so the parser reaches the per-record decoding.
        buffer = struct.pack("<I", len(buffer) - 4) + buffer[4:]
    for parse in (parse_attendance_buffer, parse_user_table):
        with contextlib.suppress(RecordFormatError):
            parse(buffer, count)


@given(st.binary(min_size=24, max_size=24), st.binary(min_size=8, max_size=8))
def test_any_bytes_in_text_fields_decode(user_id: bytes, name: bytes) -> None:
    # 40-byte record with arbitrary enroll-number bytes, and a 28-byte user with arbitrary name bytes.
    record = struct.pack("<H24sBIB8x", 1, user_id, 1, 782550489, 0)
    _, parsed = parse_attendance_buffer(with_length_prefix(record), 1)
    assert parsed[0].local_time == "2024-05-06 07:08:09"
    user = struct.pack("<HB5s8sIxBhI", 1, 0, b"", name, 0, 1, 0, 42)
    assert parse_user_table(with_length_prefix(user), 1)[0].enroll_number == "42"


def test_49_byte_log_that_pyzk_misreads() -> None:
    """pyzk 0.9 walks anything not 8 or 16 bytes with a 40-byte stride: on 49-byte firmware every record
    after the first is read from the wrong offset. Ours parses every record exactly."""
    originals = [
        AttendanceRecord(str(1000 + i), f"2024-05-{6 + i:02d} 08:0{i}:00", 1, i % 2, 0, i + 1)
        for i in range(5)
    ]
    buffer = encode_attendance_buffer(originals, 49)
    size, parsed = parse_attendance_buffer(buffer, 5)
    assert size == 49
    assert parsed == originals

    # What pyzk's loop does with the same bytes (40-byte stride over the records).
    body = buffer[4:]
    pyzk_second = struct.unpack("<H24sB4sB8s", body[40:80])
    assert pyzk_second[1].split(b"\0")[0] != b"1001"


def test_gbk_names_and_both_user_tables() -> None:
    users = [TerminalUser(1, "1001", "张三", 0, 123), TerminalUser(2, "1002", "Bob", 14, 0)]
    for size in (28, 72):
        for encoding in ("utf-8", "gbk"):
            parsed = parse_user_table(encode_user_table_buffer(users, size, encoding), 2)
            assert parsed == users
    letters = [TerminalUser(3, "A-17", "Long Name Of Twenty", 0, 0)]
    assert parse_user_table(encode_user_table_buffer(letters, 72), 1) == letters
    with pytest.raises(ValueError):
        encode_user_table_buffer(letters, 28)  # 28-byte tables hold numeric enroll numbers only


def test_user_table_wrong_size_is_record_format_error() -> None:
    with pytest.raises(RecordFormatError, match="user table"):
        parse_user_table(with_length_prefix(b"\0" * 40), 1)
    assert parse_user_table(b"", 0) == []


def test_encoders_reject_unrepresentable_records() -> None:
    with pytest.raises(ValueError):
        encode_records([AttendanceRecord("x", "2024-05-06 07:08:09", 1, 0)], 16)
    with pytest.raises(ValueError):
        encode_records([AttendanceRecord("1", "2024-05-06 07:08:09", 1, 0, 0, 70000)], 8)
    with pytest.raises(ValueError):
        encode_records([AttendanceRecord("1" * 25, "2024-05-06 07:08:09", 1, 0)], 40)
    with pytest.raises(ValueError):
        encode_records([], 12)


def test_parse_is_linear() -> None:
    """200,000 records parse in well under pyzk's ~20 s; a quadratic parser would blow this budget."""
    one = encode_records([AttendanceRecord("12345", "2024-05-06 07:08:09", 1, 0, 0, 3)], 40)
    buffer = with_length_prefix(one * 200_000)
    started = time.perf_counter()
    size, parsed = parse_attendance_buffer(buffer, 200_000)
    elapsed = time.perf_counter() - started
    assert size == 40 and len(parsed) == 200_000
    assert elapsed < 5.0, f"parsing 200,000 records took {elapsed:.2f} s"


def test_codec_and_simulator_do_not_import_zk() -> None:
    package = Path(records.__file__).parents[1]
    sources = [package / "devices" / "records.py", *sorted((package / "simulator").glob("*.py"))]
    for source in sources:
        assert not re.search(r"^\s*(from|import)\s+zk\b", source.read_text(), re.MULTILINE), source


@settings(max_examples=200)
@given(st.sampled_from(RECORD_SIZES), st.integers(min_value=1, max_value=30), st.data())
def test_garbage_records_of_every_size_parse_or_say_why(size: int, count: int, data: st.DataObject) -> None:
    # Random bytes that fit the framing exactly, so every per-record decoder sees garbage (a random
    # buffer rarely divides into a known size); an unknown uid table is random garbage too.
    body = data.draw(st.binary(min_size=size * count, max_size=size * count))
    users = data.draw(st.dictionaries(st.integers(0, 0xFFFF), st.text(max_size=24), max_size=5))
    parsed_size, parsed = parse_attendance_buffer(with_length_prefix(body), count, users)
    assert parsed_size == size and len(parsed) == count
    for record in parsed:
        assert isinstance(record.enroll_number, str) and len(record.local_time) == 19


@settings(max_examples=200)
@given(st.sampled_from(USER_TABLE_SIZES), st.integers(min_value=1, max_value=20), st.data())
def test_garbage_user_tables_of_every_size_parse(size: int, count: int, data: st.DataObject) -> None:
    body = data.draw(st.binary(min_size=size * count, max_size=size * count))
    users = parse_user_table(with_length_prefix(body), count)
    assert len(users) == count
    assert all(isinstance(user.enroll_number, str) and isinstance(user.name, str) for user in users)


@settings(max_examples=200)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=20))
def test_garbage_with_a_right_prefix_never_raises_anything_else(body: bytes, count: int) -> None:
    for parse in (parse_attendance_buffer, parse_user_table):
        with contextlib.suppress(RecordFormatError):
            parse(with_length_prefix(body), count)


def test_ids_that_are_not_utf8_keep_a_key_that_round_trips() -> None:
    # "你好" in GBK: not UTF-8. Replaced by U+FFFD it could never be told apart or mapped.
    gbk_id = "你好".encode("gbk")
    raw_user = gbk_id.ljust(24, b"\0")
    buffer = with_length_prefix(struct.pack("<H24sB4sB8s", 7, raw_user, 1, b"\0\0\0\0", 0, b"\0" * 8))
    _, [record] = parse_attendance_buffer(buffer, 1)
    assert record.enroll_number == "hex:" + gbk_id.hex() == "hex:c4e3bac3"
    # Encoding the key gives the terminal's bytes back, for the 40-byte records and the 72-byte users.
    again = encode_records([record], 40)
    assert parse_attendance_buffer(with_length_prefix(again), 1)[1] == [record]
    user = TerminalUser(7, record.enroll_number, "张三", 0, 0)
    assert parse_user_table(encode_user_table_buffer([user], 72, "gbk"), 1) == [user]
    # Text that merely looks like a key stays text.
    for text in ("hex:41", "hex:zz", "hex:"):
        looks = AttendanceRecord(text, "2024-05-06 07:08:09", 1, 0, 0, 1)
        assert parse_attendance_buffer(with_length_prefix(encode_records([looks], 40)), 1)[1] == [looks]
