"""Read-back edge cases: the zone DingTalk reads its window in, a users.map change while an outcome is
unknown, and several punches with the same userid, time and terminal.

Real HTTP to the fake DingTalk on 127.0.0.1 and a real SQLite store; waits go through a fake clock.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fixtures_simulator import wait_for
from harness import SteppingClock

from zkdingsync.delivery.settler import plan_read_back
from zkdingsync.dingtalk.client import DingTalkClient
from zkdingsync.dingtalk.fake import LIST_RECORD, FakeDingTalk
from zkdingsync.forwarder import Forwarder
from zkdingsync.mapping import UserMapper
from zkdingsync.model import Delivery, Directory, Punch
from zkdingsync.store import Store

SERIAL = "ZK-SN123"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zkdingsync.db") as opened:
        yield opened


def save(store: Store, punches: list[Punch]) -> None:
    store.save_poll(
        "lobby",
        serial=SERIAL,
        record_count=len(punches),
        record_size=40,
        punches=punches,
        polled_at=datetime.now(timezone.utc),
    )


def forwarder_for(
    store: Store, client: DingTalkClient, mapper: UserMapper, clock: SteppingClock
) -> Forwarder:
    return Forwarder(
        store,
        client,
        mapper,
        rate_per_second=1000,
        concurrency=1,
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(3),
        settle_delay_seconds=30,
    )


def test_read_back_finds_the_punch_when_dingtalk_reads_dates_in_another_zone(store: Store) -> None:
    # DingTalk reads listRecord's dates in the organisation's zone (China); the configured default zone
    # (used for the window) is the terminals' (Vietnam, an hour behind). The window must still cover it.
    ms = (int(time.time()) - 3600) * 1000
    save(store, [Punch("lobby", SERIAL, "1001", "2026-11-25 08:00:00", 0, 1, ms)])
    clock = SteppingClock(datetime.now(timezone.utc))
    with FakeDingTalk({"u1"}, org_timezone="Asia/Shanghai", hang_seconds=5) as fake:
        client = DingTalkClient(
            "fake-app-key", "fake-app-secret", fake.url, 0.3, store=store, org_timezone="Asia/Ho_Chi_Minh"
        )
        fake.hang_next()  # DingTalk takes the upload; the answer never comes
        with forwarder_for(store, client, UserMapper({"1001": "u1"}), clock) as forwarder:
            assert forwarder.drain(max_steps=200)
        client.close()
        assert fake.calls[LIST_RECORD] == 1
        assert len(fake.uploads) == 1  # found by the read-back: not sent a second time
    assert store.delivery_counts()[Delivery.DELIVERED] == 1


def test_read_back_uses_the_userid_of_the_upload_after_a_map_change(store: Store) -> None:
    ms = (int(time.time()) - 3600) * 1000
    save(store, [Punch("lobby", SERIAL, "1001", "2026-11-25 08:00:00", 0, 1, ms)])
    clock = SteppingClock(datetime.now(timezone.utc))
    mapper = UserMapper({"1001": "old-user"})
    with FakeDingTalk({"old-user", "new-user"}, hang_seconds=5) as fake:
        client = DingTalkClient("fake-app-key", "fake-app-secret", fake.url, 0.3, store=store)
        fake.hang_next()  # uploaded as old-user; the outcome is unknown
        with forwarder_for(store, client, mapper, clock) as forwarder:
            forwarder.step()
            [stored] = store.in_flight()
            assert stored.outcome_unknown
            mapper.update({"1001": "new-user"}, match_job_number=False)  # users.map edited, reloaded
            assert forwarder.drain(max_steps=200)
        client.close()
        assert [u["userid"] for u in fake.uploads] == ["old-user"]  # read back as old-user: found
    [delivered] = store.punches(delivery=Delivery.DELIVERED)
    assert delivered.id == stored.id


def test_one_record_in_dingtalk_settles_only_one_of_two_identical_punches(store: Store) -> None:
    # Check-in and check-out in the same second on the same terminal: DingTalk's upload carries neither
    # state nor verify mode, so both are the same (userid, time, device). Both outcomes are unknown and only
    # one upload arrived: one record must not settle two punches.
    ms = (int(time.time()) - 3600) * 1000
    punches = [Punch("lobby", SERIAL, "1001", "2026-11-25 08:00:00", state, 1, ms) for state in (0, 1)]
    save(store, punches)
    crash = datetime.now(timezone.utc)
    assert len(store.claim_due(crash, 10)) == 2  # a crash left both in flight...
    clock = SteppingClock(crash + timedelta(seconds=60))
    with FakeDingTalk({"u1"}) as fake:
        fake.add_upload("u1", ms, SERIAL, "lobby")  # ...and DingTalk holds one of them
        client = DingTalkClient("fake-app-key", "fake-app-secret", fake.url, 2.0, store=store)
        with forwarder_for(store, client, UserMapper({"1001": "u1"}), clock) as forwarder:
            assert forwarder.drain(max_steps=200)
        client.close()
        assert len(fake.uploads) == 2  # one found, the other sent: one record per punch
        assert [u["how"] for u in fake.uploads].count("upload") == 1
    assert store.delivery_counts()[Delivery.DELIVERED] == 2


def test_read_back_windows_are_padded_but_stay_within_seven_days() -> None:
    day_ms = 24 * 3600 * 1000
    items = [("u1", 1_790_000_000_000 + i * day_ms) for i in range(12)]
    calls = plan_read_back(items, key=lambda item: item)
    assert sorted(item for call in calls for item in call.items) == items
    for call in calls:
        assert call.end_ms - call.start_ms <= 7 * day_ms - 1000
        times = [ms for _, ms in call.items]
        # Padded a day each side: a window DingTalk reads in another zone (or a DST fold) still covers it.
        assert call.start_ms <= min(times) - day_ms
        assert call.end_ms >= max(times) + day_ms


class GatedSource:
    """The DingTalk client's job number walk, held at a gate until the test opens it."""

    def __init__(self, client: DingTalkClient) -> None:
        self.client = client
        self.gate = threading.Event()
        self.entered = threading.Event()

    def list_directory(self) -> Directory:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self.client.list_directory()


