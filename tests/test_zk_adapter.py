"""The pyzk adapter against the fake terminal over real TCP/UDP on 127.0.0.1: reads, the no-download
path, the digest shortcut, and every fault turned into one clear TerminalError."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import structlog
from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401

from zkdingsync.config.objects import DeviceConfig
from zkdingsync.devices import guard as guard_module
from zkdingsync.devices import session as session_module
from zkdingsync.devices import zk
from zkdingsync.devices.records import encode_time
from zkdingsync.errors import TerminalError
from zkdingsync.simulator import FakeTerminal, Fault
from zkdingsync.simulator import protocol as p

Terminals = Callable[..., FakeTerminal]
TIMEOUT = 0.5


def device_for(terminal: FakeTerminal, **changes: object) -> DeviceConfig:
    base = DeviceConfig(name="lobby", host="127.0.0.1", port=terminal.port, timezone=terminal.spec.timezone)
    return replace(base, **changes)  # type: ignore[arg-type]


def full_read(device: DeviceConfig, timeout: float = TIMEOUT, **kwargs: object) -> zk.LogRead:
    return zk.read_log(device, timeout, known=zk.KnownLog.NOTHING, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ reads


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize(("record_size", "user_table_size"), [(8, 28), (16, 28), (40, 72), (49, 72)])
def test_full_read_matches_the_terminal(
    terminals: Terminals, record_size: int, user_table_size: int, protocol: str
) -> None:
    terminal = terminals(
        serial=f"SN{record_size}{protocol}",
        record_size=record_size,
        user_table_size=user_table_size,
        users=25,
        records=3000,
    )
    read = full_read(device_for(terminal, protocol=protocol))
    assert read.downloaded
    assert read.record_size == record_size
    assert read.first_index == 0
    assert read.records == terminal.records
    assert read.records[0].enroll_number == "1001"  # 8-byte records resolved through the user table
    state = read.state
    assert (state.serial, state.record_count, state.users) == (terminal.serial, 3000, 25)
    assert (state.record_capacity, state.user_capacity) == (
        terminal.spec.capacity,
        terminal.spec.user_capacity,
    )
    assert state.info is not None and state.info.firmware == terminal.spec.firmware
    assert state.drift_seconds is not None and abs(state.drift_seconds) < 3
    assert read.digest is not None and read.digest.record_count == 3000
    assert terminal.enabled
    wait_for(lambda: terminal.active_sessions == 0)


def test_unchanged_log_is_not_downloaded(terminals: Terminals) -> None:
    terminal = terminals(serial="NOCHANGE", records=500)
    device = device_for(terminal)
    first = full_read(device)
    buffers = terminal.command_count(p.CMD_PREPARE_BUFFER)
    disables = terminal.command_count(p.CMD_DISABLEDEVICE)
    again = zk.read_log(
        device, TIMEOUT, known=zk.KnownLog(serial=first.state.serial, count=first.state.record_count)
    )
    assert not again.downloaded
    assert again.records == []
    assert again.state.record_count == 500
    assert terminal.command_count(p.CMD_PREPARE_BUFFER) == buffers
    assert terminal.command_count(p.CMD_DISABLEDEVICE) == disables


def test_full_log_is_read_even_when_the_count_did_not_move(terminals: Terminals) -> None:
    # A full terminal that rotates its log keeps the count constant: the count proves nothing then.
    terminal = terminals(serial="FULL0001", capacity=300, records=300)
    device = device_for(terminal)
    first = full_read(device)
    again = zk.read_log(device, TIMEOUT, known=zk.KnownLog(serial=first.state.serial, count=300))
    assert again.downloaded and len(again.records) == 300


def test_digest_skips_the_unchanged_prefix(terminals: Terminals) -> None:
    terminal = terminals(serial="DIGEST01", records=1000)
    device = device_for(terminal)
    first = full_read(device)
    new = terminal.add_punch("1003", "2024-06-01 09:00:00")
    read = zk.read_log(device, TIMEOUT, known=zk.KnownLog(serial="DIGEST01", count=1000, digest=first.digest))
    assert read.downloaded
    assert read.first_index == 1000
    assert read.records == [new]
    assert read.state.record_count == 1001
    # The digest of this read covers the whole log: a full read gives the same one.
    assert read.digest == full_read(device).digest


def test_digest_mismatch_parses_everything(terminals: Terminals) -> None:
    terminal = terminals(serial="DIGEST02", records=100)
    device = device_for(terminal)
    first = full_read(device)
    assert first.digest is not None
    forged = replace(first.digest, digest=bytes(16))
    terminal.add_punch("1002", "2024-06-01 09:00:00")
    read = zk.read_log(device, TIMEOUT, known=zk.KnownLog(serial="DIGEST02", count=100, digest=forged))
    assert read.first_index == 0
    assert read.records == terminal.records


def test_cleared_log_is_noticed_by_its_count(terminals: Terminals) -> None:
    terminal = terminals(serial="CLEAR001", records=200)
    device = device_for(terminal)
    first = full_read(device)
    terminal.clear_log()
    after = terminal.add_punch("1004", "2024-06-02 09:00:00")
    read = zk.read_log(device, TIMEOUT, known=zk.KnownLog(serial="CLEAR001", count=200, digest=first.digest))
    assert read.downloaded and read.first_index == 0
    assert read.records == [after]


def test_empty_log(terminals: Terminals) -> None:
    terminal = terminals(serial="EMPTY001", records=0)
    read = full_read(device_for(terminal))
    assert read.downloaded and read.records == [] and read.record_size is None
    assert terminal.command_count(p.CMD_PREPARE_BUFFER) == 0


def test_inline_buffer_replies(terminals: Terminals) -> None:
    terminal = terminals(serial="INLINE01", records=5, inline_buffers=True)
    assert full_read(device_for(terminal)).records == terminal.records


def test_comm_key(terminals: Terminals) -> None:
    terminal = terminals(serial="KEY00001", comm_key=123456, records=10)
    assert len(full_read(device_for(terminal, comm_key=123456)).records) == 10
    with pytest.raises(TerminalError, match="wrong comm key") as caught:
        full_read(device_for(terminal, comm_key=654321))
    assert caught.value.device == "lobby"


def test_read_info_and_set_time(terminals: Terminals) -> None:
    terminal = terminals(serial="INFO0001", records=42, clock_offset_seconds=-3600)
    device = device_for(terminal)
    state = zk.read_info(device, TIMEOUT)
    assert (state.serial, state.firmware, state.platform) == (
        "INFO0001",
        terminal.spec.firmware,
        terminal.spec.platform,
    )
    assert state.record_count == 42
    assert state.drift_seconds is not None and abs(state.drift_seconds + 3600) < 3
    zk.set_time(device, TIMEOUT, at=datetime.now(timezone.utc))
    assert abs(zk.read_info(device, TIMEOUT).drift_seconds or 99) < 3  # type: ignore[operator]


# ----------------------------------------------------------------------------------------- faults


def test_drop_mid_download_fails_cleanly_within_the_timeout(terminals: Terminals) -> None:
    """pyzk 0.9 alone spins forever here (see the next test); through the adapter it fails at once,
    and the terminal it had disabled is enabled again over a new connection."""
    terminal = terminals(serial="DROP0001", records=20_000)
    terminal.set_fault(Fault.drop_mid_download(after_bytes=5000, once=True))
    started = time.monotonic()
    with pytest.raises(TerminalError, match="connection dropped mid-download"):
        full_read(device_for(terminal), timeout=2.0)
    assert time.monotonic() - started < 2.0
    assert terminal.enabled
    # Nothing partial came out, and the next poll reads everything.
    assert len(full_read(device_for(terminal)).records) == 20_000


def test_pyzk_alone_hangs_on_a_drop_mid_download(terminals: Terminals) -> None:
    """The trap the adapter closes: unguarded pyzk never returns (its raw receive loop spins on b'')."""
    terminal = terminals(serial="DROP0002", records=20_000)
    terminal.set_fault(Fault.drop_mid_download(after_bytes=5000))
    code = (
        "import sys\nfrom zk import ZK\n"
        f"z = ZK('127.0.0.1', port={terminal.port}, timeout=1, ommit_ping=True)\n"
        "z.connect()\nz.read_with_buffer(13)\nprint('returned')\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=1.5, check=False)


def test_drop_mid_download_over_udp_times_out(terminals: Terminals) -> None:
    terminal = terminals(serial="DROP0003", records=5000)
    terminal.set_fault(Fault.drop_mid_download(after_bytes=2000, once=True))
    with pytest.raises(TerminalError, match=r"timed out after 0\.5 s"):
        full_read(device_for(terminal, protocol="udp"))
    wait_for(lambda: terminal.enabled)


def test_reply_past_the_timeout_then_a_fresh_session_works(terminals: Terminals) -> None:
    terminal = terminals(serial="SLOW0001", records=50)
    terminal.set_fault(Fault.delay(1.0, command=p.CMD_GET_TIME, once=True))
    started = time.monotonic()
    with pytest.raises(TerminalError, match=r"timed out after 0.5 s waiting for 127.0.0.1:\d+"):
        full_read(device_for(terminal))
    assert time.monotonic() - started < 1.0
    # The late reply went to the discarded session; a new one is not desynchronised.
    assert full_read(device_for(terminal)).records == terminal.records


def test_slow_download_still_re_enables_the_terminal(terminals: Terminals) -> None:
    terminal = terminals(serial="SLOW0002", records=500)
    terminal.set_fault(Fault.delay(0.8, command=p.CMD_READ_BUFFER, once=True))
    with pytest.raises(TerminalError, match="timed out"):
        full_read(device_for(terminal))
    wait_for(lambda: terminal.enabled)


def test_refused_port_tcp_and_udp(terminals: Terminals) -> None:
    terminal = terminals(serial="OFF00001", records=5)
    terminal.power_off()
    try:
        for protocol in ("tcp", "udp"):
            with pytest.raises(TerminalError) as caught:
                full_read(device_for(terminal, protocol=protocol))
            assert caught.value.reason == f"connection refused at 127.0.0.1:{terminal.port}"
    finally:
        terminal.power_on()
    assert len(full_read(device_for(terminal)).records) == 5


def test_terminal_that_closes_at_once(terminals: Terminals) -> None:
    terminal = terminals(serial="REFUSE01")
    terminal.set_fault(Fault.refuse())
    with pytest.raises(TerminalError, match="connection closed by the terminal"):
        full_read(device_for(terminal))


def test_unreachable_host_name() -> None:
    device = DeviceConfig(name="ghost", host="no-such-terminal.invalid", port=4370)
    with pytest.raises(TerminalError, match="cannot resolve host name"):
        full_read(device)


@pytest.mark.parametrize(
    "host", ["1.2.3.4; rm -rf /", "$(reboot)", "-c1 127.0.0.1", "a..b", "", "x" * 300, "bad_host"]
)
def test_hosts_that_are_not_hosts_are_rejected(host: str) -> None:
    with pytest.raises(ValueError, match=r"^host "):
        zk.validate_host(host)
    with pytest.raises(TerminalError, match="host "):
        full_read(DeviceConfig(name="bad", host=host, port=4370))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "terminal-1.office.lan", "gate", "fe80::1"])
def test_good_hosts_pass(host: str) -> None:
    assert zk.validate_host(host) == host


@pytest.mark.parametrize(
    "command",
    [None, p.CMD_GET_FREE_SIZES, p.CMD_OPTIONS_RRQ, p.CMD_PREPARE_BUFFER, p.CMD_READ_BUFFER, p.CMD_CONNECT],
)
@pytest.mark.parametrize("raw", [False, True])
def test_garbage_gives_one_clear_error_and_no_hang(
    terminals: Terminals, command: int | None, raw: bool
) -> None:
    terminal = terminals(serial="GARBAGE1", records=3000)
    terminal.set_fault(Fault.garbage(command=command, raw=raw))
    started = time.monotonic()
    with pytest.raises(TerminalError) as caught:
        full_read(device_for(terminal))
    assert caught.value.reason  # one line an admin reads, never a library traceback
    assert "\n" not in caught.value.reason
    assert time.monotonic() - started < 5
    terminal.clear_faults()
    wait_for(lambda: terminal.enabled)
    assert len(full_read(device_for(terminal)).records) == 3000


def test_punch_during_download_is_held_back_by_disabling(terminals: Terminals) -> None:
    terminal = terminals(serial="DURING01", records=400)
    terminal.set_fault(Fault.punch_during_download("1005"))
    read = full_read(device_for(terminal))
    # The terminal was disabled: the punch waited and landed after ENABLEDEVICE, not inside the read.
    assert len(read.records) == 400 and read.state.record_count == 400
    assert terminal.enabled and terminal.record_count == 401
    again = zk.read_log(
        device_for(terminal), TIMEOUT, known=zk.KnownLog(serial="DURING01", count=400, digest=read.digest)
    )
    assert [r.enroll_number for r in again.records] == ["1005"]


def test_log_that_moves_under_a_disabled_terminal_is_read_again(terminals: Terminals) -> None:
    """A terminal that ignores DISABLEDEVICE: a record appears between the size query and the
    snapshot. The count read after the download gives it away and the download is repeated."""
    terminal = terminals(serial="MOVING01", records=400)
    # Hold PREPARE_BUFFER back long enough for the watcher to slip a record in first.
    terminal.set_fault(Fault.delay(0.3, command=p.CMD_PREPARE_BUFFER, once=True))
    sizes_before = terminal.command_count(p.CMD_GET_FREE_SIZES)

    def slip_in() -> None:
        # The second GET_FREE_SIZES of the session is the one made under DISABLEDEVICE.
        wait_for(lambda: terminal.command_count(p.CMD_GET_FREE_SIZES) >= sizes_before + 2)
        terminal.add_raw_record("1006", encode_time(2024, 6, 3, 9, 0, 0))

    watcher = threading.Thread(target=slip_in)
    watcher.start()
    with structlog.testing.capture_logs() as logs:
        read = full_read(device_for(terminal), timeout=2.0)
    watcher.join()
    assert [entry["event"] for entry in logs].count("terminal.log_moved") == 1
    assert read.state.record_count == 401 == len(read.records)
    assert read.records[-1].enroll_number == "1006"


def test_cancel_abandons_a_session_and_still_re_enables(terminals: Terminals) -> None:
    terminal = terminals(serial="CANCEL01", records=500)
    terminal.set_fault(Fault.delay(3.0, command=p.CMD_READ_BUFFER, once=True))
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(zk.TerminalCancelled, match="cancelled"):
        full_read(device_for(terminal), timeout=10.0, cancel=cancel)
    # Abandoned within a slice of the cancel, plus at most the short clean-up budget.
    assert time.monotonic() - started < 3.0
    wait_for(lambda: terminal.enabled, timeout=5)


# ------------------------------------------------------------------------------ the guarded socket


def guarded(**kwargs: object) -> tuple[guard_module.GuardedSocket, socket.socket]:
    ours, theirs = socket.socketpair()
    options: dict[str, object] = {"timeout": 1.0, "deadline": time.monotonic() + 5, "cancel": None, **kwargs}
    return guard_module.GuardedSocket(ours, **options), theirs  # type: ignore[arg-type]


def test_guard_turns_end_of_file_into_an_error() -> None:
    guard, peer = guarded()
    peer.sendall(b"abc")
    peer.close()
    assert guard.recv(100) == b"abc"
    with pytest.raises(ConnectionError):
        guard.recv(100)
    assert guard.peer_closed
    guard.close()


def test_guard_caps_the_bytes_a_download_may_bring() -> None:
    guard, peer = guarded()
    guard.allow_bytes(10)
    peer.sendall(b"x" * 64)
    with pytest.raises(ConnectionError, match="more data"):
        guard.recv(64)
    guard.close()
    peer.close()


def test_guard_enforces_the_session_deadline() -> None:
    guard, peer = guarded(deadline=time.monotonic() + 0.2, timeout=10.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        while True:  # a terminal dripping a byte at a time never trips the per-reply timeout
            peer.sendall(b"x")
            guard.recv(1)
    assert time.monotonic() - started < 1.0
    guard.close()
    peer.close()


def test_guard_reply_timeout() -> None:
    guard, peer = guarded(timeout=0.2)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        guard.recv(10)
    assert 0.15 < time.monotonic() - started < 1.0
    guard.close()
    peer.close()


def test_translate_names_the_place() -> None:
    device = DeviceConfig(name="gate", host="10.0.0.5", port=4370)
    session = session_module.Session(device, 10.0, 120.0, None)
    assert session.translate(ConnectionRefusedError()) == "connection refused at 10.0.0.5:4370"
    assert session.translate(TimeoutError()) == "timed out after 10 s waiting for 10.0.0.5:4370"
    session.downloading = True
    assert session.translate(ConnectionResetError()) == "connection dropped mid-download"


def test_terminal_state_drift_sign() -> None:
    read_at = datetime(2024, 5, 6, tzinfo=timezone.utc)
    state = zk.TerminalState("S", 0, 0, 0, 0, "", read_at + timedelta(seconds=90), read_at)
    assert state.drift_seconds == 90.0
