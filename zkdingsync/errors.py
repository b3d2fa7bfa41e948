"""Domain errors: what the rest of the program raises and catches instead of library exceptions.

Each adapter translates its library's failures into one of these at its edge, so callers never see a
`zk`, `sqlite3` or `requests` exception and every message can name the place (terminal, key, employee).
"""

from __future__ import annotations


class ZkdingsyncError(Exception):
    """Base of every error this program raises on purpose."""


class UserError(ZkdingsyncError):
    """A mistake the user can fix (config, arguments, environment): reported as one line, no traceback."""


class ConfigError(UserError):
    """The configuration is invalid. `problems` holds every problem found, each one line with its place."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StoreError(ZkdingsyncError):
    """The SQLite store cannot be opened, written or read (disk full, read-only, corrupt)."""


class StoreLockedError(UserError):
    """Another zkdingsync process already holds the store."""


class TerminalError(ZkdingsyncError):
    """A terminal could not be read. `device` names the terminal, the message says why in plain words."""

    def __init__(self, device: str, reason: str) -> None:
        self.device = device
        self.reason = reason
        super().__init__(f"terminal {device}: {reason}")


class RecordFormatError(ZkdingsyncError):
    """Bytes from a terminal do not form a valid buffer, record or user table."""
