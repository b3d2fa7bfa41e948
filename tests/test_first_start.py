"""First start, backlogs and the monthly budget, through the real `zkdingsync run` process and the fakes."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401
from harness import DaemonProcess, run_cli, write_fleet_config

from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.model import TerminalUser
from zkdingsync.simulator import FakeTerminal, history_start
from zkdingsync.timeconv import local_to_epoch_ms

USERS = {"1001": "alice", "1002": "bob", "1003": "carol"}
SHANGHAI = ZoneInfo("Asia/Shanghai")
APP_KEY = "dingfirst"
APP_SECRET = "first-start-secret-5678"


@pytest.fixture
def dingtalk() -> Iterator[FakeDingTalk]:
    with FakeDingTalk(users=USERS.values(), app_key=APP_KEY, app_secret=APP_SECRET) as fake:
        yield fake


def configure(tmp_path: Path, dingtalk: FakeDingTalk, fleet: dict[str, FakeTerminal], **changes: Any) -> Path:
    return write_fleet_config(
        tmp_path / "config.yaml",
        dingtalk=dingtalk,
        fleet=fleet,
        users=USERS,
        app_key=APP_KEY,
        app_secret=APP_SECRET,
        **changes,
    )


def status(config: Path) -> dict[str, Any]:
    result = run_cli(["status", "--json", "-c", str(config)])
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def local_ms(local_time: str) -> int:
    ms = local_to_epoch_ms(local_time, SHANGHAI)
    assert ms is not None
    return ms


def received(dingtalk: FakeDingTalk) -> Counter[str]:
    """The Shanghai wall-clock time of every upload DingTalk accepted, with how often."""
    return Counter(
        datetime.fromtimestamp(int(u["user_check_time"]) / 1000, SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")
        for u in dingtalk.uploads
    )


def test_first_start_sends_today_and_backfill_sends_the_window_once(
    tmp_path: Path, terminals: Callable[..., FakeTerminal], dingtalk: FakeDingTalk
) -> None:
    lobby = terminals(serial="FIRST001", record_size=40, users=3, records=0)
    now = datetime.now(SHANGHAI)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    # 290 punches on the 20 days before today, 10 today (between midnight and now).
    old = [(midnight - timedelta(days=1 + i % 20)).replace(hour=8) + timedelta(seconds=i) for i in range(290)]
    today = [midnight + (now - midnight) * (k + 1) / 12 for k in range(10)]
    for n, moment in enumerate(old + today):
        lobby.add_punch(str(1001 + n % 3), moment.replace(tzinfo=None, microsecond=0))
    config = configure(tmp_path, dingtalk, {"lobby": lobby}, delivery_since=None, rate_per_second=15)
    daemon = DaemonProcess(config, tmp_path)
    try:
        wait_for(lambda: len(dingtalk.uploads) >= 10, timeout=30, interval=0.05)
        document = wait_for(
            lambda: (d := status(config))["delivery"]["delivered_total"] == 10 and d, timeout=20, interval=0.2
        )
        assert document["delivery"]["history"] == 290
        assert document["delivery"]["pending"] == 0
        assert sorted(received(dingtalk)) == sorted(m.strftime("%Y-%m-%d %H:%M:%S") for m in today)
        [held] = daemon.events("history.held")
        assert (held["device"], held["punches"]) == ("lobby", 290)
        first_day = (midnight - timedelta(days=20)).date().isoformat()
        assert held["deliver_with"].startswith(f"zkdingsync backfill --since {first_day} ")

        since = (midnight - timedelta(days=10)).date().isoformat()
        backfill = run_cli(["backfill", "-c", str(config), "--since", since, "--yes"])
        assert backfill.returncode == 0, backfill.stderr
        window = [m for m in old if m >= midnight - timedelta(days=10)]
        assert f"{len(window)} uploads" in backfill.stdout
        wait_for(lambda: len(dingtalk.uploads) >= 10 + len(window), timeout=40, interval=0.1)
        wait_for(lambda: status(config)["delivery"]["pending"] == 0, timeout=20, interval=0.2)
    finally:
        code = daemon.terminate(timeout=10)
    assert code == 0, daemon.stderr()[-3000:]
    expected = sorted(m.strftime("%Y-%m-%d %H:%M:%S") for m in today + window)
    got = received(dingtalk)
    assert sorted(got) == expected
    assert max(got.values()) == 1  # once each
    assert status(config)["delivery"]["history"] == 290 - len(window)
    assert len(daemon.events("history.held")) == 1
    assert "Traceback" not in daemon.stderr()


def test_a_punch_read_now_goes_ahead_of_the_backlog(
    tmp_path: Path, terminals: Callable[..., FakeTerminal]
) -> None:
    with FakeDingTalk(
        users=USERS.values(), app_key=APP_KEY, app_secret=APP_SECRET, latency_seconds=0.05
    ) as dingtalk:
        queued = 150
        lobby = terminals(
            serial="LIVE0001", record_size=40, users=3, records=queued, first_punch=history_start(queued)
        )
        config = configure(tmp_path, dingtalk, {"lobby": lobby}, rate_per_second=15)
        daemon = DaemonProcess(config, tmp_path)
        try:
            wait_for(lambda: len(dingtalk.uploads) >= 30, timeout=30, interval=0.02)
            record = lobby.add_punch("1001", punch_state=1)
            assert record is not None
            landed = time.monotonic()
            live = local_ms(record.local_time)
            wait_for(
                lambda: live in {int(u["user_check_time"]) for u in dingtalk.uploads},
                timeout=10,
                interval=0.01,
            )
            waited = time.monotonic() - landed
            backlog_left = queued + 1 - len(dingtalk.uploads)
            wait_for(lambda: len(dingtalk.uploads) >= queued + 1, timeout=60, interval=0.1)
            wait_for(lambda: status(config)["delivery"]["pending"] == 0, timeout=20, interval=0.2)
        finally:
            code = daemon.terminate(timeout=10)
        assert code == 0, daemon.stderr()[-3000:]
    # Within the poll interval (1 s) plus 3 s, while most of the backlog still waited.
    assert waited < 1 + 3, waited
    assert backlog_left > queued // 2
    got = received(dingtalk)
    assert len(got) == queued + 1 and max(got.values()) == 1  # nothing lost, nothing doubled


def test_unmapped_punches_are_parked_in_bulk_and_a_mapped_one_still_arrives(
    tmp_path: Path, terminals: Callable[..., FakeTerminal], dingtalk: FakeDingTalk
) -> None:
    queued = 50_000
    # 20 employees, none of them mapped; one mapped punch lands meanwhile.
    gate = terminals(
        serial="PARK0001",
        record_size=40,
        users=[TerminalUser(uid=i, enroll_number=str(2000 + i), name=f"U{i}") for i in range(1, 21)],
        records=queued,
        capacity=queued * 2,
        first_punch=history_start(queued),
    )
    config = configure(tmp_path, dingtalk, {"gate": gate})
    daemon = DaemonProcess(config, tmp_path)
    started = time.monotonic()
    try:
        wait_for(lambda: daemon.events("poll.finished"), timeout=30, interval=0.05)
        record = gate.add_punch("1002", punch_state=1)
        assert record is not None
        landed = time.monotonic()
        wait_for(lambda: dingtalk.uploads, timeout=10, interval=0.01)
        waited = time.monotonic() - landed
        wait_for(lambda: status(config)["delivery"]["parked"] == queued, timeout=30, interval=0.2)
        parked_after = time.monotonic() - started
    finally:
        code = daemon.terminate(timeout=10)
    assert code == 0, daemon.stderr()[-3000:]
    assert waited < 1 + 3, waited
    assert parked_after < 30, parked_after
    lines = daemon.stderr().splitlines()
    assert len(lines) < 300, len(lines)
    parked_lines = daemon.events("delivery.parked_unmapped")
    assert sorted(e["enroll_number"] for e in parked_lines) == sorted(str(2000 + i) for i in range(1, 21))
    # In bulk, but for the batches the forwarder claimed before a sweep saw them (parked one by one).
    assert sum(e["punches"] for e in parked_lines) >= queued * 0.99
    assert [u["userid"] for u in dingtalk.uploads] == ["bob"]


def test_quota_exhausted_keeps_storing_pauses_and_says_so_once(
    tmp_path: Path, terminals: Callable[..., FakeTerminal], dingtalk: FakeDingTalk
) -> None:
    lobby = terminals(serial="QUOTA001", record_size=40, users=3, records=3, first_punch=history_start(3))
    dingtalk.fail_next(90020, n=None)  # the organisation's month is spent already
    config = configure(tmp_path, dingtalk, {"lobby": lobby})
    daemon = DaemonProcess(config, tmp_path)
    try:
        wait_for(lambda: daemon.events("delivery.quota_exhausted"), timeout=30, interval=0.05)
        calls = dingtalk.calls["upload"]
        for enroll in ("1001", "1002"):
            lobby.add_punch(enroll, punch_state=1)
        document = wait_for(
            lambda: (d := status(config))["delivery"]["pending"] == 5 and d, timeout=20, interval=0.2
        )
        assert dingtalk.calls["upload"] == calls  # nothing more asked of DingTalk this month
    finally:
        code = daemon.terminate(timeout=10)
    assert code == 0, daemon.stderr()[-3000:]
    [said] = daemon.events("delivery.quota_exhausted")
    assert said["level"] == "error"
    assert said["resumes_on"].endswith("-01")
    assert any("resumes on" in line for line in document["needs_attention"])
    assert dingtalk.uploads == []
