"""Every fault of the fake terminal, and what a client sees when it is on."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401
from zk import ZK, const
from zk.exception import ZKErrorResponse, ZKNetworkError
from zkclient import ATTENDANCE_TABLE, MiniZkClient

from zkdingsync.devices.records import encode_time, parse_attendance_buffer
from zkdingsync.errors import RecordFormatError
from zkdingsync.simulator import FakeTerminal, Fault
from zkdingsync.simulator import protocol as p

Factory = Callable[..., FakeTerminal]
SHORT = 0.3  # client timeout in seconds for the fault tests


def pyzk(terminal: FakeTerminal, udp: bool = False, timeout: float = SHORT) -> ZK:
    return ZK("127.0.0.1", port=terminal.port, timeout=timeout, force_udp=udp, ommit_ping=True)


@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_delay_on_one_command_times_out_the_client(terminals: Factory, udp: bool) -> None:
    terminal = terminals(records=10)
    terminal.set_fault(Fault.delay(SHORT * 3, command=p.CMD_READ_BUFFER, once=True))
    conn = pyzk(terminal, udp).connect()
    assert conn.get_serialnumber() == terminal.serial  # other commands are answered at once
    started = time.monotonic()
    with pytest.raises(ZKNetworkError, match="timed out"):
        conn.read_with_buffer(const.CMD_ATTLOG_RRQ)
    assert time.monotonic() - started < SHORT * 3
    # A fresh connection (as the adapter must make after any error) works again: the fault was `once`.
    fresh = pyzk(terminal, udp).connect()
    buffer, _ = fresh.read_with_buffer(const.CMD_ATTLOG_RRQ)
    assert len(parse_attendance_buffer(buffer, 10)[1]) == 10
    fresh.disconnect()


def test_delay_on_every_command_times_out_connect(terminals: Factory) -> None:
    terminal = terminals()
    terminal.set_fault(Fault.delay(SHORT * 3))
    with pytest.raises(ZKNetworkError, match="timed out"):
        pyzk(terminal).connect()
    terminal.clear_faults()
    pyzk(terminal).connect().disconnect()


def test_drop_mid_download_closes_the_connection_mid_data(terminals: Factory) -> None:
    # Not pyzk: pyzk 0.9 spins forever on recv() == b"" when this happens.
    terminal = terminals(records=5000)  # 200,004 bytes: the first chunk is a full 65,472 bytes
    terminal.set_fault(Fault.drop_mid_download(after_bytes=1000))
    client = MiniZkClient("127.0.0.1", terminal.port, timeout=2)
    client.connect()
    before = client.received_bytes
    with pytest.raises(ConnectionError, match="closed the connection"):
        client.read_buffer(ATTENDANCE_TABLE)
    # The PREPARE_BUFFER answer (29 bytes), PREPARE_DATA (24), then the DATA packet's prefix and header
    # (16) and 1000 bytes of its 65,472: then end of file.
    assert client.received_bytes - before == 29 + 24 + 16 + 1000
    client.close()


def test_drop_mid_download_raw_socket_sees_end_of_file(terminals: Factory) -> None:
    terminal = terminals(records=100)
    terminal.set_fault(Fault.drop_mid_download(after_bytes=10, once=True))
    client = MiniZkClient("127.0.0.1", terminal.port, timeout=2)
    client.connect()
    client.command(p.CMD_PREPARE_BUFFER, struct.pack("<bhii", 1, 13, 0, 0))
    assert client.command(p.CMD_READ_BUFFER, struct.pack("<ii", 0, 4004)).command == p.CMD_PREPARE_DATA
    assert client.sock is not None
    data = b""
    while chunk := client.sock.recv(65536):
        data += chunk
    assert len(data) == 8 + 8 + 10  # DATA prefix + header + 10 bytes, then end of file
    client.close()


def test_drop_mid_download_udp_stops_sending(terminals: Factory) -> None:
    terminal = terminals(records=1000)  # 40,004 bytes: UDP chunks of 16 KiB in 1 KiB datagrams
    terminal.set_fault(Fault.drop_mid_download(after_bytes=3000))
    conn = pyzk(terminal, udp=True).connect()
    # pyzk's UDP loop waits for more datagrams, which never come: its socket times out, and the
    # bare TimeoutError escapes (pyzk does not wrap it in a ZKError there).
    with pytest.raises(TimeoutError):
        conn.read_with_buffer(const.CMD_ATTLOG_RRQ)


def test_refuse_closes_connections(terminals: Factory) -> None:
    terminal = terminals()
    terminal.set_fault(Fault.refuse())
    with pytest.raises(ZKNetworkError):
        pyzk(terminal).connect()
    with pytest.raises(ZKNetworkError, match="timed out"):
        pyzk(terminal, udp=True).connect()
    terminal.clear_faults()
    pyzk(terminal).connect().disconnect()


def test_power_off_refuses_then_power_on_serves(terminals: Factory) -> None:
    terminal = terminals()
    conn = pyzk(terminal).connect()
    terminal.power_off()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", terminal.port)) != 0  # connection refused
    with pytest.raises(ZKNetworkError):
        pyzk(terminal).connect()
    with pytest.raises(ZKNetworkError):
        conn.get_serialnumber()  # the open connection was dropped
    terminal.power_on()
    fresh = pyzk(terminal).connect()
    assert fresh.get_serialnumber() == terminal.serial
    fresh.disconnect()


def test_impossible_dates(terminals: Factory) -> None:
    terminal = terminals(records=2)
    terminal.add_raw_record("1001", encode_time(2024, 2, 31, 8, 0, 0))
    conn = pyzk(terminal, timeout=2).connect()
    conn.read_sizes()
    buffer, _ = conn.read_with_buffer(const.CMD_ATTLOG_RRQ)
    _, records = parse_attendance_buffer(buffer, conn.records)
    assert records[-1].local_time == "2024-02-31 08:00:00"  # kept, for quarantine downstream
    with pytest.raises(ValueError, match="day is out of range"):
        conn.get_attendance()  # pyzk loses the whole log over one bad date
    conn.disconnect()


@pytest.mark.parametrize("record_size", [8, 16, 40, 49])
def test_punch_between_size_query_and_download(terminals: Factory, record_size: int) -> None:
    terminal = terminals(record_size=record_size, user_table_size=28 if record_size < 40 else 72, records=4)
    terminal.set_fault(Fault.punch_during_download("1002"))
    conn = pyzk(terminal, timeout=2).connect()
    conn.read_sizes()
    buffer, _ = conn.read_with_buffer(const.CMD_ATTLOG_RRQ)
    with pytest.raises(RecordFormatError):
        parse_attendance_buffer(buffer, conn.records)  # 5 records' bytes for a count of 4
    assert terminal.record_count == 5
    conn.disconnect()


def test_punch_during_download_waits_while_disabled(terminals: Factory) -> None:
    terminal = terminals(records=4)
    terminal.set_fault(Fault.punch_during_download("1002"))
    conn = pyzk(terminal, timeout=2).connect()
    conn.disable_device()
    try:
        conn.read_sizes()
        buffer, _ = conn.read_with_buffer(const.CMD_ATTLOG_RRQ)
    finally:
        conn.enable_device()
    assert len(parse_attendance_buffer(buffer, conn.records)[1]) == 4  # consistent download
    assert terminal.record_count == 5  # the punch landed once the terminal was enabled again
    conn.disconnect()


def test_full_log(terminals: Factory) -> None:
    terminal = terminals(capacity=50, records=10)
    assert terminal.fill_log() == 40
    conn = pyzk(terminal, timeout=2).connect()
    conn.read_sizes()
    assert (conn.records, conn.rec_cap, conn.rec_av) == (50, 50, 0)
    assert terminal.add_punch("1001") is None
    assert terminal.rejected_punches == 1 and terminal.record_count == 50
    buffer, _ = conn.read_with_buffer(const.CMD_ATTLOG_RRQ)
    assert len(parse_attendance_buffer(buffer, 50)[1]) == 50
    conn.disconnect()


def test_garbage_raw_reply(terminals: Factory) -> None:
    terminal = terminals()
    conn = pyzk(terminal).connect()
    terminal.set_fault(Fault.garbage(command=p.CMD_GET_FREE_SIZES, raw=True))
    with pytest.raises((ZKNetworkError, ZKErrorResponse)):
        conn.read_sizes()


def test_garbage_in_buffer_data_is_a_record_format_error(terminals: Factory) -> None:
    terminal = terminals(records=20)
    terminal.set_fault(Fault.garbage(command=p.CMD_READ_BUFFER))
    conn = pyzk(terminal, timeout=2).connect()
    conn.read_sizes()
    buffer, size = conn.read_with_buffer(const.CMD_ATTLOG_RRQ)
    assert size == 4 + 20 * 40  # framing intact, contents random
    with pytest.raises(RecordFormatError):
        parse_attendance_buffer(buffer, conn.records)
    conn.disconnect()


def test_garbage_payload_on_plain_ack_shifts_pyzk(terminals: Factory) -> None:
    terminal = terminals()
    client = MiniZkClient("127.0.0.1", terminal.port)
    client.connect()
    terminal.set_fault(Fault.garbage(command=p.CMD_DISABLEDEVICE, once=True))
    reply = client.command(p.CMD_DISABLEDEVICE)
    assert reply.command == p.CMD_ACK_OK and len(reply.payload) == 16  # stray bytes on a plain ACK
    assert client.command(p.CMD_ENABLEDEVICE).payload == b""  # `once`: back to normal
    client.disconnect()


def test_faults_clear(terminals: Factory) -> None:
    terminal = terminals(records=3)
    terminal.set_fault(Fault.garbage())
    terminal.set_fault(Fault.delay(5))
    terminal.clear_faults()
    conn = pyzk(terminal).connect()
    assert conn.get_serialnumber() == terminal.serial
    conn.disconnect()
    wait_for(lambda: terminal.active_sessions == 0)
