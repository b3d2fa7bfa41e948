"""The history policy: what a terminal held before delivery began is stored, counted, never queued."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from zkdingsync.history import HistoryPolicy, HistoryRule, day_start_ms, log_first_contact, parse_day
from zkdingsync.model import Delivery, Punch
from zkdingsync.store import Store
from zkdingsync.timeconv import local_to_epoch_ms

SHANGHAI = ZoneInfo("Asia/Shanghai")
# 2026-11-25 16:00 in Shanghai: the first contact.
FIRST_CONTACT = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)


def punch_at(local_time: str, *, enroll: str = "1001", quarantine: str | None = None) -> Punch:
    return Punch(
        device="lobby",
        serial="SN1",
        enroll_number=enroll,
        local_time=local_time,
        punch_state=0,
        verify_mode=1,
        check_time_ms=local_to_epoch_ms(local_time, SHANGHAI),
        quarantine_reason=quarantine,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zk.db") as opened:
        yield opened


def save(store: Store, punches: list[Punch], at: datetime, rule: HistoryRule | None) -> int:
    return store.save_poll(
        "lobby",
        serial="SN1",
        record_count=len(punches),
        record_size=40,
        punches=punches,
        polled_at=at,
        history=rule,
    )


def states(store: Store) -> dict[str, Delivery]:
    return {stored.punch.local_time: stored.delivery for stored in store.punches()}


def test_punches_before_the_first_contact_day_are_history(store: Store) -> None:
    log = [
        punch_at("2026-11-01 09:00:00"),
        punch_at("2026-11-24 23:59:59"),  # the evening before, in the terminal's zone
        punch_at("2026-11-25 00:00:00"),  # the first-contact day's midnight: delivered
        punch_at("2026-11-25 15:59:00"),
    ]
    assert save(store, log, FIRST_CONTACT, HistoryRule(SHANGHAI)) == 4
    assert states(store) == {
        "2026-11-01 09:00:00": Delivery.HISTORY,
        "2026-11-24 23:59:59": Delivery.HISTORY,
        "2026-11-25 00:00:00": Delivery.PENDING,
        "2026-11-25 15:59:00": Delivery.PENDING,
    }
    checkpoint = store.checkpoint("lobby")
    assert checkpoint is not None and checkpoint.first_contact == FIRST_CONTACT


def test_the_first_contact_day_stays_the_start_on_later_days(store: Store) -> None:
    save(store, [punch_at("2026-11-25 09:00:00")], FIRST_CONTACT, HistoryRule(SHANGHAI))
    # Two days later the terminal was down for a day: its punches of yesterday are not history.
    later = FIRST_CONTACT + timedelta(days=2)
    save(
        store,
        [punch_at("2026-11-25 09:00:00"), punch_at("2026-11-26 10:00:00")],
        later,
        HistoryRule(SHANGHAI),
    )
    assert states(store)["2026-11-26 10:00:00"] is Delivery.PENDING
    checkpoint = store.checkpoint("lobby")
    assert checkpoint is not None and checkpoint.first_contact == FIRST_CONTACT


def test_a_failed_first_poll_is_not_the_first_contact(store: Store) -> None:
    store.record_poll_failure("lobby", error="timed out", at=FIRST_CONTACT - timedelta(days=3))
    save(store, [punch_at("2026-11-23 09:00:00")], FIRST_CONTACT, HistoryRule(SHANGHAI))
    assert states(store) == {"2026-11-23 09:00:00": Delivery.HISTORY}


def test_delivery_since_moves_the_start_earlier_or_later(store: Store, tmp_path: Path) -> None:
    log = [punch_at("2026-11-09 23:00:00"), punch_at("2026-11-10 08:00:00"), punch_at("2026-11-25 09:00:00")]
    save(store, log, FIRST_CONTACT, HistoryRule(SHANGHAI, since=date(2026, 11, 10)))
    assert list(states(store).values()) == [Delivery.HISTORY, Delivery.PENDING, Delivery.PENDING]
    with Store.open(tmp_path / "later.db") as later:
        save(later, log, FIRST_CONTACT, HistoryRule(SHANGHAI, since=date(2026, 12, 1)))
        assert set(states(later).values()) == {Delivery.HISTORY}


def test_history_is_neither_quarantined_nor_parked_and_impossible_times_stay_quarantined(
    store: Store,
) -> None:
    old = punch_at("2026-01-01 09:00:00", quarantine="older than DingTalk's 180-day window")
    impossible = Punch(
        "lobby", "SN1", "1001", "2026-02-31 09:00:00", 0, 1, None, quarantine_reason="impossible"
    )
    save(store, [old, impossible], FIRST_CONTACT, HistoryRule(SHANGHAI))
    rows = {stored.punch.local_time: (stored.delivery, stored.reason) for stored in store.punches()}
    assert rows == {
        "2026-01-01 09:00:00": (Delivery.HISTORY, None),
        "2026-02-31 09:00:00": (Delivery.QUARANTINED, "impossible"),
    }


def test_without_a_rule_everything_new_is_queued(store: Store) -> None:
    save(store, [punch_at("2026-11-01 09:00:00")], FIRST_CONTACT, None)
    assert states(store) == {"2026-11-01 09:00:00": Delivery.PENDING}


def test_history_is_queued_by_window_and_counted(store: Store) -> None:
    log = [punch_at(f"2026-11-{day:02d} 09:00:00") for day in range(1, 25)]
    save(store, log, FIRST_CONTACT, HistoryRule(SHANGHAI))
    start, end = day_start_ms(date(2026, 11, 10), SHANGHAI), day_start_ms(date(2026, 11, 13), SHANGHAI)
    assert store.count_history("lobby", start, end) == 3
    assert store.queue_history("lobby", start, end, now=FIRST_CONTACT) == 3
    assert store.queue_history("lobby", start, end, now=FIRST_CONTACT) == 0  # once each
    counts = store.delivery_counts()
    assert (counts[Delivery.HISTORY], counts[Delivery.PENDING]) == (21, 3)
    assert store.history_held("lobby").count == 21


def test_first_contact_is_said_once_with_the_range_and_the_command(store: Store) -> None:
    save(
        store,
        [punch_at("2026-11-01 09:00:00"), punch_at("2026-11-20 18:00:00")],
        FIRST_CONTACT,
        HistoryRule(SHANGHAI),
    )
    with capture_logs() as logs:
        log_first_contact(store.history_held("lobby"))
    [line] = logs
    assert line["event"] == "history.held"
    assert (line["device"], line["punches"], line["first"], line["last"]) == (
        "lobby",
        2,
        "2026-11-01",
        "2026-11-20",
    )
    assert line["deliver_with"] == "zkdingsync backfill --since 2026-11-01 --until 2026-11-20 --device lobby"


def test_policy_rule_and_dates() -> None:
    assert HistoryPolicy(date(2026, 11, 1)).rule(SHANGHAI) == HistoryRule(SHANGHAI, date(2026, 11, 1))
    # Local midnight in the zone, not UTC's.
    assert day_start_ms(date(2026, 11, 25), SHANGHAI) == local_to_epoch_ms("2026-11-25 00:00:00", SHANGHAI)
    assert parse_day("2026-11-01") == date(2026, 11, 1)
    for bad in ("2026-11-1", "2026-13-01", "yesterday", "2026-W48-2", "20261101"):
        with pytest.raises(ValueError, match="is not a date YYYY-MM-DD"):
            parse_day(bad)
