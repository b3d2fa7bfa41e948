"""Run the real `zkdingsync run` process against fake terminals and a fake DingTalk, for end-to-end tests.

The fakes live in the test process (real TCP on 127.0.0.1); the daemon is a child process started with the
same interpreter, so what is tested is what an admin runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.simulator import FakeTerminal

APP_KEY = "dinge2e"
APP_SECRET = "e2e-secret-value-1234"


def config_document(
    store: Path,
    dingtalk_url: str,
    terminals: Mapping[str, FakeTerminal],
    users: Mapping[str, str],
    *,
    interval_seconds: float = 1,
    extra_poll: Mapping[str, Any] | None = None,
    dingtalk_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return a config document (as a dict) for the given fakes."""
    return {
        "dingtalk": {
            "app_key": APP_KEY,
            "app_secret": APP_SECRET,
            "api_base": dingtalk_url,
            "timeout_seconds": 2,
            **(dingtalk_extra or {}),
        },
        "store": {"path": str(store)},
        "poll": {"interval_seconds": interval_seconds, "timeout_seconds": 3, **(extra_poll or {})},
        "users": {"map": dict(users)},
        "devices": [
            {"name": name, "host": "127.0.0.1", "port": terminal.port, "timezone": "Asia/Shanghai"}
            for name, terminal in terminals.items()
        ],
        "log": {"format": "json"},
    }


@dataclass
class DaemonProcess:
    """One `zkdingsync run` child process; its log (JSON lines on stderr) goes to a file."""

    config_path: Path
    log_path: Path
    environ: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    _log_file: Any = field(default=None, repr=False)

    def start(self) -> DaemonProcess:
        """Start the daemon; return self."""
        self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "zkdingsync", "run", "-c", str(self.config_path)],
            stdout=self._log_file,
            stderr=self._log_file,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.environ},
        )
        return self

    def signal(self, signum: int) -> None:
        """Send `signum` to the daemon."""
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait up to `timeout` seconds; return the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._log_file.close()
        return code

    def kill(self) -> None:
        """kill -9, as a crash or a power cut would."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)
        self._log_file.close()

    def log_text(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str) -> list[str]:
        """The log lines of one event name."""
        return [line for line in self.log_text().splitlines() if f'"event": "{name}"' in line]


def write_config(path: Path, document: Mapping[str, Any]) -> Path:
    """Write a config document as YAML to `path`; return it."""
    path.write_text(yaml.safe_dump(dict(document), sort_keys=False), encoding="utf-8")
    return path


def expected_uploads(
    terminals: Mapping[str, FakeTerminal], users: Mapping[str, str]
) -> list[tuple[str, str, str]]:
    """Every mapped punch the terminals recorded, as (userid, local time, serial)."""
    return sorted(
        (users[record.enroll_number], record.local_time, terminal.serial)
        for terminal in terminals.values()
        for record in terminal.records
        if record.enroll_number in users
    )


def received(dingtalk: FakeDingTalk, zone: str = "Asia/Shanghai") -> list[tuple[str, str, str]]:
    """What DingTalk accepted, as (userid, local time in `zone`, device_id)."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    tz = ZoneInfo(zone)
    return sorted(
        (
            str(upload["userid"]),
            datetime.fromtimestamp(int(upload["user_check_time"]) / 1000, tz).strftime("%Y-%m-%d %H:%M:%S"),
            str(upload["device_id"]),
        )
        for upload in dingtalk.uploads
    )


def run_cli(args: Sequence[str], *, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run `python -m zkdingsync ARGS` and return the finished process with text output."""
    return subprocess.run(
        [sys.executable, "-m", "zkdingsync", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
