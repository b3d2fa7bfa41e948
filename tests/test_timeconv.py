"""Terminal wall clock -> epoch milliseconds in the configured zone, DST rules, quarantine reasons."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zkdingsync.model import AttendanceRecord
from zkdingsync.timeconv import (
    Classifier,
    classify,
    describe_duration,
    local_to_datetime,
    local_to_epoch_ms,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")
NOW = datetime(2024, 5, 6, 0, 0, tzinfo=timezone.utc)


def record(local_time: str, enroll: str = "1001") -> AttendanceRecord:
    return AttendanceRecord(enroll, local_time, verify_mode=1, punch_state=0)


def test_shanghai_wall_clock_becomes_utc_epoch_ms() -> None:
    # 07:08:09 at +08:00 is 23:08:09 UTC the day before.
    assert local_to_epoch_ms("2024-05-06 07:08:09", SHANGHAI) == 1714950489000


def test_same_wall_clock_in_another_zone_is_another_moment() -> None:
    shanghai = local_to_epoch_ms("2024-05-06 07:08:09", SHANGHAI)
    utc = local_to_epoch_ms("2024-05-06 07:08:09", ZoneInfo("UTC"))
    assert shanghai is not None and utc is not None
    assert utc - shanghai == 8 * 3600 * 1000


@pytest.mark.parametrize(
    "text",
    ["2024-02-31 07:00:00", "2023-02-29 12:00:00", "2024-04-31 00:00:00", "2024-13-01 00:00:00", "garbage"],
)
def test_impossible_dates_give_none(text: str) -> None:
    assert local_to_epoch_ms(text, SHANGHAI) is None
    assert local_to_datetime(text, SHANGHAI) is None


def test_leap_day_is_possible() -> None:
    assert local_to_epoch_ms("2024-02-29 12:00:00", SHANGHAI) is not None


def test_ambiguous_fall_back_time_takes_first_occurrence() -> None:
    # 2024-11-03 01:30 happens twice in New York; the first is EDT (-04:00) = 05:30 UTC.
    assert local_to_epoch_ms("2024-11-03 01:30:00", NEW_YORK) == 1730611800000


def test_nonexistent_spring_forward_time_uses_offset_before_the_gap() -> None:
    # 2024-03-10 02:30 does not exist in New York; read with EST (-05:00) = 07:30 UTC (03:30 EDT).
    assert local_to_epoch_ms("2024-03-10 02:30:00", NEW_YORK) == 1710055800000
    before = local_to_epoch_ms("2024-03-10 01:59:59", NEW_YORK)
    after = local_to_epoch_ms("2024-03-10 03:00:00", NEW_YORK)
    assert before is not None and after is not None
    # 03:00 EDT is only one second after 01:59:59 EST, and the gap times land in order past it.
    assert after - before == 1000
    assert local_to_epoch_ms("2024-03-10 02:30:00", NEW_YORK) > after  # type: ignore[operator]


def test_quarantine_reasons() -> None:
    impossible = classify(
        record("2024-02-31 07:00:00"),
        device="lobby",
        serial="S1",
        tz=SHANGHAI,
        now=NOW,
        future_tolerance_seconds=600,
    )
    assert impossible.check_time_ms is None
    assert impossible.quarantine_reason == "impossible date 2024-02-31 07:00:00"

    # NOW is 08:00 in Shanghai: 11:00 is three hours ahead.
    future = classify(
        record("2024-05-06 11:00:00"),
        device="lobby",
        serial="S1",
        tz=SHANGHAI,
        now=NOW,
        future_tolerance_seconds=600,
    )
    assert future.quarantine_reason == "in the future by 3 h"
    assert future.check_time_ms is not None

    old = classify(
        record("2023-10-01 08:00:00"),
        device="lobby",
        serial="S1",
        tz=SHANGHAI,
        now=NOW,
        future_tolerance_seconds=600,
    )
    assert old.quarantine_reason == "older than DingTalk's 180-day window"

    fine = classify(
        record("2024-05-06 07:59:00"),
        device="lobby",
        serial="S1",
        tz=SHANGHAI,
        now=NOW,
        future_tolerance_seconds=600,
    )
    assert fine.quarantine_reason is None
    assert (fine.device, fine.serial, fine.enroll_number) == ("lobby", "S1", "1001")


def test_future_tolerance_is_respected() -> None:
    # 5 minutes ahead is within a 600 s tolerance, 11 minutes is not.
    within = classify(
        record("2024-05-06 08:05:00"),
        device="d",
        serial="s",
        tz=SHANGHAI,
        now=NOW,
        future_tolerance_seconds=600,
    )
    beyond = classify(
        record("2024-05-06 08:11:00"),
        device="d",
        serial="s",
        tz=SHANGHAI,
        now=NOW,
        future_tolerance_seconds=600,
    )
    assert within.quarantine_reason is None
    assert beyond.quarantine_reason == "in the future by 11 min"


def test_describe_duration() -> None:
    assert describe_duration(45) == "45 s"
    assert describe_duration(12 * 60 + 5) == "12 min"
    assert describe_duration(3 * 3600) == "3 h"
    assert describe_duration(3 * 3600 + 20 * 60) == "3 h 20 min"
    assert describe_duration(2 * 86400 + 4 * 3600) == "2 d 4 h"


ZONES = ["Asia/Shanghai", "America/New_York", "Europe/London", "Australia/Lord_Howe", "Asia/Kolkata", "UTC"]


@settings(max_examples=300, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    year=st.integers(2000, 2040),
    month=st.integers(1, 12),
    day=st.integers(1, 31),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    second=st.integers(0, 59),
)
def test_classifier_cache_agrees_with_exact_conversion(
    zone: str, year: int, month: int, day: int, hour: int, minute: int, second: int
) -> None:
    tz = ZoneInfo(zone)
    text = f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}"
    classifier = Classifier(device="d", serial="s", tz=tz, now=NOW, future_tolerance_seconds=600)
    # Twice: the second call comes from the per-hour cache.
    for _ in range(2):
        fast = classifier.classify(record(text))
        exact = classify(record(text), device="d", serial="s", tz=tz, now=NOW, future_tolerance_seconds=600)
        assert fast == exact


def test_classifier_is_exact_around_dst_changes() -> None:
    for zone, day in [
        ("America/New_York", "2024-03-10"),
        ("America/New_York", "2024-11-03"),
        ("Australia/Lord_Howe", "2024-04-07"),
        ("Australia/Lord_Howe", "2024-10-06"),
    ]:
        tz = ZoneInfo(zone)
        classifier = Classifier(device="d", serial="s", tz=tz, now=NOW, future_tolerance_seconds=600)
        for minute_of_day in range(0, 24 * 60, 7):
            text = f"{day} {minute_of_day // 60:02d}:{minute_of_day % 60:02d}:30"
            assert classifier.epoch_ms(text) == local_to_epoch_ms(text, tz), (zone, text)


@pytest.fixture
def host_zone() -> Iterator[None]:
    saved = os.environ.get("TZ")
    yield
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


@pytest.mark.parametrize("host_tz", ["UTC", "America/Los_Angeles", "Asia/Tokyo"])
def test_host_timezone_never_enters(host_zone: None, host_tz: str) -> None:
    os.environ["TZ"] = host_tz
    time.tzset()
    assert local_to_epoch_ms("2024-05-06 07:08:09", SHANGHAI) == 1714950489000
    punch = Classifier(device="d", serial="s", tz=SHANGHAI, now=NOW, future_tolerance_seconds=600).classify(
        record("2024-05-06 07:08:09")
    )
    assert punch.check_time_ms == 1714950489000


def test_host_timezone_never_enters_in_a_fresh_process() -> None:
    """The same conversion in processes started with different TZ values gives the same number."""
    code = (
        "from zoneinfo import ZoneInfo\n"
        "from zkdingsync.timeconv import local_to_epoch_ms\n"
        "print(local_to_epoch_ms('2024-11-03 01:30:00', ZoneInfo('America/New_York')),"
        " local_to_epoch_ms('2024-05-06 07:08:09', ZoneInfo('Asia/Shanghai')))\n"
    )
    outputs = set()
    for host_tz in ("UTC", "Pacific/Kiritimati", "America/St_Johns"):
        env = {**os.environ, "TZ": host_tz}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=30
        )
        outputs.add(done.stdout.strip())
    assert outputs == {"1730611800000 1714950489000"}


def test_now_must_be_aware_and_any_zone_works() -> None:
    # The same instant expressed in another zone classifies identically.
    local_now = NOW.astimezone(ZoneInfo("America/Los_Angeles"))
    a = classify(
        record("2024-05-06 11:00:00"),
        device="d",
        serial="s",
        tz=SHANGHAI,
        now=NOW,
        future_tolerance_seconds=0,
    )
    b = classify(
        record("2024-05-06 11:00:00"),
        device="d",
        serial="s",
        tz=SHANGHAI,
        now=local_now,
        future_tolerance_seconds=0,
    )
    assert a == b
    assert NOW - timedelta(0) == local_now


BERLIN = ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("local_time", "expected_ms"),
    [
        # Spring forward 2024-03-31: 02:00 CET -> 03:00 CEST; 2024-03-31 00:00 UTC = 1711843200 s.
        ("2024-03-31 01:59:59", 1711846799000),  # CET (+01:00): 00:59:59 UTC
        ("2024-03-31 02:30:00", 1711848600000),  # in the gap: read with CET, 01:30 UTC
        ("2024-03-31 03:00:00", 1711846800000),  # CEST (+02:00): 01:00 UTC
        # Fall back 2024-10-27: 03:00 CEST -> 02:00 CET; 2024-10-27 00:00 UTC = 1729987200 s.
        ("2024-10-27 01:59:59", 1729987199000),  # CEST: 23:59:59 UTC the day before
        ("2024-10-27 02:30:00", 1729989000000),  # ambiguous: the first (CEST), 00:30 UTC
        ("2024-10-27 03:00:00", 1729994400000),  # CET: 02:00 UTC
    ],
)
def test_berlin_dst_edges_hand_computed(local_time: str, expected_ms: int) -> None:
    assert local_to_epoch_ms(local_time, BERLIN) == expected_ms
    classifier = Classifier(device="d", serial="s", tz=BERLIN, now=NOW, future_tolerance_seconds=600)
    assert classifier.epoch_ms(local_time) == expected_ms  # the hour cache agrees at the edges


@pytest.mark.parametrize(
    ("local_time", "reason"),
    [
        ("2024-05-06 08:10:01", "in the future by 10 min"),  # NOW is 08:00 Shanghai; tolerance 600 s
        ("2023-11-08 07:59:59", "older than DingTalk's 180-day window"),
        ("2024-04-31 08:00:00", "impossible date 2024-04-31 08:00:00"),
        ("2024-02-30 08:00:00", "impossible date 2024-02-30 08:00:00"),
        ("2023-02-29 08:00:00", "impossible date 2023-02-29 08:00:00"),
    ],
)
def test_suspect_punches_are_kept_with_a_reason(local_time: str, reason: str) -> None:
    punch = Classifier(device="d", serial="s", tz=SHANGHAI, now=NOW, future_tolerance_seconds=600).classify(
        AttendanceRecord("1001", local_time, 1, 0)
    )
    assert punch.quarantine_reason == reason and punch.local_time == local_time
