"""Whether the store's database path can be used: never a device, directory or socket (a config error
even at start), and writable, or creatable, by this user (checked by `validate`). Nothing is created.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from zkdingsync.config.tree import path_text


def store_path_problem(path: Path) -> str | None:
    """Given the store's database path, return why it can never be a database file, or None.

    Checked even where the disk's state is not (`check_store=False`, the daemon's start): a device, a
    directory or a socket stays one, so the service stops with a config error (exit 78) instead of being
    restarted forever. A path that does not exist yet, or cannot be looked at now, passes here.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        # Missing (created at start), below a file, or not visible to this user: store_problem says more.
        return None
    if stat.S_ISDIR(mode):
        return f"{path_text(path)} is a directory, not a database file"
    if not stat.S_ISREG(mode):
        return f"{path_text(path)} is {_file_kind(mode)}, not a database file"
    return None


def _nearest_existing(path: Path) -> Path:
    """The closest ancestor of `path` that exists (the root at worst)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _file_kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    return "not a regular file"


def store_problem(path: Path) -> str | None:
    """Given the store's database path, return None when it can be opened for writing, else why not.

    Nothing is created: a missing directory passes when its nearest existing parent is writable.
    """
    try:
        return _store_problem(path)
    except OSError as error:  # a directory on the way that this user may not search
        return f"cannot check {path_text(path)}: {error.strerror or error}"


def _store_problem(path: Path) -> str | None:
    problem = store_path_problem(path)
    if problem:
        return problem
    shown = path_text(path)
    if path.exists():
        if not os.access(path, os.W_OK):
            return f"{shown} is not writable by this user"
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return (
                f"{path_text(path.parent)} is not writable by this user "
                "(SQLite writes its journal beside the file)"
            )
        return None
    parent = _nearest_existing(path)
    if not parent.is_dir():
        return f"cannot create {shown}: {path_text(parent)} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {shown}: {path_text(parent)} is not writable by this user"
    return None
