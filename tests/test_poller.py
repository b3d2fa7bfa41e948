"""The poller's own logic with a scripted terminal reader and the real SQLite store: scheduling,
backoff, logging once, re-baselining, failing closed, clock drift, reloads, the run loop."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog
from fixtures_simulator import wait_for

from zkdingsync.config.objects import DeviceConfig, PollConfig
from zkdingsync.devices.records import encode_records
from zkdingsync.devices.zk import DeviceLike, KnownLog, LogDigest, LogRead, TerminalState
from zkdingsync.errors import StoreError, TerminalError
from zkdingsync.model import AttendanceRecord, Delivery
from zkdingsync.poller import Poller
from zkdingsync.store import Store

T0 = datetime(2024, 5, 6, 0, 0, tzinfo=timezone.utc)
POLL = PollConfig(
    interval_seconds=60,
    timeout_seconds=1,
    max_concurrency=4,
    backoff_max_seconds=600,
    future_tolerance_seconds=600,
    drift_threshold_seconds=60,
)


class Clock:
    """A settable wall clock."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@dataclass
class ScriptedTerminal:
    """What the fake reader pretends one terminal holds."""

    serial: str
    records: list[AttendanceRecord] = field(default_factory=list)
    error: TerminalError | Exception | None = None
    clock_offset_seconds: float = 0.0
    capacity: int = 100_000


