"""Store queries added for `status` and `retry`, on real SQLite files."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from harness import sample_punch

from zkdingsync.model import Delivery, Punch
from zkdingsync.store import Store

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zk.db") as opened:
        yield opened


def save(store: Store, device: str, punches: list[Punch], at: datetime) -> None:
    store.save_poll(
        device,
        serial=f"SN-{device}",
        record_count=len(punches),
        record_size=40,
        punches=punches,
        polled_at=at,
    )


def test_oldest_stored_at_follows_the_state(store: Store) -> None:
    assert store.oldest_stored_at() is None
    save(store, "lobby", [sample_punch(1)], T0)
    save(store, "lobby", [sample_punch(2)], T0 + timedelta(hours=1))
    assert store.oldest_stored_at() == T0
    [claimed] = store.claim_due(T0 + timedelta(hours=2), limit=1)
    assert claimed.punch.enroll_number == "1001"
    assert store.oldest_stored_at() == T0 + timedelta(hours=1)
    assert store.oldest_stored_at(Delivery.IN_FLIGHT) == T0
    assert store.oldest_stored_at(Delivery.PARKED) is None


def test_requeue_quarantined_moves_only_punches_with_a_real_time(store: Store) -> None:
    save(
        store,
        "lobby",
        [
            sample_punch(1, quarantine="time 30 days in the future"),
            sample_punch(2, quarantine="impossible date 2026-02-31 08:00:02", impossible=True),
            sample_punch(3),
        ],
        T0,
    )
    save(store, "gate", [sample_punch(4, device="gate", quarantine="time 30 days in the future")], T0)
    assert store.requeue_quarantined(reason_contains="no such reason", now=T0) == 0
    assert store.requeue_quarantined(device="lobby", now=T0) == 1
    assert store.delivery_counts()[Delivery.QUARANTINED] == 2
    assert store.requeue_quarantined(now=T0) == 1
    [left] = store.punches(delivery=Delivery.QUARANTINED)
    assert left.punch.enroll_number == "1002"
    # Re-queued punches are due at once and carry no stale reason.
    claimed = store.claim_due(T0, limit=10)
    assert sorted(p.punch.enroll_number for p in claimed) == ["1001", "1003", "1004"]
    assert all(p.reason is None for p in claimed)
