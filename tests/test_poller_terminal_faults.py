"""Terminal-side faults the other poller tests do not reach: 8-byte logs whose user table changes,
full logs, slow terminals holding workers, and pyzk internals failing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401

from zkdingsync.config.objects import DeviceConfig, PollConfig
from zkdingsync.model import TerminalUser
from zkdingsync.poller import Poller, PollResult
from zkdingsync.simulator import FakeTerminal
from zkdingsync.store import Store

POLL = PollConfig(
    interval_seconds=60,
    timeout_seconds=0.5,
    max_concurrency=4,
    backoff_max_seconds=600,
    future_tolerance_seconds=600,
    drift_threshold_seconds=60,
)
ZONE = ZoneInfo("Asia/Shanghai")
Key = tuple[str, str, str, int, int]


def recent(days: float) -> str:
    return (datetime.now(ZONE) - timedelta(days=days)).strftime("%Y-%m-%d %H:%M:%S")


def device_for(name: str, terminal: FakeTerminal, **changes: Any) -> DeviceConfig:
    return replace(
        DeviceConfig(name=name, host="127.0.0.1", port=terminal.port, timezone="Asia/Shanghai"), **changes
    )


def stored_keys(store: Store) -> list[Key]:
    return sorted(
        (s.punch.serial, s.punch.enroll_number, s.punch.local_time, s.punch.punch_state, s.punch.verify_mode)
        for s in store.punches()
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zk.db") as opened:
        yield opened


class Cycle:
    """A poller driven through schedule time without waiting; `restart()` is a new process."""

    def __init__(self, store: Store, devices: list[DeviceConfig]) -> None:
        self.store = store
        self.devices = devices
        self.poller = Poller(devices, store, poll=POLL, jitter=lambda: 0.0)
        self.now = datetime.now(timezone.utc) - timedelta(seconds=60)

    def __call__(self, seconds: float = 60) -> dict[str, PollResult]:
        self.now += timedelta(seconds=seconds)
        return {result.device: result for result in self.poller.poll_due(self.now)}

    def restart(self) -> None:
        self.poller.close()
        self.poller = Poller(self.devices, self.store, poll=POLL, jitter=lambda: 0.0)


# ------------------------------------------------------------------ 8-byte logs and the user table


def test_eight_byte_log_deleted_user_is_not_stored_again_after_restart(terminals: Any, store: Store) -> None:
    terminal = terminals(serial="UID0000001", record_size=8, user_table_size=28, users=3, records=0)
    terminal.add_punches(6, first=recent(1))
    cycle = Cycle(store, [device_for("gate", terminal)])
    assert cycle()["gate"].new == 6
    before = stored_keys(store)
    assert {key[1] for key in before} == {"1001", "1002", "1003"}

    # The admin deletes user 1002 at the terminal; its punches stay in the log under uid 2.
    terminal.set_users([user for user in terminal.users if user.uid != 2])
    cycle.restart()  # a new process reads the whole log again
    result = cycle()["gate"]
    assert result.ok and result.new == 0, result
    assert stored_keys(store) == before


def test_eight_byte_log_reassigned_uid_keeps_old_punches_and_names_new_ones(
    terminals: Any, store: Store
) -> None:
    terminal = terminals(serial="UID0000002", record_size=8, user_table_size=28, users=3, records=0)
    terminal.add_punches(6, first=recent(2))
    cycle = Cycle(store, [device_for("gate", terminal)])
    assert cycle()["gate"].new == 6
    before = stored_keys(store)

    # uid 2 goes to a new employee 2002; the old punches under uid 2 were 1002's.
    terminal.set_users([u if u.uid != 2 else TerminalUser(2, "2002", "New") for u in terminal.users])
    cycle.restart()
    assert cycle()["gate"].new == 0
    assert stored_keys(store) == before

    punch = terminal.add_punch("2002", recent(0.01))
    assert punch is not None and punch.uid == 2
    result = cycle()["gate"]
    assert result.new == 1, result
    after = stored_keys(store)
    assert set(after) - set(before) == {("UID0000002", "2002", punch.local_time, 0, 1)}

    cycle.restart()  # and again after a restart: every punch keeps the enroll number it was stored with
    assert cycle()["gate"].new == 0
    assert stored_keys(store) == after


def test_unreadable_uid_memo_starts_afresh() -> None:
    from zkdingsync.store import UidNames

    for text in (None, "", "{", "[]", '{"periods": {"x": 1}, "last": {}}', '{"periods": {}}'):
        names = UidNames.load(text)
        assert names.periods == {} and names.last == {}
    names = UidNames({}, {})
    from zkdingsync.model import AttendanceRecord

    names.resolve([AttendanceRecord("7", "2024-01-01 08:00:00", 1, 0, 0, 7)], {})
    again = UidNames.load(names.dump())
    assert again.periods == {7: [("7", "")]} and again.last == {7: "2024-01-01 08:00:00"}


# ------------------------------------------------------------------------------ pyzk internals


@pytest.mark.parametrize("attribute", ["_ZK__send_command", "get_serialnumber", "_ZK__read_chunk"])
def test_pyzk_internals_missing_is_a_terminal_error(
    terminals: Any, monkeypatch: pytest.MonkeyPatch, attribute: str
) -> None:
    import zk

    from zkdingsync.devices.zk import KnownLog, read_log
    from zkdingsync.errors import TerminalError

    terminal = terminals(serial="PYZK000001", record_size=40, users=2, records=3)
    monkeypatch.delattr(zk.ZK, attribute)
    with pytest.raises(TerminalError) as caught:
        read_log(device_for("gate", terminal), 0.5, known=KnownLog.NOTHING)
    assert "pyzk" in caught.value.reason
    monkeypatch.undo()
    wait_for(lambda: terminal.enabled)


# ------------------------------------------------------------------------------------ a full log


def test_full_log_is_checked_at_its_end_every_poll_warned_once_and_nothing_stored_twice(
    terminals: Any, store: Store
) -> None:
    import structlog

    terminal = terminals(serial="FULL000001", record_size=16, user_table_size=28, users=5, capacity=20)
    terminal.add_punches(20, first=recent(1))
    cycle = Cycle(store, [device_for("gate", terminal)])
    with structlog.testing.capture_logs() as logs:
        first = cycle()["gate"]
        assert first.ok and first.new == 20 and first.downloaded
        assert terminal.add_punch("1001") is None  # the terminal refuses punches now
        second = cycle()["gate"]
        # The count says nothing about a full log (it may rotate): its last record is read, and it is
        # still the one stored, so nothing is new.
        assert second.ok and not second.downloaded and second.new == 0
    full = [entry for entry in logs if entry["event"] == "terminal.log_full"]
    assert len(full) == 1 and full[0]["log_level"] == "warning", logs
    assert full[0]["records"] == 20 and full[0]["capacity"] == 20

    terminal.clear_log()
    with structlog.testing.capture_logs() as logs:
        assert cycle()["gate"].ok
    assert [entry["event"] for entry in logs].count("terminal.log_full") == 0
    assert len(stored_keys(store)) == 20


# ---------------------------------------------------------------------- slow terminals and the pool


class SlowReader:
    """A reader whose "slow" terminals answer each poll just under the timeout (their worker's timer
    jumps ahead by 0.9 timeout), and can be made to hang on a gate; healthy ones answer at once."""

    def __init__(self, slow: set[str], timer: Any) -> None:
        import threading

        self.slow = slow
        self.timer = timer
        self.gate = threading.Event()
        self.hanging = False
        self.started: list[str] = []

    def read_log(self, device: Any, **kwargs: Any) -> Any:
        from zkdingsync.devices.zk import LogRead, TerminalState

        self.started.append(device.name)
        if device.name in self.slow:
            self.timer.advance(kwargs["timeout_seconds"] * 0.9 * 10)  # ten replies, each just in time
            if self.hanging:
                self.gate.wait(30)
        read_at = kwargs["now"]()
        state = TerminalState("S-" + device.name, 0, 100, 0, 1000, "", read_at, read_at)
        return LogRead(state=state, downloaded=kwargs["known"].count != 0)

    def set_time(self, device: Any, **kwargs: Any) -> None:
        raise AssertionError("not used")


class ThreadTimer:
    """time.monotonic per worker thread: a slow reply moves only its own worker's timer."""

    def __init__(self) -> None:
        import threading

        self.local = threading.local()

    def __call__(self) -> float:
        return float(getattr(self.local, "t", 0.0))

    def advance(self, seconds: float) -> None:
        self.local.t = self() + seconds


