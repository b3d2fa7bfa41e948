"""Tail reads of the terminal adapter against the fake terminal: only what is new is read, and every case
where the stored last record is not where it should be falls back to a whole-log read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture  # noqa: F401

from zkdingsync.config.objects import DeviceConfig
from zkdingsync.devices import zk
from zkdingsync.errors import TerminalError
from zkdingsync.simulator import FakeTerminal, Fault
from zkdingsync.simulator import protocol as p

Terminals = Callable[..., FakeTerminal]
TIMEOUT = 2.0


def device_for(terminal: FakeTerminal, **changes: object) -> DeviceConfig:
    base = DeviceConfig(name="lobby", host="127.0.0.1", port=terminal.port, timezone=terminal.spec.timezone)
    return replace(base, **changes)  # type: ignore[arg-type]


def read_after(device: DeviceConfig, before: zk.LogRead, **kwargs: object) -> zk.LogRead:
    """The next poll's read, knowing what `before` stored."""
    return zk.read_log(
        device,
        TIMEOUT,
        known=zk.KnownLog(serial=before.state.serial, count=before.state.record_count, tail=before.tail),
        **kwargs,  # type: ignore[arg-type]
    )


def first_read(terminal: FakeTerminal, **changes: object) -> tuple[DeviceConfig, zk.LogRead]:
    device = device_for(terminal, **changes)
    read = zk.read_log(device, TIMEOUT, known=zk.KnownLog.NOTHING)
    assert read.full and read.records == terminal.records
    return device, read


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize("grow", [1, 10_000])
def test_growth_reads_only_the_new_records(terminals: Terminals, grow: int, protocol: str) -> None:
    terminal = terminals(serial=f"GROW{grow}{protocol}", records=3000, capacity=20_000)
    device, before = first_read(terminal, protocol=protocol)
    terminal.add_punches(grow)
    read = read_after(device, before)
    assert not read.full and read.offset_reads is True
    assert read.records == terminal.records[3000:]
    assert read.first_index == 3000
    assert read.log_bytes == (grow + 1) * 40  # the new records and the one-record overlap
    assert read.tail is not None and read.tail.record_count == 3000 + grow
    assert terminal.enabled


@pytest.mark.parametrize("refill", [2000, 4000])
def test_a_log_cleared_and_refilled_is_read_whole(terminals: Terminals, refill: int) -> None:
    terminal = terminals(serial=f"REFILL{refill}", records=3000)
    device, before = first_read(terminal)
    terminal.clear_log()
    terminal.add_punches(refill, first="2025-03-01 08:00:00")
    read = read_after(device, before)
    assert read.full
    assert read.records == terminal.records


def test_an_overlap_mismatch_falls_back_to_a_whole_read(terminals: Terminals) -> None:
    terminal = terminals(serial="EDITED01", records=500)
    device, before = first_read(terminal)
    assert before.tail is not None
    edited = replace(before.tail, last_record=bytes(40))  # the store's last record is not on the terminal
    terminal.add_punch("1001")
    read = zk.read_log(device, TIMEOUT, known=zk.KnownLog(serial="EDITED01", count=500, tail=edited))
    assert read.full and read.records == terminal.records
    assert read.offset_reads is None  # nothing learned against the firmware


def test_a_full_refusing_log_reads_one_record(terminals: Terminals) -> None:
    terminal = terminals(serial="REFUSE01", records=2000, capacity=2000)
    device, before = first_read(terminal)
    assert terminal.add_punch("1001") is None  # refused: the log is full
    read = read_after(device, before)
    assert not read.downloaded and read.log_bytes == 40
    assert read.tail == before.tail


@pytest.mark.parametrize(("punches", "whole"), [(1, False), (5, False), (2000, True)])
def test_a_rotating_full_log_yields_what_follows_the_stored_record(
    terminals: Terminals, punches: int, whole: bool
) -> None:
    terminal = terminals(serial=f"ROTATE{punches}", records=3000, capacity=3000, overwrite_when_full=True)
    device, before = first_read(terminal)
    unchanged = read_after(device, before)
    assert not unchanged.downloaded and unchanged.log_bytes == 40
    for _ in range(punches):
        terminal.add_punch("1002")
    read = read_after(device, before)
    assert read.state.record_count == 3000
    if whole:  # 2,000 records are more than the bounded tail search: read whole, nothing lost
        assert read.full and read.records == terminal.records
    else:
        assert not read.full and read.records == terminal.records[-punches:]
        assert read.log_bytes <= 64 * 1024


@pytest.mark.parametrize("behaviour", ["ignore", "whole", "error"])
def test_firmware_without_offset_reads_is_detected_and_read_whole(
    terminals: Terminals, behaviour: str
) -> None:
    terminal = terminals(serial=f"NOOFS{behaviour[:3]}", records=3000, offset_reads=behaviour)
    device, before = first_read(terminal)
    terminal.add_punches(3)
    read = read_after(device, before)
    assert read.full and read.records == terminal.records
    assert read.offset_reads is False and read.offset_problem
    assert terminal.enabled
    assert zk.probe_offset_reads(device, TIMEOUT).startswith("no (")


def test_probe_reports_offset_reads(terminals: Terminals) -> None:
    terminal = terminals(serial="PROBEOFS", records=10)
    assert zk.probe_offset_reads(device_for(terminal), TIMEOUT) == "yes"
    empty = terminals(serial="PROBEEMP")
    assert zk.probe_offset_reads(device_for(empty), TIMEOUT).startswith("untested")


def test_an_absurd_record_count_is_refused_before_any_download(terminals: Terminals) -> None:
    terminal = terminals(serial="CLAIM001", records=10)
    terminal.set_fault(Fault.claim_records(2_000_000_000))
    with pytest.raises(TerminalError) as raised:
        zk.read_log(device_for(terminal), TIMEOUT, known=zk.KnownLog.NOTHING)
    assert "2,000,000,000 records" in raised.value.reason
    assert terminal.command_count(p.CMD_PREPARE_BUFFER) == 0
    assert terminal.enabled


def test_a_count_above_capacity_is_refused(terminals: Terminals) -> None:
    terminal = terminals(serial="OVERCAP1", records=10, capacity=10)
    terminal.add_raw_record("1001", 782550489)  # bypasses the capacity: 11 records in a 10-record log
    with pytest.raises(TerminalError, match="more than its capacity of 10"):
        zk.read_log(device_for(terminal), TIMEOUT, known=zk.KnownLog.NOTHING)
