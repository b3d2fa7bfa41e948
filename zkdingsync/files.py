"""Owner-only files: the one policy for every file that holds punches (store, WAL, SHM, lock, backups,
exports).

Punches are personal data and labour-dispute evidence, so such files are mode 0600 whatever the umask of
the process (systemd's `UMask=0077` does not apply when an admin runs the daemon or a command by hand).
New files are created 0600 from the start, never chmod-ed after a window of being readable; files left
by an earlier version are tightened when they are opened.

A file that is written whole (a backup, an export) goes to a hidden temporary name in the same directory
first and is renamed into place only once complete: a failure (a full disk, say) leaves no partial file
behind under the real name, nor under the temporary one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

OWNER_ONLY = 0o600

# SQLite's companions of a database file.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def create_private(path: Path) -> None:
    """Given a path, create it as an empty owner-only file if it does not exist, and make it owner-only if
    it does (a file left by an earlier version). Raise OSError when that is refused."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, OWNER_ONLY)
    try:
        tighten_fd(fd)
    finally:
        os.close(fd)


def tighten_fd(fd: int) -> None:
    """Make an open file owner-only unless it already is (the umask only removes bits, so an existing file
    can be wider). Raise OSError when the process does not own it."""
    mode = os.fstat(fd).st_mode & 0o777
    if mode != OWNER_ONLY:
        os.fchmod(fd, OWNER_ONLY)


def tighten_database(path: Path) -> None:
    """Given a SQLite database path, make it and its existing companions (-wal, -shm, -journal) owner-only.

    SQLite gives the companions it creates the mode of the database file, so a 0600 database keeps them
    0600 from then on. Missing files are skipped; raise OSError on a refusal.
    """
    for candidate in (path, *(path.with_name(path.name + suffix) for suffix in SQLITE_COMPANIONS)):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            tighten_fd(fd)
        finally:
            os.close(fd)


def temporary_sibling(path: Path) -> Path:
    """Given the final path of a file written whole, return the hidden name it is written under first."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def remove_quietly(path: Path) -> None:
    """Remove a file and its SQLite companions if they exist (clean-up after a failure)."""
    for candidate in (path, *(path.with_name(path.name + suffix) for suffix in SQLITE_COMPANIONS)):
        with suppress(OSError):
            candidate.unlink()


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """Yield an owner-only temporary path beside `path`; when the block ends without an exception, flush it
    to disk and rename it to `path`, otherwise remove it. Raise OSError when it cannot be created or the
    rename fails (the temporary file is removed then too)."""
    temporary = temporary_sibling(path)
    create_private(temporary)
    try:
        yield temporary
        fd = os.open(temporary, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        remove_quietly(temporary)
        raise
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Flush a directory's entries to disk, so a rename survives power loss (best effort)."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
