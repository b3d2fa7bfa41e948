"""A month of DingTalk's budget, driven day by day on one clock: the real forwarder, the real client, the
fake DingTalk over HTTP and a real store. The quota runs out on day 20 (DingTalk answers 90020): nothing is
lost, nothing more is sent that month, and on the 1st delivery resumes by itself, the punch just read first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from harness import SteppingClock
from structlog.testing import capture_logs

from zkdingsync.dingtalk.client import DingTalkClient
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.forwarder import Forwarder
from zkdingsync.mapping import UserMapper
from zkdingsync.model import Delivery, Punch
from zkdingsync.store import Store

SHANGHAI = ZoneInfo("Asia/Shanghai")
USERS = {"1001": "alice", "1002": "bob", "1003": "carol"}
PER_DAY = 3
EXHAUSTED_ON = 20


def local(day: datetime, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return day.replace(hour=hour, minute=minute, second=second).astimezone(timezone.utc)


def punches_of(day: datetime, hour: int = 8) -> list[Punch]:
    moments = [local(day, hour, n) for n in range(PER_DAY)]
    return [
        Punch(
            "lobby",
            "SN-MONTH",
            str(1001 + n),
            moment.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S"),
            0,
            1,
            int(moment.timestamp() * 1000),
        )
        for n, moment in enumerate(moments)
    ]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zk.db") as opened:
        yield opened


def test_quota_spent_on_day_20_then_delivery_resumes_on_the_1st(store: Store) -> None:
    month = datetime(2026, 11, 1, tzinfo=SHANGHAI)
    clock = SteppingClock(local(month, 9))
    stored: list[Punch] = []
    with FakeDingTalk(USERS.values(), qps_limit=None, clock=lambda: clock.now.timestamp()) as fake:
        client = DingTalkClient("fake-app-key", "fake-app-secret", fake.url, 2.0, store=store, clock=clock)
        forwarder = Forwarder(
            store,
            client,
            UserMapper(USERS),
            rate_per_second=100,
            concurrency=1,
            clock=clock,
            sleep=clock.sleep,
        )
        with capture_logs() as events, forwarder:
            for number in range(1, 31):
                day = month.replace(day=number)
                clock.now = local(day, 9)
                batch = punches_of(day)
                store.save_poll(
                    "lobby",
                    serial="SN-MONTH",
                    record_count=len(stored) + PER_DAY,
                    record_size=40,
                    punches=batch,
                    polled_at=clock.now,
                )
                stored += batch
                if number == EXHAUSTED_ON:
                    fake.fail_next(90020, n=None)  # the organisation's month is spent
                    accepted_before = len(fake.uploads)
                if number < EXHAUSTED_ON:
                    assert forwarder.drain(max_steps=200)
                else:
                    for _ in range(20):  # the rest of the day: the daemon keeps trying to step
                        forwarder.step()
                        clock.advance(600)
            # Nothing more went out after the first refusal, and nothing was lost.
            assert len(fake.uploads) == accepted_before
            assert fake.calls["upload"] == accepted_before + 1  # the one call DingTalk refused
            waiting = store.delivery_counts()
            assert waiting[Delivery.PENDING] == PER_DAY * (30 - EXHAUSTED_ON + 1)
            assert waiting[Delivery.DELIVERED] == PER_DAY * (EXHAUSTED_ON - 1)

            # The 1st (China time): DingTalk takes calls again; a punch is read just after midnight.
            fake.clear_faults()
            december = datetime(2026, 12, 1, tzinfo=SHANGHAI)
            clock.now = local(december, 0, 0, 5)
            live = punches_of(december, hour=0)[:1]
            store.save_poll(
                "lobby",
                serial="SN-MONTH",
                record_count=len(stored) + 1,
                record_size=40,
                punches=live,
                polled_at=clock.now,
            )
            stored += live
            assert forwarder.drain(max_steps=500)
        names = Counter(event["event"] for event in events)
    uploads = fake.uploads
    assert uploads[accepted_before]["user_check_time"] == live[0].check_time_ms  # live first
    got = Counter((u["userid"], int(u["user_check_time"])) for u in uploads)
    assert sorted(got) == sorted((USERS[p.enroll_number], p.check_time_ms) for p in stored)
    assert set(got.values()) == {1}  # once each
    assert names["delivery.quota_exhausted"] == 1
    assert names["delivery.quota_renewed"] == 1
    assert store.calls_in_month("2026-12") == PER_DAY * (30 - EXHAUSTED_ON + 1) + 1
    # The days are counted too (the forecast's input), in DingTalk's zone.
    assert store.calls_by_day("2026-11-01", "2026-11-01") == {"2026-11-01": PER_DAY}
    assert clock.now - local(december, 0) < timedelta(hours=1)