def test_a_slow_job_number_walk_does_not_hold_delivery_back(store: Store) -> None:
    ms = (int(time.time()) - 3600) * 1000
    save(
        store,
        [
            Punch("lobby", SERIAL, "1001", "2026-11-25 08:00:00", 0, 1, ms),  # in users.map
            Punch("lobby", SERIAL, "2002", "2026-11-25 08:00:01", 0, 1, ms + 1000),  # only a job number
        ],
    )
    clock = SteppingClock(datetime.now(timezone.utc))
    with FakeDingTalk({"u1": None, "u2": "2002"}) as fake:
        client = DingTalkClient("fake-app-key", "fake-app-secret", fake.url, 2.0, store=store)
        source = GatedSource(client)
        mapper = UserMapper({"1001": "u1"}, match_job_number=True, source=source, cache=store, clock=clock)
        with forwarder_for(store, client, mapper, clock) as forwarder:
            forwarder.step()  # starts the walk, which hangs at the gate, and sends what it can
            assert source.entered.wait(10)
            assert forwarder.mapping_refreshing
            assert [u["userid"] for u in fake.uploads] == ["u1"]  # not held back by the walk
            counts = store.delivery_counts()
            assert counts[Delivery.PARKED] == 0  # 2002 waits for the table rather than being parked
            assert counts[Delivery.PENDING] == 1
            source.gate.set()
            wait_for(lambda: not forwarder.mapping_refreshing, timeout=10)
            assert mapper.resolve("2002") == "u2"
            assert forwarder.drain(max_steps=200)
        client.close()
        assert sorted(u["userid"] for u in fake.uploads) == ["u1", "u2"]
    assert store.delivery_counts()[Delivery.DELIVERED] == 2
