"""The store's connection: open (creating and migrating, or read-only), the single-instance lock,
transactions and queries. Every table's methods (the other modules of this package) build on it.

One file, WAL journal, `synchronous=FULL` so that a committed "delivered" survives power loss. One
connection behind a lock, shared by the poller threads, the forwarder threads and the main loop of one
process. Other processes (`status`, `retry`) open their own connection; WAL lets them read while the
daemon writes. A lock file next to the database keeps a second daemon away.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import sqlite_utils

from zkdingsync.errors import StoreError, StoreLockedError
from zkdingsync.files import create_private, tighten_database, tighten_fd
from zkdingsync.store.schema import migrations

# How long a writer waits for another process (a `retry` or `status` run) to finish its transaction.
BUSY_TIMEOUT_MS = 10_000

S = TypeVar("S", bound="Connection")

# Writes one key-value (key, value, expires_at or None), replacing what the key held.
UPSERT_KV = (
    "INSERT INTO kv (key, value, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
)


def iso(at: datetime) -> str:
    """Given an aware datetime, return it as the store writes times (UTC ISO-8601, microseconds)."""
    if at.tzinfo is None:
        raise ValueError("store times must be timezone-aware")
    return at.astimezone(timezone.utc).isoformat(timespec="microseconds")


def parse_time(text: str | None) -> datetime | None:
    """Given a time as the store wrote it (or None), return the aware datetime (or None)."""
    return None if text is None else datetime.fromisoformat(text)


class Connection:
    """The SQLite connection of a store. Open it with `Store.open(path)`; thread-safe; a context manager."""

    def __init__(self, db: sqlite_utils.Database, path: Path, lock_file: int | None) -> None:
        self._db = db
        self._conn: sqlite3.Connection = db.conn
        self._conn.row_factory = sqlite3.Row
        self.path = path
        self._lock_fd = lock_file
        self._mutex = threading.RLock()

    # ------------------------------------------------------------------ life cycle

    @classmethod
    def open(cls: type[S], path: Path, *, lock: bool = False, read_only: bool = False) -> S:
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
            # Owner-only before SQLite opens it: the -wal and -shm files it creates take the same mode.
            create_private(path)
            tighten_database(path)
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
            raise store_error(path, error) from error
        except OSError as error:
            if lock_fd is not None:
                os.close(lock_fd)
            raise StoreError(f"store {path}: {error.strerror or error}") from error
        return cls(db, path, lock_fd)

    @classmethod
    def _open_read_only(cls: type[S], path: Path) -> S:
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
            raise store_error(path, error) from error
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

    def __enter__(self: S) -> S:
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
                raise store_error(self.path, error) from error
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
                raise store_error(self.path, error) from error

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._mutex:
            try:
                return list(self._conn.execute(sql, params).fetchall())
            except sqlite3.Error as error:
                raise store_error(self.path, error) from error

    def _update(self, sql: str, params: Sequence[Any]) -> None:
        with self._transaction() as conn:
            conn.execute(sql, params)

    def integrity_check(self) -> str:
        """Return SQLite's `PRAGMA integrity_check` answer ("ok" when the file is sound)."""
        return str(self._query("PRAGMA integrity_check")[0][0])


def store_error(path: Path, error: sqlite3.Error) -> StoreError:
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
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise StoreError(f"store {path}: cannot create lock file {lock_path}: {error.strerror}") from error
    try:
        tighten_fd(fd)
    except OSError as error:
        os.close(fd)
        raise StoreError(f"store {path}: cannot make {lock_path} owner-only: {error.strerror}") from error
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
