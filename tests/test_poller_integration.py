"""The poller end to end: the real adapter over real TCP/UDP against fake terminals, the real SQLite
store. Every punch stored exactly once; unchanged polls download nothing; each terminal fault fails
only its own terminal, loses nothing, duplicates nothing, and leaves the terminal enabled."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401

from zkdingsync.config.objects import DeviceConfig, PollConfig
from zkdingsync.devices.records import encode_time
from zkdingsync.model import Delivery
from zkdingsync.poller import Poller, PollResult
from zkdingsync.simulator import FakeTerminal, Fault
from zkdingsync.simulator import protocol as p
from zkdingsync.store import Store

Terminals = Callable[..., FakeTerminal]
Key = tuple[str, str, str, int, int]

POLL = PollConfig(
    interval_seconds=60,
    timeout_seconds=0.5,
    max_concurrency=8,
    backoff_max_seconds=600,
    future_tolerance_seconds=600,
    drift_threshold_seconds=60,
)
ZONE = ZoneInfo("Asia/Shanghai")


def recent(days: float) -> str:
    """The terminal-local wall clock `days` ago (punches inside DingTalk's window, not quarantined)."""
    return (datetime.now(ZONE) - timedelta(days=days)).strftime("%Y-%m-%d %H:%M:%S")


def device_for(name: str, terminal: FakeTerminal, **changes: Any) -> DeviceConfig:
    return replace(
        DeviceConfig(name=name, host="127.0.0.1", port=terminal.port, timezone="Asia/Shanghai"), **changes
    )


def terminal_keys(terminal: FakeTerminal) -> list[Key]:
    serial = terminal.serial
    return [(serial, r.enroll_number, r.local_time, r.punch_state, r.verify_mode) for r in terminal.records]


def stored_keys(store: Store, serial: str) -> list[Key]:
    return [
        (s.punch.serial, s.punch.enroll_number, s.punch.local_time, s.punch.punch_state, s.punch.verify_mode)
        for s in store.punches()
        if s.punch.serial == serial
    ]


def assert_stored_exactly_once(store: Store, terminal: FakeTerminal) -> None:
    expected = terminal_keys(terminal)
    assert len(set(expected)) == len(expected), "the test itself made two identical punches"
    assert sorted(stored_keys(store, terminal.serial)) == sorted(expected)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zk.db") as opened:
        yield opened


@dataclass
class Cycle:
    """Drives a poller through schedule time without waiting: each call polls what is due."""

    poller: Poller
    now: datetime

    def __call__(self, seconds: float = 60) -> dict[str, PollResult]:
        self.now += timedelta(seconds=seconds)
        return {result.device: result for result in self.poller.poll_due(self.now)}


def make_cycle(store: Store, devices: list[DeviceConfig], poll: PollConfig = POLL) -> Cycle:
    poller = Poller(devices, store, poll=poll, jitter=lambda: 0.0)
    return Cycle(poller, datetime.now(timezone.utc) - timedelta(seconds=60))


# ------------------------------------------------------------------------------------ acceptance


def test_five_mixed_terminals_every_punch_stored_exactly_once(terminals: Terminals, store: Store) -> None:
    layouts = [(8, 28, "tcp"), (16, 28, "tcp"), (40, 72, "tcp"), (49, 72, "tcp"), (40, 72, "udp")]
    fleet = []
    for index, (record_size, user_table, protocol) in enumerate(layouts):
        terminal = terminals(
            serial=f"MIX{index:05d}", record_size=record_size, user_table_size=user_table, users=30, records=0
        )
        terminal.add_punches(5000, first=recent(5))
        fleet.append((terminal, device_for(f"t{index}", terminal, protocol=protocol)))
    cycle = make_cycle(store, [device for _, device in fleet])

    first = cycle()
    assert all(result.ok and result.new == 5000 for result in first.values()), first

    # Punches keep arriving, also while polls are running (a disabled terminal holds them back).
    stamp = itertools.count()
    base = datetime.now(ZONE).replace(tzinfo=None) - timedelta(hours=1)

    def punch(terminal: FakeTerminal) -> None:
        when = base + timedelta(seconds=next(stamp))
        terminal.add_punch("1001", when.strftime("%Y-%m-%d %H:%M:%S"))

    stop = threading.Event()

    def keep_punching() -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            punch(fleet[n % len(fleet)][0])
            stop.wait(0.001)  # pace the background punches (returns at once when stopped)

    puncher = threading.Thread(target=keep_punching)
    puncher.start()
    try:
        for _ in range(4):
            for terminal, _ in fleet:
                punch(terminal)
            results = cycle()
            assert all(result.ok for result in results.values()), results
    finally:
        stop.set()
        puncher.join()
    for terminal, _ in fleet:
        wait_for(lambda terminal=terminal: terminal.enabled and terminal.pending_punches == 0)
    cycle()

    for terminal, _ in fleet:
        assert terminal.record_count > 5004
        assert_stored_exactly_once(store, terminal)
    assert store.delivery_counts()[Delivery.QUARANTINED] == 0

    # Nothing new: no terminal is disabled or downloaded again.
    buffers = [terminal.command_count(p.CMD_PREPARE_BUFFER) for terminal, _ in fleet]
    disables = [terminal.command_count(p.CMD_DISABLEDEVICE) for terminal, _ in fleet]
    idle = cycle()
    assert all(result.ok and not result.downloaded and result.new == 0 for result in idle.values())
    assert [terminal.command_count(p.CMD_PREPARE_BUFFER) for terminal, _ in fleet] == buffers
    assert [terminal.command_count(p.CMD_DISABLEDEVICE) for terminal, _ in fleet] == disables


# ---------------------------------------------------------------------------------------- faults


@pytest.fixture
def healthy(terminals: Terminals) -> list[tuple[FakeTerminal, DeviceConfig]]:
    """Two well-behaved terminals that share every fault test's poll cycles."""
    pair = []
    for index in range(2):
        terminal = terminals(serial=f"HEALTHY{index}", records=0)
        terminal.add_punches(50, first=recent(2))
        pair.append((terminal, device_for(f"healthy{index}", terminal)))
    return pair


def check_healthy(
    results: dict[str, PollResult], healthy: list[tuple[FakeTerminal, DeviceConfig]], store: Store
) -> None:
    for terminal, device in healthy:
        assert results[device.name].ok, results[device.name]
        assert_stored_exactly_once(store, terminal)


def test_cleared_log_rebaselines_without_requeueing(
    terminals: Terminals, store: Store, healthy: list[tuple[FakeTerminal, DeviceConfig]]
) -> None:
    bad = terminals(serial="CLEARED1", records=0)
    bad.add_punches(300, first=recent(3))
    cycle = make_cycle(store, [device_for("bad", bad), *(d for _, d in healthy)])
    cycle()
    # HR's side: everything so far was delivered.
    for stored in store.claim_due(datetime.now(timezone.utc) + timedelta(days=1), 10_000):
        store.mark_delivered(stored.id, at=datetime.now(timezone.utc), userid="u")
    old = bad.records
    bad.clear_log()
    bad.add_punch(old[0].enroll_number, old[0].local_time, old[0].verify_mode, old[0].punch_state)  # re-read
    fresh = bad.add_punch("1002", recent(0.01))
    with structlog.testing.capture_logs() as logs:
        results = cycle()
        cycle()
    assert results["bad"].ok and results["bad"].new == 1
    [reset] = events(logs, "terminal.log_reset")
    assert (reset["device"], reset["old_count"], reset["new_count"]) == ("bad", 300, 2)
    counts = store.delivery_counts()
    assert counts[Delivery.DELIVERED] == 400 and counts[Delivery.PENDING] == 1
    [pending] = store.punches(delivery=Delivery.PENDING)
    assert fresh is not None and pending.punch.local_time == fresh.local_time
    check_healthy(results, healthy, store)


def test_log_cleared_and_refilled_to_the_same_count_is_caught_by_the_hourly_full_read(
    terminals: Terminals, store: Store
) -> None:
    lobby = terminals(serial="REFILL01", records=0)
    lobby.add_punches(2, first=recent(1))
    cycle = make_cycle(store, [device_for("lobby", lobby)])
    assert cycle()["lobby"].downloaded
    lobby.clear_log()
    refilled = [lobby.add_punch("1003", recent(0.02)), lobby.add_punch("1001", recent(0.01), punch_state=1)]
    # Same serial, same count: the next polls within the hour cannot tell, and do not download.
    assert not cycle(60)["lobby"].downloaded
    result = cycle(3600)
    assert result["lobby"].downloaded and result["lobby"].new == 2
    stored = {s.punch.local_time for s in store.punches()}
    assert all(record is not None and record.local_time in stored for record in refilled)
    assert len(store.punches()) == 4


def test_swapped_terminal(
    terminals: Terminals, store: Store, healthy: list[tuple[FakeTerminal, DeviceConfig]]
) -> None:
    bad = terminals(serial="BEFORE01", records=0)
    bad.add_punches(120, first=recent(3))
    cycle = make_cycle(store, [device_for("bad", bad), *(d for _, d in healthy)])
    cycle()
    old_keys = terminal_keys(bad)
    bad.swap("AFTER001")
    bad.add_punches(30, first=recent(1))
    with structlog.testing.capture_logs() as logs:
        results = cycle()
        cycle()
    [swap] = events(logs, "terminal.swapped")
    assert (swap["old_serial"], swap["new_serial"]) == ("BEFORE01", "AFTER001")
    assert results["bad"].new == 30
    assert sorted(stored_keys(store, "BEFORE01")) == sorted(old_keys)
    assert_stored_exactly_once(store, bad)
    check_healthy(results, healthy, store)


def test_impossible_dates_are_quarantined_not_dropped(
    terminals: Terminals, store: Store, healthy: list[tuple[FakeTerminal, DeviceConfig]]
) -> None:
    bad = terminals(serial="BADDATE1", records=0)
    bad.add_punches(10, first=recent(1))
    bad.add_raw_record("1003", encode_time(2024, 2, 31, 7, 0, 0))
    bad.add_punches(10, first=recent(0.5))
    cycle = make_cycle(store, [device_for("bad", bad), *(d for _, d in healthy)])
    results = cycle()
    assert results["bad"].ok and results["bad"].new == 21
    [quarantined] = store.punches(delivery=Delivery.QUARANTINED)
    assert quarantined.reason == "impossible date 2024-02-31 07:00:00"
    assert quarantined.punch.check_time_ms is None
    assert_stored_exactly_once(store, bad)
    check_healthy(results, healthy, store)


def test_punch_during_download(
    terminals: Terminals, store: Store, healthy: list[tuple[FakeTerminal, DeviceConfig]]
) -> None:
    bad = terminals(serial="DURING02", records=0)
    bad.add_punches(2000, first=recent(3))
    bad.set_fault(Fault.punch_during_download("1004"))
    cycle = make_cycle(store, [device_for("bad", bad), *(d for _, d in healthy)])
    results = cycle()
    assert results["bad"].ok and results["bad"].new == 2000
    wait_for(lambda: bad.enabled and bad.record_count == 2001)
    later = cycle()
    assert later["bad"].new == 1
    assert_stored_exactly_once(store, bad)
    check_healthy(results, healthy, store)


def test_dropped_connection(
    terminals: Terminals, store: Store, healthy: list[tuple[FakeTerminal, DeviceConfig]]
) -> None:
    bad = terminals(serial="DROPPED1", records=0)
    bad.add_punches(20_000, first=recent(20))
    bad.set_fault(Fault.drop_mid_download(after_bytes=10_000, once=True))
    cycle = make_cycle(store, [device_for("bad", bad), *(d for _, d in healthy)])
    started = time.monotonic()
    results = cycle()
    assert time.monotonic() - started < 2
    assert not results["bad"].ok and results["bad"].error == "connection dropped mid-download"
    assert stored_keys(store, "DROPPED1") == []  # all or nothing
    checkpoint = store.checkpoint("bad")
    assert checkpoint is not None and checkpoint.serial is None and checkpoint.down_since is not None
    assert bad.enabled
    again = cycle((results["bad"].next_due - cycle.now).total_seconds())
    assert again["bad"].ok and again["bad"].new == 20_000
    assert_stored_exactly_once(store, bad)
    check_healthy(results, healthy, store)


def test_reply_past_the_timeout(
    terminals: Terminals, store: Store, healthy: list[tuple[FakeTerminal, DeviceConfig]]
) -> None:
    bad = terminals(serial="SLOWPOKE", records=0)
    bad.add_punches(500, first=recent(2))
    bad.set_fault(Fault.delay(1.0, command=p.CMD_READ_BUFFER, once=True))
    cycle = make_cycle(store, [device_for("bad", bad), *(d for _, d in healthy)])
    started = time.monotonic()
    results = cycle()
    assert time.monotonic() - started < 3
    assert not results["bad"].ok and results["bad"].error is not None
    assert results["bad"].error.startswith("timed out after 0.5 s")
    wait_for(lambda: bad.enabled)
    again = cycle((results["bad"].next_due - cycle.now).total_seconds())
    assert again["bad"].ok and again["bad"].new == 500
    assert_stored_exactly_once(store, bad)
    check_healthy(results, healthy, store)


def test_wrong_comm_key_then_fixed_by_reload(
    terminals: Terminals, store: Store, healthy: list[tuple[FakeTerminal, DeviceConfig]]
) -> None:
    bad = terminals(serial="LOCKED01", comm_key=2468, records=0)
    bad.add_punches(40, first=recent(2))
    wrong = device_for("bad", bad, comm_key=1357)
    cycle = make_cycle(store, [wrong, *(d for _, d in healthy)])
    with structlog.testing.capture_logs() as logs:
        results = cycle()
        second = cycle((results["bad"].next_due - cycle.now).total_seconds())
        cycle.poller.update_devices([replace(wrong, comm_key=2468), *(d for _, d in healthy)])
        fixed = cycle(0)
    assert results["bad"].error == "wrong comm key (the terminal rejected it; check comm_key)"
    assert not second["bad"].ok
    assert fixed["bad"].ok and fixed["bad"].new == 40
    assert len(events(logs, "terminal.down")) == 1
    assert len(events(logs, "terminal.recovered")) == 1
    assert_stored_exactly_once(store, bad)
    check_healthy(results, healthy, store)


def test_refused_port_down_and_recovered_logged_once(
    terminals: Terminals, store: Store, healthy: list[tuple[FakeTerminal, DeviceConfig]]
) -> None:
    bad = terminals(serial="POWERED1", records=0)
    bad.add_punches(30, first=recent(2))
    cycle = make_cycle(store, [device_for("bad", bad), *(d for _, d in healthy)])
    cycle()
    bad.power_off()
    try:
        with structlog.testing.capture_logs() as logs:
            down = cycle()
            for _ in range(3):
                cycle((down["bad"].next_due - cycle.now).total_seconds())
        assert down["bad"].error == f"connection refused at 127.0.0.1:{bad.port}"
        check_healthy(down, healthy, store)
    finally:
        bad.power_on()
    bad.add_punch("1005", recent(0.01))
    with structlog.testing.capture_logs() as more_logs:
        back = cycle(3600)
        cycle()
    logs += more_logs
    assert [e["device"] for e in events(logs, "terminal.down")] == ["bad"]
    [recovered] = events(logs, "terminal.recovered")
    assert recovered["device"] == "bad" and recovered["down_for"]
    assert back["bad"].ok and back["bad"].new == 1
    assert_stored_exactly_once(store, bad)


def test_a_restart_trusts_the_checkpoint_and_does_not_download_unchanged_logs(
    terminals: Terminals, store: Store
) -> None:
    lobby = terminals(serial="RESTART1", records=0)
    lobby.add_punches(50, first=recent(1))
    assert make_cycle(store, [device_for("lobby", lobby)])()["lobby"].downloaded
    restarted = make_cycle(store, [device_for("lobby", lobby)])  # a new process, same store
    assert not restarted()["lobby"].downloaded
    assert restarted(3600)["lobby"].downloaded  # the hourly full read still comes


def test_a_terminal_still_down_after_a_restart_is_logged_down_once_more(
    terminals: Terminals, store: Store
) -> None:
    bad = terminals(serial="STILLDN1", records=0)
    cycle = make_cycle(store, [device_for("bad", bad)])
    cycle()
    bad.power_off()
    try:
        with structlog.testing.capture_logs() as before:
            cycle()
        restarted = make_cycle(store, [device_for("bad", bad)])  # a new process: its journal must say it too
        with structlog.testing.capture_logs() as after:
            first = restarted()
            restarted((first["bad"].next_due - restarted.now).total_seconds())
    finally:
        bad.power_on()
    assert len(events(before, "terminal.down")) == 1
    assert len(events(after, "terminal.down")) == 1