def test_slow_terminals_cannot_take_every_worker(store: Store) -> None:
    names = [f"slow{i}" for i in range(4)] + [f"ok{i}" for i in range(4)]
    devices = [DeviceConfig(name=name, host="127.0.0.1", port=4370 + i) for i, name in enumerate(names)]
    timer = ThreadTimer()
    reader = SlowReader({name for name in names if name.startswith("slow")}, timer)
    t0 = datetime(2024, 5, 6, tzinfo=timezone.utc)
    poller = Poller(devices, store, poll=POLL, clock=lambda: t0, reader=reader, timer=timer)
    assert all(result.ok for result in poller.poll_due(t0))  # four workers; each slow poll took 4.5 s

    # Next round the slow terminals hang: at most half the workers may go to them, so the healthy
    # terminals are polled while they hang.
    reader.hanging = True
    reader.started.clear()
    import threading

    done: list[PollResult] = []
    runner = threading.Thread(target=lambda: done.extend(poller.poll_due(t0 + timedelta(minutes=1))))
    runner.start()
    try:
        wait_for(lambda: {f"ok{i}" for i in range(4)} <= set(reader.started))
        assert sum(name.startswith("slow") for name in reader.started) <= 2
    finally:
        reader.gate.set()
        runner.join(30)
    assert sorted(result.device for result in done) == sorted(names)
    poller.close()


