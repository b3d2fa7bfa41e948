"""Big logs through the real poller, the fake terminal and a real store: each poll reads what is new,
and every case (growth, clear and refill, rotation, a refusing full log, firmware without offset
reads, a crash between batches) ends with every punch stored exactly once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
from fixtures_simulator import simulator_fixture, terminals_fixture  # noqa: F401
from harness import Dying, Mortality, SimulatedCrash

from zkdingsync.config.objects import DeviceConfig, PollConfig
from zkdingsync.devices.zk import LogRead, ZkReader
from zkdingsync.poller import Poller, PollResult
from zkdingsync.simulator import FakeTerminal
from zkdingsync.simulator import protocol as p
from zkdingsync.store import Store
from zkdingsync.terminal_poll import BATCH_RECORDS

POLL = PollConfig(interval_seconds=60, timeout_seconds=2, max_concurrency=4, max_full_reads=2)
ZONE = ZoneInfo("Asia/Shanghai")
Key = tuple[str, str, str, int, int]


def recent(days: float) -> str:
    return (datetime.now(ZONE) - timedelta(days=days)).strftime("%Y-%m-%d %H:%M:%S")


def device_for(name: str, terminal: FakeTerminal) -> DeviceConfig:
    return DeviceConfig(name=name, host="127.0.0.1", port=terminal.port, timezone="Asia/Shanghai")


def stored_keys(store: Store, serial: str) -> list[Key]:
    return sorted(
        (s.punch.serial, s.punch.enroll_number, s.punch.local_time, s.punch.punch_state, s.punch.verify_mode)
        for s in store.punches()
        if s.punch.serial == serial
    )


def terminal_keys(terminal: FakeTerminal) -> list[Key]:
    return sorted(
        (terminal.serial, r.enroll_number, r.local_time, r.punch_state, r.verify_mode)
        for r in terminal.records
    )


def assert_exactly_once(store: Store, terminal: FakeTerminal, also: set[Key] = frozenset()) -> None:  # type: ignore[assignment]
    stored = stored_keys(store, terminal.serial)
    assert len(stored) == len(set(stored))
    assert set(stored) == set(terminal_keys(terminal)) | set(also)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zk.db") as opened:
        yield opened


class Cycle:
    """A poller driven through schedule time without waiting; `restart()` is a new process."""

    def __init__(
        self, store: Any, devices: list[DeviceConfig], poll: PollConfig = POLL, reader: Any = None
    ) -> None:
        self.store, self.devices, self.poll, self.reader = store, devices, poll, reader
        self.poller = Poller(devices, store, poll=poll, jitter=lambda: 0.0, reader=reader)
        self.now = datetime.now(timezone.utc) - timedelta(seconds=60)

    def __call__(self, seconds: float = 60) -> dict[str, PollResult]:
        self.now += timedelta(seconds=seconds)
        return {result.device: result for result in self.poller.poll_due(self.now)}

    def restart(self, store: Any = None) -> None:
        self.poller.close()
        self.store = store or self.store
        self.poller = Poller(self.devices, self.store, poll=self.poll, jitter=lambda: 0.0, reader=self.reader)


@pytest.mark.parametrize("grow", [1, 10_000])
def test_growth_is_read_as_a_tail(terminals: Any, store: Store, grow: int) -> None:
    terminal = terminals(serial=f"BIGGROW{grow}", records=0, capacity=50_000)
    terminal.add_punches(2000, first=recent(20))
    cycle = Cycle(store, [device_for("gate", terminal)])
    assert cycle()["gate"].new == 2000
    prepared = terminal.command_count(p.CMD_PREPARE_BUFFER)
    terminal.add_punches(grow)
    with structlog.testing.capture_logs() as logs:
        result = cycle()["gate"]
    assert result.new == grow
    assert [entry.get("read") for entry in logs if entry["event"] == "poll.finished"] == ["tail"]
    assert terminal.command_count(p.CMD_PREPARE_BUFFER) == prepared + 1
    assert_exactly_once(store, terminal)
    assert cycle()["gate"].new == 0 and not cycle()["gate"].downloaded


@pytest.mark.parametrize("refill", [1500, 2500])
def test_clear_and_refill_to_fewer_or_more_records(terminals: Any, store: Store, refill: int) -> None:
    terminal = terminals(serial=f"BIGREFL{refill}", records=0)
    terminal.add_punches(2000, first=recent(20))
    cycle = Cycle(store, [device_for("gate", terminal)])
    cycle()
    before = set(stored_keys(store, terminal.serial))
    terminal.clear_log()
    terminal.add_punches(refill, first=recent(10))
    assert cycle()["gate"].new == refill
    assert_exactly_once(store, terminal, also=before)


def test_a_rotating_full_log_receiving_1_then_2000_punches(terminals: Any, store: Store) -> None:
    terminal = terminals(serial="BIGROT01", records=0, capacity=3000, overwrite_when_full=True)
    terminal.add_punches(3000, first=recent(20))
    cycle = Cycle(store, [device_for("gate", terminal)])
    assert cycle()["gate"].new == 3000
    seen = set(stored_keys(store, terminal.serial))
    assert not cycle()["gate"].downloaded  # unchanged: only its last record was read
    for punches in (1, 2000):  # 2,000 records are more than the tail search reaches: read whole
        for index in range(punches):
            terminal.add_punch("1003", recent(punches - index / 1000))  # distinct times, oldest first
        assert cycle()["gate"].new == punches
        assert terminal.record_count == 3000
        seen |= set(terminal_keys(terminal))
        assert set(stored_keys(store, terminal.serial)) == seen
    assert len(stored_keys(store, terminal.serial)) == 5001


def test_a_refusing_full_log(terminals: Any, store: Store) -> None:
    terminal = terminals(serial="BIGREF01", records=0, capacity=1000)
    terminal.add_punches(1000, first=recent(20))
    cycle = Cycle(store, [device_for("gate", terminal)])
    assert cycle()["gate"].new == 1000
    assert terminal.add_punch("1001") is None
    result = cycle()["gate"]
    assert result.ok and result.new == 0 and not result.downloaded
    assert_exactly_once(store, terminal)


def test_an_overlap_mismatch_reads_the_whole_log(terminals: Any, store: Store) -> None:
    terminal = terminals(serial="BIGMISM1", records=0)
    terminal.add_punches(1000, first=recent(20))
    cycle = Cycle(store, [device_for("gate", terminal)])
    cycle()
    before = set(stored_keys(store, terminal.serial))
    # Edited at the terminal: the same number of old records, but not the ones stored, then one more.
    terminal.clear_log()
    terminal.add_punches(1001, first=recent(15))
    with structlog.testing.capture_logs() as logs:
        assert cycle()["gate"].new == 1001
    assert [entry.get("read") for entry in logs if entry["event"] == "poll.finished"] == ["whole"]
    assert_exactly_once(store, terminal, also=before)


def test_a_terminal_without_offset_reads_is_logged_once_and_read_whole(terminals: Any, store: Store) -> None:
    terminal = terminals(serial="BIGNOOF1", records=0, offset_reads="ignore")
    terminal.add_punches(3000, first=recent(20))
    cycle = Cycle(store, [device_for("gate", terminal)])
    cycle()
    with structlog.testing.capture_logs() as logs:
        for index in range(3):
            terminal.add_punch("1002", recent(0.5 - index / 100))
            assert cycle()["gate"].new == 1
    warnings = [entry for entry in logs if entry["event"] == "terminal.no_tail_reads"]
    assert len(warnings) == 1 and warnings[0]["device"] == "gate"
    checkpoint = store.checkpoint("gate")
    assert checkpoint is not None and checkpoint.offset_reads is False
    cycle.restart()  # the finding is kept: no tail read is tried again
    terminal.add_punch("1002", recent(0.4))
    with structlog.testing.capture_logs() as logs:
        assert cycle()["gate"].new == 1
    assert not [entry for entry in logs if entry["event"] == "terminal.no_tail_reads"]
    assert_exactly_once(store, terminal)


def test_a_crash_between_two_batches_never_moves_the_checkpoint_ahead(terminals: Any, tmp_path: Path) -> None:
    terminal = terminals(serial="BIGCRASH", records=0, capacity=3 * BATCH_RECORDS)
    terminal.add_punches(2 * BATCH_RECORDS + 10, first=recent(30))
    path = tmp_path / "crash.db"
    mortality = Mortality()
    mortality.arm("save_punches", "after", nth=2)  # the second batch is stored, then the process dies
    first = Store.open(path)
    cycle = Cycle(Dying(first, mortality), [device_for("gate", terminal)])
    with pytest.raises(SimulatedCrash):
        cycle()
    cycle.poller.close()
    first.close()
    with Store.open(path) as store:
        assert store.checkpoint("gate") is None or store.checkpoint("gate").last_success is None  # type: ignore[union-attr]
        assert len(stored_keys(store, terminal.serial)) == 2 * BATCH_RECORDS
        cycle.restart(store)
        assert cycle()["gate"].new == 10
        checkpoint = store.checkpoint("gate")
        assert checkpoint is not None and checkpoint.record_count == 2 * BATCH_RECORDS + 10
        assert_exactly_once(store, terminal)


class CountingReader(ZkReader):
    """The real adapter, counting whole-log reads in flight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.active = self.most = 0
        self.calls: dict[str, int] = {}

    def read_log(self, device: Any, **kwargs: Any) -> LogRead:
        whole = kwargs.get("allow_full", True)  # without it only a small log is read whole
        self.calls[device.name] = self.calls.get(device.name, 0) + 1
        with self.lock:
            self.active += whole
            self.most = max(self.most, self.active)
        try:
            return super().read_log(device, **kwargs)
        finally:
            with self.lock:
                self.active -= whole


