"""Every DingTalk fault of the reliability notes, through the forwarder: nothing lost, no duplicate.

Real HTTP to the fake DingTalk on 127.0.0.1 and a real SQLite store; the forwarder's waits go through a
fake clock, so the schedule is asserted without sleeping (only the client's short read timeout is real).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import structlog
from harness import SteppingClock

from zkdingsync.dingtalk.client import DingTalkClient
from zkdingsync.dingtalk.fake import LIST_RECORD, FakeDingTalk
from zkdingsync.forwarder import Forwarder
from zkdingsync.mapping import UserMapper
from zkdingsync.model import Delivery, DingTalkHealth, Punch
from zkdingsync.quota import next_month_start
from zkdingsync.store import Store

USERS = {"1001": "manager4220", "1002": "clerk7", "1003": "boss"}
SERIAL = "ZK-SN123"


class World:
    """A store with punches, a fake DingTalk, a client and a forwarder on a fake clock."""

    def __init__(self, tmp_path: Path, punches: int = 3, client_timeout: float = 2.0) -> None:
        self.clock = SteppingClock(datetime.now(timezone.utc))
        self.store = Store.open(tmp_path / "zkdingsync.db")
        self.fake = FakeDingTalk(set(USERS.values()), hang_seconds=5).start()
        first_ms = (int(time.time()) - 3600) * 1000
        self.punches = [
            Punch("lobby", SERIAL, list(USERS)[i % 3], f"2026-11-25 08:00:{i:02d}", 0, 1, first_ms + i * 1000)
            for i in range(punches)
        ]
        self.store.save_poll(
            "lobby",
            serial=SERIAL,
            record_count=punches,
            record_size=40,
            punches=self.punches,
            polled_at=self.clock.now,
        )
        self.client = DingTalkClient(
            "fake-app-key", "fake-app-secret", self.fake.url, client_timeout, store=self.store
        )
        self.forwarder = self.new_forwarder()

    def new_forwarder(self) -> Forwarder:
        return Forwarder(
            self.store,
            self.client,
            UserMapper(USERS),
            rate_per_second=100,
            concurrency=1,  # one call at a time: a deterministic schedule (concurrency has its own test)
            clock=self.clock,
            sleep=self.clock.sleep,
            rng=random.Random(7),
            settle_delay_seconds=30,
        )

    def hold_seconds(self) -> float:
        hold = self.forwarder.hold_until
        assert hold is not None
        return (hold - self.clock.now).total_seconds()

    def delivered_once(self) -> None:
        """Every punch delivered, and DingTalk holds each exactly once."""
        assert self.forwarder.drain(max_steps=2000)
        counts = self.store.delivery_counts()
        assert counts[Delivery.DELIVERED] == len(self.punches)
        seen = sorted((u["userid"], u["user_check_time"]) for u in self.fake.uploads)
        assert seen == sorted((USERS[p.enroll_number], p.check_time_ms) for p in self.punches)

    def close(self) -> None:
        self.forwarder.close()
        self.fake.stop()
        self.client.close()
        self.store.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    created = World(tmp_path)
    yield created
    created.close()


@pytest.fixture
def slow_world(tmp_path: Path) -> Iterator[World]:
    created = World(tmp_path, punches=1, client_timeout=0.3)
    yield created
    created.close()


def test_connection_refused_holds_then_drains(world: World) -> None:
    world.fake.go_down()
    world.forwarder.step()
    assert world.store.delivery_counts()[Delivery.PENDING] == 3
    assert world.hold_seconds() >= 5  # WAIT_NETWORK_SECONDS at least
    assert world.forwarder.step() > 0  # held: nothing is tried
    world.fake.come_up()
    world.delivered_once()


def test_accepted_but_never_answered_is_read_back_not_sent_again(slow_world: World) -> None:
    slow_world.fake.hang_next()
    slow_world.forwarder.step()
    [stored] = slow_world.store.in_flight()
    assert stored.outcome_unknown
    assert slow_world.fake.calls[LIST_RECORD] == 0
    started = slow_world.clock.now
    slow_world.delivered_once()
    assert len(slow_world.fake.uploads) == 1  # found by the read-back: not sent again
    assert slow_world.fake.calls["upload"] == 1
    assert slow_world.fake.calls[LIST_RECORD] == 1
    assert slow_world.clock.now - started >= timedelta(seconds=30)  # it waited before reading back


def test_never_answered_and_never_arrived_is_sent_again(slow_world: World) -> None:
    slow_world.fake.hang_next(accept=False)
    slow_world.delivered_once()
    assert slow_world.fake.calls["upload"] == 2
    assert [p.outcome_unknown for p in slow_world.store.punches()] == [True]  # a duplicate would be explained


def test_connection_reset_after_accepting_is_read_back(world: World) -> None:
    world.client.check_credentials()
    world.fake.reset_next()
    world.delivered_once()
    assert world.fake.calls["upload"] == 3


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retried(world: World, status: int) -> None:
    world.fake.http_error_next(status, n=2)
    world.forwarder.step()
    assert world.hold_seconds() >= 5
    world.delivered_once()


def test_gateway_timeout_is_settled_by_reading_back(world: World) -> None:
    world.fake.http_error_next(504)
    world.delivered_once()
    assert world.fake.calls[LIST_RECORD] == 1


@pytest.mark.parametrize(
    ("inject", "minimum_hold"),
    [
        (lambda fake: fake.html_next(), 300),
        (lambda fake: fake.html_next(status=403), 300),
        (lambda fake: fake.ban_next(), 300),
        (lambda fake: fake.fail_next(90018), 2),
        (lambda fake: fake.fail_next(90002), 1),
        (lambda fake: fake.fail_next(90005), 60),
        (lambda fake: fake.fail_next(90006), 60),
        (lambda fake: fake.fail_next(-1), 1),
    ],
    ids=["html", "html-403", "ip-ban", "90018", "90002", "90005", "90006", "busy"],
)
def test_throttles_hold_delivery_for_the_wait_they_call_for(
    world: World, inject, minimum_hold: float
) -> None:  # type: ignore[no-untyped-def]
    inject(world.fake)
    world.forwarder.step()
    hold = world.hold_seconds()
    assert hold >= minimum_hold
    assert world.forwarder.step() == pytest.approx(hold)  # nothing is sent while held
    before = world.fake.calls["upload"]
    world.clock.advance(hold)
    world.forwarder.step()
    assert world.fake.calls["upload"] == before + 1  # a single probe first
    world.delivered_once()


def test_backoff_grows_with_jitter_to_a_cap(world: World) -> None:
    world.fake.go_down()
    holds = []
    for _ in range(12):
        world.forwarder.step()
        holds.append(world.hold_seconds())
        world.clock.advance(holds[-1])
    assert holds[0] >= 5
    assert holds[-1] <= 300
    assert max(holds) >= 150  # it grew
    assert len({round(h, 3) for h in holds[-3:]}) == 3  # jittered, not a lockstep
    world.fake.come_up()
    world.delivered_once()


def test_expired_token_is_refreshed_once(world: World) -> None:
    world.forwarder.step()
    world.store.requeue_parked()
    world.fake.invalidate_tokens()
    fresh = Punch("lobby", SERIAL, "1002", "2026-11-25 09:00:00", 0, 1, (int(time.time()) - 60) * 1000)
    world.store.save_poll(
        "lobby", serial=SERIAL, record_count=4, record_size=40, punches=[fresh], polled_at=world.clock.now
    )
    world.punches.append(fresh)
    world.delivered_once()
    assert world.fake.calls["gettoken"] == 2


def alerting_forwarder(world: World, alerts: list[str]) -> Forwarder:
    """A forwarder of the world's parts at the default rate, one call at a time, telling `alerts`."""
    return Forwarder(
        world.store,
        world.client,
        UserMapper(USERS),
        concurrency=1,
        clock=world.clock,
        sleep=world.clock.sleep,
        alert=alerts.append,
    )


