"""Helpers for the model-based test and the crash tests: a fake clock, simulated process death, and
the bookkeeping that decides whether DingTalk got every punch exactly once.

`SimulatedCrash` derives from BaseException on purpose: like the SIGKILL it stands for, it must not be
caught by the `except Exception` edges of the poller and forwarder threads, so it leaves the step in
progress exactly where it struck.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from zkdingsync.dingtalk.client import DingTalkClient
from zkdingsync.forwarder import Forwarder
from zkdingsync.mapping import UserMapper
from zkdingsync.model import Punch
from zkdingsync.store import Store

# (userid, user_check_time in epoch ms, device_id): how a punch is recognised in DingTalk.
UploadKey = tuple[str, int, str]


def expected_ms(local_time: str, zone: str) -> int:
    """Given a terminal wall-clock text and the terminal's IANA zone, return the epoch milliseconds
    DingTalk must receive (computed independently of `zkdingsync.timeconv`)."""
    naive = datetime.strptime(local_time, "%Y-%m-%d %H:%M:%S")  # noqa: DTZ007 - zone attached below
    return int(naive.replace(tzinfo=ZoneInfo(zone)).timestamp() * 1000)


def upload_key(upload: Mapping[str, Any]) -> UploadKey:
    """Given an upload the fake DingTalk accepted, return its (userid, check time ms, device_id)."""
    return (str(upload["userid"]), int(upload["user_check_time"]), str(upload["device_id"]))


def duplicates(uploads: Iterable[Mapping[str, Any]]) -> dict[UploadKey, int]:
    """Given accepted uploads, return every key accepted more than once with how many times."""
    counts = Counter(upload_key(upload) for upload in uploads)
    return {key: n for key, n in counts.items() if n > 1}


class FakeClock:
    """Aware UTC time that moves only when told: `now()` for every `clock=`, `advance(s)` as `sleep=`."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(timezone.utc)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        """Return the current fake time."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds` (negative values are ignored): the injected sleep."""
        with self._lock:
            self._now += timedelta(seconds=max(0.0, float(seconds)))


class SteppingClock:
    """A settable UTC clock for the forwarder: call it for the time; its `sleep` advances it (and records
    the wait) instead of sleeping; `now` is the current fake time."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        """The injected sleep: record the wait and move the clock on by it."""
        with self._lock:
            self.sleeps.append(seconds)
            self.now += timedelta(seconds=seconds)

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds`."""
        with self._lock:
            self.now += timedelta(seconds=seconds)


def sample_punch(
    n: int, *, device: str = "lobby", quarantine: str | None = None, impossible: bool = False
) -> Punch:
    """The n-th of a series of punches one second apart on 2026-11-25 (enroll number 1000 + n)."""
    return Punch(
        device=device,
        serial=f"SN-{device}",
        enroll_number=str(1000 + n),
        local_time=f"2026-11-25 08:00:{n:02d}",
        punch_state=0,
        verify_mode=1,
        check_time_ms=None if impossible else 1_764_028_800_000 + n * 1000,
        quarantine_reason=quarantine,
    )


def drain_to_fake(store: Store, url: str, users: Mapping[str, str], clock: SteppingClock) -> None:
    """Deliver everything the store holds to the fake DingTalk at `url` with the real client and forwarder,
    their waits on `clock` (read-backs 30 s after an unknown outcome); fail if it does not drain."""
    client = DingTalkClient("fake-app-key", "fake-app-secret", url, 0.3, store=store)
    forwarder = Forwarder(
        store,
        client,
        UserMapper(users),
        rate_per_second=1000,
        concurrency=1,
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(3),
        settle_delay_seconds=30,
    )
    try:
        with forwarder:
            assert forwarder.drain(max_steps=200)
    finally:
        client.close()


class SimulatedCrash(BaseException):
    """The process died here (kill -9): nothing after this point happens, nothing uncommitted survives."""


@dataclass
class _CrashPoint:
    method: str
    when: str  # "before" the call happens, or "after" it returned (its commit is durable)
    remaining: int  # strike at the nth matching call


class Mortality:
    """Shared fate of one simulated process: arm a crash point; once struck, every call through a
    `Dying` proxy of this process raises SimulatedCrash (a dead process neither writes nor uploads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._point: _CrashPoint | None = None
        self.dead = False
        self.struck_at: str | None = None

    def arm(self, method: str, when: str, nth: int = 1) -> None:
        """Die at the `nth` call of `method` (on any proxy of this process), `before` or `after` it."""
        if when not in ("before", "after"):
            raise ValueError("when must be 'before' or 'after'")
        with self._lock:
            self._point = _CrashPoint(method, when, nth)

    def disarm(self) -> None:
        """Forget an armed crash point that was never reached."""
        with self._lock:
            self._point = None

    def kill(self) -> None:
        """Die now (kill -9 between two calls)."""
        with self._lock:
            self.dead = True
            self.struck_at = self.struck_at or "killed"
            self._point = None

    def check(self, method: str, when: str) -> None:
        """Raise SimulatedCrash if this process is dead or this is the armed point."""
        with self._lock:
            point = self._point
            if not self.dead and point is not None and point.method == method and point.when == when:
                point.remaining -= 1
                if point.remaining <= 0:
                    self.dead = True
                    self.struck_at = f"{when} {method}"
                    self._point = None
            if self.dead:
                raise SimulatedCrash(self.struck_at or "dead")


class Dying:
    """A proxy of a store or client that belongs to a mortal process: every public method call checks
    the process's fate before and after the real call. Attributes pass through unchanged."""

    def __init__(self, target: Any, mortality: Mortality) -> None:
        self._target = target
        self._mortality = mortality

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if name.startswith("_") or not callable(attribute):
            return attribute
        mortality = self._mortality

        def call(*args: Any, **kwargs: Any) -> Any:
            mortality.check(name, "before")
            result = attribute(*args, **kwargs)
            mortality.check(name, "after")
            return result

        return call


