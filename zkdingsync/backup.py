"""`zkdingsync backup DEST [--keep N]`: a consistent, integrity-checked copy of the store.

The copy is made through SQLite's online backup API from a read-only connection (never a file copy of a
live WAL database, which can be torn), in one read transaction: it holds the store as it was when the copy
began, while the daemon goes on storing and delivering. The copy is written owner-only under a temporary
name, checked with `PRAGMA integrity_check`, then renamed into place; on any failure nothing is left.

DEST is a file name, or a directory (an existing one, a name ending in "/", or any new name given with
`--keep`; it is created mode 0700): the copy is then named
`zkdingsync-YYYYMMDD-HHMMSS.db` by the local time, and `--keep N` removes all but the newest N such copies
there. Nothing else in the directory is touched.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

from zkdingsync.config import Config
from zkdingsync.errors import StoreError, UserError
from zkdingsync.files import written_whole
from zkdingsync.model import Delivery
from zkdingsync.store import Store

BACKUP_NAME = re.compile(r"zkdingsync-\d{8}-\d{6}\.db")


@dataclass(frozen=True)
class BackupReport:
    """What a finished backup holds."""

    path: Path
    size_bytes: int
    counts: dict[Delivery, int]
    removed: tuple[Path, ...]

    def summary(self) -> str:
        """One line for the admin: where, how big, how many punches in which state, what was pruned."""
        total = sum(self.counts.values())
        states = ", ".join(f"{state.value} {n}" for state, n in self.counts.items() if n)
        pruned = f"; removed {len(self.removed)} older" if self.removed else ""
        return (
            f"backup {self.path}: {self.size_bytes / 1_000_000:.1f} MB, {total} punches"
            f"{f' ({states})' if states else ''}, integrity ok{pruned}"
        )


def backup_name(at: datetime, zone: ZoneInfo) -> str:
    """Given a moment and the configured timezone, return the dated file name of a backup made then."""
    return f"zkdingsync-{at.astimezone(zone):%Y%m%d-%H%M%S}.db"


def backup_target(dest: str, at: datetime, zone: ZoneInfo, *, keep: int | None) -> tuple[Path, bool]:
    """Given DEST as typed (and --keep), return the copy's path and whether DEST is a directory: an
    existing one, a name ending in "/", or a new name given with --keep. Raise UserError when DEST names
    a file that exists or a directory that cannot hold it."""
    path = Path(dest)
    if path.is_dir() or dest.endswith("/") or (keep is not None and not path.exists()):
        return path / backup_name(at, zone), True
    if path.exists():
        raise UserError(f"backup {dest}: the file exists; name a new file or a directory")
    if not path.parent.is_dir():
        raise UserError(f"backup {dest}: no directory {path.parent}")
    return path, False


def take_backup(source: Path, target: Path, *, now: datetime) -> tuple[int, dict[Delivery, int]]:
    """Copy the store at `source` to `target` and check the copy; return its size and punch counts.

    Raise UserError (one line, nothing left at `target`) when the copy cannot be written or is unsound.
    """
    try:
        with written_whole(target) as temporary:
            with Store.open(source, read_only=True) as store:
                store.copy_to(temporary, taken_at=now)
            with Store.open(temporary, read_only=True) as copy:
                verdict = copy.integrity_check()
                if verdict != "ok":
                    raise UserError(f"backup {target}: the copy failed integrity_check ({verdict}); removed")
                counts = copy.delivery_counts()
            size = temporary.stat().st_size
    except StoreError as error:
        raise UserError(_failure(target, error)) from error
    except OSError as error:
        raise UserError(f"backup {target}: {error.strerror or error}") from error
    return size, counts


def _failure(target: Path, error: StoreError) -> str:
    text = str(error)
    if "full" in text or "disk I/O" in text:
        return f"backup failed: disk full at {target.parent} (nothing was left there)"
    return f"backup failed: {text}"


def prune(directory: Path, keep: int) -> tuple[Path, ...]:
    """Remove all but the newest `keep` dated backups in `directory`; return the removed paths."""
    dated = sorted(p for p in directory.iterdir() if BACKUP_NAME.fullmatch(p.name) and p.is_file())
    old = dated[:-keep] if keep > 0 else dated
    for path in old:
        path.unlink()
    return tuple(old)


def backup_command(
    config: Config,
    dest: str,
    *,
    keep: int | None = None,
    out: TextIO | None = None,
    now: datetime | None = None,
) -> int:
    """Given a loaded Config, DEST and --keep, make the backup, prune, print one summary line; return 0.

    Raise UserError (one line) for a missing store, a bad DEST or --keep, or a failed copy.
    """
    out = sys.stdout if out is None else out
    now = datetime.now(timezone.utc) if now is None else now
    source = Path(config.store.path)
    if not source.is_file():
        raise UserError(f"no store yet at {source} (has the daemon run?)")
    if keep is not None and keep < 1:
        raise UserError(f"--keep {keep}: keep at least 1 copy")
    target, in_directory = backup_target(dest, now, ZoneInfo(config.timezone), keep=keep)
    if in_directory:
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"backup {dest}: cannot create the directory: {error.strerror}") from error
    size, counts = take_backup(source, target, now=now)
    removed = prune(target.parent, keep) if keep is not None else ()
    out.write(BackupReport(target, size, counts, removed).summary() + "\n")
    return 0