def test_quota_exhausted_waits_for_the_1st_and_says_so_once(world: World) -> None:
    alerts: list[str] = []
    world.forwarder = alerting_forwarder(world, alerts)
    world.fake.fail_next(90020, n=None)
    with structlog.testing.capture_logs() as events:
        world.forwarder.step()
        health = world.store.dingtalk_health()
        assert health is not None and health.text().startswith("paused: ")
        assert world.fake.calls["upload"] == 1  # the rest of the batch was not sent
        assert world.store.delivery_counts()[Delivery.PENDING] == 3
        for _ in range(5):  # the rest of the month: not one call more
            world.clock.advance(3 * 3600)
            world.forwarder.step()
        assert world.fake.calls["upload"] == 1
        world.fake.clear_faults()
        world.clock.now = next_month_start(world.clock.now, ZoneInfo("Asia/Shanghai")) + timedelta(seconds=1)
        world.delivered_once()
    names = [event["event"] for event in events]
    assert names.count("delivery.quota_exhausted") == 1
    # The admin may act (a bigger edition): `journalctl -p warning` must show it.
    assert all(e["log_level"] == "error" for e in events if e["event"] == "delivery.quota_exhausted")
    assert names.count("delivery.quota_renewed") == 1
    assert _health(world) == "ok"
    assert len(alerts) == 2 and alerts[0].startswith("DingTalk call budget spent: DingTalk refuses calls")


def test_persistent_bad_token_is_bounded_then_needs_a_human(world: World) -> None:
    world.fake.reject_all_tokens()
    with structlog.testing.capture_logs() as events:
        for _ in range(3):
            world.forwarder.step()
            world.clock.advance(300)
    assert world.forwarder.paused is not None
    assert world.fake.calls["upload"] == 6  # three probes, each one refresh and one retry
    assert world.fake.uploads == []
    assert [event["event"] for event in events].count("delivery.paused") == 1
    world.fake.reject_all_tokens(False)
    world.delivered_once()


