"""Terminals: the checkpoint of each (where its log was read to, its health), a poll's new punches stored
with the checkpoint in one transaction, and the enroll numbers of 8-byte-record terminals' uids."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from zkdingsync.history import HistoryRule
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
    first_contact: datetime | None = None  # the first successful poll: delivery begins that day


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
        first_contact=parse_time(row["first_contact"]),
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
        history: HistoryRule | None = None,
    ) -> int:
        """Store a successful poll in one transaction and return how many punches were new.

        Punches already known (by their natural key) are left as they are, whatever their delivery state, so
        re-reading a whole log queues nothing twice. New punches become pending, quarantined when they
        carry a quarantine reason, or history when `history` is given and they were recorded before
        delivery begins (`HistoryRule`; the first successful poll is the terminal's first contact). The
        checkpoint moves in the same transaction (with `log_end`, the last record read, for the next tail
        read). Raise StoreError (nothing written) when the disk refuses.
        """
        now = iso(polled_at)
        with self._transaction() as conn:
            new = _insert_punches(conn, punches, now, _delivery_starts_ms(conn, device, history, polled_at))
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

    def save_punches(
        self, punches: Sequence[Punch], *, polled_at: datetime, history: HistoryRule | None = None
    ) -> int:
        """Store one batch of a big read without moving the checkpoint (the last batch goes with
        `save_poll`, `history` as there): a crash between batches leaves the checkpoint behind what is
        stored, never ahead. Return how many punches were new; raise StoreError (nothing written) when the
        disk refuses."""
        if not punches:
            return 0
        with self._transaction() as conn:
            starts_ms = _delivery_starts_ms(conn, punches[0].device, history, polled_at)
            return _insert_punches(conn, punches, iso(polled_at), starts_ms)

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


def _delivery_starts_ms(
    conn: sqlite3.Connection, device: str, history: HistoryRule | None, polled_at: datetime
) -> int | None:
    """The first epoch ms a terminal's new punches are queued from (None: all): the history rule applied
    to its first contact, which is this poll when the terminal has none yet."""
    if history is None:
        return None
    known = conn.execute("SELECT first_contact FROM checkpoints WHERE device = ?", (device,)).fetchone()
    first_contact = parse_time(known[0]) if known is not None else None
    return history.delivery_starts_ms(first_contact or polled_at)


def _insert_punches(
    conn: sqlite3.Connection, punches: Sequence[Punch], now: str, delivery_starts_ms: int | None
) -> int:
    """Insert the punches the store does not know yet (inside a transaction); return how many."""
    before = conn.total_changes
    conn.executemany(
        "INSERT OR IGNORE INTO punches (serial, enroll_number, local_time, punch_state, verify_mode, "
        "device, check_time_ms, workcode, stored_at, delivery, reason, next_attempt_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (_insert_row(p, now, delivery_starts_ms) for p in punches),
    )
    return conn.total_changes - before


def _insert_row(punch: Punch, stored_at: str, delivery_starts_ms: int | None) -> tuple[Any, ...]:
    """The punches row of a newly read punch: history when recorded before delivery begins (a history
    punch older than DingTalk's window is not quarantined: nothing is asked of anyone), else quarantined
    when it carries a reason, else pending."""
    reason = punch.quarantine_reason
    moment = punch.check_time_ms
    if delivery_starts_ms is not None and moment is not None and moment < delivery_starts_ms:
        delivery, reason = Delivery.HISTORY, None
    elif reason:
        delivery = Delivery.QUARANTINED
    else:
        delivery = Delivery.PENDING
    return (
        punch.serial,
        punch.enroll_number,
        punch.local_time,
        punch.punch_state,
        punch.verify_mode,
        punch.device,
        moment,
        punch.workcode,
        stored_at,
        delivery.value,
        reason,
        stored_at,
    )


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
                record_capacity, first_contact)
            VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?, ?, ?, ?)
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
                record_capacity = COALESCE(excluded.record_capacity, checkpoints.record_capacity),
                first_contact = COALESCE(checkpoints.first_contact, excluded.first_contact)
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
            now,
        ),
    )
