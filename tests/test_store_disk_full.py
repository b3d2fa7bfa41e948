"""Reliability scenario 4: the state directory stops taking writes under a running daemon.

The real daemon (`python -m zkdingsync run`) runs as a child process against fake terminals and the fake
DingTalk. "Disk full" is made honestly and without mounting anything: the test lowers the child's
RLIMIT_FSIZE to 0 with `prlimit(2)`, so every write to a regular file fails (EFBIG; Python ignores
SIGXFSZ) exactly as on a full or read-only disk, and raises it again when "space returns". The daemon's
log goes to a pipe, which the limit does not touch.

Promises checked: nothing stored and nothing lost while the disk refuses (the checkpoint does not move, so
the punches are read again afterwards), one clear error per component and no traceback storm, and
delivery resumes by itself once writes succeed again, without duplicates.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401 - fixtures
from harness import write_fleet_config

from zkdingsync.dingtalk.fake import UPLOAD, FakeDingTalk
from zkdingsync.model import Delivery
from zkdingsync.simulator import FakeTerminal, history_start
from zkdingsync.store import Store

USERS = {"1001": "alice", "1002": "bob", "1003": "carol"}
APP_KEY = "dingdiskfull"
APP_SECRET = "disk-full-secret-5678"

pytestmark = pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit(2)")


class PipedDaemon:
    """`python -m zkdingsync run` whose stderr (JSON log lines) is read through a pipe."""

    def __init__(self, config: Path, directory: Path) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith("ZKDINGSYNC_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "zkdingsync", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=directory,
            env=env,
        )
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            with self._lock:
                self._lines.append(raw.decode("utf-8", errors="replace").rstrip("\n"))

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.lines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and (name is None or entry.get("event") == name):
                found.append(entry)
        return found

    def limit_file_size(self, limit: int) -> None:
        """Set the child's RLIMIT_FSIZE soft limit (the hard limit stays, so it can be raised again)."""
        _, hard = resource.prlimit(self.process.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.process.pid, resource.RLIMIT_FSIZE, (limit, hard))

    def running(self) -> bool:
        return self.process.poll() is None

    def terminate(self, timeout: float = 10.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise
        self._reader.join(timeout=5)
        return code

    def ensure_dead(self) -> None:
        if self.running():
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def dingtalk() -> Iterator[FakeDingTalk]:
    with FakeDingTalk(users=USERS.values(), app_key=APP_KEY, app_secret=APP_SECRET) as fake:
        yield fake


def _expected(fleet: dict[str, FakeTerminal]) -> Counter[tuple[str, str, str]]:
    return Counter(
        (USERS[record.enroll_number], record.local_time, terminal.serial)
        for terminal in fleet.values()
        for record in terminal.records
    )


def _received(dingtalk: FakeDingTalk) -> Counter[tuple[str, str, str]]:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    zone = ZoneInfo("Asia/Shanghai")
    return Counter(
        (
            str(upload["userid"]),
            datetime.fromtimestamp(int(upload["user_check_time"]) / 1000, zone).strftime("%Y-%m-%d %H:%M:%S"),
            str(upload["device_id"]),
        )
        for upload in dingtalk.uploads
    )


def _delivered_in_store(store: Path) -> int:
    with Store.open(store) as reader:
        return len(reader.punches(delivery=Delivery.DELIVERED))


def test_disk_full_fails_closed_says_so_once_and_recovers_by_itself(
    tmp_path: Path, terminals: Callable[..., FakeTerminal], dingtalk: FakeDingTalk
) -> None:
    fleet = {
        name: terminals(serial=f"FULL0000{i}", users=3, records=3, first_punch=history_start(3))
        for i, name in enumerate(("lobby", "gate"))
    }
    store = tmp_path / "state" / "zk.db"
    config = write_fleet_config(
        tmp_path / "config.yaml",
        dingtalk=dingtalk,
        fleet=fleet,
        users=USERS,
        app_key=APP_KEY,
        app_secret=APP_SECRET,
        store=store,
    )
    daemon = PipedDaemon(config, tmp_path)

    def alive() -> None:
        assert daemon.running(), "\n".join(daemon.lines()[-40:])

    def delivered_all() -> bool:
        alive()
        return _received(dingtalk) == _expected(fleet)

    try:
        wait_for(delivered_all, timeout=30, interval=0.05)
        wait_for(lambda: _delivered_in_store(store) == 6, timeout=10, interval=0.05)
        uploads_before = len(dingtalk.uploads)

        # 1. The disk fills up while new punches arrive at both terminals.
        daemon.limit_file_size(0)
        for terminal in fleet.values():
            terminal.add_punch("1001", punch_state=1)
            terminal.add_punch("1002", punch_state=0)
        wait_for(lambda: alive() or daemon.events("store.failing"), timeout=15, interval=0.05)
        # Several more poll rounds run against the full disk.
        connections = sum(terminal.connections for terminal in fleet.values())
        wait_for(
            lambda: alive() or sum(terminal.connections for terminal in fleet.values()) >= connections + 6,
            timeout=20,
            interval=0.05,
        )
        # Nothing could be stored, so nothing new went out; the terminals still hold their punches and
        # the checkpoints did not move.
        assert len(dingtalk.uploads) == uploads_before
        # (A poll may be under way at this instant, the terminal disabled: wait for it to end.)
        wait_for(
            lambda: all(terminal.enabled and len(terminal.records) == 5 for terminal in fleet.values()),
            timeout=10,
            interval=0.01,
        )
        with Store.open(store) as reader:
            assert [checkpoint.record_count for checkpoint in reader.checkpoints()] == [3, 3]
            assert len(reader.punches()) == 6

        # Space returns: polling and delivery resume by themselves.
        daemon.limit_file_size(resource.RLIM_INFINITY)
        wait_for(delivered_all, timeout=30, interval=0.05)
        wait_for(lambda: alive() or daemon.events("store.recovered"), timeout=10, interval=0.05)
        wait_for(lambda: _delivered_in_store(store) == 10, timeout=10, interval=0.05)

        # 2. The disk fills up while DingTalk holds an upload: DingTalk takes it, the "delivered" commit
        # fails, the punch stays in flight and is settled by reading DingTalk back once space returns.
        dingtalk.slow_next(1.0)
        calls = dingtalk.calls[UPLOAD]
        fleet["lobby"].add_punch("1003", punch_state=1)
        wait_for(lambda: alive() or dingtalk.calls[UPLOAD] > calls, timeout=15, interval=0.01)
        daemon.limit_file_size(0)
        wait_for(lambda: alive() or len(dingtalk.uploads) > 10, timeout=10, interval=0.05)
        wait_for(
            lambda: alive() or any("punch_id" in e for e in daemon.events("delivery.store_failed")),
            timeout=10,
            interval=0.05,
        )
        daemon.limit_file_size(resource.RLIM_INFINITY)
        wait_for(lambda: _delivered_in_store(store) == 11, timeout=30, interval=0.05)
    finally:
        try:
            code = daemon.terminate(timeout=10)
        finally:
            daemon.ensure_dead()
    log = "\n".join(daemon.lines())
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert _received(dingtalk) == _expected(fleet), "a punch was lost or sent twice"
    # One clear error per component and outage, naming the store; no line per poll or per punch.
    failing = daemon.events("store.failing")
    assert len(failing) == 2, failing
    assert all(str(store) in entry["error"] and "disk" in entry["error"] for entry in failing), failing
    errors = [entry for entry in daemon.events() if entry.get("level") in ("error", "critical")]
    assert len(errors) <= 6, errors
    with Store.open(store) as reader:
        assert reader.integrity_check() == "ok"
        assert [checkpoint.record_count for checkpoint in reader.checkpoints()] == [5, 6]
        assert reader.outcome_unknown_count() == 0
