"""Misbehaviours a fake terminal can be told to show (`FakeTerminal.set_fault`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from zkdingsync.simulator import protocol as p


class FaultKind(str, enum.Enum):
    """What a fault does (see `Fault`)."""

    DELAY = "delay"
    DROP_MID_DOWNLOAD = "drop_mid_download"
    REFUSE = "refuse"
    GARBAGE = "garbage"
    PUNCH_DURING_DOWNLOAD = "punch_during_download"
    CLAIM_RECORDS = "claim_records"


@dataclass(frozen=True)
class Fault:
    """A misbehaviour to switch on with `FakeTerminal.set_fault()`; use the constructors.

    - `Fault.delay(seconds, command=None)`: wait `seconds` before answering (only `command`, e.g.
      `protocol.CMD_READ_BUFFER`, when given). Beyond the client's timeout the client sees a timeout and
      the late reply then sits in its socket.
    - `Fault.drop_mid_download(after_bytes=1000)`: on READ_BUFFER send PREPARE_DATA and the first
      `after_bytes` bytes of the chunk, then close the connection (TCP: FIN; UDP: stop sending). This is
      a terminal losing power mid-download; pyzk 0.9 spins forever on it.
    - `Fault.refuse()`: accept TCP connections and close them at once; ignore UDP datagrams. (To stop
      listening altogether use `FakeTerminal.power_off()`.)
    - `Fault.garbage(command=None, raw=False)`: corrupt replies. raw=False keeps the framing and fills
      the payload with random bytes (READ_BUFFER: the data chunk; a plain ACK gets 16 stray payload
      bytes); raw=True sends random unframed bytes instead of the reply.
    - `Fault.punch_during_download(enroll_number)`: when a session that asked GET_FREE_SIZES then asks
      PREPARE_BUFFER for the log, a punch is added just before the snapshot, so the count and the bytes
      disagree. Like any punch it is held back while the terminal is disabled.
    - `Fault.claim_records(count)`: GET_FREE_SIZES reports `count` records (and as much capacity), and a
      buffered read of the log announces `count` records and streams random bytes for as long as it is
      read: a hostile or broken terminal.

    `once=True` makes the fault fire a single time, then clear itself.
    """

    kind: FaultKind
    command: int | None = None
    seconds: float = 0.0
    after_bytes: int = 1000
    raw: bool = False
    enroll_number: str = ""
    once: bool = False
    records: int = 0

    @classmethod
    def delay(cls, seconds: float, command: int | None = None, once: bool = False) -> Fault:
        """Answer late: wait `seconds` before replying (to `command` only, when given)."""
        return cls(FaultKind.DELAY, command=command, seconds=seconds, once=once)

    @classmethod
    def drop_mid_download(cls, after_bytes: int = 1000, once: bool = False) -> Fault:
        """Close the connection after sending `after_bytes` bytes of a READ_BUFFER chunk."""
        return cls(FaultKind.DROP_MID_DOWNLOAD, command=p.CMD_READ_BUFFER, after_bytes=after_bytes, once=once)

    @classmethod
    def refuse(cls) -> Fault:
        """Close every TCP connection as soon as it is accepted; ignore UDP."""
        return cls(FaultKind.REFUSE)

    @classmethod
    def garbage(cls, command: int | None = None, raw: bool = False, once: bool = False) -> Fault:
        """Answer with random bytes (framed with a garbage payload, or raw unframed bytes)."""
        return cls(FaultKind.GARBAGE, command=command, raw=raw, once=once)

    @classmethod
    def punch_during_download(cls, enroll_number: str, once: bool = True) -> Fault:
        """Add a punch between the size query and the log snapshot of a download."""
        return cls(
            FaultKind.PUNCH_DURING_DOWNLOAD,
            command=p.CMD_PREPARE_BUFFER,
            enroll_number=enroll_number,
            once=once,
        )

    @classmethod
    def claim_records(cls, count: int) -> Fault:
        """Report `count` records (and that capacity) and stream garbage for the log's buffered read."""
        return cls(FaultKind.CLAIM_RECORDS, records=count)