# ---------------------------------------------------------------------------- the real daemon process


def write_config(
    path: Path,
    *,
    store: Path,
    api_base: str,
    devices: Sequence[tuple[str, int]],
    users: Mapping[str, str],
    app_key: str,
    app_secret: str,
    timezone_name: str = "Asia/Shanghai",
    dingtalk_timeout_seconds: float = 1.0,
    poll_interval_seconds: float = 1.0,
    log_format: str = "json",
    readback_delay_seconds: float = 2.0,
    delivery_since: str | None = "2000-01-01",
    monthly_call_quota: int | None = None,
    rate_per_second: float | None = None,
) -> Path:
    """Given where things are, write a daemon config (terminals on 127.0.0.1) to `path`; return it.

    `delivery_since` defaults to a day before any test's punches, so that everything a terminal holds is
    delivered whatever the hour a test runs at; None leaves the key out (history before the first poll).
    """
    document = {
        "dingtalk": {
            "app_key": app_key,
            "app_secret": app_secret,
            "api_base": api_base,
            "timeout_seconds": dingtalk_timeout_seconds,
            # Tests settle unknown outcomes quickly; the shipped default waits 30 s.
            "readback_delay_seconds": readback_delay_seconds,
        },
        "store": {"path": str(store)},
        "poll": {"interval_seconds": poll_interval_seconds, "timeout_seconds": 2},
        "users": {"map": dict(users)},
        "devices": [
            {"name": name, "host": "127.0.0.1", "port": port, "timezone": timezone_name}
            for name, port in devices
        ],
        "log": {"format": log_format},
    }
    if delivery_since is not None:
        document["delivery"] = {"since": delivery_since}
    dingtalk = document["dingtalk"]
    assert isinstance(dingtalk, dict)
    if monthly_call_quota is not None:
        dingtalk["monthly_call_quota"] = monthly_call_quota
    if rate_per_second is not None:
        dingtalk["rate_per_second"] = rate_per_second
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def write_fleet_config(
    path: Path,
    *,
    dingtalk: Any,
    fleet: Mapping[str, Any],
    users: Mapping[str, str],
    app_key: str,
    app_secret: str,
    store: Path | None = None,
    **changes: Any,
) -> Path:
    """`write_config` for fake terminals by name (`FakeTerminal`s) and a fake DingTalk (`FakeDingTalk`),
    the store beside the config unless given, DingTalk calls timing out after 2 s."""
    return write_config(
        path,
        store=store or path.parent / "zk.db",
        api_base=dingtalk.url,
        devices=[(name, terminal.port) for name, terminal in fleet.items()],
        users=users,
        app_key=app_key,
        app_secret=app_secret,
        **{"dingtalk_timeout_seconds": 2.0, **changes},
    )


def run_cli(
    args: Sequence[str], *, timeout: float = 30, environ: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m zkdingsync ARGS` (with `environ` added to this environment) and return the finished
    process with its text output."""
    return subprocess.run(
        [sys.executable, "-m", "zkdingsync", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(environ or {})},
    )


def parked_status(config: Path, parked: int) -> str | None:
    """`zkdingsync status` (plain text) once it shows `parked` parked punches, else None."""
    result = run_cli(["status", "-c", str(config)])
    return result.stdout if f"parked           {parked}" in result.stdout else None


class DaemonProcess:
    """`python -m zkdingsync run -c CONFIG` as a child process, its output in files under `directory`."""

    def __init__(
        self, config: Path, directory: Path, name: str = "daemon", environ: Mapping[str, str] | None = None
    ) -> None:
        self.config = config
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        env = {key: value for key, value in os.environ.items() if not key.startswith("ZKDINGSYNC_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(environ or {})
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "zkdingsync", "run", "-c", str(config)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=directory,
                env=env,
            )

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    def running(self) -> bool:
        """True while the child has not exited."""
        return self.process.poll() is None

    def kill9(self) -> int:
        """SIGKILL the child and reap it; return its exit status (-9)."""
        self.process.kill()
        return self.process.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM the child and wait up to `timeout` seconds for it; return its exit code. Raise
        subprocess.TimeoutExpired (after killing it) if it does not stop in time."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise

    def wait(self, timeout: float) -> int:
        """Wait for the child to exit on its own; return its exit code."""
        return self.process.wait(timeout=timeout)

    def stderr(self) -> str:
        """Everything the child wrote on stderr so far."""
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stdout(self) -> str:
        """Everything the child wrote on stdout so far."""
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, signum: int) -> None:
        """Send `signum` to the child."""
        self.process.send_signal(signum)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The child's log events (JSON lines on stderr) named `name`."""
        found = []
        for line in self.stderr().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == name:
                found.append(entry)
        return found

    def ensure_dead(self) -> None:
        """Kill the child if it still runs (test clean-up)."""
        if self.running():
            self.kill9()
