"""Enroll numbers that are text ("A-17", "E0012"): mappable in users.map, shown as mapped by `probe
--users`, and delivered under the mapped userid by the real daemon."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401
from harness import DaemonProcess, parked_status, run_cli, write_fleet_config

from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.model import TerminalUser
from zkdingsync.simulator import FakeTerminal, history_start

APP_KEY = "dingtextids"
APP_SECRET = "text-ids-secret-0123"
USERS = {"A-17": "lee", "E0012": "wang"}


def test_a_text_enroll_number_is_mapped_probed_and_delivered(
    tmp_path: Path, terminals: Callable[..., FakeTerminal]
) -> None:
    enrolled = [
        TerminalUser(1, "A-17", "Lee"),
        TerminalUser(2, "E0012", "Wang"),
        TerminalUser(3, "B 9", "Zhao"),  # not in users.map: parked under its own text
    ]
    lobby = terminals(
        serial="TEXTIDS01",
        record_size=40,
        user_table_size=72,
        users=enrolled,
        records=6,
        first_punch=history_start(6),
    )
    with FakeDingTalk(users=USERS.values(), app_key=APP_KEY, app_secret=APP_SECRET) as dingtalk:
        config = write_fleet_config(
            tmp_path / "config.yaml",
            dingtalk=dingtalk,
            fleet={"lobby": lobby},
            users=USERS,
            app_key=APP_KEY,
            app_secret=APP_SECRET,
        )
        assert run_cli(["validate", "-c", str(config)]).returncode == 0
        probed = run_cli(["probe", "--users", "-c", str(config)])
        assert probed.returncode == 0, probed.stderr
        assert " A-17  Lee  -> lee" in probed.stdout
        assert "E0012  Wang  -> wang" in probed.stdout
        assert "  B 9  Zhao  (not in users.map)" in probed.stdout
        assert "3 enrolled, 1 not in users.map" in probed.stdout

        daemon = DaemonProcess(config, tmp_path)
        try:
            wait_for(lambda: len(dingtalk.uploads) >= 4, timeout=30, interval=0.05)
            status = wait_for(lambda: parked_status(config, 2), timeout=30, interval=0.2)
        finally:
            assert daemon.terminate() == 0
        uploads = list(dingtalk.uploads)
    assert Counter(upload["userid"] for upload in uploads) == {"lee": 2, "wang": 2}
    assert all(upload["device_id"] == "TEXTIDS01" for upload in uploads)
    assert "Traceback" not in daemon.stderr()
    assert "enroll number B 9 has no DingTalk user" in status  # "B 9" is parked under its own text
