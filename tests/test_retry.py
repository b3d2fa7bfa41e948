"""`retry`: parked (and quarantined) punches back in the queue, on real SQLite stores."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone
from pathlib import Path

from harness import sample_punch

from zkdingsync.config import Config, DeviceConfig, DingTalkConfig, StoreConfig
from zkdingsync.model import Delivery
from zkdingsync.retry import retry_command
from zkdingsync.store import Store

NOW = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)


def make_config(tmp_path: Path) -> Config:
    return Config(
        dingtalk=DingTalkConfig(app_key="dingabc123", app_secret="retry-secret-31415"),
        devices=(DeviceConfig(name="lobby", host="127.0.0.1"), DeviceConfig(name="gate", host="127.0.0.1")),
        store=StoreConfig(path=tmp_path / "zk.db"),
    )


def fill(path: Path) -> None:
    """lobby: 3 parked (2 unmapped, 1 permanent error), 1 pending; gate: 1 parked, 2 quarantined."""
    with Store.open(path) as store:
        store.save_poll(
            "lobby",
            serial="SN-lobby",
            record_count=4,
            record_size=40,
            punches=[sample_punch(n) for n in range(4)],
            polled_at=NOW - timedelta(hours=1),
        )
        store.save_poll(
            "gate",
            serial="SN-gate",
            record_count=3,
            record_size=40,
            punches=[
                sample_punch(10, device="gate"),
                sample_punch(11, device="gate", quarantine="time 40 days in the future"),
                sample_punch(12, device="gate", quarantine="impossible date 2026-02-31", impossible=True),
            ],
            polled_at=NOW - timedelta(hours=1),
        )
        claimed = store.claim_due(NOW - timedelta(minutes=50), limit=10)
        by_enroll = {stored.punch.enroll_number: stored for stored in claimed}
        store.park(by_enroll["1000"].id, reason="enroll number 1000 has no DingTalk userid")
        store.park(by_enroll["1001"].id, reason="enroll number 1001 has no DingTalk userid")
        store.park(by_enroll["1002"].id, reason="errcode 60121 user not found")
        store.park(by_enroll["1010"].id, reason="enroll number 1010 has no DingTalk userid")
        store.mark_pending(by_enroll["1003"].id, retry_at=NOW + timedelta(hours=1), reason="rate limited")


def run_retry(config: Config, **options: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = retry_command(config, out=out, err=err, now=NOW, **options)  # type: ignore[arg-type]
    return code, out.getvalue(), err.getvalue()


def test_requeues_every_parked_punch_and_asks_for_a_mapping_refresh(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    fill(config.store.path)
    code, out, err = run_retry(config)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "re-queued 4 parked punches",
        "the daemon delivers them on its next round (or when it next starts)",
        "still quarantined: 2 (add --quarantined to re-queue those with a valid time)",
    ]
    with Store.open(config.store.path) as store:
        counts = store.delivery_counts()
        assert (counts[Delivery.PARKED], counts[Delivery.PENDING]) == (0, 5)
        # Due now: the forwarder's next claim takes exactly the four, not the one backing off.
        due = store.claim_due(NOW, limit=10)
        assert sorted(stored.punch.enroll_number for stored in due) == ["1000", "1001", "1002", "1010"]
        assert store.mapping_refresh_requested() == NOW


def test_filters_by_reason_and_device(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    fill(config.store.path)
    code, out, _ = run_retry(config, reason="no DingTalk userid", device="lobby")
    assert code == 0
    assert out.splitlines()[0] == (
        "re-queued 2 parked punches matching reason containing 'no DingTalk userid' and terminal 'lobby'"
    )
    assert "still parked: 2" in out
    with Store.open(config.store.path) as store:
        left = {stored.punch.enroll_number for stored in store.punches(delivery=Delivery.PARKED)}
    assert left == {"1002", "1010"}


def test_nothing_to_do_still_succeeds(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    fill(config.store.path)
    code, out, _ = run_retry(config, reason="no such reason")
    assert code == 0
    assert out.startswith("re-queued 0 parked punches matching reason containing 'no such reason'\n")
    assert "next round" not in out


def test_quarantined_on_request_only_with_a_real_time(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    fill(config.store.path)
    code, out, _ = run_retry(config, include_quarantined=True)
    assert code == 0
    assert "re-queued 1 quarantined punch\n" in out
    assert "still quarantined: 1 (their time is impossible; they cannot be uploaded)" in out
    with Store.open(config.store.path) as store:
        [left] = store.punches(delivery=Delivery.QUARANTINED)
    assert left.punch.enroll_number == "1012"


def test_works_while_the_daemon_holds_the_lock(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    fill(config.store.path)
    with Store.open(config.store.path, lock=True) as daemon:
        code, out, _ = run_retry(config, device="gate")
        assert code == 0
        assert out.startswith("re-queued 1 parked punch matching terminal 'gate'\n")
        # The daemon's own connection sees the change at once and can deliver it.
        [due] = daemon.claim_due(NOW, limit=10)
        assert due.punch.enroll_number == "1010"


def test_unknown_device_is_noted_and_no_store_is_created(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    code, out, _ = run_retry(config, device="attic")
    assert code == 0
    assert out.splitlines() == [
        "note: no terminal named 'attic' in the config; matching stored punches anyway",
        f"no store yet at {config.store.path}: nothing to re-queue",
    ]
    assert not Path(config.store.path).exists()


def test_an_unusable_store_fails_with_one_line(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    Path(config.store.path).write_bytes(b"not a database" * 200)
    code, out, err = run_retry(config)
    assert (code, out) == (1, "")
    assert err.startswith("zkdingsync retry: cannot update the store: ")
    assert len(err.splitlines()) == 1
