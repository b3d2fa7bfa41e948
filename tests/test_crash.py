"""The real daemon (`python -m zkdingsync run`) killed with SIGKILL at random moments, and restarted.

Three fake terminals and the fake DingTalk run in this test process; the daemon is a child process with a
config in tmp_path. Each kill is triggered by something observable (the n-th terminal connection, the
n-th upload call, an upload held by a slow DingTalk, the instance lock just taken), chosen by a seeded
random generator, so no kill waits on a fixed sleep and a failing run can be repeated with its seed.

At the end the daemon runs until DingTalk holds every punch the terminals recorded, then stops on SIGTERM
with exit code 0 within 10 s. A duplicate in DingTalk is allowed only for a punch whose store row says
its upload's outcome was unknown (`outcome_unknown`); the goal, and what is normally seen, is zero.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401 - fixtures
from harness import DaemonProcess, UploadKey, duplicates, expected_ms, upload_key, write_config

from zkdingsync.dingtalk.fake import DEFAULT_APP_KEY, DEFAULT_APP_SECRET, UPLOAD, FakeDingTalk
from zkdingsync.simulator import FakeTerminal
from zkdingsync.store import Store

ZONE = "Asia/Shanghai"
USERS = {str(1000 + i): f"emp{1000 + i}" for i in range(1, 6)}  # make_users(5): enroll 1001..1005
SEED = int(os.environ.get("CRASH_TEST_SEED", "20261125"))  # another seed explores other moments
KILLS = 6
TRIGGER_TIMEOUT = 15.0  # a kill trigger that never comes means the daemon is not working
# An upload in flight at a kill rests 30 s (the forwarder's settle delay) before DingTalk is read back.
DELIVERY_TIMEOUT = 45.0


@dataclass
class Rig:
    """Terminals, fake DingTalk and the daemon's config for one test."""

    terminals: list[FakeTerminal]
    fake: FakeDingTalk
    config: Path
    store: Path
    directory: Path
    punches: int = 0

    def punch(self, rng: random.Random, count: int) -> None:
        """Add `count` punches at random terminals, each at its own second (twenty minutes ago onwards)."""
        base = datetime.now(ZoneInfo(ZONE)).replace(microsecond=0, tzinfo=None) - timedelta(minutes=20)
        for _ in range(count):
            terminal = rng.choice(self.terminals)
            local = base + timedelta(seconds=self.punches)
            self.punches += 1
            record = terminal.add_punch(
                rng.choice(sorted(USERS)), local.strftime("%Y-%m-%d %H:%M:%S"), punch_state=rng.randint(0, 1)
            )
            assert record is not None

    def expected(self) -> dict[UploadKey, tuple[str, str]]:
        """Every punch the terminals recorded, as DingTalk must receive it -> (serial, enroll number)."""
        keys: dict[UploadKey, tuple[str, str]] = {}
        for terminal in self.terminals:
            for record in terminal.records:
                key = (USERS[record.enroll_number], expected_ms(record.local_time, ZONE), terminal.serial)
                keys[key] = (terminal.serial, record.enroll_number)
        return keys

    def undelivered(self) -> set[UploadKey]:
        """The recorded punches DingTalk does not hold yet."""
        accepted = {upload_key(upload) for upload in self.fake.uploads}
        return set(self.expected()) - accepted

    def lock_holder(self) -> str:
        """The pid written in the store's instance lock file, or ''."""
        lock = self.store.with_name(self.store.name + ".lock")
        try:
            return lock.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return ""


@pytest.fixture(name="rig")
def rig_fixture(terminals: Callable[..., FakeTerminal], tmp_path: Path) -> Iterator[Rig]:
    """Three fake terminals, a fake DingTalk with 20 ms latency, a config pointing the daemon at them."""
    fake = FakeDingTalk(list(USERS.values()), latency_seconds=0.02, hang_seconds=3.0).start()
    started = [terminals(serial=f"CRASH{i:05d}", users=5, timezone=ZONE) for i in range(3)]
    store = tmp_path / "state" / "zkdingsync.db"
    config = write_config(
        tmp_path / "config.yaml",
        store=store,
        api_base=fake.url,
        devices=[(f"door{i}", terminal.port) for i, terminal in enumerate(started)],
        users=USERS,
        app_key=DEFAULT_APP_KEY,
        app_secret=DEFAULT_APP_SECRET,
        timezone_name=ZONE,
    )
    try:
        yield Rig(started, fake, config, store, tmp_path)
    finally:
        fake.stop()


def _connections(rig: Rig) -> int:
    return sum(terminal.connections for terminal in rig.terminals)


def _await(daemon: DaemonProcess, condition: Callable[[], object], timeout: float = TRIGGER_TIMEOUT) -> None:
    """Wait for `condition` while the daemon runs; fail with its stderr if it exits on its own."""
    wait_for(lambda: condition() or not daemon.running(), timeout=timeout, interval=0.05)
    assert daemon.running(), (
        f"the daemon exited on its own ({daemon.process.returncode}): {daemon.stderr()[-3000:]}"
    )


