"""The fake terminal, driven by the unmodified pyzk 0.9 client (TCP and UDP) and by our own client."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401
from zk import ZK, const
from zk.exception import ZKErrorResponse
from zkclient import ATTENDANCE_TABLE, USER_TABLE, MiniZkClient

from zkdingsync.devices.records import parse_attendance_buffer, parse_user_table
from zkdingsync.model import AttendanceRecord, TerminalUser
from zkdingsync.simulator import FakeTerminal, Simulator, TerminalSpec
from zkdingsync.simulator import protocol as p

Factory = Callable[..., FakeTerminal]
TRANSPORTS = pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])


def pyzk(terminal: FakeTerminal, udp: bool = False, password: int = 0, timeout: float = 2.0) -> ZK:
    return ZK(
        "127.0.0.1", port=terminal.port, timeout=timeout, password=password, force_udp=udp, ommit_ping=True
    )


def table_size_for(record_size: int) -> int:
    return 28 if record_size in (8, 16) else 72


@TRANSPORTS
def test_identity_and_disconnect(terminals: Factory, udp: bool) -> None:
    terminal = terminals(
        serial="GATE0001", name="Front gate", platform="ZLM60_TFT", firmware="Ver 6.60 Jan 1 2020"
    )
    conn = pyzk(terminal, udp).connect()
    assert conn.get_serialnumber() == "GATE0001"
    assert conn.get_firmware_version() == "Ver 6.60 Jan 1 2020"
    assert conn.get_device_name() == "Front gate"
    assert conn.get_platform() == "ZLM60_TFT"
    assert conn.get_mac().startswith("00:17:61:")
    # Unknown option: ACK_ERROR; pyzk then sends its error-clearing commands, which get ACK_UNKNOWN,
    # and the session stays in step (the next answer is the right one).
    assert conn.get_extend_fmt() is None
    assert conn.get_serialnumber() == "GATE0001"
    assert terminal.active_sessions == 1
    assert conn.disconnect()
    assert terminal.connections == 1
    wait_for(lambda: terminal.active_sessions == 0)


@TRANSPORTS
def test_comm_key(terminals: Factory, udp: bool) -> None:
    terminal = terminals(comm_key=123456)
    conn = pyzk(terminal, udp, password=123456).connect()
    assert conn.get_serialnumber() == terminal.serial
    conn.disconnect()
    with pytest.raises(ZKErrorResponse, match="Unauthenticated"):
        pyzk(terminal, udp, password=654321).connect()
    with pytest.raises(ZKErrorResponse, match="Unauthenticated"):
        pyzk(terminal, udp, password=0).connect()
    assert terminal.connections == 1


def test_commands_before_auth_are_refused(terminals: Factory) -> None:
    terminal = terminals(comm_key=7)
    client = MiniZkClient("127.0.0.1", terminal.port)
    client.sock = socket.create_connection(("127.0.0.1", terminal.port), timeout=2)
    assert client.command(p.CMD_CONNECT).command == p.CMD_ACK_UNAUTH
    client.session_id = 0
    assert client.command(p.CMD_GET_FREE_SIZES).command == p.CMD_ACK_UNAUTH
    client.close()


@TRANSPORTS
def test_clock_follows_zone_and_offset(terminals: Factory, udp: bool) -> None:
    terminal = terminals(timezone="America/New_York", clock_offset_seconds=-3600)
    conn = pyzk(terminal, udp).connect()
    expected = datetime.now(ZoneInfo("America/New_York")).replace(tzinfo=None) - timedelta(hours=1)
    assert abs((conn.get_time() - expected).total_seconds()) < 3
    terminal.set_clock_offset(86_400)
    assert abs((conn.get_time() - expected - timedelta(days=1, hours=1)).total_seconds()) < 3
    target = datetime(2030, 6, 1, 12, 0, 0)  # noqa: DTZ001 - terminal wall clock
    assert conn.set_time(target)
    assert abs((conn.get_time() - target).total_seconds()) < 3
    conn.disconnect()


@TRANSPORTS
def test_sizes(terminals: Factory, udp: bool) -> None:
    terminal = terminals(users=7, records=123, capacity=5000)
    conn = pyzk(terminal, udp).connect()
    conn.read_sizes()
    assert (conn.users, conn.records, conn.rec_cap, conn.rec_av) == (7, 123, 5000, 5000 - 123)
    conn.disconnect()


@TRANSPORTS
@pytest.mark.parametrize("table_size", [28, 72])
def test_users_both_table_sizes(terminals: Factory, udp: bool, table_size: int) -> None:
    users = [
        TerminalUser(1, "1001", "Alice", 14, 555),
        TerminalUser(2, "1002", "Bob"),
        TerminalUser(9, "77", "Carol"),
    ]
    terminal = terminals(users=users, user_table_size=table_size, record_size=16 if table_size == 28 else 40)
    conn = pyzk(terminal, udp).connect()
    got = conn.get_users()
    assert [(u.uid, u.user_id, u.name, u.privilege, u.card) for u in got] == [
        (1, "1001", "Alice", 14, 555),
        (2, "1002", "Bob", 0, 0),
        (9, "77", "Carol", 0, 0),
    ]
    buffer, _ = conn.read_with_buffer(const.CMD_USERTEMP_RRQ, const.FCT_USER)
    assert parse_user_table(buffer, 3) == users
    conn.disconnect()


@TRANSPORTS
@pytest.mark.parametrize("record_size", [8, 16, 40, 49])
def test_full_download_all_layouts(terminals: Factory, udp: bool, record_size: int) -> None:
    # 20,000 records: several TCP chunks (65,472 bytes) and many UDP chunks (16 KiB in 1 KiB datagrams).
    terminal = terminals(
        record_size=record_size, user_table_size=table_size_for(record_size), users=50, records=20_000
    )
    conn = pyzk(terminal, udp, timeout=5).connect()
    conn.read_sizes()
    assert conn.disable_device()
    assert not terminal.enabled
    try:
        buffer, size = conn.read_with_buffer(const.CMD_ATTLOG_RRQ)
    finally:
        conn.enable_device()
    assert terminal.enabled
    users = {u.uid: u.user_id for u in conn.get_users()}
    parsed_size, parsed = parse_attendance_buffer(buffer, conn.records, users)
    assert size == 4 + 20_000 * record_size
    assert parsed_size == record_size
    assert parsed == terminal.records
    assert parsed[0].enroll_number == "1001" and parsed[0].local_time == "2024-01-01 08:00:00"
    assert parsed[-1].local_time == "2024-01-15 05:19:00"
    conn.disconnect()


@TRANSPORTS
@pytest.mark.parametrize("record_size", [16, 40])
def test_pyzk_get_attendance(terminals: Factory, udp: bool, record_size: int) -> None:
    terminal = terminals(
        record_size=record_size, user_table_size=table_size_for(record_size), users=3, records=10
    )
    conn = pyzk(terminal, udp).connect()
    got = conn.get_attendance()
    assert [(a.user_id, a.timestamp.strftime("%Y-%m-%d %H:%M:%S"), a.status, a.punch) for a in got] == [
        (r.enroll_number, r.local_time, r.verify_mode, r.punch_state) for r in terminal.records
    ]
    conn.disconnect()


def test_small_buffers_inline(terminals: Factory) -> None:
    terminal = terminals(inline_buffers=True, users=2, records=3)
    for udp in (False, True):
        conn = pyzk(terminal, udp).connect()
        buffer, _ = conn.read_with_buffer(const.CMD_ATTLOG_RRQ)
        assert parse_attendance_buffer(buffer, 3)[1] == terminal.records
        conn.disconnect()


@TRANSPORTS
def test_clear_attendance(terminals: Factory, udp: bool) -> None:
    terminal = terminals(records=40)
    conn = pyzk(terminal, udp).connect()
    assert conn.clear_attendance()
    conn.read_sizes()
    assert conn.records == 0 and terminal.records == []
    assert conn.get_attendance() == []
    conn.disconnect()


@TRANSPORTS
@pytest.mark.parametrize("record_size", [16, 40, 49])
def test_live_capture(terminals: Factory, udp: bool, record_size: int) -> None:
    terminal = terminals(record_size=record_size, user_table_size=table_size_for(record_size), users=3)
    conn = pyzk(terminal, udp).connect()
    deadline = time.monotonic() + 10
    punched = False
    seen = None
    capture = conn.live_capture(new_timeout=0.1)
    for event in capture:
        if event is not None:
            seen = event
            conn.end_live_capture = True
        elif not punched and terminal.active_sessions and _registered(terminal):
            terminal.add_punch("1002", "2024-03-04 05:06:07", verify_mode=15, punch_state=1)
            punched = True
        assert time.monotonic() < deadline, "no live event"
    assert seen is not None
    expected = ("1002", datetime(2024, 3, 4, 5, 6, 7), 15, 1)  # noqa: DTZ001 - terminal wall clock
    assert (seen.user_id, seen.timestamp, seen.status, seen.punch) == expected
    conn.disconnect()


def _registered(terminal: FakeTerminal) -> bool:
    return terminal.command_count(p.CMD_REG_EVENT) > 0


@pytest.mark.parametrize("record_size", [8, 16, 40, 49])
def test_live_events_one_per_packet_after_ack(terminals: Factory, record_size: int) -> None:
    terminal = terminals(record_size=record_size, user_table_size=table_size_for(record_size), users=3)
    client = MiniZkClient("127.0.0.1", terminal.port)
    client.connect()
    assert client.register_events().command == p.CMD_ACK_OK
    terminal.add_punch("1001", "2024-03-04 05:06:07")
    terminal.add_punch("1003", "2024-03-04 05:06:08", punch_state=1)
    deadline = time.monotonic() + 5
    first, second = client.next_event(deadline), client.next_event(deadline)
    expected_length = {8: 10, 16: 12, 40: 32, 49: 52}[record_size]
    assert len(first) == len(second) == expected_length
    time_at = {8: 4, 16: 6, 40: 26, 49: 26}[record_size]
    assert first[time_at : time_at + 6] == bytes([24, 3, 4, 5, 6, 7])
    assert second[time_at : time_at + 6] == bytes([24, 3, 4, 5, 6, 8])
    assert second[time_at - 1] == 1  # punch state
    if record_size == 16:
        assert struct.unpack("<I", first[:4])[0] == 1001
    if record_size == 8:
        assert struct.unpack("<H", first[:2])[0] == 1  # the uid of enroll number 1001
    client.register_events(on=False)
    client.disconnect()


def test_independent_client_reads_users_and_log(terminals: Factory) -> None:
    users = [TerminalUser(1, "A-1", "张三"), TerminalUser(2, "B-2", "Bob")]
    terminal = terminals(users=users, record_size=49, user_table_size=72, records=70_000, capacity=70_000)
    client = MiniZkClient("127.0.0.1", terminal.port)
    client.connect()
    assert client.option("~SerialNumber") == terminal.serial
    assert client.option("~NoSuchKey") is None
    sizes = client.sizes()
    assert sizes == {"users": 2, "records": 70_000, "record_capacity": 70_000}
    assert parse_user_table(client.read_buffer(USER_TABLE, 5), 2) == users
    size, records = parse_attendance_buffer(client.read_buffer(ATTENDANCE_TABLE), 70_000)
    assert size == 49 and len(records) == 70_000
    assert records[1] == AttendanceRecord("B-2", "2024-01-01 08:01:00", 1, 1, 0, 2)
    assert client.command(4242).command == p.CMD_ACK_UNKNOWN  # unknown commands are answered
    client.disconnect()


def test_probe_connection_and_garbage_frames_are_tolerated(terminals: Factory) -> None:
    terminal = terminals()
    socket.create_connection(("127.0.0.1", terminal.port), timeout=2).close()  # pyzk's probe
    with socket.create_connection(("127.0.0.1", terminal.port), timeout=2) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert raw.recv(100) == b""  # not the protocol: the terminal hangs up
    conn = pyzk(terminal).connect()
    assert conn.get_serialnumber() == terminal.serial
    conn.disconnect()


def test_punches_wait_while_disabled(terminals: Factory) -> None:
    terminal = terminals(records=5)
    conn = pyzk(terminal).connect()
    conn.disable_device()
    assert terminal.add_punch("1001", "2024-06-01 09:00:00") is not None
    assert terminal.pending_punches == 1 and terminal.record_count == 5
    conn.enable_device()
    assert terminal.pending_punches == 0 and terminal.record_count == 6
    assert terminal.records[-1].local_time == "2024-06-01 09:00:00"
    conn.disconnect()


def test_disconnect_does_not_reenable(terminals: Factory) -> None:
    terminal = terminals()
    conn = pyzk(terminal).connect()
    conn.disable_device()
    conn.disconnect()
    assert not terminal.enabled  # a client that forgets enable_device() is visible


def test_punch_every_and_add_punch_times(terminals: Factory) -> None:
    terminal = terminals(users=2, timezone="Asia/Shanghai", clock_offset_seconds=120)
    terminal.punch_every(0.02)
    wait_for(lambda: terminal.record_count >= 3)
    terminal.stop_punching()
    first = terminal.records[0]
    assert first.enroll_number in {"1001", "1002"}
    shanghai_now = datetime.now(ZoneInfo("Asia/Shanghai")).replace(tzinfo=None) + timedelta(seconds=120)
    assert abs((datetime.fromisoformat(first.local_time) - shanghai_now).total_seconds()) < 5
    # An aware datetime is converted to the terminal's zone.
    aware = datetime(2024, 1, 1, 0, 0, 0, tzinfo=ZoneInfo("UTC"))
    assert terminal.add_punch("1001", aware) == AttendanceRecord("1001", "2024-01-01 08:00:00", 1, 0, 0, 1)


def test_swap_replaces_the_unit(terminals: Factory) -> None:
    terminal = terminals(serial="OLD00001", records=10)
    conn = pyzk(terminal).connect()
    terminal.swap("NEW00002")
    assert terminal.serial == "NEW00002" and terminal.record_count == 0
    wait_for(lambda: terminal.active_sessions == 0)
    conn = pyzk(terminal).connect()
    assert conn.get_serialnumber() == "NEW00002"
    conn.read_sizes()
    assert conn.records == 0
    conn.disconnect()


def test_many_terminals_in_one_simulator() -> None:
    with Simulator() as sim:
        fleet = [sim.add_terminal(serial=f"FLEET{i:03d}", users=3, records=10) for i in range(30)]
        assert len({t.port for t in fleet}) == 30
        for terminal in fleet[::7]:
            conn = pyzk(terminal).connect()
            assert conn.get_serialnumber() == terminal.serial
            conn.disconnect()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", fleet[0].port)) != 0  # closed with the simulator


def test_spec_validation() -> None:
    with pytest.raises(ValueError):
        TerminalSpec(record_size=12)
    with pytest.raises(ValueError):
        TerminalSpec(user_table_size=40)
    with pytest.raises(ValueError):
        TerminalSpec(records=10, capacity=5)
