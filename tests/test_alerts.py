"""Robot alerts: what `Watch` tells, from real store checkpoints, and the daemon sending them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml
from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401
from harness import DaemonProcess, write_config

from zkdingsync.alerts import Watch
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.simulator import FakeTerminal, Fault, history_start
from zkdingsync.store import Store

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)


def test_down_drift_and_parked_are_told_once_when_they_start_and_end(tmp_path: Path) -> None:
    watch = Watch(terminal_down_after=timedelta(minutes=10), drift_threshold_seconds=60)
    with Store.open(tmp_path / "zk.db") as store:
        store.save_poll("gate", serial="SN2", record_count=0, record_size=None, punches=[], polled_at=T0)
        store.record_poll_failure("lobby", error="connection refused at 10.0.0.5:4370", at=T0)
        names = ["lobby", "gate"]
        assert watch.check(store.checkpoints(), 0, None, T0 + timedelta(minutes=9), names) == []
        [down] = watch.check(store.checkpoints(), 0, None, T0 + timedelta(minutes=11), names)
        assert "lobby unreachable for 11 min (connection refused at 10.0.0.5:4370)" in down
        assert watch.check(store.checkpoints(), 0, None, T0 + timedelta(minutes=30), names) == []
        store.save_poll(
            "lobby",
            serial="SN1",
            record_count=0,
            record_size=None,
            punches=[],
            polled_at=T0,
            drift_seconds=-95,
        )
        messages = watch.check(
            store.checkpoints(),
            3,
            "enroll number 7 has no DingTalk user",
            T0 + timedelta(minutes=31),
            names,
        )
        assert messages == [
            "zkdingsync: terminal lobby is reachable again; polling resumed",
            "zkdingsync: terminal lobby clock is off by -95 s; check its time",
            "zkdingsync: 3 punches parked (most: enroll number 7 has no DingTalk user); fix the cause, "
            "then run `zkdingsync retry`",
        ]
        # Nothing new: nothing told.
        assert watch.check(store.checkpoints(), 3, None, T0, names) == []


def test_the_daemon_tells_the_group_robot_when_a_terminal_is_down_and_back(
    tmp_path: Path, terminals: Callable[..., FakeTerminal]
) -> None:
    lobby = terminals(serial="ROBOT001", record_size=40, users=2, records=2, first_punch=history_start(2))
    with FakeDingTalk(
        users=["alice", "bob"],
        app_key="k",
        app_secret="robot-test-secret",
        robot_token="tok",
        robot_secret="SECabc",
    ) as fake:
        config = write_config(
            tmp_path / "config.yaml",
            store=tmp_path / "zk.db",
            api_base=fake.url,
            devices=[("lobby", lobby.port)],
            users={"1001": "alice", "1002": "bob"},
            app_key="k",
            app_secret="robot-test-secret",
        )
        document = yaml.safe_load(config.read_text(encoding="utf-8"))
        document["dingtalk"]["robot"] = {
            "access_token": "tok",
            "secret": "SECabc",
            "min_interval_seconds": 3,
            "terminal_down_minutes": 0,
        }
        config.write_text(yaml.safe_dump(document), encoding="utf-8")
        lobby.set_fault(Fault.refuse())
        daemon = DaemonProcess(config, tmp_path)
        try:
            texts = lambda: [m["text"]["content"] for m in fake.robot_messages]  # noqa: E731
            wait_for(lambda: any("lobby unreachable" in t for t in texts()), timeout=60, interval=0.1)
            lobby.clear_faults()
            wait_for(lambda: any("lobby is reachable again" in t for t in texts()), timeout=60, interval=0.1)
            wait_for(lambda: len(fake.uploads) == 2, timeout=20, interval=0.1)
        finally:
            assert daemon.terminate(timeout=10) == 0
    assert "robot-test-secret" not in daemon.stderr() and "SECabc" not in daemon.stderr()
