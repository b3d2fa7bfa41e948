"""`zkdingsync backfill`: history of a window queued once, priced against the calls left this month."""

from __future__ import annotations

import io
from datetime import date, datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from harness import run_cli, write_config

from zkdingsync.backfill import BackfillRequest, backfill_command
from zkdingsync.config import load_config
from zkdingsync.errors import UserError
from zkdingsync.history import HistoryRule
from zkdingsync.model import Delivery, Punch
from zkdingsync.store import Store
from zkdingsync.timeconv import local_to_epoch_ms

SHANGHAI = ZoneInfo("Asia/Shanghai")
NOW = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)  # 16:00 in Shanghai


def history_store(path: Path, device: str = "lobby", days: range = range(1, 25)) -> None:
    """One punch a day at 09:00 on 2026-11-01 .. 11-24, all history (first contact on 11-25)."""
    log = [
        Punch(device, f"SN-{device}", "1001", f"2026-11-{day:02d} 09:00:00", 0, 1, ms)
        for day in days
        if (ms := local_to_epoch_ms(f"2026-11-{day:02d} 09:00:00", SHANGHAI)) is not None
    ]
    with Store.open(path) as store:
        store.save_poll(
            device,
            serial=f"SN-{device}",
            record_count=len(log),
            record_size=40,
            punches=log,
            polled_at=NOW,
            history=HistoryRule(SHANGHAI),
        )


def config_for(tmp_path: Path, quota: int = 5000, devices: tuple[str, ...] = ("lobby",)) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        store=tmp_path / "zk.db",
        api_base="http://127.0.0.1:9",
        devices=[(name, 4370 + index) for index, name in enumerate(devices)],
        users={"1001": "u1"},
        app_key="dingkey",
        app_secret="secret-value-1234",
        monthly_call_quota=quota,
    )


def run(config_path: Path, request: BackfillRequest) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = backfill_command(load_config(config_path), request, out=out, err=err, now=NOW)
    return code, out.getvalue(), err.getvalue()


def test_backfill_queues_the_window_once(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    history_store(tmp_path / "zk.db")
    request = BackfillRequest(since=date(2026, 11, 10), until=date(2026, 11, 14))
    code, out, _ = run(config, request)
    assert code == 0
    assert "lobby: 5 history punches from 2026-11-10 to 2026-11-14" in out
    assert "5 uploads (5 DingTalk calls); 5000 calls left this month (2026-11: 0 of 5000 used)" in out
    assert "queued 5 punches" in out
    with Store.open(tmp_path / "zk.db") as store:
        pending = sorted(p.punch.local_time[:10] for p in store.punches(delivery=Delivery.PENDING))
        assert pending == [f"2026-11-{day}" for day in range(10, 15)]
    code, out, _ = run(config, request)
    assert (code, "nothing to backfill" in out) == (0, True)


def test_backfill_refuses_beyond_the_calls_left_unless_yes(tmp_path: Path) -> None:
    config = config_for(tmp_path, quota=100)
    history_store(tmp_path / "zk.db")
    with Store.open(tmp_path / "zk.db") as store:
        store.count_calls("2026-11", 90, day="2026-11-25")
    request = BackfillRequest(since=date(2026, 11, 1))
    code, out, err = run(config, request)
    assert code == 1
    assert "24 uploads (24 DingTalk calls); 10 calls left this month" in out
    assert "24 uploads is more than the 10 calls left in 2026-11" in err and "--yes" in err
    with Store.open(tmp_path / "zk.db") as store:
        assert store.delivery_counts()[Delivery.HISTORY] == 24  # nothing queued
    code, out, _ = run(config, BackfillRequest(since=date(2026, 11, 1), dry_run=True))
    assert code == 0 and "dry run: nothing queued" in out
    code, out, _ = run(config, BackfillRequest(since=date(2026, 11, 1), yes=True))
    assert code == 0 and "queued 24 punches" in out


def test_backfill_by_device_and_the_errors_a_user_can_make(tmp_path: Path) -> None:
    config = config_for(tmp_path, devices=("lobby", "gate"))
    history_store(tmp_path / "zk.db", "lobby")
    history_store(tmp_path / "zk.db", "gate", range(1, 4))
    code, out, _ = run(config, BackfillRequest(since=date(2026, 11, 1), devices=("gate",)))
    assert code == 0 and "gate: 3 history punches from 2026-11-01 on" in out and "lobby" not in out
    with pytest.raises(UserError, match="no terminal named 'nowhere'"):
        run(config, BackfillRequest(since=date(2026, 11, 1), devices=("nowhere",)))
    with pytest.raises(UserError, match="--until 2026-11-01 is before --since 2026-11-02"):
        run(config, BackfillRequest(since=date(2026, 11, 2), until=date(2026, 11, 1)))


def test_backfill_command_line(tmp_path: Path) -> None:
    config = config_for(tmp_path, quota=10)
    history_store(tmp_path / "zk.db")
    refused = run_cli(["backfill", "-c", str(config), "--since", "2026-11-01"])
    assert refused.returncode == 1
    assert "24 uploads is more than the 10 calls left" in refused.stderr and "--yes" in refused.stderr
    assert "Traceback" not in refused.stderr
    bad = run_cli(["backfill", "-c", str(config), "--since", "2026-11-31"])
    assert bad.returncode == 2 and "'2026-11-31' is not a date YYYY-MM-DD" in bad.stderr
    dry = run_cli(["backfill", "-c", str(config), "--since", "2026-11-01", "--device", "lobby", "--dry-run"])
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing queued" in dry.stdout
