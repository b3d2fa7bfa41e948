"""Wire format of the ZK terminal protocol: command codes, packet framing, checksum, comm-key scrambling.

Written from `/work/shared/reference/zk-protocol.md`, not from a client. All integers little-endian.
A packet is an 8-byte header (command, checksum, session_id, reply_id) and a payload; over TCP it is
preceded by an 8-byte prefix (0x5050, 0x7D82, u32 length of the packet).
"""

from __future__ import annotations

import struct

CMD_CONNECT = 1000
CMD_EXIT = 1001
CMD_ENABLEDEVICE = 1002
CMD_DISABLEDEVICE = 1003
CMD_GET_VERSION = 1100
CMD_AUTH = 1102
CMD_OPTIONS_RRQ = 11
CMD_CLEAR_ATTLOG = 15
CMD_GET_FREE_SIZES = 50
CMD_STARTVERIFY = 60
CMD_CANCELCAPTURE = 62
CMD_GET_TIME = 201
CMD_SET_TIME = 202
CMD_REG_EVENT = 500
CMD_PREPARE_DATA = 1500
CMD_DATA = 1501
CMD_FREE_DATA = 1502
CMD_PREPARE_BUFFER = 1503
CMD_READ_BUFFER = 1504

CMD_ACK_OK = 2000
CMD_ACK_ERROR = 2001
CMD_ACK_DATA = 2002
CMD_ACK_UNAUTH = 2005
CMD_ACK_UNKNOWN = 0xFFFF

# PREPARE_BUFFER sub-commands (the table a buffered read is for).
BUFFER_USER_TABLE = 9
BUFFER_ATTENDANCE_LOG = 13

EVENT_ATTENDANCE = 1  # REG_EVENT flag, and the session field of an attendance event packet

TCP_MAGIC = b"\x50\x50\x82\x7d"
TCP_PREFIX = struct.Struct("<4sI")
HEADER = struct.Struct("<4H")

MAX_TCP_CHUNK = 0xFFC0  # 65,472: the largest READ_BUFFER chunk a TCP client asks for
MAX_UDP_CHUNK = 16 * 1024
UDP_DATA_PAYLOAD = 1024  # a UDP client reads DATA datagrams of at most 1024 + 8 bytes

USHRT_MAX = 0xFFFF


def checksum(packet: bytes) -> int:
    """Given a packet whose checksum field is zero, return its checksum (the ZK SDK's folding sum)."""
    total = 0
    even = len(packet) & ~1
    for (word,) in struct.iter_unpack("<H", packet[:even]):
        total += word
        if total > USHRT_MAX:
            total -= USHRT_MAX
    if len(packet) & 1:
        total += packet[-1]
    while total > USHRT_MAX:
        total -= USHRT_MAX
    return (-total - 1) % USHRT_MAX


def build_packet(command: int, session_id: int, reply_id: int, payload: bytes = b"") -> bytes:
    """Return a header + payload packet (no TCP prefix) with a correct checksum."""
    unsummed = HEADER.pack(command, 0, session_id, reply_id) + payload
    return HEADER.pack(command, checksum(unsummed), session_id, reply_id) + payload


def tcp_frame(packet: bytes) -> bytes:
    """Return a packet with its TCP prefix."""
    return TCP_PREFIX.pack(TCP_MAGIC, len(packet)) + packet


def parse_header(packet: bytes) -> tuple[int, int, int, int, bytes]:
    """Given a packet, return (command, checksum, session_id, reply_id, payload).

    Raise ValueError if it is shorter than a header.
    """
    if len(packet) < HEADER.size:
        raise ValueError(f"packet of {len(packet)} bytes is shorter than the 8-byte header")
    command, check, session_id, reply_id = HEADER.unpack_from(packet, 0)
    return command, check, session_id, reply_id, packet[HEADER.size :]


def _reverse_bits32(value: int) -> int:
    """Reverse the 32 bits of a u32."""
    return int(f"{value & 0xFFFFFFFF:032b}"[::-1], 2)


def make_commkey(key: int, session_id: int, ticks: int = 50) -> bytes:
    """Return the 4-byte AUTH answer to a comm-key challenge (the ZK SDK's MakeKey).

    Reverse the 32 bits of the key, add the session id, XOR the bytes with "ZKSO", swap the two u16
    halves, then XOR bytes 0, 1 and 3 with `ticks` and put `ticks` itself in byte 2.
    """
    scrambled = (_reverse_bits32(key) + session_id) & 0xFFFFFFFF
    b = bytes(x ^ y for x, y in zip(struct.pack("<I", scrambled), b"ZKSO", strict=True))
    swapped = b[2:4] + b[0:2]
    tick = ticks & 0xFF
    return bytes((swapped[0] ^ tick, swapped[1] ^ tick, tick, swapped[3] ^ tick))


def commkey_matches(answer: bytes, key: int, session_id: int) -> bool:
    """Return True if `answer` is make_commkey(key, session_id, ticks) for the ticks it carries
    (clients pick their own ticks and send it in byte 2)."""
    if len(answer) < 4:
        return False
    return answer[:4] == make_commkey(key, session_id, answer[2])


def encode_event_time(year: int, month: int, day: int, hour: int, minute: int, second: int) -> bytes:
    """Return the 6-byte time of a live event: Y-2000, M, D, h, m, s (each clamped to a byte)."""
    return bytes(min(max(v, 0), 255) for v in (year - 2000, month, day, hour, minute, second))
