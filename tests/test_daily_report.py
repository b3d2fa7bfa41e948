"""The daily robot report: at `daily_report_at`, once a day, about yesterday; injected clock, fake robot."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from harness import SteppingClock

from zkdingsync.config import load_config
from zkdingsync.daily_report import DailyReport
from zkdingsync.dingtalk.client import DingTalkClient
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.dingtalk.robot import PREFIX, RobotNotifier
from zkdingsync.errors import ConfigError
from zkdingsync.model import Punch
from zkdingsync.store import Store

TOKEN = "robot-token-123"
SECRET = "SEC0123456789abcdef"
SHANGHAI = ZoneInfo("Asia/Shanghai")


def at(text: str) -> datetime:
    """A Shanghai wall-clock time as an aware UTC datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=SHANGHAI).astimezone(timezone.utc)


def punch(device: str, enroll: str, local_time: str) -> Punch:
    return Punch(
        device=device,
        serial=f"SN-{device}",
        enroll_number=enroll,
        local_time=local_time,
        punch_state=0,
        verify_mode=1,
        check_time_ms=int(at(local_time).timestamp() * 1000),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """Yesterday (2026-11-30): lobby 3 punches (2 delivered, 1 pending), gate none and down for 40 min."""
    with Store.open(tmp_path / "zk.db") as store:
        store.save_poll(
            "lobby",
            serial="SN-lobby",
            record_count=5,
            record_size=40,
            polled_at=at("2026-11-30 18:00:00"),
            punches=[
                punch("lobby", "1001", "2026-11-30 08:59:00"),
                punch("lobby", "1002", "2026-11-30 09:01:00"),
                punch("lobby", "1003", "2026-11-30 18:00:00"),
                punch("lobby", "1002", "2026-11-29 18:00:00"),  # the day before: not counted
                punch("lobby", "1001", "2026-12-01 08:10:00"),  # today: not counted
            ],
        )
        ids = {(p.punch.enroll_number, p.punch.local_time): p.id for p in store.punches()}
        for key in [("1001", "2026-11-30 08:59:00"), ("1003", "2026-11-30 18:00:00")]:
            store.mark_delivered(ids[key], at=at("2026-11-30 18:00:05"), userid="u", request_id="r")
        store.park(ids[("1002", "2026-11-29 18:00:00")], reason="enroll number 1002 is not mapped")
        for polled, failed in [
            ("2026-11-30 07:00:00", False),
            ("2026-11-30 10:00:00", True),
            ("2026-11-30 10:40:00", False),
        ]:
            if failed:  # the gate is down from 10:00 to 10:40
                store.record_poll_failure("gate", error="timed out", at=at(polled))
            else:
                store.save_poll(
                    "gate", serial="SN-gate", record_count=0, record_size=40, punches=[], polled_at=at(polled)
                )
        store.count_calls("2026-12", 1250)
        yield store


def contents(fake: FakeDingTalk) -> list[str]:
    return [message["text"]["content"] for message in fake.robot_messages]


def test_the_report_goes_out_once_at_its_time_about_yesterday(store: Store, tmp_path: Path) -> None:
    clock = SteppingClock(at("2026-12-01 08:29:00"))
    with FakeDingTalk(robot_token=TOKEN, robot_secret=SECRET) as fake:
        client = DingTalkClient("fake-app-key", "fake-app-secret", fake.url, 2.0, store=store)
        notifier = RobotNotifier(
            client, TOKEN, SECRET, min_interval_seconds=3.0, monotonic=lambda: 0.0, wait=clock.sleep
        )

        def report() -> DailyReport:
            return DailyReport(
                store,
                notifier.notify,
                at="08:30",
                zone=SHANGHAI,
                terminals=lambda: ["lobby", "gate"],
                quota=5000,
                clock=clock,
            )

        daily = report()
        assert not daily.check()  # 08:29: not yet
        assert notifier.pending() == 0
        clock.advance(60)
        assert daily.check()  # 08:30
        assert not daily.check()  # once
        assert not report().check()  # a restart does not send it again
        while notifier.send_next():
            pass
        clock.advance(86_400)
        assert report().check()  # the next day, about 2026-12-01
        while notifier.send_next():
            pass
        messages = contents(fake)
    assert len(messages) == 2
    assert messages[0] == "\n".join(
        [
            f"{PREFIX} daily report for 2026-11-30: 3 punches, 1 waiting to be delivered",
            "- lobby: 3 (delivered 2, pending 1)",
            "- gate: 0",
            "parked, by enroll number: 1002: 1 (fix the cause, then `zkdingsync retry`)",
            "terminals down: gate 11-30 10:00 to 11-30 10:40 (40 min)",
            "DingTalk calls this month: 1250 of 5000 (25%)",
        ]
    )
    assert messages[1].startswith(f"{PREFIX} daily report for 2026-12-01: 1 punches, 1 waiting")
    assert "terminals down: none" in messages[1]


def test_a_terminal_still_down_is_reported_as_such(store: Store) -> None:
    store.record_poll_failure("gate", error="timed out", at=at("2026-11-30 23:00:00"))
    sent: list[str] = []
    DailyReport(
        store,
        sent.append,
        at="00:05",
        zone=SHANGHAI,
        terminals=lambda: ["lobby"],
        quota=0,
        clock=lambda: at("2026-12-01 00:05:00"),
    ).check()
    (text,) = sent
    assert (
        "terminals down: gate 11-30 10:00 to 11-30 10:40 (40 min); gate since 11-30 23:00, still down" in text
    )
    assert "- gate" not in text  # neither configured nor punched at that day
    assert text.endswith("DingTalk calls this month: 1250 of 0")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("8:30", 'must be quoted, like "08:30" (YAML reads 8:30 as the number 510)'),
        ('"24:00"', "'24:00' is not a 24-hour time of day like \"08:30\""),
    ],
)
def test_daily_report_at_must_be_a_time_of_day(
    tmp_path: Path, config_template: str, value: str, problem: str
) -> None:
    path = tmp_path / "config.yaml"
    text = config_template.format(store=tmp_path / "zk.db")
    text = text.replace(
        "store:", f"  robot:\n    access_token: tok-123456\n    daily_report_at: {value}\nstore:"
    )
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path, check_store=False)
    assert any(
        problem in line and "dingtalk.robot.daily_report_at" in line for line in raised.value.problems
    ), raised.value.problems
    path.write_text(text.replace(value, '"08:30"'), encoding="utf-8")
    assert load_config(path, check_store=False).dingtalk.robot.daily_report_at == "08:30"  # type: ignore[union-attr]
