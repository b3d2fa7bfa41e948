"""Terminals: the checkpoint of each (where its log was read to, its health), a poll's new punches stored
with the checkpoint in one transaction, and the enroll numbers of 8-byte-record terminals' uids."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from zkdingsync.model import Delivery, Punch, TerminalInfo
from zkdingsync.store.connection import UPSERT_KV, Connection, iso, parse_time
from zkdingsync.store.uid_names import UidNames

_UID_NAMES_KEY = "uid_enroll:{serial}"


@dataclass(frozen=True)
class Checkpoint:
    """What the store remembers about one terminal between polls."""

    device: str
    serial: str | None
    record_count: int
    record_size: int | None
    last_poll: datetime | None
    last_success: datetime | None
    last_error: str | None
    down_since: datetime | None
    drift_seconds: float | None
    firmware: str | None
    platform: str | None
    users: int | None
    user_capacity: int | None
    record_capacity: int | None
    last_record: bytes | None = None  # the raw bytes of the last record stored (for tail reads)
    offset_reads: bool | None = None  # does the firmware read from an offset? None: not known yet


@dataclass(frozen=True)
class LogEnd:
    """The end of a terminal's log as a poll read it: its last record (raw bytes), and what the poll
    learned about offset reads (None: nothing)."""

    last_record: bytes | None
    offset_reads: bool | None = None


def _checkpoint(row: sqlite3.Row) -> Checkpoint:
    return Checkpoint(
        device=row["device"],
        serial=row["serial"],
        record_count=row["record_count"],
        record_size=row["record_size"],
        last_poll=parse_time(row["last_poll"]),
        last_success=parse_time(row["last_success"]),
        last_error=row["last_error"],
        down_since=parse_time(row["down_since"]),
        drift_seconds=row["drift_seconds"],
        firmware=row["firmware"],
        platform=row["platform"],
        users=row["users"],
        user_capacity=row["user_capacity"],
        record_capacity=row["record_capacity"],
        last_record=row["last_record"],
        offset_reads=None if row["offset_reads"] is None else bool(row["offset_reads"]),
    )


class Terminals(Connection):
    """The checkpoints table, and the uid memo of each 8-byte-record terminal."""

    def checkpoint(self, device: str) -> Checkpoint | None:
        """Return the checkpoint of the named terminal, or None if it was never polled."""
        rows = self._query("SELECT * FROM checkpoints WHERE device = ?", (device,))
        return _checkpoint(rows[0]) if rows else None

    def checkpoints(self) -> list[Checkpoint]:
        """Return every terminal's checkpoint, ordered by name."""
        return [_checkpoint(row) for row in self._query("SELECT * FROM checkpoints ORDER BY device")]

    def save_poll(
        self,
        device: str,
        *,
        serial: str,
        record_count: int,
        record_size: int | None,
        punches: Sequence[Punch],
        polled_at: datetime,
        info: TerminalInfo | None = None,
        drift_seconds: float | None = None,
        log_end: LogEnd | None = None,
    ) -> int:
        """Store a successful poll in one transaction and return how many punches were new.

        Punches already known (by their natural key) are left as they are, whatever their delivery state, so
        re-reading a whole log queues nothing twice. New punches become pending, or quarantined when they
        carry a quarantine reason. The checkpoint moves in the same transaction (with `log_end`, the last
        record read, for the next tail read). Raise StoreError (nothing written) when the disk refuses.
        """
        now = iso(polled_at)
        with self._transaction() as conn:
            new = _insert_punches(conn, punches, now)
            # A poll that succeeds ends an outage: keep it for the daily report.
            conn.execute(
                "INSERT INTO outages (device, down_since, up_at) SELECT device, down_since, ? "
                "FROM checkpoints WHERE device = ? AND down_since IS NOT NULL",
                (now, device),
            )
            _save_checkpoint(conn, device, serial, record_count, record_size, now, info, drift_seconds)
            if log_end is not None:
                conn.execute(
                    "UPDATE checkpoints SET last_record = ?, offset_reads = COALESCE(?, offset_reads) "
                    "WHERE device = ?",
                    (log_end.last_record, log_end.offset_reads, device),
                )
        return new

    def save_punches(self, punches: Sequence[Punch], *, polled_at: datetime) -> int:
        """Store one batch of a big read without moving the checkpoint (the last batch goes with
        `save_poll`): a crash between batches leaves the checkpoint behind what is stored, never ahead.
        Return how many punches were new; raise StoreError (nothing written) when the disk refuses."""
        with self._transaction() as conn:
            return _insert_punches(conn, punches, iso(polled_at))

    def record_poll_failure(self, device: str, *, error: str, at: datetime) -> Checkpoint:
        """Remember a failed poll (the first failure of an outage sets `down_since`); return it."""
        now = iso(at)
        with self._transaction() as conn:
            conn.execute(
                """
                INSERT INTO checkpoints (device, last_poll, last_error, down_since) VALUES (?, ?, ?, ?)
                ON CONFLICT (device) DO UPDATE SET last_poll = excluded.last_poll,
                    last_error = excluded.last_error,
                    down_since = COALESCE(checkpoints.down_since, excluded.down_since)
                """,
                (device, now, error, now),
            )
        checkpoint = self.checkpoint(device)
        assert checkpoint is not None  # noqa: S101 - written just above
        return checkpoint

    def forget_terminal(self, device: str) -> None:
        """Drop a terminal's checkpoint (its punches stay): used when a terminal leaves the config."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM checkpoints WHERE device = ?", (device,))

    def uid_names(self, serial: str) -> UidNames:
        """Return the enroll number each uid of the terminal with this serial had (empty when none kept)."""
        rows = self._query("SELECT value FROM kv WHERE key = ?", (_UID_NAMES_KEY.format(serial=serial),))
        return UidNames.load(rows[0][0] if rows else None)

    def save_uid_names(self, serial: str, names: UidNames) -> None:
        """Keep the uid memo of a terminal (before the punches it resolved are stored)."""
        self._update(UPSERT_KV, (_UID_NAMES_KEY.format(serial=serial), names.dump(), None))


def _insert_punches(conn: sqlite3.Connection, punches: Sequence[Punch], now: str) -> int:
    """Insert the punches the store does not know yet (inside a transaction); return how many."""
    rows = [
        (
            p.serial,
            p.enroll_number,
            p.local_time,
            p.punch_state,
            p.verify_mode,
            p.device,
            p.check_time_ms,
            p.workcode,
            now,
            Delivery.QUARANTINED.value if p.quarantine_reason else Delivery.PENDING.value,
            p.quarantine_reason,
            now,
        )
        for p in punches
    ]
    before = conn.total_changes
    conn.executemany(
        "INSERT OR IGNORE INTO punches (serial, enroll_number, local_time, punch_state, verify_mode, "
        "device, check_time_ms, workcode, stored_at, delivery, reason, next_attempt_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    return conn.total_changes - before


def _save_checkpoint(
    conn: sqlite3.Connection,
    device: str,
    serial: str,
    record_count: int,
    record_size: int | None,
    now: str,
    info: TerminalInfo | None,
    drift_seconds: float | None,
) -> None:
    """Move a terminal's checkpoint after a successful poll (inside the poll's transaction)."""
    conn.execute(
        """
            INSERT INTO checkpoints (device, serial, record_count, record_size, last_poll, last_success,
                last_error, down_since, drift_seconds, firmware, platform, users, user_capacity,
                record_capacity)
            VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (device) DO UPDATE SET
                serial = excluded.serial, record_count = excluded.record_count,
                record_size = COALESCE(excluded.record_size, checkpoints.record_size),
                last_poll = excluded.last_poll, last_success = excluded.last_success,
                last_error = NULL, down_since = NULL,
                drift_seconds = COALESCE(excluded.drift_seconds, checkpoints.drift_seconds),
                firmware = COALESCE(excluded.firmware, checkpoints.firmware),
                platform = COALESCE(excluded.platform, checkpoints.platform),
                users = COALESCE(excluded.users, checkpoints.users),
                user_capacity = COALESCE(excluded.user_capacity, checkpoints.user_capacity),
                record_capacity = COALESCE(excluded.record_capacity, checkpoints.record_capacity)
            """,
        (
            device,
            serial,
            record_count,
            record_size,
            now,
            now,
            drift_seconds,
            info.firmware if info else None,
            info.platform if info else None,
            info.users if info else None,
            info.user_capacity if info else None,
            info.record_capacity if info else None,
        ),
    )
