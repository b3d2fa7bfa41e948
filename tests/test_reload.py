"""`zkdingsync reload`: the answer file and how an answer is matched to its request."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import run_cli

from zkdingsync.errors import ConfigError, UserError
from zkdingsync.reload import ReloadAnswer, answer_path, publish, read_answer, request_reload


class Daemonless:
    """Stands in for the daemon's side: a clock, and an answer written when the signal arrives."""

    def __init__(self, path: Path, answer: ReloadAnswer | None) -> None:
        self.path = path
        self.answer = answer
        self.now = 100.0
        self.signals: list[tuple[int, int]] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def send(self, pid: int, signum: int) -> None:
        self.signals.append((pid, signum))
        if self.answer is not None:
            publish(self.answer, self.path)


def test_an_answer_round_trips_owner_only_and_redacted(tmp_path: Path) -> None:
    path = tmp_path / "reload.json"
    publish(
        ReloadAnswer(42, 7.5, applied=False, problems=("c.yaml:3: x: https://h/?access_token=abc",)), path
    )
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_answer(path) == ReloadAnswer(42, 7.5, False, ("c.yaml:3: x: https://h/?access_token=***",))
    path.write_text("{half", encoding="utf-8")
    assert read_answer(path) is None
    assert read_answer(tmp_path / "missing.json") is None


def test_the_answer_lives_in_the_runtime_directory(tmp_path: Path) -> None:
    assert answer_path({"RUNTIME_DIRECTORY": str(tmp_path)}) == tmp_path / "reload.json"
    assert answer_path({}) is None


def test_applied_and_rejected_answers(tmp_path: Path) -> None:
    path = tmp_path / "reload.json"
    good = Daemonless(path, ReloadAnswer(42, 100.0, applied=True))
    assert request_reload(42, path, clock=good.clock, sleep=good.sleep, send=good.send) == (
        "configuration reloaded"
    )
    assert good.signals == [(42, signal.SIGHUP)]
    bad = Daemonless(path, ReloadAnswer(42, 100.0, applied=False, problems=("c.yaml:3: prot: unknown key",)))
    with pytest.raises(ConfigError) as rejected:
        request_reload(42, path, clock=bad.clock, sleep=bad.sleep, send=bad.send)
    assert rejected.value.problems == ["c.yaml:3: prot: unknown key"]


@pytest.mark.parametrize(
    "stale",
    [ReloadAnswer(42, 99.0, applied=True), ReloadAnswer(43, 100.0, applied=True)],
    ids=["read-before-the-signal", "another-daemon"],
)
def test_an_answer_to_an_earlier_request_is_not_taken(tmp_path: Path, stale: ReloadAnswer) -> None:
    path = tmp_path / "reload.json"
    world = Daemonless(path, None)
    publish(stale, path)
    with pytest.raises(UserError, match=r"did not answer the reload within 5 s"):
        request_reload(42, path, timeout_seconds=5, clock=world.clock, sleep=world.sleep, send=world.send)
    assert 105.0 <= world.now < 105.2  # waited the whole timeout, polling


def test_no_such_daemon_is_one_line_exit_1(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    result = run_cli(["reload", "--pid", str(gone.pid)], environ={"RUNTIME_DIRECTORY": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr == f"zkdingsync: no daemon with process id {gone.pid} to reload\n"


def test_reload_outside_systemd_says_what_to_use(tmp_path: Path) -> None:
    result = run_cli(["reload", "--pid", "1"], environ={"RUNTIME_DIRECTORY": ""})
    assert result.returncode == 1
    assert "use `systemctl reload zkdingsync`" in result.stderr
