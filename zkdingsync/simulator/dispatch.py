"""The protocol a fake terminal speaks: one request in, the reply packets out (no sockets here).

- A comm key other than 0 makes CONNECT answer ACK_UNAUTH; AUTH must then carry
  make_commkey(key, session) (any ticks byte), otherwise ACK_UNAUTH again. Commands from a session that
  is not connected and authenticated get ACK_UNAUTH; unknown commands get ACK_UNKNOWN.
- DISABLEDEVICE keeps the terminal disabled until some session sends ENABLEDEVICE (a disconnect does not
  re-enable it), so a test can see a client that forgot to re-enable.
- PREPARE_BUFFER snapshots the table; READ_BUFFER serves any byte range (start offset, length) of that
  snapshot until FREE_DATA, or mishandles the offset as `TerminalSpec.offset_reads` says.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

from zkdingsync.devices import records as codec
from zkdingsync.simulator import protocol as p
from zkdingsync.simulator.faults import FaultKind
from zkdingsync.simulator.spec import OFFSET_ERROR, OFFSET_IGNORED, OFFSET_WHOLE
from zkdingsync.simulator.state import TerminalData


@dataclass(eq=False)  # identity: sessions live in sets
class Session:
    """One client conversation: a TCP connection, or a UDP peer address."""

    send: Callable[[bytes], None]  # send one packet (the transport adds the TCP prefix)
    udp: bool
    session_id: int = 0
    connected: bool = False  # CONNECT seen
    authenticated: bool = False
    buffer: bytes | None = None  # PREPARE_BUFFER snapshot
    streaming: int = 0  # a claim_records fault: the bytes a buffered read pretends to hold
    sizes_answered: bool = False
    registered: bool = False  # REG_EVENT with the attendance flag
    replying: bool = False  # the packets of a reply are on their way: events wait
    events: deque[bytes] = field(default_factory=deque)
    awaiting_ack: asyncio.TimerHandle | None = None
    last_seen: float = 0.0
    last_sent: float = 0.0  # TCP: when the last packet went out (monotonic)
    eager: bool = False  # TCP: the client asked before a reply was all sent
    inbox: asyncio.Queue[bytes] | None = None  # UDP: datagrams waiting to be answered in order


@dataclass
class Reply:
    """What the protocol layer wants sent for one request, packet by packet."""

    packets: list[bytes]
    close_after: bool = False


Handler = Callable[["Dispatcher", Session, int, bytes], Reply]


def _reply(session: Session, command: int, reply_id: int, payload: bytes = b"") -> Reply:
    return Reply([p.build_packet(command, session.session_id, reply_id, payload)])


class Dispatcher:
    """Answers requests from the terminal's data (event loop thread)."""

    def __init__(self, data: TerminalData) -> None:
        self.data = data
        self._session_ids = itertools.count(data.random.randint(1, 30000))

    def handle(self, session: Session, command: int, reply_id: int, payload: bytes) -> Reply:
        """Answer one request. Returns the packets to send, in order."""
        self.data.count_command(command)
        if command == p.CMD_CONNECT:
            session.session_id = next(self._session_ids) % 0xFFFE + 1
            session.connected = True
            session.authenticated = self.data.spec.comm_key == 0
            session.buffer = None
            if not session.authenticated:
                return _reply(session, p.CMD_ACK_UNAUTH, reply_id)
            self.data.count_connection()
            return _reply(session, p.CMD_ACK_OK, reply_id)
        if command == p.CMD_AUTH:
            if session.connected and p.commkey_matches(payload, self.data.spec.comm_key, session.session_id):
                if not session.authenticated:
                    session.authenticated = True
                    self.data.count_connection()
                return _reply(session, p.CMD_ACK_OK, reply_id)
            return _reply(session, p.CMD_ACK_UNAUTH, reply_id)
        if command == p.CMD_EXIT:
            reply = _reply(session, p.CMD_ACK_OK, reply_id)
            reply.close_after = True
            return reply
        if not (session.connected and session.authenticated):
            return _reply(session, p.CMD_ACK_UNAUTH, reply_id)
        handler = self._handlers.get(command)
        if handler is None:
            return _reply(session, p.CMD_ACK_UNKNOWN, reply_id)
        return handler(self, session, reply_id, payload)

    def garbage(self, packets: list[bytes], raw: bool, command: int) -> list[bytes]:
        """Replace a reply with random bytes, keeping the framing unless `raw`."""
        rng = self.data.random
        if raw:
            return [rng.randbytes(rng.randint(16, 64))]
        corrupted = []
        for packet in packets:
            code, _, session_id, reply_id, payload = p.parse_header(packet)
            if command == p.CMD_READ_BUFFER and code != p.CMD_DATA:
                corrupted.append(packet)  # keep the chunk framing intact, spoil only the data
                continue
            junk = rng.randbytes(len(payload) or 16)
            corrupted.append(p.build_packet(code, session_id, reply_id, junk))
        return corrupted

    def event_payload(self, data: bytes) -> bytes:
        """Turn one stored record into a live-event payload of the layout that goes with the record size."""
        size = self.data.spec.record_size
        users = {u.uid: u.enroll_number for u in self.data.users}
        record = codec.parse_attendance_buffer(codec.with_length_prefix(data), 1, users)[1][0]
        when = p.encode_event_time(*codec.decode_time(codec.encode_local_time(record.local_time)))
        if size == 8:
            return struct.pack("<HBB6s", record.uid or 0, record.verify_mode, record.punch_state, when)
        if size == 16:
            return struct.pack(
                "<IBB6s", int(record.enroll_number), record.verify_mode, record.punch_state, when
            )
        user_id = record.enroll_number.encode("utf-8")
        if size == 40:
            return struct.pack("<24sBB6s", user_id, record.verify_mode, record.punch_state, when)
        return struct.pack("<24sBB6s20s", user_id, record.verify_mode, record.punch_state, when, b"")

    def options(self) -> dict[str, str]:
        """The OPTIONS_RRQ keys the terminal knows, with their values."""
        serial = self.data.serial
        # A stable, plausible MAC (ZKTeco's OUI) derived from the serial.
        mac = self.data.spec.mac or ":".join(
            f"{b:02x}" for b in b"\x00\x17\x61" + zlib.crc32(serial.encode()).to_bytes(4, "little")[:3]
        )
        return {
            "~SerialNumber": serial,
            "~DeviceName": self.data.spec.name or serial,
            "~Platform": self.data.spec.platform,
            "MAC": mac,
            "~ZKFPVersion": "10",
        }

    # ------------------------------------------------------------------------------------ commands

    def _on_enable(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        self.data.set_enabled(True)
        return _reply(session, p.CMD_ACK_OK, reply_id)

    def _on_disable(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        self.data.set_enabled(False)
        return _reply(session, p.CMD_ACK_OK, reply_id)

    def _on_version(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        return _reply(session, p.CMD_ACK_OK, reply_id, self.data.spec.firmware.encode() + b"\x00")

    def _on_options(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        key = payload.split(b"\x00", 1)[0].decode("ascii", errors="replace")
        value = self.options().get(key)
        if value is None:
            return _reply(session, p.CMD_ACK_ERROR, reply_id)
        return _reply(session, p.CMD_ACK_OK, reply_id, f"{key}={value}\x00".encode())

    def _on_get_time(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        now = self.data.terminal_time()
        try:
            value = codec.encode_time(now.year, now.month, now.day, now.hour, now.minute, now.second)
        except ValueError:
            return _reply(session, p.CMD_ACK_ERROR, reply_id)
        return _reply(session, p.CMD_ACK_OK, reply_id, struct.pack("<I", value))

    def _on_set_time(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        try:
            (value,) = struct.unpack_from("<I", payload)
            wanted = datetime(*codec.decode_time(value))  # noqa: DTZ001 - terminal wall clock, naive
        except (struct.error, ValueError):
            return _reply(session, p.CMD_ACK_ERROR, reply_id)
        self.data.set_clock(wanted)
        return _reply(session, p.CMD_ACK_OK, reply_id)

    def _on_free_sizes(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        spec = self.data.spec
        users, records = self.data.sizes()
        capacity = spec.capacity
        claim = self.data.take_fault(FaultKind.CLAIM_RECORDS, p.CMD_GET_FREE_SIZES)
        if claim is not None:
            records = capacity = claim.records
        fields = [0] * 23
        fields[4] = users
        fields[8] = records
        fields[14] = 3000  # finger capacity
        fields[15] = spec.user_capacity
        fields[16] = capacity
        fields[17] = 3000
        fields[18] = max(0, spec.user_capacity - users)
        fields[19] = max(0, capacity - records)
        fields[22] = 0  # face capacity
        session.sizes_answered = True
        return _reply(session, p.CMD_ACK_OK, reply_id, struct.pack("<23i", *fields))

    def _on_prepare_buffer(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        try:
            _, table, _fct, _ext = struct.unpack_from("<bhii", payload)
        except struct.error:
            return _reply(session, p.CMD_ACK_ERROR, reply_id)
        session.streaming = 0
        if table == p.BUFFER_ATTENDANCE_LOG:
            claim = self.data.take_fault(FaultKind.CLAIM_RECORDS, p.CMD_PREPARE_BUFFER)
            if claim is not None:
                session.buffer, session.streaming = None, 4 + claim.records * self.data.spec.record_size
                return _reply(
                    session, p.CMD_ACK_OK, reply_id, struct.pack("<BIII", 0, session.streaming, 0, 0)
                )
            fault = self.data.take_fault(FaultKind.PUNCH_DURING_DOWNLOAD, p.CMD_PREPARE_BUFFER)
            if fault is not None and session.sizes_answered:
                self.data.add_punch(fault.enroll_number or "1")
            buffer = self.data.log_buffer()
        elif table == p.BUFFER_USER_TABLE:
            buffer = self.data.user_buffer()
        else:
            return _reply(session, p.CMD_ACK_ERROR, reply_id)
        if self.data.spec.inline_buffers and len(buffer) <= p.UDP_DATA_PAYLOAD - 8:
            session.buffer = None
            return _reply(session, p.CMD_DATA, reply_id, buffer)
        session.buffer = buffer
        return _reply(session, p.CMD_ACK_OK, reply_id, struct.pack("<BIII", 0, len(buffer), 0, 0))

    def _on_read_buffer(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        try:
            start, size = struct.unpack_from("<ii", payload)
        except struct.error:
            return _reply(session, p.CMD_ACK_ERROR, reply_id)
        buffer = session.buffer
        limit = p.MAX_UDP_CHUNK if session.udp else p.MAX_TCP_CHUNK
        if session.streaming and 0 <= start < session.streaming and 0 < size <= limit:
            chunk = self.data.random.randbytes(min(size, session.streaming - start))
            return self._chunk_reply(session, reply_id, chunk)
        if buffer is None or start < 0 or size <= 0 or size > limit or start >= len(buffer):
            return _reply(session, p.CMD_ACK_ERROR, reply_id)
        # Firmware without offset reads still serves a whole-buffer read: its chunks start at multiples
        # of the chunk size. Any other offset is what it mishandles.
        offset_reads = self.data.spec.offset_reads if start % limit else None
        if offset_reads == OFFSET_ERROR:
            return _reply(session, p.CMD_ACK_ERROR, reply_id)
        if offset_reads == OFFSET_IGNORED:
            start = 0
        chunk = buffer[start : start + size]
        if offset_reads == OFFSET_WHOLE:
            chunk = buffer[:limit]
        return self._chunk_reply(session, reply_id, chunk)

    def _chunk_reply(self, session: Session, reply_id: int, chunk: bytes) -> Reply:
        """PREPARE_DATA, the data (TCP: one packet; UDP: datagrams of at most 1024 bytes), ACK_OK."""
        packets = [
            p.build_packet(
                p.CMD_PREPARE_DATA, session.session_id, reply_id, struct.pack("<II", len(chunk), 0)
            )
        ]
        step = p.UDP_DATA_PAYLOAD if session.udp else max(len(chunk), 1)
        for offset in range(0, len(chunk), step):
            packets.append(
                p.build_packet(p.CMD_DATA, session.session_id, reply_id, chunk[offset : offset + step])
            )
        packets.append(p.build_packet(p.CMD_ACK_OK, session.session_id, reply_id))
        return Reply(packets)

    def _on_free_data(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        session.buffer = None
        session.streaming = 0
        return _reply(session, p.CMD_ACK_OK, reply_id)

    def _on_clear_log(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        self.data.clear_log()
        return _reply(session, p.CMD_ACK_OK, reply_id)

    def _on_reg_event(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        flags = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
        session.registered = bool(flags & p.EVENT_ATTENDANCE)
        if not session.registered:
            session.events.clear()
        return _reply(session, p.CMD_ACK_OK, reply_id)

    def _on_plain_ok(self, session: Session, reply_id: int, payload: bytes) -> Reply:
        return _reply(session, p.CMD_ACK_OK, reply_id)

    _handlers: ClassVar[dict[int, Handler]] = {
        p.CMD_ENABLEDEVICE: _on_enable,
        p.CMD_DISABLEDEVICE: _on_disable,
        p.CMD_GET_VERSION: _on_version,
        p.CMD_OPTIONS_RRQ: _on_options,
        p.CMD_GET_TIME: _on_get_time,
        p.CMD_SET_TIME: _on_set_time,
        p.CMD_GET_FREE_SIZES: _on_free_sizes,
        p.CMD_PREPARE_BUFFER: _on_prepare_buffer,
        p.CMD_READ_BUFFER: _on_read_buffer,
        p.CMD_FREE_DATA: _on_free_data,
        p.CMD_CLEAR_ATTLOG: _on_clear_log,
        p.CMD_REG_EVENT: _on_reg_event,
        p.CMD_CANCELCAPTURE: _on_plain_ok,
        p.CMD_STARTVERIFY: _on_plain_ok,
    }
