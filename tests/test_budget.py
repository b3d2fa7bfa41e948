"""DingTalk's monthly budget: the forecast by hand, `status`'s fields, `probe --budget`."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture  # noqa: F401

from zkdingsync.config import Config, DeviceConfig, DingTalkConfig, PollConfig, StoreConfig
from zkdingsync.model import Punch
from zkdingsync.probe_budget import probe_budget
from zkdingsync.quota import edition_for, forecast_month
from zkdingsync.simulator import FakeTerminal
from zkdingsync.status import status_command
from zkdingsync.store import Store

SHANGHAI = ZoneInfo("Asia/Shanghai")
# 2026-11-25 16:00 in Shanghai.
NOW = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)
# 1,000 calls a day on 11-19 .. 11-24, 400 so far today; 20,000 in the month.
DAYS = {f"2026-11-{day}": 1000 for day in range(19, 25)} | {"2026-11-25": 400, "2026-11-18": 9999}


def test_forecast_by_hand() -> None:
    forecast = forecast_month(
        used=20_000, calls_by_day=DAYS, now=NOW, zone=SHANGHAI, quota=24_000, counting_since="2026-11-01"
    )
    # 6,400 calls over the 6 days 16 hours since 11-19 00:00 (11-18 is outside the 7 days): 960 a day.
    assert forecast.per_day == pytest.approx(960.0)
    # 5 days 8 hours to 12-01 00:00 at 960 a day: 5,120 more.
    assert forecast.forecast == 25_120
    # 4,000 calls left at 960 a day: 4 days 4 hours from 11-25 16:00 is 11-29 20:00.
    assert forecast.exhausted_on == date(2026, 11, 29)
    assert forecast.month == "2026-11"
    roomy = forecast_month(used=20_000, calls_by_day=DAYS, now=NOW, zone=SHANGHAI, quota=200_000)
    assert roomy.exhausted_on is None
    spent = forecast_month(used=24_000, calls_by_day=DAYS, now=NOW, zone=SHANGHAI, quota=24_000)
    assert spent.exhausted_on == date(2026, 11, 25)


def test_a_young_store_is_not_extrapolated_from_minutes() -> None:
    # Counting began this morning: the rate is taken over at least one day.
    forecast = forecast_month(
        used=400,
        calls_by_day={"2026-11-25": 400},
        now=NOW,
        zone=SHANGHAI,
        quota=5000,
        counting_since="2026-11-25",
    )
    assert forecast.per_day == pytest.approx(400.0)
    assert forecast.forecast == 400 + round(400 * (5 + 8 / 24))


def test_editions() -> None:
    assert edition_for(4_000).startswith("标准版")
    assert edition_for(150_000).startswith("专业版 (")
    assert edition_for(300_000) == "专业版 with 1 增购包 add-on (5,200,000 calls a month)"


def make_config(tmp_path: Path, quota: int, *devices: DeviceConfig) -> Config:
    return Config(
        dingtalk=DingTalkConfig(
            app_key="dingabc123", app_secret="app-secret-123456", monthly_call_quota=quota
        ),
        devices=devices or (DeviceConfig(name="lobby", host="127.0.0.1"),),
        store=StoreConfig(path=tmp_path / "zk.db"),
        poll=PollConfig(timeout_seconds=2.0),
        timezone="Asia/Shanghai",
    )


def status_json(config: Config) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    code = status_command(config, as_json=True, out=out, err=io.StringIO(), now=NOW)
    return code, json.loads(out.getvalue())


def test_status_shows_the_forecast_and_warns_beyond_the_quota(tmp_path: Path) -> None:
    config = make_config(tmp_path, 24_000)
    with Store.open(config.store.path) as store:
        store.count_calls("2026-11", 20_000 - sum(DAYS.values()), day="2026-11-01")
        for day, calls in DAYS.items():
            store.count_calls(day[:7], calls, day=day)
    code, document = status_json(config)
    dingtalk = document["dingtalk"]
    assert dingtalk["calls_this_month"] == 20_000
    assert dingtalk["forecast_calls_this_month"] == 25_120
    assert dingtalk["quota_exhausted_on"] == "2026-11-29"
    assert code == 1
    assert any("forecast" in line and "2026-11-29" in line for line in document["needs_attention"])


def test_status_within_the_quota_has_no_exhaustion_date(tmp_path: Path) -> None:
    config = make_config(tmp_path, 5000)
    with Store.open(config.store.path) as store:
        store.count_calls("2026-11", 10, day="2026-11-25")
    code, document = status_json(config)
    assert document["dingtalk"]["quota_exhausted_on"] is None
    assert document["dingtalk"]["forecast_calls_this_month"] == 10 + round(10 * (5 + 8 / 24))
    assert code == 0


def punches(day: str, count: int) -> list[Punch]:
    return [
        Punch(
            "lobby", "SN1", str(1000 + n), f"{day} 08:{n // 60:02d}:{n % 60:02d}", 0, 1, 1_764_000_000_000 + n
        )
        for n in range(count)
    ]


def test_probe_budget_from_the_store(tmp_path: Path) -> None:
    config = make_config(tmp_path, 5000)
    with Store.open(config.store.path) as store:
        log = punches("2026-11-24", 300) + punches("2026-11-25", 100) + punches("2026-10-01", 50)
        store.save_poll(
            "lobby", serial="SN1", record_count=len(log), record_size=40, punches=log, polled_at=NOW
        )
    out = io.StringIO()
    assert probe_budget(config, out=out, now=lambda: NOW) == 0
    text = out.getvalue()
    assert "(from the store)" in text
    assert "lobby       400 punches, busiest 2026-11-24 with 300" in text
    assert "2026-10-01" not in text  # older than 30 days
    # 400 punches over 2 days: 200 a day, 6,000 a month: beyond the standard edition.
    assert "about 6,000 upload calls a month" in text
    assert "专业版 (professional edition" in text
    assert "NOT enough" in text


def test_probe_budget_reads_the_terminals_while_the_store_is_new(
    tmp_path: Path, terminals: Callable[..., FakeTerminal]
) -> None:
    today = NOW.astimezone(SHANGHAI)
    start = (today - timedelta(days=2)).strftime("%Y-%m-%d 09:00:00")
    gate = terminals(serial="BUDGET01", record_size=40, users=5, records=30, first_punch=start)
    config = make_config(tmp_path, 5000, DeviceConfig(name="gate", host="127.0.0.1", port=gate.port))
    out = io.StringIO()
    assert probe_budget(config, out=out, now=lambda: NOW) == 0
    text = out.getvalue()
    assert "from the terminals" in text
    assert "gate        30 punches" in text
    assert not config.store.path.exists()  # nothing was created
