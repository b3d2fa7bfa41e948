"""`status`: real SQLite stores filled through the public Store API, text and JSON output, exit codes."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from zkdingsync.config import Config, DeviceConfig, DingTalkConfig, PollConfig, StoreConfig, load_config
from zkdingsync.model import Delivery, DingTalkHealth, HealthState, Punch, TerminalInfo
from zkdingsync.quota import call_month
from zkdingsync.redaction import forget_secrets
from zkdingsync.status import (
    collect_status,
    needs_attention,
    render_json,
    render_text,
    start_of_day,
    status_command,
)
from zkdingsync.store import Store

SHANGHAI = ZoneInfo("Asia/Shanghai")
# 16:00 in Shanghai.
NOW = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)
APP_SECRET = "app-secret-6f1c9e2b7a"


def punch(n: int, *, device: str = "lobby", quarantine: str | None = None) -> Punch:
    return Punch(
        device=device,
        serial=f"SN-{device}",
        enroll_number=str(1000 + n % 50),
        local_time=f"2026-11-25 {8 + n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}",
        punch_state=0,
        verify_mode=1,
        check_time_ms=1_764_028_800_000 + n * 1000,
        quarantine_reason=quarantine,
    )


def info(records: int, capacity: int) -> TerminalInfo:
    return TerminalInfo(
        serial="SN-lobby",
        firmware="Ver 6.60 Apr 28 2017",
        platform="ZMM220_TFT",
        terminal_time=NOW,
        users=50,
        user_capacity=3000,
        records=records,
        record_capacity=capacity,
    )


def make_config(tmp_path: Path, *devices: str, quota: int = 5000) -> Config:
    return Config(
        dingtalk=DingTalkConfig(app_key="dingabc123", app_secret=APP_SECRET, monthly_call_quota=quota),
        devices=tuple(DeviceConfig(name=name, host="127.0.0.1", comm_key=8675309) for name in devices),
        store=StoreConfig(path=tmp_path / "state" / "zk.db"),
        poll=PollConfig(interval_seconds=60.0, drift_threshold_seconds=60.0),
        timezone="Asia/Shanghai",
    )


def run_status(config: Config, *, as_json: bool, now: datetime = NOW) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = status_command(config, as_json=as_json, out=out, err=err, now=now)
    return code, out.getvalue(), err.getvalue()


def healthy_store(config: Config) -> None:
    """lobby polled a minute ago: 10 punches, 6 delivered, DingTalk ok."""
    with Store.open(config.store.path) as store:
        store.save_poll(
            "lobby",
            serial="SN-lobby",
            record_count=10,
            record_size=40,
            punches=[punch(n) for n in range(10)],
            polled_at=NOW - timedelta(minutes=1),
            info=info(10, 100_000),
            drift_seconds=2.0,
        )
        for stored in store.claim_due(NOW, limit=6):
            store.mark_delivered(stored.id, at=NOW - timedelta(seconds=30), userid=f"u{stored.id}")
        store.count_calls(call_month(NOW, SHANGHAI), 7)
        store.set_dingtalk_health(DingTalkHealth(HealthState.OK, at=NOW - timedelta(seconds=30)))


def test_all_well_exits_0_with_a_readable_table(tmp_path: Path) -> None:
    config = make_config(tmp_path, "lobby")
    healthy_store(config)
    code, out, err = run_status(config, as_json=False)
    assert (code, err) == (0, "")
    assert "Nothing needs attention." in out
    assert "2026-11-25 16:00:00 (Asia/Shanghai)" in out
    [lobby_row] = [line for line in out.splitlines() if line.strip().startswith("lobby")]
    assert lobby_row.split()[:2] == ["lobby", "ok"]
    assert "10 / 100000 (0%)" in lobby_row
    assert "+2 s" in lobby_row
    assert "pending          4" in out
    assert "delivered today  6 (total 6)" in out
    assert "health           ok (at 2026-11-25 15:59:30)" in out
    assert "7 of 5000 (0%)" in out


def test_json_document(tmp_path: Path) -> None:
    config = make_config(tmp_path, "lobby", "gate")
    healthy_store(config)
    code, out, _ = run_status(config, as_json=True)
    document = json.loads(out)
    assert code == 0
    assert document["ok"] is True
    assert document["needs_attention"] == []
    assert document["generated_at"] == "2026-11-25T16:00:00+08:00"
    lobby, gate = document["terminals"]
    assert lobby["name"] == "lobby"
    assert lobby["state"] == "ok"
    assert lobby["reachable"] is True
    assert (lobby["records"], lobby["record_capacity"], lobby["percent_full"]) == (10, 100_000, 0.0)
    assert lobby["new_today"] == 10
    assert lobby["serial"] == "SN-lobby"
    assert lobby["last_success"] == "2026-11-25T15:59:00+08:00"
    # In the config but never polled: listed, not an alarm by itself.
    assert gate["state"] == "never polled"
    assert gate["reachable"] is False
    assert gate["last_poll"] is None
    assert document["delivery"] == {
        "pending": 4,
        "in_flight": 0,
        "delivered_today": 6,
        "delivered_total": 6,
        "parked": 0,
        "parked_reasons": [],
        "quarantined": 0,
        "quarantined_reasons": [],
        "oldest_pending_stored_at": "2026-11-25T15:59:00+08:00",
        "outcome_unknown": 0,
        "history": 0,
    }
    assert document["dingtalk"]["health"] == "ok"
    assert document["dingtalk"]["calls_this_month"] == 7
    assert document["dingtalk"]["monthly_call_quota"] == 5000


def troubled_store(config: Config) -> None:
    """Everything that needs a human at once."""
    with Store.open(config.store.path) as store:
        # lobby: 95 % full, clock 2 minutes fast; its punches were stored 3 hours ago and are still pending.
        store.save_poll(
            "lobby",
            serial="SN-lobby",
            record_count=95_000,
            record_size=40,
            punches=[punch(n) for n in range(20)],
            polled_at=NOW - timedelta(hours=3),
            info=info(95_000, 100_000),
            drift_seconds=120.0,
        )
        store.save_poll(
            "lobby",
            serial="SN-lobby",
            record_count=95_000,
            record_size=40,
            punches=[],
            polled_at=NOW - timedelta(seconds=20),
        )
        # gate: polled once, then down since 15:00 local, with a secret in the error text.
        store.save_poll(
            "gate",
            serial="SN-gate",
            record_count=3,
            record_size=40,
            punches=[punch(n, device="gate") for n in range(100, 103)],
            polled_at=NOW - timedelta(hours=2),
        )
        store.record_poll_failure("gate", error="connection refused", at=NOW - timedelta(hours=1))
        store.record_poll_failure(
            "gate", error=f"auth failed with key {APP_SECRET} / 8675309", at=NOW - timedelta(minutes=1)
        )
        claimed = store.claim_due(NOW, limit=5)
        store.park(claimed[0].id, reason="enroll number 1000 has no DingTalk userid")
        store.park(claimed[1].id, reason="enroll number 1000 has no DingTalk userid")
        store.park(claimed[2].id, reason=f"errcode 40078 for secret {APP_SECRET}")
        store.save_poll(
            "lobby",
            serial="SN-lobby",
            record_count=95_001,
            record_size=40,
            punches=[punch(500, quarantine="time 40 days in the future")],
            polled_at=NOW - timedelta(seconds=10),
        )
        store.count_calls(call_month(NOW, SHANGHAI), 4_300)
        paused = "paused: errcode 88 permission denied for the attendance API"
        store.set_dingtalk_health(DingTalkHealth.parse(paused, NOW))


def test_problems_exit_1_and_are_named(tmp_path: Path) -> None:
    config = make_config(tmp_path, "lobby", "gate", "side")
    troubled_store(config)
    code, out, _ = run_status(config, as_json=True)
    assert code == 1
    document = json.loads(out)
    assert document["ok"] is False
    attention = document["needs_attention"]
    assert attention == [
        "terminal lobby is 95% full (95001 of 100000 records)",
        "terminal lobby clock is off by +120 s (threshold 60 s)",
        "terminal gate is down since 2026-11-25 15:00:00: auth failed with key *** / ***",
        "3 punches parked (most: enroll number 1000 has no DingTalk userid); fix the cause, then run "
        "`zkdingsync retry`",
        "1 punch quarantined (most: time 40 days in the future)",
        "oldest pending punch has waited 3 h for delivery",
        "DingTalk delivery is paused: errcode 88 permission denied for the attendance API",
        "DingTalk calls this month: 4300 of 5000 (86%)",
    ]
    delivery = document["delivery"]
    assert delivery["parked"] == 3
    assert delivery["parked_reasons"] == [
        {"reason": "enroll number 1000 has no DingTalk userid", "count": 2},
        {"reason": "errcode 40078 for secret ***", "count": 1},
    ]
    assert delivery["quarantined"] == 1
    assert delivery["quarantined_reasons"] == [{"reason": "time 40 days in the future", "count": 1}]
    assert delivery["in_flight"] == 2
    gate = document["terminals"][1]
    assert gate["state"] == "down"
    assert gate["down_since"] == "2026-11-25T15:00:00+08:00"
    assert document["terminals"][2]["state"] == "never polled"


def test_text_shows_the_same_problems_without_secrets(tmp_path: Path) -> None:
    config = make_config(tmp_path, "lobby", "gate", "side")
    troubled_store(config)
    code, out, _ = run_status(config, as_json=False)
    assert code == 1
    assert APP_SECRET not in out
    assert "8675309" not in out
    assert "DOWN since 2026-11-25 15:00:00" in out
    assert "never polled" in out
    assert "95001 / 100000 (95%)" in out
    assert "     2  enroll number 1000 has no DingTalk userid" in out
    assert "Needs attention" in out
    assert "  - DingTalk delivery is paused: errcode 88" in out


def test_secrets_from_a_loaded_config_never_appear(tmp_path: Path) -> None:
    forget_secrets()  # the loader registers the secret; prove the status code scrubs it on its own as well
    store_path = tmp_path / "zk.db"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        "dingtalk:\n"
        "  app_key: dingabc123\n"
        "  app_secret: ${ZKDINGSYNC_APP_SECRET}\n"
        f"store:\n  path: {store_path}\n"
        "devices:\n  - name: lobby\n    host: 127.0.0.1\n"
    )
    config = load_config(config_file, {"ZKDINGSYNC_APP_SECRET": "loaded-secret-93b1d0"})
    forget_secrets()
    with Store.open(store_path) as store:
        store.record_poll_failure("lobby", error="echo loaded-secret-93b1d0", at=NOW)
        store.set_dingtalk_health(DingTalkHealth.parse("error: token refused for loaded-secret-93b1d0", NOW))
    for as_json in (True, False):
        code, out, err = run_status(config, as_json=as_json)
        assert code == 1
        assert "loaded-secret-93b1d0" not in out + err
        assert "***" in out


def test_status_reads_while_the_daemon_holds_the_lock_and_writes(tmp_path: Path) -> None:
    config = make_config(tmp_path, "lobby")
    healthy_store(config)
    with Store.open(config.store.path, lock=True) as daemon:
        # The daemon has an open write transaction's worth of recent work committed in WAL.
        daemon.save_poll(
            "lobby",
            serial="SN-lobby",
            record_count=12,
            record_size=40,
            punches=[punch(n) for n in range(10, 12)],
            polled_at=NOW,
        )
        code, out, _ = run_status(config, as_json=True)
        assert code == 0
        assert json.loads(out)["delivery"]["pending"] == 6
        # status did not take or break the lock: the daemon keeps writing.
        daemon.set_value("probe", "still mine")
        assert daemon.get_value("probe", now=NOW) == "still mine"


def test_missing_store_is_reported_and_not_created(tmp_path: Path) -> None:
    config = make_config(tmp_path, "lobby")
    code, out, err = run_status(config, as_json=False)
    assert code == 1
    assert out == ""
    assert err == f"zkdingsync status: no store yet at {config.store.path} (has the daemon run?)\n"
    code, out, _ = run_status(config, as_json=True)
    document = json.loads(out)
    assert code == 1
    assert document["ok"] is False
    assert document["needs_attention"] == [f"no store yet at {config.store.path} (has the daemon run?)"]
    assert not Path(config.store.path).exists()
    assert not Path(config.store.path).parent.exists()


def test_unreadable_store_is_a_clear_error(tmp_path: Path) -> None:
    config = make_config(tmp_path, "lobby")
    Path(config.store.path).parent.mkdir(parents=True)
    Path(config.store.path).write_bytes(b"this is not a database" * 100)
    code, out, err = run_status(config, as_json=False)
    assert (code, out) == (1, "")
    assert err.startswith("zkdingsync status: cannot read the store: ")
    assert "Traceback" not in err


def test_today_is_counted_in_the_configured_timezone(tmp_path: Path) -> None:
    path = tmp_path / "zk.db"
    # 23:59 on the 25th in Shanghai is 15:59 UTC; 00:30 on the 26th is 16:30 UTC.
    late_evening = datetime(2026, 11, 25, 15, 59, tzinfo=timezone.utc)
    after_midnight = datetime(2026, 11, 25, 16, 30, tzinfo=timezone.utc)
    assert start_of_day(after_midnight, SHANGHAI) == datetime(2026, 11, 25, 16, 0, tzinfo=timezone.utc)
    with Store.open(path) as store:
        store.save_poll(
            "lobby", serial="SN", record_count=2, record_size=40, punches=[punch(1)], polled_at=late_evening
        )
        [claimed] = store.claim_due(late_evening, limit=1)
        store.mark_delivered(claimed.id, at=late_evening, userid="u1")
        store.save_poll(
            "lobby", serial="SN", record_count=2, record_size=40, punches=[punch(2)], polled_at=after_midnight
        )
        report = collect_status(store, None, after_midnight, month_quota=5000, local_tz=SHANGHAI)
        in_utc = collect_status(store, None, after_midnight, month_quota=5000, local_tz=timezone.utc)
    assert report.terminals[0].new_today == 1
    assert report.delivery.delivered_today == 0
    assert report.delivery.delivered_total == 1
    assert in_utc.terminals[0].new_today == 2
    assert in_utc.delivery.delivered_today == 1


def test_a_daemon_that_stopped_polling_is_noticed(tmp_path: Path) -> None:
    config = make_config(tmp_path, "lobby")
    healthy_store(config)
    code, out, _ = run_status(config, as_json=True, now=NOW + timedelta(hours=2))
    attention: list[Any] = json.loads(out)["needs_attention"]
    assert code == 1
    assert "terminal lobby was last polled 2 h 1 min ago (is the daemon running?)" in attention


def test_report_without_config_lists_every_known_terminal(tmp_path: Path) -> None:
    with Store.open(tmp_path / "zk.db") as store:
        for name in ("b-gate", "a-lobby"):
            store.save_poll(name, serial=name, record_count=0, record_size=None, punches=[], polled_at=NOW)
        report = collect_status(store, None, NOW, month_quota=0, local_tz=SHANGHAI)
    assert [t.name for t in report.terminals] == ["a-lobby", "b-gate"]
    assert needs_attention(report) == []
    # A zero quota means "unknown": no percentage, no division by zero.
    assert json.loads(render_json(report))["dingtalk"]["quota_used_percent"] is None
    assert "0 of 0" in render_text(report)


@pytest.mark.parametrize(("calls", "warned"), [(3_999, False), (4_000, True)])
def test_quota_warning_starts_at_80_percent(tmp_path: Path, calls: int, warned: bool) -> None:
    with Store.open(tmp_path / "zk.db") as store:
        store.count_calls("2026-11", calls)
        store.count_calls("2026-10", 10_000)  # last month does not count
        report = collect_status(store, [], NOW, month_quota=5_000, local_tz=SHANGHAI)
    assert any("DingTalk calls this month" in line for line in needs_attention(report)) is warned
    assert report.delivery.parked == 0
    assert Delivery.PARKED.value in json.loads(render_json(report))["delivery"]


def test_text_escapes_what_terminals_and_dingtalk_chose(tmp_path: Path) -> None:
    config = make_config(tmp_path, "lobby")
    healthy_store(config)
    with Store.open(config.store.path) as store:
        [claimed] = store.claim_due(NOW, limit=1)
        store.park(claimed.id, reason="enroll number \x1b[2J\x1b[31m1000 has no DingTalk userid")
        store.record_poll_failure("lobby", error="firmware says \x1b]0;owned\x07\r", at=NOW)
    _, out, _ = run_status(config, as_json=False)
    assert not any(ch in out for ch in "\x1b\x07\r")
    assert "enroll number \\x1b[2J\\x1b[31m1000 has no DingTalk userid" in out
