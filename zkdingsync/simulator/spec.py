"""What a fake terminal is: `TerminalSpec` (its layout, capacity, firmware quirks) and the helpers that
make deterministic users and punch histories for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from zkdingsync.devices import records as codec
from zkdingsync.model import TerminalUser

DEFAULT_FIRST_PUNCH = "2024-01-01 08:00:00"

# How a firmware answers a READ_BUFFER whose start offset is not a multiple of the chunk size
# (`TerminalSpec.offset_reads`); whole-buffer reads, chunk by chunk, always work.
OFFSET_HONOURED = "honour"  # the bytes asked for (every firmware we know of)
OFFSET_IGNORED = "ignore"  # the right length, but read from the start of the buffer
OFFSET_WHOLE = "whole"  # the whole buffer, whatever was asked
OFFSET_ERROR = "error"  # ACK_ERROR
OFFSET_READS = (OFFSET_HONOURED, OFFSET_IGNORED, OFFSET_WHOLE, OFFSET_ERROR)

FULL_LOG_REFUSE = "refuse"
FULL_LOG_ROTATE = "rotate"


def make_users(count: int) -> list[TerminalUser]:
    """Return `count` deterministic users: uid i (from 1), enroll number str(1000 + i), a short name
    that fits both user-table layouts."""
    return [
        TerminalUser(uid=i, enroll_number=str(1000 + i), name=f"User{i}" if i < 10_000 else f"U{i}")
        for i in range(1, count + 1)
    ]


def history_start(count: int, timezone: str = "Asia/Shanghai", step_seconds: int = 60) -> str:
    """Return the wall-clock start (in `timezone`) of `count` punches `step_seconds` apart that end about
    now: a history DingTalk accepts (its window is 180 days), for the demo and `simulate`."""
    start = datetime.now(ZoneInfo(timezone)) - timedelta(seconds=step_seconds * (count + 1))
    return start.strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class TerminalSpec:
    """How to build a fake terminal. `users` is a list of users or a count for `make_users`; `records`
    is the number of deterministic punches it starts with; `port` 0 picks a free port (TCP and UDP).
    `capacity` is the log's record capacity: a full log refuses new punches, or with
    `overwrite_when_full` drops its oldest record for each new one (firmware that rotates).
    `offset_reads` is how READ_BUFFER treats a start offset (one of `OFFSET_READS`)."""

    serial: str = "SIM0000001"
    name: str = ""  # ~DeviceName; defaults to the serial
    record_size: int = 40  # 8, 16, 40 or 49
    user_table_size: int = 72  # 28 or 72
    users: Sequence[TerminalUser] | int = 10
    records: int = 0
    comm_key: int = 0
    capacity: int = 100_000
    user_capacity: int = 10_000
    timezone: str = "Asia/Shanghai"
    clock_offset_seconds: float = 0.0
    port: int = 0
    firmware: str = "Ver 6.60 Apr 28 2017"
    platform: str = "ZMM220_TFT"
    mac: str = ""  # defaults to one derived from the serial
    inline_buffers: bool = False  # answer PREPARE_BUFFER with CMD_DATA inline when the buffer is small
    first_punch: str = DEFAULT_FIRST_PUNCH  # wall-clock time of the first of `records` (see history_start)
    overwrite_when_full: bool = False  # a full log drops its oldest record for a new punch (else refuses)
    offset_reads: str = OFFSET_HONOURED

    def __post_init__(self) -> None:
        if self.record_size not in codec.RECORD_SIZES:
            raise ValueError(f"record_size must be one of {codec.RECORD_SIZES}, not {self.record_size}")
        if self.user_table_size not in codec.USER_TABLE_SIZES:
            raise ValueError(f"user_table_size must be 28 or 72, not {self.user_table_size}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range")
        if self.capacity < 0 or self.records > self.capacity:
            raise ValueError(f"records ({self.records}) must be between 0 and capacity ({self.capacity})")
        if self.offset_reads not in OFFSET_READS:
            raise ValueError(
                f"offset_reads must be one of {', '.join(OFFSET_READS)}, not {self.offset_reads!r}"
            )
        ZoneInfo(self.timezone)  # fail early on an unknown zone