def _run_and_kill(rig: Rig, rng: random.Random, mode: str, name: str) -> tuple[DaemonProcess, str]:
    """Add punches, start the daemon, wait for the moment `mode` names (with a deadline), SIGKILL the
    daemon there; return it and a description of the moment."""
    offset = rng.randint(1, 3)
    # Enough new punches that this incarnation has at least `offset` uploads to make.
    rig.punch(rng, offset + rng.randint(0, 3))
    daemon = DaemonProcess(rig.config, rig.directory, name=name)
    if mode == "startup":
        _await(daemon, lambda: rig.lock_holder() == str(daemon.pid))
        moment = "right after it took the instance lock"
    elif mode == "polling":
        target = _connections(rig) + offset
        _await(daemon, lambda: _connections(rig) >= target)
        moment = f"in a terminal session (connection {target})"
    elif mode == "delivering":
        target = rig.fake.calls[UPLOAD] + offset
        _await(daemon, lambda: rig.fake.calls[UPLOAD] >= target)
        moment = f"as upload call {target} arrived"
    else:  # DingTalk slow: it answers after the client's 1 s timeout; the kill lands while it sits on it
        rig.fake.slow_next(1.5, n=2)
        target = rig.fake.calls[UPLOAD] + 1
        _await(daemon, lambda: rig.fake.calls[UPLOAD] >= target)
        moment = f"while DingTalk sat on upload call {target}"
    assert daemon.kill9() == -9
    return daemon, moment


def test_kill_9_at_random_moments_loses_nothing(rig: Rig) -> None:
    """Six SIGKILLs (startup, polling, delivering, DingTalk slow) with punches arriving all along: every
    recorded punch reaches DingTalk with the right user, time and device; duplicates only where an
    upload's outcome was unknown; SIGTERM at the end exits 0 within 10 s."""
    rng = random.Random(SEED)
    started = time.monotonic()
    modes = ["startup", "polling", "delivering", "slow"] + [
        rng.choice(["polling", "delivering", "slow"]) for _ in range(KILLS - 4)
    ]
    rng.shuffle(modes)
    moments: list[str] = []
    daemons: list[DaemonProcess] = []
    try:
        for number, mode in enumerate(modes):
            daemon, moment = _run_and_kill(rig, rng, mode, f"run{number}")
            daemons.append(daemon)
            moments.append(moment)
        rig.punch(rng, 5)
        final = DaemonProcess(rig.config, rig.directory, name="final")
        daemons.append(final)
        _await(final, lambda: not rig.undelivered(), timeout=DELIVERY_TIMEOUT)
        assert not rig.undelivered(), f"never delivered: {sorted(rig.undelivered())}"
        stop_started = time.monotonic()
        assert final.terminate(timeout=10.0) == 0, final.stderr()[-2000:]
        stop_seconds = time.monotonic() - stop_started
    finally:
        for daemon in daemons:
            daemon.ensure_dead()

    expected = rig.expected()
    uploads = rig.fake.uploads
    unexpected = [upload for upload in uploads if upload_key(upload) not in expected]
    assert not unexpected, f"DingTalk got punches no terminal recorded (wrong time or device?): {unexpected}"
    doubled = duplicates(uploads)
    with Store.open(rig.store) as store:
        assert store.integrity_check() == "ok"
        unknown = {
            (stored.punch.serial, stored.punch.enroll_number, stored.punch.check_time_ms)
            for stored in store.punches()
            if stored.outcome_unknown
        }
        unknown_count = store.outcome_unknown_count()
    unexplained = [key for key in doubled if (expected[key][0], expected[key][1], key[1]) not in unknown]
    assert not unexplained, f"duplicates without an unknown upload outcome: {unexplained} (kills: {moments})"
    for daemon in daemons:
        assert "Traceback" not in daemon.stderr(), daemon.stderr()[-3000:]
    print(  # the numbers the acceptance report quotes (shown with -s or on failure)
        f"crash test: {len(expected)} punches, {len(uploads)} uploads, "
        f"{sum(n - 1 for n in doubled.values())} duplicates, {unknown_count} outcome_unknown, "
        f"{len(modes)} kills ({'; '.join(moments)}), SIGTERM stop {stop_seconds:.2f} s, "
        f"total {time.monotonic() - started:.1f} s"
    )


def test_second_instance_on_the_same_store_refuses_to_start(rig: Rig) -> None:
    """A restart overlap: a second `run` on the same store exits non-zero at once with one clear line
    saying another instance is already running, no traceback; the first keeps working and stops with 0."""
    first = DaemonProcess(rig.config, rig.directory, name="first")
    second: DaemonProcess | None = None
    try:
        _await(first, lambda: rig.lock_holder() == str(first.pid))
        second = DaemonProcess(rig.config, rig.directory, name="second")
        code = second.wait(timeout=15)
        assert code != 0
        err = second.stderr()
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "already running" in lines[0], err
        assert str(rig.store) in lines[0], lines[0]
        assert first.running()
        rig.punch(random.Random(SEED), 3)
        _await(first, lambda: not rig.undelivered())
        assert not duplicates(rig.fake.uploads)
        assert first.terminate(timeout=10.0) == 0, first.stderr()[-2000:]
    finally:
        first.ensure_dead()
        if second is not None:
            second.ensure_dead()
