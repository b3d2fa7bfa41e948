"""The weekly backup units: what they run, as whom, when; and that systemd accepts them."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from zkdingsync.cli import build_parser

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"


def read(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / name).read_text())
    return parser


def test_the_service_keeps_8_weekly_copies_in_the_state_directory_as_the_daemon_user() -> None:
    service = read("zkdingsync-backup.service")["Service"]
    daemon = read("zkdingsync.service")["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0] == shlex.split(daemon["ExecStart"])[0]
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.dest, args.keep, args.config) == (
        "backup",
        "/var/lib/zkdingsync/backups",
        8,
        "/etc/zkdingsync/config.yaml",
    )
    assert service["Type"] == "oneshot"
    for key in ("User", "Group", "StateDirectory", "StateDirectoryMode"):
        assert service[key] == daemon[key], key
    assert service["UMask"] == "0077"
    assert args.dest.startswith(f"/var/lib/{daemon['StateDirectory']}/")


def test_the_timer_runs_it_weekly_and_catches_up_after_downtime() -> None:
    timer = read("zkdingsync-backup.timer")
    assert timer["Timer"]["Unit"] == "zkdingsync-backup.service"
    assert timer["Timer"]["OnCalendar"].startswith("Sun ")
    assert timer["Timer"]["Persistent"] == "yes"
    assert timer["Install"]["WantedBy"] == "timers.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_accepts_the_units_and_the_calendar(tmp_path: Path) -> None:
    text = (SYSTEMD / "zkdingsync-backup.service").read_text()
    (tmp_path / "zkdingsync-backup.service").write_text(
        text.replace("/opt/zkdingsync/bin/zkdingsync", "/bin/true")
    )
    shutil.copy(SYSTEMD / "zkdingsync-backup.timer", tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(p) for p in sorted(tmp_path.iterdir()))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "zkdingsync" in line] == []
    calendar = subprocess.run(
        [
            "systemd-analyze",
            "calendar",
            "--iterations=2",
            read("zkdingsync-backup.timer")["Timer"]["OnCalendar"],
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    times = [
        line.split(":", 1)[1].split()[:2]
        for line in calendar.stdout.splitlines()
        if "elapse" in line or "Iter." in line
    ]
    assert [day for day, _ in times] == ["Sun", "Sun"]  # a week apart: weekly
