"""The store's schema: its migrations, applied in order by `Store.open` (sqlite-utils records which ran)."""

from __future__ import annotations

import sqlite_utils
from sqlite_utils.migrations import Migrations

migrations = Migrations("zkdingsync")


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


@migrations()
def m003_dingtalk_evidence(db: sqlite_utils.Database) -> None:
    """What DingTalk confirmed (its request id, or the record id a read-back found), employee names for
    the export, an index for reading a window of days, and the terminals' past outages. Existing punches
    keep NULL."""
    db.execute("ALTER TABLE punches ADD COLUMN request_id TEXT")
    db.execute("ALTER TABLE punches ADD COLUMN record_id TEXT")
    db.execute("CREATE INDEX punches_local_time ON punches (local_time)")
    db.execute(
        "CREATE TABLE employee_names (serial TEXT NOT NULL, enroll_number TEXT NOT NULL, name TEXT NOT NULL, "
        "PRIMARY KEY (serial, enroll_number))"
    )
    db.execute("CREATE TABLE dingtalk_names (userid TEXT PRIMARY KEY, name TEXT NOT NULL)")
    # Ended outages of each terminal, for the daily report (a current one is the checkpoint's down_since).
    db.execute("CREATE TABLE outages (device TEXT NOT NULL, down_since TEXT NOT NULL, up_at TEXT NOT NULL)")
    db.execute("CREATE INDEX outages_up_at ON outages (up_at)")


@migrations()
def m004_log_tail(db: sqlite_utils.Database) -> None:
    """Tail reads: the last record stored of each terminal's log (raw bytes), and whether its firmware
    reads a buffer from an offset (NULL: not known yet)."""
    db.execute("ALTER TABLE checkpoints ADD COLUMN last_record BLOB")
    db.execute("ALTER TABLE checkpoints ADD COLUMN offset_reads INTEGER")


@migrations()
def m005_history_and_daily_calls(db: sqlite_utils.Database) -> None:
    """History (punches kept but not queued) needs each terminal's first contact; the budget forecast
    needs calls per day; bulk parking groups the pending punches by enroll number; live first takes the
    newest pending punches."""
    db.execute("ALTER TABLE checkpoints ADD COLUMN first_contact TEXT")
    # A store from before: its terminals were met when their first punch was stored (else at their last
    # successful poll), so nothing already being delivered turns into history.
    db.execute(
        "UPDATE checkpoints SET first_contact = coalesce("
        "(SELECT min(stored_at) FROM punches WHERE punches.device = checkpoints.device), last_success)"
    )
    db.execute("CREATE TABLE api_calls_daily (day TEXT PRIMARY KEY, calls INTEGER NOT NULL)")
    db.execute("CREATE INDEX punches_pending_enroll ON punches (enroll_number) WHERE delivery = 'pending'")
    db.execute("CREATE INDEX punches_pending_stored ON punches (stored_at) WHERE delivery = 'pending'")
    db.execute("CREATE INDEX punches_history ON punches (device, check_time_ms) WHERE delivery = 'history'")
