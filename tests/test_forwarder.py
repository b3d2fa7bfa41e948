"""The forwarder against the fake DingTalk (real HTTP on 127.0.0.1) and a real SQLite store.

Waits go through an injected clock and sleep: tests assert the schedule without sleeping.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
import structlog
from harness import SteppingClock

from zkdingsync.delivery.ratelimit import RateLimiter
from zkdingsync.delivery.settler import plan_read_back
from zkdingsync.dingtalk.client import DingTalkClient
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.forwarder import Forwarder
from zkdingsync.mapping import UserMapper
from zkdingsync.model import Delivery, Punch
from zkdingsync.quota import call_month
from zkdingsync.store import Store

USERS = {f"{1000 + i}": f"user{i:02d}" for i in range(50)}  # enroll number -> userid


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zkdingsync.db") as opened:
        yield opened


def make_punches(
    count: int,
    *,
    first_ms: int,
    device: str = "lobby",
    serial: str = "ZK-SN123",
    enroll_numbers: Sequence[str] = tuple(USERS),
) -> list[Punch]:
    punches = []
    for i in range(count):
        ms = first_ms + i * 1000
        local = datetime.fromtimestamp(ms / 1000, tz=timezone(timedelta(hours=8))).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
        enroll = enroll_numbers[i % len(enroll_numbers)]
        punches.append(Punch(device, serial, enroll, local, 0, 1, ms))
    return punches


def save(store: Store, punches: Sequence[Punch], at: datetime | None = None) -> None:
    by_device: dict[tuple[str, str], list[Punch]] = {}
    for punch in punches:
        by_device.setdefault((punch.device, punch.serial), []).append(punch)
    for (device, serial), group in by_device.items():
        store.save_poll(
            device,
            serial=serial,
            record_count=len(group),
            record_size=40,
            punches=group,
            polled_at=at or datetime.now(timezone.utc),
        )


def hour_ago_ms() -> int:
    return (int(time.time()) - 3600) * 1000


def client_for(fake: FakeDingTalk, store: Store, timeout: float = 2.0) -> DingTalkClient:
    return DingTalkClient("fake-app-key", "fake-app-secret", fake.url, timeout, store=store, pool_size=16)


def uploaded(fake: FakeDingTalk) -> Counter[tuple[Any, ...]]:
    return Counter(
        (u["userid"], u["device_id"], u["device_name"], u["user_check_time"]) for u in fake.uploads
    )


def expected(punches: Sequence[Punch]) -> Counter[tuple[Any, ...]]:
    return Counter((USERS[p.enroll_number], p.serial, p.device, p.check_time_ms) for p in punches)


def test_ten_thousand_punches_are_delivered_once_each(store: Store, tmp_path: Path) -> None:
    first = hour_ago_ms() - 20_000 * 1000
    punches = make_punches(6000, first_ms=first) + make_punches(
        4000, first_ms=first + 500, device="gate-2", serial="ZK-GATE-0002"
    )
    save(store, punches)
    users_file = tmp_path / "users.json"
    users_file.write_text(json.dumps(sorted(USERS.values())), encoding="utf-8")
    # The fake DingTalk runs in a child process, so that its CPU is not taken from the forwarder's.
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zkdingsync.dingtalk.fake",
            "--users-file",
            str(users_file),
            "--qps-limit",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        url = child.stdout.readline().strip()
        client = DingTalkClient("fake-app-key", "fake-app-secret", url, 5.0, store=store)
        forwarder = Forwarder(
            store, client, UserMapper(USERS), rate_per_second=100_000, concurrency=4, monthly_call_quota=None
        )
        with forwarder:
            assert forwarder.drain()
        uploads = requests.get(f"{url}/_fake/uploads", timeout=10).json()["uploads"]
    finally:
        child.terminate()
        child.wait(timeout=10)
    received = Counter((u["userid"], u["device_id"], u["device_name"], u["user_check_time"]) for u in uploads)
    assert received == expected(punches)
    assert len(uploads) == 10_000
    assert store.delivery_counts()[Delivery.DELIVERED] == 10_000
    assert store.outcome_unknown_count() == 0


# Hand-computed epoch milliseconds (wall clock minus the zone's UTC offset, then seconds since 1970):
# Europe/Berlin, spring forward on 2026-03-29: 01:59:59 CET (UTC+1) = 00:59:59Z, and the next second
# 03:00:00 CEST (UTC+2) = 01:00:00Z. Autumn back on 2026-10-25: 02:30 happens twice, 00:30Z (CEST) and
# 01:30Z (CET). Asia/Shanghai (UTC+8, no DST): 2026-03-30 08:59:30 = 00:59:30Z, and the same on 2026-10-26.
SPRING = [
    ("berlin", "2026-03-29 01:59:59", 1774745999000),
    ("berlin", "2026-03-29 03:00:00", 1774746000000),
    ("shanghai", "2026-03-30 08:59:30", 1774832370000),
]
AUTUMN = [
    ("berlin", "2026-10-25 02:30:00", 1792888200000),  # first 02:30 (fold=0, CEST)
    ("berlin", "2026-10-25 02:30:00", 1792891800000),  # second 02:30 (fold=1, CET): another punch state
    ("shanghai", "2026-10-26 08:59:30", 1792976370000),
]


@pytest.mark.parametrize(
    ("edge", "now"), [(SPRING, "2026-04-01T12:00:00+00:00"), (AUTUMN, "2026-10-27T12:00:00+00:00")]
)
def test_dst_edge_times_go_through_unchanged(
    store: Store, edge: list[tuple[str, str, int]], now: str
) -> None:
    clock = SteppingClock(datetime.fromisoformat(now))
    punches = [
        Punch(device, f"SN-{device}", "1001", local, state, 1, ms)
        for state, (device, local, ms) in enumerate(edge)
    ]
    save(store, punches, at=clock.now)
    with FakeDingTalk({"user01"}, clock=lambda: clock().timestamp()) as fake:
        forwarder = Forwarder(
            store, client_for(fake, store), UserMapper({"1001": "user01"}), clock=clock, sleep=clock.sleep
        )
        with forwarder:
            assert forwarder.drain()
        assert sorted(u["user_check_time"] for u in fake.uploads) == sorted(ms for _, _, ms in edge)
        assert {u["device_id"] for u in fake.uploads} == {"SN-berlin", "SN-shanghai"}


def test_unmapped_punches_are_parked_and_logged_once_per_number(store: Store) -> None:
    punches = make_punches(30, first_ms=hour_ago_ms(), enroll_numbers=["1001", "1023", "1024"])
    save(store, punches)
    with FakeDingTalk(set(USERS.values())) as fake, structlog.testing.capture_logs() as events:
        forwarder = Forwarder(
            store, client_for(fake, store), UserMapper({"1001": "user01"}), rate_per_second=1000
        )
        with forwarder:
            assert forwarder.drain()
        assert len(fake.uploads) == 10
    assert store.delivery_counts()[Delivery.PARKED] == 20
    assert dict(store.park_reasons()) == {
        "enroll number 1023 has no DingTalk user": 10,
        "enroll number 1024 has no DingTalk user": 10,
    }
    assert sorted(e["enroll_number"] for e in events if e["event"] == "mapping.unmapped") == ["1023", "1024"]


def test_rate_limit_spaces_calls_evenly(store: Store) -> None:
    clock = SteppingClock(datetime.now(timezone.utc))
    save(store, make_punches(5, first_ms=hour_ago_ms()), at=clock.now)
    with FakeDingTalk(set(USERS.values())) as fake:
        forwarder = Forwarder(
            store,
            client_for(fake, store),
            UserMapper(USERS),
            rate_per_second=10,
            concurrency=1,
            clock=clock,
            sleep=clock.sleep,
        )
        with forwarder:
            assert forwarder.step() == 0
        assert len(fake.uploads) == 5
    assert clock.sleeps == pytest.approx([0.1] * 4, rel=2e-3)


def test_rate_limiter_never_exceeds_its_rate_in_any_second() -> None:
    now = [0.0]
    limiter = RateLimiter(19, monotonic=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    stamps = []
    for _ in range(100):
        limiter.acquire()
        stamps.append(now[0])
    for i, stamp in enumerate(stamps):
        assert sum(1 for other in stamps[i:] if other < stamp + 1.0) <= 19


def test_batch_line_is_logged(store: Store) -> None:
    save(store, make_punches(3, first_ms=hour_ago_ms()))
    with FakeDingTalk(set(USERS.values())) as fake, structlog.testing.capture_logs() as events:
        forwarder = Forwarder(store, client_for(fake, store), UserMapper(USERS), rate_per_second=1000)
        with forwarder:
            forwarder.step()
    [batch] = [e for e in events if e["event"] == "delivery.batch"]
    assert batch["delivered"] == 3
    assert batch["pending"] == batch["parked"] == batch["unknown"] == 0
    assert isinstance(batch["duration_ms"], int)


def test_crash_with_punches_in_flight_settles_by_reading_back(store: Store) -> None:
    punches = make_punches(10, first_ms=hour_ago_ms())
    save(store, punches)
    crash_time = datetime.now(timezone.utc)
    in_flight = store.claim_due(crash_time, 10)  # the crashed process had claimed them all...
    assert len(in_flight) == 10
    with FakeDingTalk(set(USERS.values())) as fake:
        for punch in punches[:6]:  # ...and DingTalk had accepted six before the crash
            fake.add_upload(USERS[punch.enroll_number], punch.check_time_ms or 0, punch.serial, punch.device)
        clock = SteppingClock(crash_time + timedelta(seconds=5))
        forwarder = Forwarder(
            store,
            client_for(fake, store),
            UserMapper(USERS),
            rate_per_second=1000,
            clock=clock,
            sleep=clock.sleep,
            settle_delay_seconds=30,
        )
        with forwarder:
            forwarder.step()
            assert fake.calls["list_record"] == 0  # too recent: DingTalk may still be writing them
            assert forwarder.drain()
        assert uploaded(fake) == expected(punches)  # each exactly once: six before, four after
        assert [u["how"] for u in fake.uploads].count("upload") == 4
        assert fake.calls["list_record"] == 1  # 10 punches of 10 users in one window: one call
    assert store.delivery_counts()[Delivery.DELIVERED] == 10
    flagged = {p.id for p in store.punches() if p.outcome_unknown}
    assert len(flagged) == 4  # those resent after the read-back did not find them


def test_read_back_plan_respects_dingtalk_limits() -> None:
    day_ms = 24 * 3600 * 1000
    items = [(f"u{i % 120}", 1_790_000_000_000 + (i * 7919 % 20) * day_ms + i) for i in range(600)]
    calls = plan_read_back(items, key=lambda item: item)
    covered = [item for call in calls for item in call.items]
    assert sorted(covered) == sorted(items)
    for call in calls:
        assert len(call.userids) <= 50
        assert call.end_ms - call.start_ms <= 7 * day_ms - 1000
        assert all(user in call.userids and call.start_ms <= ms <= call.end_ms for user, ms in call.items)
    assert len(calls) <= 4 * 3  # 20 days: four windows (five days plus a day's padding each side), 120 users


def test_monthly_budget_warns_at_80_percent_then_stops(store: Store) -> None:
    clock = SteppingClock(datetime.now(timezone.utc))
    month = call_month(clock.now, ZoneInfo("Asia/Shanghai"))  # the client's default zone
    store.count_calls(month, 8)
    save(store, make_punches(5, first_ms=hour_ago_ms()), at=clock.now)
    with FakeDingTalk(set(USERS.values())) as fake, structlog.testing.capture_logs() as events:
        forwarder = Forwarder(
            store,
            client_for(fake, store),
            UserMapper(USERS),
            rate_per_second=1000,
            monthly_call_quota=10,
            clock=clock,
            sleep=clock.sleep,
        )
        with forwarder:
            for _ in range(6):
                forwarder.step()
        assert len(fake.uploads) == 2
    assert store.calls_in_month(month) == 10
    assert store.delivery_counts()[Delivery.PENDING] == 3  # kept, not dropped
    names = [e["event"] for e in events]
    assert names.count("delivery.quota_warning") == 1
    assert names.count("delivery.quota_exhausted") == 1


def test_future_punch_waits_for_its_moment_and_old_punch_is_parked(store: Store) -> None:
    clock = SteppingClock(datetime.now(timezone.utc))
    now_ms = int(clock.now.timestamp()) * 1000
    future = make_punches(1, first_ms=now_ms + 120_000, enroll_numbers=["1001"])
    old = make_punches(1, first_ms=now_ms - 181 * 24 * 3600 * 1000, enroll_numbers=["1002"])
    save(store, future + old, at=clock.now)
    with FakeDingTalk(set(USERS.values()), clock=lambda: clock().timestamp()) as fake:
        forwarder = Forwarder(
            store, client_for(fake, store), UserMapper(USERS), clock=clock, sleep=clock.sleep
        )
        with forwarder:
            forwarder.step()
            assert fake.uploads == []
            assert [reason for reason, _ in store.park_reasons()] == [
                "the punch is older than the 180 days DingTalk accepts"
            ]
            clock.advance(121)
            forwarder.step()
        assert [u["user_check_time"] for u in fake.uploads] == [now_ms + 120_000]


def test_stop_interrupts_every_wait(store: Store) -> None:
    save(store, make_punches(3, first_ms=hour_ago_ms()))
    stop = threading.Event()
    with FakeDingTalk(set(USERS.values())) as fake:
        fake.ban_next(n=None)  # every call: hold for at least five minutes
        forwarder = Forwarder(store, client_for(fake, store), UserMapper(USERS), rng=random.Random(3))
        thread = threading.Thread(target=forwarder.run, args=(stop,))
        thread.start()
        deadline = time.monotonic() + 10
        while forwarder.hold_until is None and time.monotonic() < deadline:
            stop.wait(0.01)
        assert forwarder.hold_until is not None
        started = time.monotonic()
        stop.set()
        thread.join(timeout=5)
        assert not thread.is_alive()
        assert time.monotonic() - started < 2
    assert store.delivery_counts()[Delivery.IN_FLIGHT] == 0


def test_wake_ends_an_idle_wait_at_once_but_stop_still_ends_the_loop(store: Store) -> None:
    stop = threading.Event()
    with FakeDingTalk(set(USERS.values())) as fake:
        # An idle wait of a minute: only wake() can bring the new punch out in time.
        forwarder = Forwarder(store, client_for(fake, store), UserMapper(USERS), idle_seconds=60)
        thread = threading.Thread(target=forwarder.run, args=(stop,))
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not forwarder._idle and time.monotonic() < deadline:  # it found nothing to send
                stop.wait(0.01)
            save(store, make_punches(1, first_ms=hour_ago_ms()))
            forwarder.wake()
            deadline = time.monotonic() + 10
            while not fake.uploads and time.monotonic() < deadline:
                stop.wait(0.01)
            assert len(fake.uploads) == 1
        finally:
            stop.set()
            forwarder.wake()
            thread.join(timeout=5)
        assert not thread.is_alive()


def test_no_dingtalk_call_is_spent_while_the_store_refuses_writes(store: Store) -> None:
    punches = make_punches(3, first_ms=hour_ago_ms())
    save(store, punches)
    clock = SteppingClock(datetime.now(timezone.utc))
    store.claim_due(clock(), 1)  # left in flight by a crash: its outcome must be read back
    with FakeDingTalk(set(USERS.values())) as fake:
        forwarder = Forwarder(
            store,
            client_for(fake, store),
            UserMapper(USERS),
            clock=clock,
            sleep=clock.sleep,
            settle_delay_seconds=30,
        )
        with forwarder:
            forwarder.step()  # delivers the two others; the one in flight rests before its read-back
            assert len(fake.uploads) == 2
            store._conn.execute("PRAGMA query_only=ON")  # as a full disk would: every write fails
            clock.advance(65)
            forwarder.step()  # reads back once, cannot record what it learnt
            calls = sum(fake.calls.values())
            for _ in range(5):
                clock.advance(65)  # past the next settling round each time
                forwarder.step()
            assert sum(fake.calls.values()) == calls  # no read-back (or upload) until the store works
            store._conn.execute("PRAGMA query_only=OFF")
            for _ in range(5):
                clock.advance(65)
                forwarder.step()
    assert uploaded(fake) == expected(punches)
    assert store.delivery_counts()[Delivery.DELIVERED] == 3


def test_an_unknown_outcome_is_read_back_under_the_userid_it_was_sent_as_after_a_map_change(
    store: Store,
) -> None:
    [punch] = make_punches(1, first_ms=hour_ago_ms(), enroll_numbers=["1001"])
    save(store, [punch])
    clock = SteppingClock(datetime.now(timezone.utc))
    with FakeDingTalk({"user01", "someone-else"}) as fake:
        fake.hang_next(1, accept=True)  # DingTalk takes the upload, the answer never comes
        first = Forwarder(
            store, client_for(fake, store, timeout=0.3), UserMapper(USERS), clock=clock, sleep=clock.sleep
        )
        with first:
            first.step()
        assert len(fake.uploads) == 1 and store.delivery_counts()[Delivery.IN_FLIGHT] == 1
        # The admin edits users.map and restarts: 1001 now maps to another DingTalk user.
        clock.advance(120)
        second = Forwarder(
            store,
            client_for(fake, store),
            UserMapper({"1001": "someone-else"}),
            clock=clock,
            sleep=clock.sleep,
        )
        with second:
            second.step()
            clock.advance(120)
            second.step()
    assert [u["userid"] for u in fake.uploads] == ["user01"]  # found by reading back, not sent again
    assert store.delivery_counts()[Delivery.DELIVERED] == 1


def test_a_restart_ends_the_waits_an_earlier_run_set(store: Store) -> None:
    punches = make_punches(2, first_ms=hour_ago_ms())
    save(store, punches)
    now = datetime.now(timezone.utc)
    for claimed in store.claim_due(now, 10):  # an earlier run held them back for 5 minutes
        store.mark_pending(claimed.id, retry_at=now + timedelta(minutes=5), reason="not sent yet: paused")
    clock = SteppingClock(now)
    with (
        FakeDingTalk(set(USERS.values())) as fake,
        Forwarder(store, client_for(fake, store), UserMapper(USERS), clock=clock, sleep=clock.sleep) as fresh,
    ):
        fresh.step()
    assert uploaded(fake) == expected(punches)
