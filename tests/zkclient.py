"""A second, independent ZK terminal client (TCP only), written from the protocol reference.

It shares no code with pyzk or with the simulator's protocol module, so a framing mistake on one side
is not hidden by the same mistake on the other. Unlike pyzk it reads the TCP stream by length (never
"one recv per reply") and raises `ConnectionError` when the terminal closes mid-reply.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

CONNECT, EXIT, ENABLE, DISABLE, VERSION, AUTH = 1000, 1001, 1002, 1003, 1100, 1102
OPTIONS, FREE_SIZES, GET_TIME, REG_EVENT = 11, 50, 201, 500
PREPARE_DATA, DATA, FREE_DATA, PREPARE_BUFFER, READ_BUFFER = 1500, 1501, 1502, 1503, 1504
ACK_OK, ACK_ERROR, ACK_UNAUTH, ACK_UNKNOWN = 2000, 2001, 2005, 0xFFFF
ATTENDANCE_TABLE, USER_TABLE = 13, 9
CHUNK = 0xFFC0


class ZkProtocolError(Exception):
    """The terminal answered something this client did not expect."""


@dataclass(frozen=True)
class Reply:
    command: int
    session_id: int
    reply_id: int
    payload: bytes


def commkey(key: int, session_id: int, ticks: int = 50) -> bytes:
    """The AUTH answer, from the reference's description of make_commkey."""
    reversed_key = 0
    for bit in range(32):
        if key >> bit & 1:
            reversed_key |= 1 << (31 - bit)
    value = (reversed_key + session_id) & 0xFFFFFFFF
    b = bytearray(struct.pack("<I", value))
    for index, letter in enumerate(b"ZKSO"):
        b[index] ^= letter
    b = b[2:] + b[:2]
    return bytes([b[0] ^ ticks, b[1] ^ ticks, ticks, b[3] ^ ticks])


def _checksum(data: bytes) -> int:
    total = 0
    for index in range(0, len(data) - 1, 2):
        total += data[index] | data[index + 1] << 8
        if total > 0xFFFF:
            total -= 0xFFFF
    if len(data) % 2:
        total += data[-1]
    while total > 0xFFFF:
        total -= 0xFFFF
    return (0xFFFE - total) % 0xFFFF


class MiniZkClient:
    """Connect, read sizes, users and the attendance log, receive live events, disconnect."""

    def __init__(self, host: str, port: int, timeout: float = 2.0, comm_key: int = 0) -> None:
        self.host, self.port, self.timeout, self.comm_key = host, port, timeout, comm_key
        self.sock: socket.socket | None = None
        self.session_id = 0
        self.reply_id = 0
        self.received_bytes = 0

    # framing ---------------------------------------------------------------------------------

    def _send(self, command: int, payload: bytes = b"", reply_id: int | None = None) -> None:
        assert self.sock is not None
        rid = self.reply_id if reply_id is None else reply_id
        body = struct.pack("<4H", command, 0, self.session_id, rid) + payload
        body = struct.pack("<4H", command, _checksum(body), self.session_id, rid) + payload
        self.sock.sendall(b"\x50\x50\x82\x7d" + struct.pack("<I", len(body)) + body)

    def _read_exactly(self, count: int) -> bytes:
        assert self.sock is not None
        parts, missing = [], count
        while missing:
            part = self.sock.recv(missing)
            if not part:
                raise ConnectionError(
                    f"terminal closed the connection with {missing} of {count} bytes missing"
                )
            self.received_bytes += len(part)
            parts.append(part)
            missing -= len(part)
        return b"".join(parts)

    def receive(self) -> Reply:
        """Read one framed packet."""
        prefix = self._read_exactly(8)
        if prefix[:4] != b"\x50\x50\x82\x7d":
            raise ZkProtocolError(f"bad TCP prefix {prefix.hex()}")
        (length,) = struct.unpack("<I", prefix[4:])
        if length < 8:
            raise ZkProtocolError(f"packet length {length} is shorter than a header")
        packet = self._read_exactly(length)
        command, checksum, session_id, reply_id = struct.unpack("<4H", packet[:8])
        expected = _checksum(packet[:2] + b"\0\0" + packet[4:])
        if checksum != expected:
            raise ZkProtocolError(
                f"bad checksum {checksum:#06x} on reply {command}, expected {expected:#06x}"
            )
        return Reply(command, session_id, reply_id, packet[8:])

    def command(self, command: int, payload: bytes = b"") -> Reply:
        """Send a request and return the first reply packet (checking it echoes our reply id)."""
        self._send(command, payload)
        reply = self.receive()
        if reply.reply_id != self.reply_id:
            raise ZkProtocolError(f"reply id {reply.reply_id} does not echo request {self.reply_id}")
        self.reply_id = (self.reply_id + 1) % 0xFFFF
        return reply

    # commands --------------------------------------------------------------------------------

    def connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.session_id = 0
        reply = self.command(CONNECT)
        self.session_id = reply.session_id
        if reply.command == ACK_UNAUTH:
            reply = self.command(AUTH, commkey(self.comm_key, self.session_id))
        if reply.command != ACK_OK:
            self.close()
            raise ZkProtocolError(f"connect refused with {reply.command}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def disconnect(self) -> None:
        self.command(EXIT)
        self.close()

    def option(self, key: str) -> str | None:
        reply = self.command(OPTIONS, key.encode() + b"\x00")
        if reply.command != ACK_OK:
            return None
        return reply.payload.split(b"\x00")[0].decode().split("=", 1)[1]

    def sizes(self) -> dict[str, int]:
        reply = self.command(FREE_SIZES)
        fields = struct.unpack_from("<20i", reply.payload)
        return {"users": fields[4], "records": fields[8], "record_capacity": fields[16]}

    def read_buffer(self, table: int, fct: int = 0) -> bytes:
        """A buffered read: PREPARE_BUFFER, READ_BUFFER per chunk, FREE_DATA."""
        reply = self.command(PREPARE_BUFFER, struct.pack("<bhii", 1, table, fct, 0))
        if reply.command == DATA:
            return reply.payload
        if reply.command != ACK_OK:
            raise ZkProtocolError(f"PREPARE_BUFFER answered {reply.command}")
        (total,) = struct.unpack_from("<I", reply.payload, 1)
        data = bytearray()
        while len(data) < total:
            size = min(CHUNK, total - len(data))
            reply = self.command(READ_BUFFER, struct.pack("<ii", len(data), size))
            if reply.command != PREPARE_DATA:
                raise ZkProtocolError(f"READ_BUFFER answered {reply.command}")
            chunk = bytearray()
            while True:
                packet = self.receive()
                if packet.command == DATA:
                    chunk += packet.payload
                elif packet.command == ACK_OK:
                    break
                else:
                    raise ZkProtocolError(f"unexpected packet {packet.command} in a chunk")
            if len(chunk) != size:
                raise ZkProtocolError(f"asked {size} bytes, got {len(chunk)}")
            data += chunk
        self.command(FREE_DATA)
        return bytes(data)

    def register_events(self, on: bool = True) -> Reply:
        return self.command(REG_EVENT, struct.pack("<I", 1 if on else 0))

    def next_event(self, deadline: float) -> bytes:
        """Wait until `deadline` (monotonic) for a live event; acknowledge it; return its payload."""
        assert self.sock is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no live event before the deadline")
            self.sock.settimeout(remaining)
            try:
                packet = self.receive()
            finally:
                self.sock.settimeout(self.timeout)
            if packet.command == REG_EVENT:
                self._send(ACK_OK, reply_id=0xFFFE)
                return packet.payload