def test_terminal_changed_by_a_reload_during_its_poll_is_polled_again(store: Store) -> None:
    import threading

    device = DeviceConfig(name="slow0", host="127.0.0.1", port=4370)
    timer = ThreadTimer()
    reader = SlowReader({"slow0"}, timer)
    reader.hanging = True
    t0 = datetime(2024, 5, 6, tzinfo=timezone.utc)
    poller = Poller([device], store, poll=POLL, clock=lambda: t0, reader=reader, timer=timer)
    runner = threading.Thread(target=poller.poll_due)
    runner.start()
    wait_for(lambda: reader.started == ["slow0"])
    poller.update_devices([replace(device, timezone="Europe/Berlin")])  # changed while in flight
    assert poller.poll_due(t0) == []  # never two sessions to one terminal
    reader.gate.set()
    runner.join(30)
    [again] = poller.poll_due(t0)  # the changed terminal was due at once, so it is polled now
    assert again.device == "slow0" and again.ok
    poller.close()


@pytest.mark.parametrize("record_size", [8, 40])
def test_full_log_that_overwrites_its_oldest_loses_nothing_and_stores_nothing_twice(
    terminals: Any, store: Store, record_size: int
) -> None:
    terminal = terminals(
        serial=f"ROT{record_size:07d}",
        record_size=record_size,
        user_table_size=28 if record_size == 8 else 72,
        users=5,
        capacity=10,
        overwrite_when_full=True,
    )
    terminal.add_punches(10, first=recent(1))
    cycle = Cycle(store, [device_for("gate", terminal)])
    assert cycle()["gate"].new == 10
    seen = set(stored_keys(store))
    base = datetime.now(ZONE).replace(tzinfo=None) - timedelta(hours=2)
    for round_ in range(3):
        made = [
            terminal.add_punch(
                "1002", (base + timedelta(minutes=round_ * 10 + i)).strftime("%Y-%m-%d %H:%M:%S")
            )
            for i in range(3)
        ]
        assert all(made) and terminal.record_count == 10  # the count stays put
        result = cycle()["gate"]
        assert result.ok and result.new == 3, result
        keys = set(stored_keys(store))
        assert seen < keys and len(keys) == len(seen) + 3
        seen = keys
    cycle.restart()
    assert cycle()["gate"].new == 0


def test_close_waits_for_polls_on_a_pool_retired_by_a_reload(store: Store) -> None:
    import threading

    devices = [DeviceConfig(name="slow0", host="127.0.0.1", port=4370)]
    timer = ThreadTimer()
    reader = SlowReader({"slow0"}, timer)
    reader.hanging = True
    t0 = datetime(2024, 5, 6, tzinfo=timezone.utc)
    poller = Poller(devices, store, poll=POLL, clock=lambda: t0, reader=reader, timer=timer)
    runner = threading.Thread(target=poller.poll_due)
    runner.start()
    wait_for(lambda: reader.started == ["slow0"])
    more = [DeviceConfig(name=f"ok{i}", host="127.0.0.1", port=4400 + i) for i in range(3)]
    poller.update_devices([*devices, *more])  # a bigger pool; the old one retires with the poll in it
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (poller.close(), closed.set()))
    closer.start()
    assert not closed.wait(0.2), "close() returned while a poll was still using the store"
    reader.gate.set()
    closer.join(30)
    runner.join(30)
    assert closed.is_set()


def test_a_garbled_future_date_does_not_freeze_a_uids_name() -> None:
    from zkdingsync.model import AttendanceRecord
    from zkdingsync.store import UidNames

    names = UidNames({}, {})
    horizon = "2024-05-07 08:00:00"
    old = AttendanceRecord("1002", "2024-05-01 08:00:00", 1, 0, 0, 2)
    garbled = AttendanceRecord("1002", "2133-12-31 23:59:59", 1, 0, 0, 2)
    assert [r.enroll_number for r in names.resolve([old, garbled], {2: "1002"}, horizon)] == ["1002", "1002"]
    assert names.last == {2: "2024-05-01 08:00:00"}
    # uid 2 now belongs to 2002, who punches: a new punch, not history behind the garbled date.
    new = AttendanceRecord("2002", "2024-05-06 09:00:00", 1, 0, 0, 2)
    resolved = names.resolve([old, garbled, new], {2: "2002"}, horizon)
    assert [r.enroll_number for r in resolved] == ["1002", "2002", "2002"]
