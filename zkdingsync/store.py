"""The SQLite store: every punch, its delivery state, per-terminal checkpoints, and small bits of state.

One file, WAL journal, `synchronous=FULL` so that a committed "delivered" survives power loss. A punch and
its delivery state share one row, so a poll's new punches and their queue entries commit together, and the
checkpoint moves in the same transaction: it can never run ahead of durable storage.

The store is shared by the poller threads, the forwarder threads and the main loop of one process: one
connection behind a lock. Other processes (`status`, `retry`) open their own connection; WAL lets them read
while the daemon writes. A lock file next to the database keeps a second daemon away.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from zkdingsync.errors import StoreError, StoreLockedError
from zkdingsync.model import Delivery, Punch, TerminalInfo

migrations = Migrations("zkdingsync")

# How long a writer waits for another process (a `retry` or `status` run) to finish its transaction.
BUSY_TIMEOUT_MS = 10_000


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    """Punches with their delivery state, terminal checkpoints, key-values, call counts, job numbers."""
    db.execute(
        """
        CREATE TABLE punches (
            id INTEGER PRIMARY KEY,
            serial TEXT NOT NULL,
            enroll_number TEXT NOT NULL,
            local_time TEXT NOT NULL,
            punch_state INTEGER NOT NULL,
            verify_mode INTEGER NOT NULL,
            device TEXT NOT NULL,
            check_time_ms INTEGER,
            workcode INTEGER NOT NULL DEFAULT 0,
            stored_at TEXT NOT NULL,
            delivery TEXT NOT NULL,
            reason TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT,
            in_flight_since TEXT,
            outcome_unknown INTEGER NOT NULL DEFAULT 0,
            delivered_at TEXT,
            userid TEXT,
            UNIQUE (serial, enroll_number, local_time, punch_state, verify_mode)
        )
        """
    )
    db.execute("CREATE INDEX punches_queue ON punches (delivery, next_attempt_at, id)")
    db.execute("CREATE INDEX punches_delivered_at ON punches (delivered_at) WHERE delivered_at IS NOT NULL")
    db.execute("CREATE INDEX punches_device_stored ON punches (device, stored_at)")
    db.execute(
        """
        CREATE TABLE checkpoints (
            device TEXT PRIMARY KEY,
            serial TEXT,
            record_count INTEGER NOT NULL DEFAULT 0,
            record_size INTEGER,
            last_poll TEXT,
            last_success TEXT,
            last_error TEXT,
            down_since TEXT,
            drift_seconds REAL,
            firmware TEXT,
            platform TEXT,
            users INTEGER,
            user_capacity INTEGER,
            record_capacity INTEGER
        )
        """
    )
    db.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at TEXT)")
    db.execute("CREATE TABLE api_calls (month TEXT PRIMARY KEY, calls INTEGER NOT NULL)")
    db.execute("CREATE TABLE job_numbers (job_number TEXT PRIMARY KEY, userid TEXT NOT NULL)")


@migrations()
def m002_outcome_unknown_index(db: sqlite_utils.Database) -> None:
    """`status` counts possible duplicates on every run: an index instead of a scan of every punch."""
    db.execute("CREATE INDEX punches_outcome_unknown ON punches (id) WHERE outcome_unknown = 1")


def _iso(at: datetime) -> str:
    if at.tzinfo is None:
        raise ValueError("store times must be timezone-aware")
    return at.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _parse(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


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


@dataclass(frozen=True)
class StoredPunch:
    """A punch with its row id and delivery state."""

    id: int
    punch: Punch
    delivery: Delivery
    reason: str | None
    attempts: int
    outcome_unknown: bool
    in_flight_since: datetime | None
    userid: str | None = None  # the DingTalk userid it was (last) uploaded as, or delivered to


_PUNCH_COLUMNS = (
    "id, serial, enroll_number, local_time, punch_state, verify_mode, device, check_time_ms, workcode, "
    "delivery, reason, attempts, outcome_unknown, in_flight_since, userid"
)


def _stored_punch(row: sqlite3.Row) -> StoredPunch:
    punch = Punch(
        device=row["device"],
        serial=row["serial"],
        enroll_number=row["enroll_number"],
        local_time=row["local_time"],
        punch_state=row["punch_state"],
        verify_mode=row["verify_mode"],
        check_time_ms=row["check_time_ms"],
        workcode=row["workcode"],
        quarantine_reason=row["reason"] if row["delivery"] == Delivery.QUARANTINED.value else None,
    )
    return StoredPunch(
        id=row["id"],
        punch=punch,
        delivery=Delivery(row["delivery"]),
        reason=row["reason"],
        attempts=row["attempts"],
        outcome_unknown=bool(row["outcome_unknown"]),
        in_flight_since=_parse(row["in_flight_since"]),
        userid=row["userid"],
    )


def _checkpoint(row: sqlite3.Row) -> Checkpoint:
    return Checkpoint(
        device=row["device"],
        serial=row["serial"],
        record_count=row["record_count"],
        record_size=row["record_size"],
        last_poll=_parse(row["last_poll"]),
        last_success=_parse(row["last_success"]),
        last_error=row["last_error"],
        down_since=_parse(row["down_since"]),
        drift_seconds=row["drift_seconds"],
        firmware=row["firmware"],
        platform=row["platform"],
        users=row["users"],
        user_capacity=row["user_capacity"],
        record_capacity=row["record_capacity"],
    )


class Store:
    """The SQLite store. Open it with `Store.open(path)`; thread-safe; a context manager."""

    def __init__(self, db: sqlite_utils.Database, path: Path, lock_file: int | None) -> None:
        self._db = db
        self._conn: sqlite3.Connection = db.conn
        self._conn.row_factory = sqlite3.Row
        self.path = path
        self._lock_fd = lock_file
        self._mutex = threading.RLock()

    # ------------------------------------------------------------------ life cycle

    @classmethod
    def open(cls, path: Path, *, lock: bool = False, read_only: bool = False) -> Store:
        """Given the database path, open (creating and migrating) the store.

        With `lock=True` take the single-instance lock first. With `read_only=True` open an existing store
        for reading only (for `status`): nothing is created, migrated or written. (Run as root beside the
        daemon, SQLite gives any -wal or -shm file it creates to the database's owner.) Raise
        StoreLockedError if another process holds the lock, StoreError if the file or its directory cannot
        be used.
        """
        path = Path(path)
        if read_only:
            return cls._open_read_only(path)
        lock_fd = _acquire_lock(path) if lock else None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
            # Transactions are ours (BEGIN/COMMIT via atomic()), not the sqlite3 module's implicit ones.
            conn.isolation_level = None
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys=ON")
            db = sqlite_utils.Database(conn)
            migrations.apply(db)
        except sqlite3.Error as error:
            if lock_fd is not None:
                os.close(lock_fd)
            raise _store_error(path, error) from error
        except OSError as error:
            if lock_fd is not None:
                os.close(lock_fd)
            raise StoreError(f"store {path}: {error.strerror or error}") from error
        return cls(db, path, lock_fd)

    @classmethod
    def _open_read_only(cls, path: Path) -> Store:
        if not path.is_file():
            raise StoreError(f"store {path}: no such file")
        try:
            # mode=rw never creates the file; query_only refuses every write. Not mode=ro: a read-only
            # connection cannot remove the -wal and -shm files it creates, a read-write one does on close.
            conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=rw",
                uri=True,
                timeout=BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,
            )
            conn.isolation_level = None
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA query_only=ON")
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as error:
            raise _store_error(path, error) from error
        if "punches" not in tables:
            conn.close()
            raise StoreError(f"store {path}: not a zkdingsync store (it has no punches table)")
        return cls(sqlite_utils.Database(conn), path, None)

    def close(self) -> None:
        """Close the connection and release the instance lock."""
        with self._mutex:
            self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Read in one transaction: every query inside sees the store as it was at the first one, however
        much the daemon writes meanwhile (WAL). Raise StoreError when the store cannot be read."""
        with self._mutex:
            try:
                self._conn.execute("BEGIN")
            except sqlite3.Error as error:
                raise _store_error(self.path, error) from error
            try:
                yield
            finally:
                # A failed read may have ended the transaction already.
                with suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; sqlite errors become StoreError (disk full, read-only, locked)."""
        with self._mutex:
            try:
                with self._db.atomic():
                    yield self._conn
            except sqlite3.Error as error:
                raise _store_error(self.path, error) from error

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._mutex:
            try:
                return list(self._conn.execute(sql, params).fetchall())
            except sqlite3.Error as error:
                raise _store_error(self.path, error) from error

    def integrity_check(self) -> str:
        """Return SQLite's `PRAGMA integrity_check` answer ("ok" when the file is sound)."""
        return str(self._query("PRAGMA integrity_check")[0][0])

    # ------------------------------------------------------------------ poller side

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
    ) -> int:
        """Store a successful poll in one transaction and return how many punches were new.

        Punches already known (by their natural key) are left as they are, whatever their delivery state, so
        re-reading a whole log queues nothing twice. New punches become pending, or quarantined when they
        carry a quarantine reason. The checkpoint moves in the same transaction. Raise StoreError (nothing
        written) when the disk refuses.
        """
        now = _iso(polled_at)
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
        with self._transaction() as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO punches (serial, enroll_number, local_time, punch_state, verify_mode, "
                "device, check_time_ms, workcode, stored_at, delivery, reason, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            new = conn.total_changes - before
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
        return new

    def record_poll_failure(self, device: str, *, error: str, at: datetime) -> Checkpoint:
        """Remember a failed poll (the first failure of an outage sets `down_since`); return it."""
        now = _iso(at)
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

    # ------------------------------------------------------------------ forwarder side

    def claim_due(self, now: datetime, limit: int) -> list[StoredPunch]:
        """Switch up to `limit` due pending punches (oldest first) to in flight and return them.

        The switch is committed before this returns, so a crash during the upload leaves them in flight:
        their outcome is then unknown and must be settled by reading DingTalk back.
        """
        at = _iso(now)
        with self._transaction() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM punches WHERE delivery = 'pending' AND next_attempt_at <= ? "
                    "ORDER BY next_attempt_at, id LIMIT ?",
                    (at, limit),
                )
            ]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            conn.execute(
                f"UPDATE punches SET delivery = 'in_flight', attempts = attempts + 1, "  # noqa: S608 - placeholders only
                f"in_flight_since = ? WHERE id IN ({marks})",
                (at, *ids),
            )
            rows = conn.execute(
                f"SELECT {_PUNCH_COLUMNS} FROM punches WHERE id IN ({marks}) ORDER BY id",  # noqa: S608
                ids,
            ).fetchall()
        return [_stored_punch(row) for row in rows]

    def _update(self, sql: str, params: Sequence[Any]) -> None:
        with self._transaction() as conn:
            conn.execute(sql, params)

    def record_upload_userids(self, userids: Mapping[int, str]) -> None:
        """Remember, before the uploads go out, which DingTalk userid each punch is sent as: should its
        outcome become unknown, DingTalk is read back under that userid, even if `users.map` changed."""
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE punches SET userid = ? WHERE id = ?",
                [(userid, pid) for pid, userid in userids.items()],
            )

    def make_pending_due(self, now: datetime) -> int:
        """Make every pending punch due at `now` (a restart or `retry` ends the waits of the last run).
        Return how many were waiting."""
        at = _iso(now)
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE punches SET next_attempt_at = ? WHERE delivery = 'pending' AND next_attempt_at > ?",
                (at, at),
            )
            return cursor.rowcount

    def mark_delivered(self, punch_id: int, *, at: datetime, userid: str) -> None:
        """DingTalk confirmed the punch (or a read-back found it)."""
        self._update(
            "UPDATE punches SET delivery = 'delivered', delivered_at = ?, userid = ?, reason = NULL, "
            "in_flight_since = NULL WHERE id = ?",
            (_iso(at), userid, punch_id),
        )

    def mark_pending(
        self, punch_id: int, *, retry_at: datetime, reason: str, outcome_unknown: bool = False
    ) -> None:
        """Put a punch back in the queue, due at `retry_at`.

        `outcome_unknown=True` records that an earlier upload's outcome was never known, which explains a
        duplicate in DingTalk should one appear.
        """
        self._update(
            "UPDATE punches SET delivery = 'pending', next_attempt_at = ?, reason = ?, "
            "in_flight_since = NULL, outcome_unknown = MAX(outcome_unknown, ?) WHERE id = ?",
            (_iso(retry_at), reason, int(outcome_unknown), punch_id),
        )

    def mark_unknown(self, punch_id: int, *, reason: str) -> None:
        """An upload's outcome is unknown: keep the punch in flight, flagged, until a read-back settles it."""
        self._update(
            "UPDATE punches SET delivery = 'in_flight', outcome_unknown = 1, reason = ? WHERE id = ?",
            (reason, punch_id),
        )

    def park(self, punch_id: int, *, reason: str) -> None:
        """Set a punch aside with its reason until a human fixes the cause and runs `retry`."""
        self._update(
            "UPDATE punches SET delivery = 'parked', reason = ?, in_flight_since = NULL WHERE id = ?",
            (reason, punch_id),
        )

    def in_flight(self) -> list[StoredPunch]:
        """Return every punch left in flight (after a crash, or an upload whose outcome is unknown)."""
        rows = self._query(
            f"SELECT {_PUNCH_COLUMNS} FROM punches WHERE delivery = 'in_flight' ORDER BY id"  # noqa: S608
        )
        return [_stored_punch(row) for row in rows]

    def requeue_parked(
        self, *, reason_contains: str | None = None, device: str | None = None, now: datetime | None = None
    ) -> int:
        """Put parked punches (optionally only those whose reason contains a text, or of one terminal) back
        in the queue, due now. Return how many."""
        return self._requeue(["delivery = 'parked'"], reason_contains, device, now)

    # ------------------------------------------------------------------ status

    def delivery_counts(self) -> dict[Delivery, int]:
        """Return how many punches are in each delivery state (every state present)."""
        counts = dict.fromkeys(Delivery, 0)
        for row in self._query("SELECT delivery, count(*) FROM punches GROUP BY delivery"):
            counts[Delivery(row[0])] = row[1]
        return counts

    def count_in(self, delivery: Delivery) -> int:
        """Return how many punches are in one delivery state (an index range: cheap on a large store)."""
        return int(self._query("SELECT count(*) FROM punches WHERE delivery = ?", (delivery.value,))[0][0])

    def park_reasons(self, limit: int = 5, *, delivery: Delivery = Delivery.PARKED) -> list[tuple[str, int]]:
        """Return the most frequent reasons of parked (or quarantined) punches with their counts."""
        rows = self._query(
            "SELECT coalesce(reason, ''), count(*) AS n FROM punches WHERE delivery = ? "
            "GROUP BY reason ORDER BY n DESC, reason LIMIT ?",
            (delivery.value, limit),
        )
        return [(row[0], row[1]) for row in rows]

    def delivered_since(self, at: datetime) -> int:
        """Return how many punches were delivered at or after `at`."""
        return int(self._query("SELECT count(*) FROM punches WHERE delivered_at >= ?", (_iso(at),))[0][0])

    def punches_since(self, at: datetime, device: str | None = None) -> int:
        """Return how many punches were stored at or after `at` (of one terminal, when named)."""
        if device is None:
            rows = self._query("SELECT count(*) FROM punches WHERE stored_at >= ?", (_iso(at),))
        else:
            rows = self._query(
                "SELECT count(*) FROM punches WHERE device = ? AND stored_at >= ?", (device, _iso(at))
            )
        return int(rows[0][0])

    def outcome_unknown_count(self) -> int:
        """Return how many punches ever had an upload whose outcome was unknown (possible duplicates)."""
        return int(self._query("SELECT count(*) FROM punches WHERE outcome_unknown = 1")[0][0])

    def punches(self, *, delivery: Delivery | None = None) -> list[StoredPunch]:
        """Return stored punches (all, or those in one delivery state), oldest first. For tests and tools."""
        if delivery is None:
            rows = self._query(f"SELECT {_PUNCH_COLUMNS} FROM punches ORDER BY id")  # noqa: S608
        else:
            rows = self._query(
                f"SELECT {_PUNCH_COLUMNS} FROM punches WHERE delivery = ? ORDER BY id",  # noqa: S608
                (delivery.value,),
            )
        return [_stored_punch(row) for row in rows]

    # ------------------------------------------------------------------ key-value

    def get_value(self, key: str, *, now: datetime) -> str | None:
        """Return the value stored under `key`, or None when missing or expired at `now`."""
        rows = self._query("SELECT value, expires_at FROM kv WHERE key = ?", (key,))
        if not rows:
            return None
        expires = _parse(rows[0]["expires_at"])
        if expires is not None and expires <= now:
            return None
        return str(rows[0]["value"])

    def set_value(self, key: str, value: str, *, expires_at: datetime | None = None) -> None:
        """Store `value` under `key`, optionally expiring at `expires_at`."""
        self._update(
            "INSERT INTO kv (key, value, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
            (key, value, _iso(expires_at) if expires_at else None),
        )

    def delete_value(self, key: str) -> None:
        """Forget the value under `key`."""
        self._update("DELETE FROM kv WHERE key = ?", (key,))

    # ------------------------------------------------------------------ monthly call budget

    def count_calls(self, month: str, n: int = 1) -> int:
        """Add `n` DingTalk calls to `month` ("2026-11") and return the month's new total."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO api_calls (month, calls) VALUES (?, ?) "
                "ON CONFLICT (month) DO UPDATE SET calls = calls + excluded.calls",
                (month, n),
            )
            return int(conn.execute("SELECT calls FROM api_calls WHERE month = ?", (month,)).fetchone()[0])

    def calls_in_month(self, month: str) -> int:
        """Return how many DingTalk calls were counted in `month`."""
        rows = self._query("SELECT calls FROM api_calls WHERE month = ?", (month,))
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------------------ job numbers

    def replace_job_numbers(self, mapping: Mapping[str, str], *, at: datetime) -> None:
        """Replace the cached job number -> DingTalk userid table."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM job_numbers")
            conn.executemany("INSERT INTO job_numbers (job_number, userid) VALUES (?, ?)", mapping.items())
            conn.execute(
                "INSERT INTO kv (key, value) VALUES ('job_numbers.updated_at', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (_iso(at),),
            )

    def job_numbers(self) -> dict[str, str]:
        """Return the cached job number -> DingTalk userid table."""
        return {row[0]: row[1] for row in self._query("SELECT job_number, userid FROM job_numbers")}

    def job_numbers_updated_at(self) -> datetime | None:
        """Return when the job number table was last replaced, or None."""
        rows = self._query("SELECT value FROM kv WHERE key = 'job_numbers.updated_at'")
        return _parse(rows[0][0]) if rows else None

    # ------------------------------------------------------------------ status and retry helpers

    def oldest_stored_at(self, delivery: Delivery = Delivery.PENDING) -> datetime | None:
        """Given a delivery state, return when its oldest punch was stored, or None when it has none."""
        rows = self._query("SELECT min(stored_at) FROM punches WHERE delivery = ?", (delivery.value,))
        return _parse(rows[0][0])

    def requeue_quarantined(
        self, *, reason_contains: str | None = None, device: str | None = None, now: datetime | None = None
    ) -> int:
        """Put quarantined punches (optionally filtered like `requeue_parked`) back in the queue, due now.

        Only punches with a real moment (`check_time_ms` set) move: an impossible local time can never be
        uploaded, so such a punch stays quarantined whatever a human asks. Return how many moved.
        """
        return self._requeue(
            ["delivery = 'quarantined'", "check_time_ms IS NOT NULL"], reason_contains, device, now
        )

    def _requeue(
        self, clauses: list[str], reason_contains: str | None, device: str | None, now: datetime | None
    ) -> int:
        params: list[Any] = [_iso(now or datetime.now(timezone.utc))]
        if reason_contains:
            clauses.append("instr(reason, ?) > 0")
            params.append(reason_contains)
        if device:
            clauses.append("device = ?")
            params.append(device)
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE punches SET delivery = 'pending', next_attempt_at = ?, reason = NULL "  # noqa: S608
                f"WHERE {' AND '.join(clauses)}",
                params,
            )
            return cursor.rowcount


def _store_error(path: Path, error: sqlite3.Error) -> StoreError:
    """Given a database path and SQLite's error, return a StoreError saying what the admin can check."""
    name = getattr(error, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
        hint = f" (is the disk holding {path.parent} full, read-only or failing?)"
    elif name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        hint = f" (does this user own {path.parent} and may it write there?)"
    elif name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        hint = " (the file is damaged or is not a zkdingsync store)"
    else:
        hint = ""
    return StoreError(f"store {path}: {error}{hint}")


def _acquire_lock(path: Path) -> int:
    """Take the single-instance lock beside the database; raise StoreLockedError if another process has it."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise StoreError(f"store {path}: cannot create lock file {lock_path}: {error.strerror}") from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f" (pid {holder})" if holder else ""
        raise StoreLockedError(
            f"another zkdingsync is already running on {path}{who}; stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