class FakeReader:
    """Implements the poller's TerminalReader port from scripted terminals (no sockets)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.terminals: dict[str, ScriptedTerminal] = {}
        self.downloads: dict[str, int] = {}
        self.calls: list[dict[str, Any]] = []
        self.clock_sets: list[tuple[str, datetime]] = []
        self.gate: dict[str, threading.Event] = {}

    def read_log(self, device: DeviceLike, **kwargs: Any) -> LogRead:
        self.calls.append({"device": device.name, **kwargs})
        if device.name in self.gate:
            self.gate[device.name].wait(10)
        terminal = self.terminals[device.name]
        if terminal.error is not None:
            raise terminal.error
        read_at = self.clock()
        state = TerminalState(
            serial=terminal.serial,
            users=1,
            user_capacity=100,
            record_count=len(terminal.records),
            record_capacity=terminal.capacity,
            clock_text="",
            clock=read_at + timedelta(seconds=terminal.clock_offset_seconds),
            read_at=read_at,
        )
        known: KnownLog = kwargs["known"]
        if known.serial == terminal.serial and known.count == len(terminal.records):
            return LogRead(state=state, downloaded=False)
        self.downloads[device.name] = self.downloads.get(device.name, 0) + 1
        digest = LogDigest(terminal.serial, 40, len(terminal.records), b"x")
        body = encode_records(terminal.records, 40)
        return LogRead(state=state, downloaded=True, record_size=40, body=body, digest=digest, full=True)

    def set_time(self, device: DeviceLike, *, timeout_seconds: float, at: datetime) -> None:
        self.clock_sets.append((device.name, at))
        self.terminals[device.name].clock_offset_seconds = 0.0


def rec(minute: int, enroll: str = "1001", day: str = "2024-05-06") -> AttendanceRecord:
    return AttendanceRecord(enroll, f"{day} 07:{minute:02d}:00", verify_mode=1, punch_state=0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zk.db") as opened:
        yield opened


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reader(clock: Clock) -> FakeReader:
    return FakeReader(clock)


def devices(*names: str, **changes: Any) -> list[DeviceConfig]:
    return [replace(DeviceConfig(name=name, host="127.0.0.1", port=4370), **changes) for name in names]


def make_poller(
    store: Store, reader: FakeReader, clock: Clock, names: Sequence[str], jitter: float = 0.0, **changes: Any
) -> Poller:
    return Poller(
        devices(*names, **changes), store, poll=POLL, clock=clock, reader=reader, jitter=lambda: jitter
    )


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


# ------------------------------------------------------------------------------------------ polls


def test_first_poll_stores_everything_then_unchanged_polls_download_nothing(
    store: Store, reader: FakeReader, clock: Clock
) -> None:
    reader.terminals["lobby"] = ScriptedTerminal("S1", [rec(1), rec(2), rec(3)])
    poller = make_poller(store, reader, clock, ["lobby"])
    with structlog.testing.capture_logs() as logs:
        [first] = poller.poll_due(T0)
        [second] = poller.poll_due(first.next_due)
    assert (first.ok, first.new, first.records, first.downloaded) == (True, 3, 3, True)
    assert (second.ok, second.new, second.downloaded) == (True, 0, False)
    assert reader.downloads == {"lobby": 1}
    assert first.next_due == T0 + timedelta(seconds=60)
    finished = events(logs, "poll.finished")
    assert [(e["device"], e["new"], e["records"], e["log_level"]) for e in finished] == [
        ("lobby", 3, 3, "info"),
        ("lobby", 0, 3, "debug"),
    ]
    assert "duration_ms" in finished[0]
    checkpoint = store.checkpoint("lobby")
    assert checkpoint is not None and (checkpoint.serial, checkpoint.record_count) == ("S1", 3)
    # Punches carry the terminal's serial and the epoch ms of the local time in the device's zone.
    punch = store.punches()[0].punch
    assert punch.serial == "S1" and punch.check_time_ms == 1714950060000  # 07:01 +08:00


def test_known_checkpoint_and_digest_are_handed_to_the_reader(
    store: Store, reader: FakeReader, clock: Clock
) -> None:
    reader.terminals["lobby"] = ScriptedTerminal("S1", [rec(1)])
    poller = make_poller(store, reader, clock, ["lobby"])
    poller.poll_due(T0)
    reader.terminals["lobby"].records.append(rec(2))
    poller.poll_due(T0 + timedelta(minutes=1))
    first, second = reader.calls
    assert first["known"] == KnownLog.NOTHING
    assert (second["known"].serial, second["known"].count) == ("S1", 1)
    assert second["known"].digest == LogDigest("S1", 40, 1, b"x")


def test_only_due_terminals_are_polled(store: Store, reader: FakeReader, clock: Clock) -> None:
    for name in ("a", "b"):
        reader.terminals[name] = ScriptedTerminal(f"S-{name}", [rec(1)])
    poller = make_poller(store, reader, clock, ["a", "b"])
    assert [r.device for r in poller.poll_due(T0)] == ["a", "b"]
    assert poller.poll_due(T0 + timedelta(seconds=59)) == []
    assert len(poller.poll_due(T0 + timedelta(seconds=60))) == 2


def test_quarantined_punches_are_kept(store: Store, reader: FakeReader, clock: Clock) -> None:
    reader.terminals["lobby"] = ScriptedTerminal(
        "S1",
        [
            rec(1),
            AttendanceRecord("1001", "2024-02-31 07:00:00", 1, 0),
            rec(0, day="2024-05-07"),  # a day ahead of the host
            rec(0, day="2023-01-01"),
        ],
    )
    poller = make_poller(store, reader, clock, ["lobby"])
    with structlog.testing.capture_logs() as logs:
        [result] = poller.poll_due(T0)
    assert result.new == 4
    reasons = sorted(p.reason or "" for p in store.punches(delivery=Delivery.QUARANTINED))
    assert reasons == [
        "impossible date 2024-02-31 07:00:00",
        "in the future by 23 h",
        "older than DingTalk's 180-day window",
    ]
    assert store.delivery_counts()[Delivery.PENDING] == 1
    assert events(logs, "poll.finished")[0]["quarantined"] == 3


# --------------------------------------------------------------------------- failures and backoff


def test_backoff_doubles_with_jitter_and_is_capped(store: Store, reader: FakeReader, clock: Clock) -> None:
    low = make_poller(store, reader, clock, ["lobby"], jitter=0.0)
    high = make_poller(store, reader, clock, ["lobby"], jitter=0.999999)
    assert [low.backoff_seconds(n) for n in range(1, 7)] == [30, 60, 120, 240, 300, 300]
    assert [round(high.backoff_seconds(n)) for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]
    assert low.backoff_seconds(10_000) == 300  # no overflow


def test_failures_move_the_due_time_and_are_recorded(store: Store, reader: FakeReader, clock: Clock) -> None:
    reader.terminals["lobby"] = ScriptedTerminal(
        "S1", error=TerminalError("lobby", "connection refused at x:1")
    )
    poller = make_poller(store, reader, clock, ["lobby"], jitter=0.0)
    now = T0
    waits = []
    for _ in range(3):
        [result] = poller.poll_due(now)
        assert not result.ok and result.error == "connection refused at x:1"
        waits.append((result.next_due - now).total_seconds())
        now = result.next_due
    assert waits == [30, 60, 120]
    checkpoint = store.checkpoint("lobby")
    assert checkpoint is not None
    assert checkpoint.last_error == "connection refused at x:1" and checkpoint.down_since == T0
    # A failure makes the next session re-enable the terminal first.
    assert [call["ensure_enabled"] for call in reader.calls] == [False, True, True]


def test_down_and_recovered_are_logged_once_each(store: Store, reader: FakeReader, clock: Clock) -> None:
    terminal = reader.terminals["lobby"] = ScriptedTerminal("S1", [rec(1)])
    poller = make_poller(store, reader, clock, ["lobby"])
    poller.poll_due(T0)
    terminal.error = TerminalError("lobby", "timed out after 1 s waiting for 127.0.0.1:4370")
    now = T0 + timedelta(minutes=1)
    with structlog.testing.capture_logs() as logs:
        for _ in range(4):
            clock.now = now
            [result] = poller.poll_due(now)
            now = result.next_due
        terminal.error = None
        clock.now = now
        for _ in range(3):
            [result] = poller.poll_due(now)
            now = result.next_due
    down = events(logs, "terminal.down")
    recovered = events(logs, "terminal.recovered")
    assert len(down) == 1 and down[0]["reason"].startswith("timed out after 1 s")
    assert down[0]["log_level"] == "warning"
    assert len(recovered) == 1
    # Down from T0+1min; the fourth failure backed off 30+60+120+240 s = 7.5 min, so the outage is 7 min 30 s.
    assert recovered[0]["down_for"] == "7 min"
    checkpoint = store.checkpoint("lobby")
    assert checkpoint is not None and checkpoint.down_since is None and checkpoint.last_error is None


def test_a_bug_in_one_poll_fails_that_poll_only(store: Store, reader: FakeReader, clock: Clock) -> None:
    reader.terminals["bad"] = ScriptedTerminal("S1", error=RuntimeError("boom"))
    reader.terminals["good"] = ScriptedTerminal("S2", [rec(1)])
    poller = make_poller(store, reader, clock, ["bad", "good"])
    with structlog.testing.capture_logs() as logs:
        bad, good = poller.poll_due(T0)
    assert not bad.ok and bad.error == "internal error: RuntimeError: boom"
    assert good.ok and good.new == 1
    assert events(logs, "poll.crashed")[0]["exc_info"] is True


class FailingStore(Store):
    """The real store, with save_poll refusing like a full disk while `full` is set."""

    full = False

    def save_poll(self, device: str, **kwargs: Any) -> int:  # type: ignore[override]
        if self.full:
            raise StoreError("database or disk is full")
        return super().save_poll(device, **kwargs)


def test_store_failure_fails_the_poll_closed(tmp_path: Path, reader: FakeReader, clock: Clock) -> None:
    store = FailingStore.open(tmp_path / "zk.db")
    assert isinstance(store, FailingStore)
    terminal = reader.terminals["lobby"] = ScriptedTerminal("S1", [rec(1)])
    poller = make_poller(store, reader, clock, ["lobby"])
    poller.poll_due(T0)
    terminal.records.append(rec(2))
    store.full = True
    with structlog.testing.capture_logs() as logs:
        failed = poller.poll_due(T0 + timedelta(minutes=1))[0]
        failed_again = poller.poll_due(T0 + timedelta(minutes=2))[0]
        store.full = False
        ok = poller.poll_due(T0 + timedelta(minutes=3))[0]
    assert not failed.ok and failed.error == "store: database or disk is full"
    assert not failed_again.ok
    # Nothing moved while the disk refused; the punch arrives once it takes writes again.
    assert ok.ok and ok.new == 1
    assert len(store.punches()) == 2
    assert len(events(logs, "store.failing")) == 1 and len(events(logs, "store.recovered")) == 1
    assert events(logs, "terminal.down") == []  # the terminal was never the problem
    # The checkpoint never ran ahead: the poll after the failures still had the old count.
    assert [call["known"].count for call in reader.calls] == [None, 1, 1, 1]
    store.close()


# --------------------------------------------------------------------------- swap and reset


def test_swapped_terminal_is_logged_once_and_rebaselined(
    store: Store, reader: FakeReader, clock: Clock
) -> None:
    terminal = reader.terminals["lobby"] = ScriptedTerminal("OLD", [rec(1), rec(2)])
    poller = make_poller(store, reader, clock, ["lobby"])
    poller.poll_due(T0)
    terminal.serial, terminal.records = "NEW", [rec(1)]
    with structlog.testing.capture_logs() as logs:
        [swapped] = poller.poll_due(T0 + timedelta(minutes=1))
        [after] = poller.poll_due(T0 + timedelta(minutes=2))
    assert swapped.new == 1 and after.new == 0
    [event] = events(logs, "terminal.swapped")
    assert (event["old_serial"], event["new_serial"]) == ("OLD", "NEW")
    assert sorted(p.punch.serial for p in store.punches()) == ["NEW", "OLD", "OLD"]


def test_cleared_log_is_logged_once_and_delivered_punches_stay_delivered(
    store: Store, reader: FakeReader, clock: Clock
) -> None:
    terminal = reader.terminals["lobby"] = ScriptedTerminal("S1", [rec(1), rec(2), rec(3)])
    poller = make_poller(store, reader, clock, ["lobby"])
    poller.poll_due(T0)
    for stored in store.claim_due(T0 + timedelta(hours=1), 10):
        store.mark_delivered(stored.id, at=T0, userid="u1")
    # Cleared, then re-filled with one old record (re-read) and one new punch.
    terminal.records = [rec(2), rec(4)]
    with structlog.testing.capture_logs() as logs:
        [result] = poller.poll_due(T0 + timedelta(minutes=1))
    [event] = events(logs, "terminal.log_reset")
    assert (event["old_count"], event["new_count"]) == (3, 2)
    assert result.new == 1
    counts = store.delivery_counts()
    assert counts[Delivery.DELIVERED] == 3 and counts[Delivery.PENDING] == 1


# -------------------------------------------------------------------------------------- clocks


def test_clock_drift_is_logged_once_and_when_it_is_back(
    store: Store, reader: FakeReader, clock: Clock
) -> None:
    terminal = reader.terminals["lobby"] = ScriptedTerminal("S1", [rec(1)], clock_offset_seconds=-300)
    poller = make_poller(store, reader, clock, ["lobby"])
    now = T0
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            now = poller.poll_due(now)[0].next_due
        terminal.clock_offset_seconds = 2
        for _ in range(2):
            now = poller.poll_due(now)[0].next_due
    [drift] = events(logs, "terminal.clock_drift")
    assert drift["drift_seconds"] == -300 and drift["sync_clock"] is False
    assert len(events(logs, "terminal.clock_ok")) == 1
    assert reader.clock_sets == []
    checkpoint = store.checkpoint("lobby")
    assert checkpoint is not None and checkpoint.drift_seconds == 2


def test_sync_clock_sets_the_terminal_clock(store: Store, reader: FakeReader, clock: Clock) -> None:
    reader.terminals["lobby"] = ScriptedTerminal("S1", [rec(1)], clock_offset_seconds=3600)
    poller = make_poller(store, reader, clock, ["lobby"], sync_clock=True)
    with structlog.testing.capture_logs() as logs:
        now = poller.poll_due(T0)[0].next_due
        poller.poll_due(now)
    assert reader.clock_sets == [("lobby", T0)]
    assert len(events(logs, "terminal.clock_set")) == 1 and len(events(logs, "terminal.clock_ok")) == 1


# ------------------------------------------------------------------------------------ reload, run


def test_update_devices_keeps_unchanged_schedules(store: Store, reader: FakeReader, clock: Clock) -> None:
    for name in ("a", "b", "c", "d"):
        reader.terminals[name] = ScriptedTerminal(f"S-{name}", [rec(1)])
    poller = make_poller(store, reader, clock, ["a", "b", "c"])
    poller.poll_due(T0)
    clock.advance(10)
    changed = replace(devices("b")[0], port=4371)
    poller.update_devices([devices("a")[0], changed, devices("d")[0]], replace(POLL, max_concurrency=2))
    schedule = poller.schedule()
    assert schedule == {"a": T0 + timedelta(seconds=60), "b": clock.now, "d": clock.now}
    assert [r.device for r in poller.poll_due(clock.now)] == ["b", "d"]


def test_run_polls_on_schedule_and_stops_promptly(store: Store, reader: FakeReader) -> None:
    for name in ("a", "b"):
        reader.terminals[name] = ScriptedTerminal(f"S-{name}", [rec(1)])
    # The slow terminal "a" holds its worker; "b" keeps being polled on its own schedule.
    reader.gate["a"] = threading.Event()
    moving = Clock(datetime.now(timezone.utc))
    reader.clock = moving
    poller = Poller(devices("a", "b"), store, poll=POLL, clock=moving, reader=reader)
    stop = threading.Event()
    runner = threading.Thread(target=poller.run, args=(stop,))
    runner.start()
    try:
        wait_for(lambda: store.checkpoint("b") is not None)
        moving.advance(61)
        wait_for(lambda: sum(call["device"] == "b" for call in reader.calls) >= 2)
        assert store.checkpoint("a") is None
    finally:
        reader.gate["a"].set()
        stop.set()
        runner.join(5)
    assert not runner.is_alive()
    assert store.checkpoint("a") is not None  # the poll in flight finished before run returned


def test_from_config_uses_the_config_fields(store: Store, reader: FakeReader) -> None:
    @dataclass
    class Cfg:
        poll: PollConfig
        devices: tuple[DeviceConfig, ...]

    poller = Poller.from_config(Cfg(POLL, tuple(devices("x", "y"))), store=store, reader=reader)
    assert set(poller.schedule()) == {"x", "y"}
