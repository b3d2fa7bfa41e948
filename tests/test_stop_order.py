"""The daemon's stop order: DingTalk calls cut off, then the threads joined, then the store closed.

The real `Daemon` on a real store and the fake DingTalk; its workers here are stand-ins that do what the
forwarder does at the worst moment (a call in flight, then a store write with its outcome), so that the
order is visible. The process-level behaviour (exit 0 within 10 s) is in `test_hostile_peers.py`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from harness import write_config

from zkdingsync import service
from zkdingsync.config import load_config
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.errors import StoreError
from zkdingsync.model import Outcome, OutcomeKind, Upload
from zkdingsync.service import CALL_GRACE_SECONDS, Daemon

APP_KEY = "dingstop"
APP_SECRET = "stop-order-secret-1234"


@pytest.fixture
def dingtalk() -> Iterator[FakeDingTalk]:
    with FakeDingTalk(users=["alice"], app_key=APP_KEY, app_secret=APP_SECRET, hang_seconds=60) as fake:
        yield fake


def make_daemon(tmp_path: Path, dingtalk: FakeDingTalk) -> Daemon:
    config = write_config(
        tmp_path / "config.yaml",
        store=tmp_path / "zk.db",
        api_base=dingtalk.url,
        devices=[("lobby", 9)],
        users={"1001": "alice"},
        app_key=APP_KEY,
        app_secret=APP_SECRET,
        dingtalk_timeout_seconds=60,
    )
    return Daemon(load_config(config), config)


class UploadAtStop:
    """A worker that, once stopped, makes an upload (which hangs) and records its outcome in the store."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.outcome: Outcome | None = None
        self.write_error: StoreError | None = None

    def run(self, stop: threading.Event) -> None:
        stop.wait()
        ms = int(time.time() - 60) * 1000
        self.outcome = self.daemon.client.upload(Upload("alice", "lobby", "SN1", ms))
        try:
            self.daemon.store.count_calls("2026-12", 1)
        except StoreError as error:
            self.write_error = error


class Stuck:
    """A worker that ignores the stop (a poll stuck in a terminal's read, say)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def run(self, stop: threading.Event) -> None:
        self.release.wait(30)


def test_a_call_in_flight_is_cut_off_and_its_outcome_written_before_the_store_closes(
    tmp_path: Path, dingtalk: FakeDingTalk
) -> None:
    daemon = make_daemon(tmp_path, dingtalk)
    assert daemon.client.check_credentials().kind is OutcomeKind.DELIVERED
    dingtalk.hang_next(n=None, accept=True)
    worker = UploadAtStop(daemon)
    daemon._start("forwarder", worker)
    tokens = dingtalk.calls["gettoken"]
    daemon.signals.stop.set()
    started = time.monotonic()
    assert daemon.stop() == 0
    took = time.monotonic() - started
    assert CALL_GRACE_SECONDS <= took < CALL_GRACE_SECONDS + 2  # not the call's 60 s timeout
    assert worker.outcome is not None and worker.outcome.kind is OutcomeKind.UNKNOWN  # read back later
    assert worker.write_error is None  # written while the store was still open
    assert not daemon.abandoned
    # Afterwards: no call goes out (no token request either), and the store takes no write.
    later = daemon.client.upload(Upload("alice", "lobby", "SN1", int(time.time() - 120) * 1000))
    assert later.code == "not-sent"
    assert dingtalk.calls["gettoken"] == tokens
    with pytest.raises(StoreError):
        daemon.store.count_calls("2026-12", 1)


def test_a_thread_that_ignores_the_stop_is_abandoned_at_the_deadline(
    tmp_path: Path, dingtalk: FakeDingTalk, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "STOP_DEADLINE_SECONDS", 0.5)
    monkeypatch.setattr(service, "CALL_GRACE_SECONDS", 0.1)
    daemon = make_daemon(tmp_path, dingtalk)
    stuck = Stuck()
    daemon._start("poller", stuck)
    daemon.signals.stop.set()
    started = time.monotonic()
    try:
        assert daemon.stop() == 0
        assert time.monotonic() - started < 2
        assert daemon.abandoned  # run_daemon then leaves with os._exit rather than wait for it
        with pytest.raises(StoreError):
            daemon.store.count_calls(datetime.now(timezone.utc).strftime("%Y-%m"), 1)
    finally:
        stuck.release.set()