def test_at_most_max_full_reads_at_once_and_every_terminal_stored(
    terminals: Any, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("zkdingsync.devices.zk.SMALL_LOG_RECORDS", 1000)  # these logs count as big
    fleet = [terminals(serial=f"BIGFLT{i:02d}", records=0) for i in range(4)]
    for terminal in fleet:
        terminal.add_punches(3000, first=recent(20))
    small = terminals(serial="BIGFLTSM", records=0)
    small.add_punches(500, first=recent(20))
    reader = CountingReader()
    devices = [device_for(f"t{i}", t) for i, t in enumerate(fleet)] + [device_for("small", small)]
    cycle = Cycle(store, devices, replace(POLL, max_full_reads=1), reader)
    results = cycle()
    assert sorted(results) == ["small", "t0", "t1", "t2", "t3"]
    assert [results[f"t{i}"].new for i in range(4)] == [3000] * 4 and results["small"].new == 500
    assert reader.most == 1
    assert reader.calls["small"] == 1  # a small log is read whole at once, without waiting for a slot
    for terminal in [*fleet, small]:
        assert_exactly_once(store, terminal)


def test_a_shorter_interval_applies_from_the_next_poll(terminals: Any, store: Store) -> None:
    terminal = terminals(serial="BIGIVAL1", records=5)
    cycle = Cycle(store, [device_for("gate", terminal)])
    cycle()
    assert cycle.poller.schedule()["gate"] == cycle.now + timedelta(seconds=60)
    cycle.poller.update_devices(cycle.devices, replace(POLL, interval_seconds=5))
    assert cycle.poller.schedule()["gate"] == cycle.now + timedelta(seconds=5)
    assert cycle(seconds=5)["gate"].ok  # due now, not after the minute that was running


def test_an_absurd_record_count_fails_the_poll_with_one_clear_line(terminals: Any, store: Store) -> None:
    from zkdingsync.simulator import Fault

    terminal = terminals(serial="BIGCLAIM", records=5)
    terminal.set_fault(Fault.claim_records(2_000_000_000))
    cycle = Cycle(store, [device_for("gate", terminal)])
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            result = cycle(seconds=700)["gate"]
            assert not result.ok
    down = [entry for entry in logs if entry["event"] == "terminal.down"]
    assert len(down) == 1 and down[0]["device"] == "gate"
    assert "2,000,000,000 records" in down[0]["reason"]
    assert terminal.command_count(p.CMD_PREPARE_BUFFER) == 0
