"""The forwarder's parts on their own (the back-off, the gate) and the forwarder against the in-memory
DingTalk port: fast enough to drive ten thousand failures with an injected clock."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import structlog
from harness import SteppingClock, sample_punch
from memory_dingtalk import UNREACHABLE, MemoryDingTalk

from zkdingsync.backoff import Backoff
from zkdingsync.delivery.gate import DeliveryGate
from zkdingsync.forwarder import Forwarder
from zkdingsync.mapping import UserMapper
from zkdingsync.model import Delivery, Outcome, OutcomeKind
from zkdingsync.store import Store

_FIRST = sample_punch(0).check_time
assert _FIRST is not None
START = _FIRST + timedelta(hours=2)  # two hours after the sample punches
USERS = {str(1000 + n): f"user{n:02d}" for n in range(60)}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zkdingsync.db") as opened:
        yield opened


def _save(store: Store, count: int) -> None:
    punches = [sample_punch(n) for n in range(count)]
    store.save_poll(
        "lobby", serial="SN-lobby", record_count=count, record_size=40, punches=punches, polled_at=START
    )


# ------------------------------------------------------------------ the back-off policy


def test_backoff_doubles_from_the_first_wait_up_to_the_cap_with_equal_jitter() -> None:
    low = Backoff(1.0, 300.0, jitter=lambda: 0.0)
    high = Backoff(1.0, 300.0, jitter=lambda: 0.999999)
    assert [low.seconds(n) for n in range(1, 11)] == [0.5, 1, 2, 4, 8, 16, 32, 64, 128, 150]
    assert [round(high.seconds(n)) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert low.seconds(0) == low.seconds(1)  # "no failure yet" waits like the first


@pytest.mark.parametrize("failures", [1_024, 1_025, 1_100, 10_000, 10**9])
def test_backoff_never_overflows(failures: int) -> None:
    """2.0 ** (failures - 1) overflows a float from 1,025 failures on: the policy stays at the cap."""
    rng = random.Random(failures)
    wait = Backoff(1.0, 300.0, jitter=rng.random).seconds(failures)
    assert 150.0 <= wait <= 300.0


# ------------------------------------------------------------------ the gate: a clock in, a decision out


def test_the_gate_holds_after_a_failure_and_only_a_later_call_ends_the_hold() -> None:
    gate = DeliveryGate(Backoff(10.0, 300.0, jitter=lambda: 0.999999))
    early, probe_before = gate.permit(START), gate.permit(START)
    assert (early, probe_before) == (1, 2)
    held = gate.failed("DingTalk cannot be reached", 0.0, START, early)
    assert held.began and held.failures == 1 and round(held.wait_seconds) == 10
    assert gate.why_not(START) == "delivery held: DingTalk cannot be reached"
    assert isinstance(gate.permit(START), str)
    # The call that was already under way when the failure was seen proves nothing.
    assert isinstance(probe_before, int)
    assert gate.answered(probe_before) is None
    assert gate.hold_until is not None
    later = START + timedelta(seconds=11)
    probe = gate.permit(later)
    assert isinstance(probe, int) and probe > probe_before
    assert gate.probing()
    ended = gate.answered(probe)
    assert ended is not None and ended.outage_since == START
    assert gate.hold_until is None and not gate.probing()


def test_the_gate_pauses_until_the_recheck_and_says_whether_the_pause_changed() -> None:
    gate = DeliveryGate(Backoff(1.0, 300.0, jitter=lambda: 0.5))
    call = gate.next_call()
    first = gate.needs_human("permission denied", "88", 3600.0, START, call)
    again = gate.needs_human("permission denied", "88", 3600.0, START, call)
    other = gate.needs_human("quota exhausted", "90020", 3600.0, START, call)
    assert (first.changed, again.changed, other.changed) == (True, False, True)
    assert gate.blocked_for(START) == 3600.0
    assert gate.resume_at(START) == START + timedelta(hours=1)
    assert gate.pause is not None and gate.pause.since == START
    assert gate.answered(gate.permit(START + timedelta(hours=1)), ends_pause=False) is not None
    assert gate.pause is not None  # a read-back that works ends no pause


# ------------------------------------------------------------------ the forwarder on the in-memory port


def test_ten_thousand_consecutive_failures_stay_within_the_cap_and_then_deliver_once(store: Store) -> None:
    count, cap = 5, 300.0
    _save(store, count)
    clock = SteppingClock(START)
    dingtalk = MemoryDingTalk(clock=clock)
    dingtalk.down = UNREACHABLE
    forwarder = Forwarder(
        store,
        dingtalk,
        UserMapper(USERS),
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(9),
        backoff_max_seconds=cap,
        monthly_call_quota=None,
    )
    waits: list[float] = []
    with structlog.testing.capture_logs() as events:
        while dingtalk.calls["upload"] < 10_000:
            wait = forwarder.step()
            held = forwarder.hold_until
            assert held is not None
            waits.append((held - clock.now).total_seconds())
            clock.advance(wait)
        dingtalk.down = None
        clock.advance(cap)
        assert forwarder.drain(max_steps=100)
        forwarder.close()
    assert dingtalk.calls["upload"] == 10_000 + count  # one probe at a time, then each punch once
    assert max(waits) <= cap
    assert min(waits[100:]) >= cap / 2  # long since at the cap, with its jitter
    levels = {event["log_level"] for event in events}
    assert not levels & {"error", "critical", "exception"}, [e for e in events if e["log_level"] == "error"]
    names = [event["event"] for event in events]
    assert names.count("delivery.held") == 1
    assert names.count("delivery.recovered") == 1
    assert store.delivery_counts()[Delivery.DELIVERED] == count
    assert set(dingtalk.accepted_counts().values()) == {1}
    assert len(dingtalk.accepted_counts()) == count


def test_an_unknown_outcome_is_settled_by_reading_the_port_back(store: Store) -> None:
    _save(store, 3)
    clock = SteppingClock(START)
    dingtalk = MemoryDingTalk(clock=clock)
    # The first upload arrived but its answer was lost; DingTalk holds it.
    dingtalk.script(Outcome(OutcomeKind.UNKNOWN, "the answer was lost", 0.0, "lost"))
    with Forwarder(store, dingtalk, UserMapper(USERS), clock=clock, sleep=clock.sleep) as forwarder:
        assert forwarder.drain(max_steps=200)
    assert dingtalk.calls["list_records"] >= 1
    assert set(dingtalk.accepted_counts().values()) == {1}
    assert store.delivery_counts()[Delivery.DELIVERED] == 3
    # Whichever went first (live first sends the newest): exactly that one's outcome was ever unknown.
    assert sorted(p.outcome_unknown for p in store.punches()) == [False, False, True]
