"""The employees' names on each terminal's user table, kept for HR's export.

After a successful poll the poller hands over the terminal's user count; the user table is read (one more
short session) only when that count differs from the names already known for the terminal: once for a new
terminal, and again when users are enrolled or removed. A failed read costs nothing but a debug line: the
names are a convenience of the export, never in the way of polling, and are tried again at the next change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog

from zkdingsync.devices.zk import DeviceLike
from zkdingsync.errors import StoreError, TerminalError
from zkdingsync.model import TerminalUser

log = structlog.get_logger(__name__)

MAX_NAME = 64  # characters of a terminal user name kept


class UserTableReader(Protocol):
    """Reads a terminal's user table (the terminal adapter)."""

    def read_users(
        self, device: DeviceLike, *, timeout_seconds: float, cancel: threading.Event | None
    ) -> list[TerminalUser]: ...


class NameStore(Protocol):
    """Where the names are kept (the store)."""

    def terminal_name_count(self, serial: str) -> int: ...

    def save_terminal_names(self, serial: str, names: Mapping[str, str]) -> None: ...


class TerminalNames:
    """Keeps the store's names of each terminal's users up to date. Thread-safe (one poll per terminal)."""

    def __init__(self, store: NameStore, reader: UserTableReader, *, timeout: Callable[[], float]) -> None:
        """Given the store, the adapter and the poll timeout (a function: reloads change it)."""
        self._store = store
        self._reader = reader
        self._timeout = timeout
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}  # serial -> the user count its names were last read at

    def after_poll(self, device: DeviceLike, serial: str, users: int, cancel: threading.Event | None) -> bool:
        """Given a terminal just polled, its serial and user count, read and keep its names if the count
        changed; return True when they were read."""
        with self._lock:
            known = self._seen.get(serial)
        try:
            if known is None:
                known = self._store.terminal_name_count(serial)
            if known == users or users <= 0:
                self._remember(serial, known)
                return False
            table = self._reader.read_users(device, timeout_seconds=self._timeout(), cancel=cancel)
            names = {user.enroll_number: user.name.strip()[:MAX_NAME] for user in table if user.name.strip()}
            self._store.save_terminal_names(serial, names)
        except (TerminalError, StoreError) as error:
            log.debug("terminal.names_unread", device=device.name, error=str(error))
            self._remember(serial, users)  # not again before the count changes
            return False
        self._remember(serial, users)
        log.debug("terminal.names_read", device=device.name, users=len(table), named=len(names))
        return True

    def _remember(self, serial: str, users: int) -> None:
        with self._lock:
            self._seen[serial] = users
