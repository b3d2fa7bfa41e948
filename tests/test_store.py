"""The SQLite store, on real files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from zkdingsync.errors import StoreError
from zkdingsync.model import Delivery, Punch, TerminalInfo
from zkdingsync.store import Store

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)


def punch(n: int, *, serial: str = "SN1", device: str = "lobby", quarantine: str | None = None) -> Punch:
    return Punch(
        device=device,
        serial=serial,
        enroll_number=str(1000 + n % 7),
        local_time=f"2026-11-25 08:{n // 60 % 60:02d}:{n % 60:02d}",
        punch_state=0,
        verify_mode=1,
        check_time_ms=1_764_028_800_000 + n * 1000,
        quarantine_reason=quarantine,
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store.open(tmp_path / "state" / "zk.db") as opened:
        yield opened


def test_rereading_a_log_inserts_nothing_twice(store: Store) -> None:
    first = [punch(n) for n in range(100)]
    assert (
        store.save_poll("lobby", serial="SN1", record_count=100, record_size=40, punches=first, polled_at=T0)
        == 100
    )
    again = [*first, punch(100), punch(101)]
    assert (
        store.save_poll("lobby", serial="SN1", record_count=102, record_size=40, punches=again, polled_at=T0)
        == 2
    )
    assert store.delivery_counts()[Delivery.PENDING] == 102
    checkpoint = store.checkpoint("lobby")
    assert checkpoint is not None
    assert (checkpoint.serial, checkpoint.record_count, checkpoint.record_size) == ("SN1", 102, 40)


def test_delivered_punches_are_not_requeued_by_a_reread(store: Store) -> None:
    store.save_poll(
        "lobby",
        serial="SN1",
        record_count=3,
        record_size=16,
        punches=[punch(n) for n in range(3)],
        polled_at=T0,
    )
    for claimed in store.claim_due(T0, 10):
        store.mark_delivered(claimed.id, at=T0, userid="u1")
    assert (
        store.save_poll(
            "lobby",
            serial="SN1",
            record_count=3,
            record_size=16,
            punches=[punch(n) for n in range(3)],
            polled_at=T0,
        )
        == 0
    )
    assert store.delivery_counts()[Delivery.DELIVERED] == 3
    assert store.claim_due(T0 + timedelta(hours=1), 10) == []


def test_quarantined_punches_are_stored_but_never_claimed(store: Store) -> None:
    store.save_poll(
        "lobby",
        serial="SN1",
        record_count=2,
        record_size=16,
        punches=[punch(1), punch(2, quarantine="impossible date 2026-02-31 08:00:00")],
        polled_at=T0,
    )
    claimed = store.claim_due(T0, 10)
    assert [c.punch.local_time for c in claimed] == [punch(1).local_time]
    assert store.park_reasons(delivery=Delivery.QUARANTINED) == [("impossible date 2026-02-31 08:00:00", 1)]


def test_claim_moves_to_in_flight_durably_and_respects_due_time(tmp_path: Path) -> None:
    path = tmp_path / "zk.db"
    with Store.open(path) as store:
        store.save_poll(
            "lobby",
            serial="SN1",
            record_count=3,
            record_size=16,
            punches=[punch(n) for n in range(3)],
            polled_at=T0,
        )
        claimed = store.claim_due(T0, 2)
        assert [c.attempts for c in claimed] == [1, 1]
        assert all(c.delivery is Delivery.IN_FLIGHT for c in claimed)
        store.mark_pending(claimed[0].id, retry_at=T0 + timedelta(minutes=5), reason="HTTP 502")
    # A new process (a restart) sees what was committed.
    with Store.open(path) as store:
        assert [p.id for p in store.in_flight()] == [claimed[1].id]
        assert [p.punch.local_time for p in store.claim_due(T0, 10)] == [punch(2).local_time]
        assert [p.id for p in store.claim_due(T0 + timedelta(minutes=5), 10)] == [claimed[0].id]


def test_unknown_outcome_is_remembered(store: Store) -> None:
    store.save_poll("lobby", serial="SN1", record_count=1, record_size=16, punches=[punch(1)], polled_at=T0)
    (claimed,) = store.claim_due(T0, 1)
    store.mark_unknown(claimed.id, reason="no answer within 10 s")
    (left,) = store.in_flight()
    assert left.outcome_unknown
    store.mark_pending(left.id, retry_at=T0, reason="not found by read-back", outcome_unknown=True)
    store.mark_pending(left.id, retry_at=T0, reason="HTTP 502")
    assert store.outcome_unknown_count() == 1


def test_park_and_requeue_by_reason_and_device(store: Store) -> None:
    store.save_poll(
        "lobby",
        serial="SN1",
        record_count=3,
        record_size=16,
        punches=[punch(n) for n in range(3)],
        polled_at=T0,
    )
    store.save_poll(
        "gate",
        serial="SN2",
        record_count=1,
        record_size=16,
        punches=[punch(9, serial="SN2", device="gate")],
        polled_at=T0,
    )
    for claimed in store.claim_due(T0, 10):
        reason = (
            "enroll number 1009 has no DingTalk user" if claimed.punch.device == "gate" else "errcode 60121"
        )
        store.park(claimed.id, reason=reason)
    assert store.park_reasons() == [("errcode 60121", 3), ("enroll number 1009 has no DingTalk user", 1)]
    assert store.requeue_parked(device="gate", now=T0) == 1
    assert store.requeue_parked(reason_contains="60121", now=T0) == 3
    assert store.delivery_counts()[Delivery.PARKED] == 0
    assert len(store.claim_due(T0, 10)) == 4


def test_poll_failure_keeps_the_first_down_time(store: Store) -> None:
    first = store.record_poll_failure("lobby", error="connection refused", at=T0)
    later = store.record_poll_failure("lobby", error="timed out", at=T0 + timedelta(minutes=3))
    assert first.down_since == T0 and later.down_since == T0
    assert later.last_error == "timed out"
    info = TerminalInfo(
        serial="SN1",
        firmware="Ver 6.60",
        platform="ZMM220",
        terminal_time=T0,
        users=5,
        user_capacity=1000,
        records=0,
        record_capacity=100_000,
    )
    store.save_poll(
        "lobby",
        serial="SN1",
        record_count=0,
        record_size=None,
        punches=[],
        polled_at=T0,
        info=info,
        drift_seconds=2.5,
    )
    recovered = store.checkpoint("lobby")
    assert recovered is not None
    assert (recovered.down_since, recovered.last_error, recovered.firmware, recovered.drift_seconds) == (
        None,
        None,
        "Ver 6.60",
        2.5,
    )


def test_values_expire_and_calls_add_up(store: Store) -> None:
    store.set_value("token", "abc", expires_at=T0 + timedelta(seconds=7200))
    assert store.get_value("token", now=T0) == "abc"
    assert store.get_value("token", now=T0 + timedelta(seconds=7200)) is None
    assert store.count_calls("2026-11") == 1
    assert store.count_calls("2026-11", 4) == 5
    assert store.calls_in_month("2026-12") == 0
    store.replace_job_numbers({"1001": "manager4220"}, at=T0)
    assert store.job_numbers() == {"1001": "manager4220"}
    assert store.job_numbers_updated_at() == T0


def test_second_instance_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "zk.db"
    probe = (
        "import sys; from pathlib import Path; from zkdingsync.store import Store; "
        "from zkdingsync.errors import StoreLockedError\n"
        "try:\n    Store.open(Path(sys.argv[1]), lock=True)\n"
        "except StoreLockedError as error:\n    print(error)\n"
        "else:\n    print('acquired')\n"
    )
    with Store.open(path, lock=True):
        result = subprocess.run(
            [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=30
        )
        assert "already running" in result.stdout and str(os.getpid()) in result.stdout
    # Released on close: another process gets it.
    result = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.stdout.strip() == "acquired"


def test_read_only_directory_fails_closed(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores permission bits; make the database file itself refuse writes instead
        path = tmp_path / "zk.db"
        with Store.open(path) as store:
            store.save_poll(
                "lobby", serial="SN1", record_count=1, record_size=16, punches=[punch(1)], polled_at=T0
            )
        with Store.open(path) as store:
            store._conn.execute("PRAGMA query_only=ON")
            with pytest.raises(StoreError):
                store.save_poll(
                    "lobby",
                    serial="SN1",
                    record_count=2,
                    record_size=16,
                    punches=[punch(1), punch(2)],
                    polled_at=T0,
                )
            checkpoint = store.checkpoint("lobby")
            assert checkpoint is not None and checkpoint.record_count == 1
        return
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(StoreError):
        Store.open(directory / "zk.db")


def test_integrity_after_many_writes(store: Store) -> None:
    for batch in range(20):
        store.save_poll(
            "lobby",
            serial="SN1",
            record_count=batch * 50,
            record_size=16,
            punches=[punch(n) for n in range(batch * 50)],
            polled_at=T0,
        )
    assert store.integrity_check() == "ok"
    assert store.punches_since(T0) == 950
