"""What HR's evidence is read from: every punch of a window for `export` (one row at a time), the
employees' names, and the online copy `backup` takes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from zkdingsync.store.connection import UPSERT_KV, Connection, iso, parse_time, store_error
from zkdingsync.store.state import BACKUP_TAKEN_KEY


@dataclass(frozen=True)
class ExportWindow:
    """Which punches an export takes: terminal-local days `first_day`..`last_day` ("YYYY-MM-DD", both
    included, read in each terminal's own zone), optionally only some terminals or enroll numbers."""

    first_day: str
    last_day: str
    devices: tuple[str, ...] = ()
    enroll_numbers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportedPunch:
    """One stored punch with everything HR's export shows about it."""

    device: str
    serial: str
    enroll_number: str
    local_time: str  # the terminal's wall clock, "YYYY-MM-DD HH:MM:SS"
    punch_state: int
    verify_mode: int
    check_time_ms: int | None
    stored_at: datetime
    delivery: str  # the state's stored name, kept as text so that every state exports, known or not
    reason: str | None
    delivered_at: datetime | None  # when DingTalk's answer (or the read-back that found it) came
    userid: str | None
    outcome_unknown: bool
    request_id: str | None  # DingTalk's request_id of the accepted upload
    record_id: str | None  # the listRecord id of the record a read-back settled it with


def export_filter(window: ExportWindow) -> tuple[str, list[Any]]:
    # Local times are the terminals' wall clocks as text, so comparing text selects whole local days in
    # each terminal's own zone; "~" sorts after any time of the last day.
    clauses = ["local_time >= ?", "local_time <= ?"]
    params: list[Any] = [window.first_day, window.last_day + "~"]
    for column, values in (("device", window.devices), ("enroll_number", window.enroll_numbers)):
        if values:
            clauses.append(f"{column} IN ({','.join('?' * len(values))})")
            params.extend(values)
    return " AND ".join(clauses), params


class Evidence(Connection):
    """Export reads, employee names and the online copy."""

    def export_count(self, window: ExportWindow) -> int:
        """Return how many punches `export_punches` yields for the window (for the progress line)."""
        where, params = export_filter(window)
        return int(self._query(f"SELECT count(*) FROM punches WHERE {where}", params)[0][0])  # noqa: S608

    def export_punches(self, window: ExportWindow) -> Iterator[ExportedPunch]:
        """Yield every punch of the window, whatever its delivery state, by local time.

        Rows are read one at a time from the database, so any window takes the same memory. Call it inside
        `snapshot()` for a consistent read while the daemon writes. A store an older version created
        without the DingTalk evidence columns yields None for them. Raise StoreError if a read fails.
        """
        where, params = export_filter(window)
        present = {row[1] for row in self._query("PRAGMA table_info(punches)")}
        evidence = ", ".join(
            name if name in present else f"NULL AS {name}" for name in ("request_id", "record_id")
        )
        sql = (
            "SELECT device, serial, enroll_number, local_time, punch_state, verify_mode, check_time_ms, "  # noqa: S608
            f"stored_at, delivery, reason, delivered_at, userid, outcome_unknown, {evidence} "
            f"FROM punches WHERE {where} ORDER BY local_time, id"
        )
        with self._mutex:
            try:
                for row in self._conn.execute(sql, params):
                    yield ExportedPunch(
                        device=row[0],
                        serial=row[1],
                        enroll_number=row[2],
                        local_time=row[3],
                        punch_state=row[4],
                        verify_mode=row[5],
                        check_time_ms=row[6],
                        stored_at=datetime.fromisoformat(row[7]),
                        delivery=row[8],
                        reason=row[9],
                        delivered_at=parse_time(row[10]),
                        userid=row[11],
                        outcome_unknown=bool(row[12]),
                        request_id=row[13],
                        record_id=row[14],
                    )
            except sqlite3.Error as error:
                raise store_error(self.path, error) from error

    def has_punches_of(self, device: str) -> bool:
        """Return True when the store holds a punch of the named terminal (an index lookup)."""
        return bool(self._query("SELECT 1 FROM punches WHERE device = ? LIMIT 1", (device,)))

    def employee_names(self) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
        """Return the known names: (serial, enroll number) -> name from the terminals' user tables, and
        DingTalk userid -> name from the directory. Empty on a store without the tables."""
        tables = {row[0] for row in self._query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "employee_names" not in tables:
            return {}, {}
        terminal = {
            (row[0], row[1]): row[2]
            for row in self._query("SELECT serial, enroll_number, name FROM employee_names")
        }
        directory = {row[0]: row[1] for row in self._query("SELECT userid, name FROM dingtalk_names")}
        return terminal, directory

    def terminal_name_count(self, serial: str) -> int:
        """Return how many of a terminal's enroll numbers have a known name (an index range)."""
        rows = self._query("SELECT count(*) FROM employee_names WHERE serial = ?", (serial,))
        return int(rows[0][0])

    def save_terminal_names(self, serial: str, names: Mapping[str, str]) -> None:
        """Remember the names a terminal's user table gives its enroll numbers (blank names are skipped)."""
        rows = [(serial, enroll, name.strip()) for enroll, name in names.items() if name.strip()]
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO employee_names (serial, enroll_number, name) VALUES (?, ?, ?) "
                "ON CONFLICT (serial, enroll_number) DO UPDATE SET name = excluded.name",
                rows,
            )

    def save_directory_names(self, names: Mapping[str, str]) -> None:
        """Remember the names the DingTalk directory gives its userids (blank names are skipped)."""
        rows = [(userid, name.strip()) for userid, name in names.items() if name.strip()]
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO dingtalk_names (userid, name) VALUES (?, ?) "
                "ON CONFLICT (userid) DO UPDATE SET name = excluded.name",
                rows,
            )

    def copy_to(self, target: Path, *, taken_at: datetime) -> None:
        """Copy the whole store into `target` (an empty file) through SQLite's online backup API.

        The copy is taken in one read transaction, so it is the store as it was at one moment however
        much the daemon writes meanwhile, and it is a single self-contained file (rollback journal, not
        WAL). It is marked as a backup taken at `taken_at`: should it ever be restored, its pending punches
        may have been delivered after that moment, so the daemon reads DingTalk back before sending them
        (`PunchQueue.adopt_restored_backup`). Raise StoreError naming `target` when it cannot be written (a
        full disk, say).
        """
        try:
            copy = sqlite3.connect(str(target), isolation_level=None)
        except sqlite3.Error as error:
            raise store_error(target, error) from error
        try:
            with self._mutex:
                self._conn.backup(copy)
            copy.execute(UPSERT_KV, (BACKUP_TAKEN_KEY, iso(taken_at), None))
            copy.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.Error as error:
            raise store_error(target, error) from error
        finally:
            copy.close()