def test_permission_missing_needs_a_human(world: World) -> None:
    world.fake.fail_next(60011)
    world.forwarder.step()
    assert world.forwarder.paused is not None
    assert "permission" in world.forwarder.paused
    world.clock.advance(300)
    world.delivered_once()


def test_unknown_user_is_parked_and_the_rest_flows(world: World) -> None:
    world.fake.set_users({"manager4220", "clerk7"})  # "boss" left the company in DingTalk
    assert world.forwarder.drain()
    assert world.store.delivery_counts()[Delivery.DELIVERED] == 2
    [(reason, count)] = world.store.park_reasons()
    assert count == 1
    assert "60121" in reason


def test_read_back_that_fails_for_now_waits_instead_of_resending(slow_world: World) -> None:
    slow_world.fake.hang_next()
    slow_world.fake.http_error_next(502, endpoint=LIST_RECORD)
    slow_world.delivered_once()
    assert slow_world.fake.calls["upload"] == 1
    assert slow_world.fake.calls[LIST_RECORD] == 2


def test_read_back_impossible_resends_and_says_so(slow_world: World) -> None:
    slow_world.fake.hang_next()
    slow_world.fake.fail_next(60011, endpoint=LIST_RECORD)
    with structlog.testing.capture_logs() as events:
        assert slow_world.forwarder.drain()
    assert slow_world.fake.calls["upload"] == 2  # the promised exception: outcome truly unknown
    assert [p.outcome_unknown for p in slow_world.store.punches()] == [True]
    [warning] = [e for e in events if e["event"] == "delivery.resent_unverified"]
    assert warning["count"] == 1


def test_crash_mid_batch_then_restart_sends_only_what_did_not_arrive(world: World) -> None:
    # The first process sends one punch, claims the others, and dies before they were answered.
    world.forwarder.batch_size = 1
    world.forwarder.step()
    claimed = world.store.claim_due(world.clock.now, 10)
    assert len(claimed) == 2
    first = claimed[0].punch
    world.fake.add_upload(USERS[first.enroll_number], first.check_time_ms or 0, SERIAL, "lobby")
    world.forwarder.close()
    world.clock.advance(31)
    world.forwarder = world.new_forwarder()
    world.delivered_once()
    assert [u["how"] for u in world.fake.uploads].count("upload") == 2


def test_a_concurrent_success_does_not_end_a_hold(tmp_path: Path) -> None:
    world = World(tmp_path, punches=6)
    try:
        world.forwarder = Forwarder(
            world.store,
            world.client,
            UserMapper(USERS),
            rate_per_second=1000,
            concurrency=3,
            clock=world.clock,
            sleep=world.clock.sleep,
            rng=random.Random(7),
        )
        world.fake.fail_next(90005, userid="manager4220")  # one of three concurrent calls is throttled
        world.forwarder.step()
        assert world.hold_seconds() >= 60  # the other two succeeded, but were sent before it was seen
        assert world.forwarder.step() > 0  # held: nothing more goes out
        sent = world.fake.calls["upload"]
        assert len(world.fake.uploads) == sent - 1
        world.delivered_once()
    finally:
        world.close()


def test_pause_and_resume_are_passed_to_the_alert_hook(world: World) -> None:
    alerts: list[str] = []
    world.forwarder = alerting_forwarder(world, alerts)
    world.fake.fail_next(60011)
    world.forwarder.step()
    world.clock.advance(300)
    world.delivered_once()
    assert len(alerts) == 2
    assert alerts[0].startswith("delivery to DingTalk paused: the DingTalk app lacks a permission")
    assert alerts[1] == "delivery to DingTalk resumed"


def test_a_pause_left_by_an_earlier_run_is_forgotten(world: World) -> None:
    left = "paused: the organisation's monthly DingTalk API quota is exhausted"
    world.store.set_dingtalk_health(DingTalkHealth.parse(left, world.clock.now))
    world.delivered_once()
    assert _health(world) == "ok"


def _health(world: World) -> str | None:
    health = world.store.dingtalk_health()
    return None if health is None else health.text()


@pytest.mark.parametrize("accept", [False, True])
def test_an_errcode_that_is_not_a_number_parks_nothing(tmp_path: Path, accept: bool) -> None:
    # A proxy or captive portal answering {"errcode": "abc"}: whether DingTalk got the punch is unknown
    # (accept: it did), so the forwarder reads back instead of parking; nothing is parked or doubled.
    world = World(tmp_path, punches=5)
    try:
        world.fake.answer_next({"errcode": "abc", "errmsg": "portal"}, n=None, accept=accept)
        world.fake.answer_next({"errcode": "abc"}, n=None, endpoint=LIST_RECORD)
        for _ in range(5):
            world.forwarder.step()
            world.clock.advance(600)
        assert world.store.delivery_counts()[Delivery.PARKED] == 0
        world.fake.clear_faults()
        world.delivered_once()
        assert world.store.delivery_counts()[Delivery.PARKED] == 0
    finally:
        world.close()
