"""`zkdingsync export`: read the window's punches from the store and write them as CSV or XLSX.

The store is opened read-only without the instance lock (like `status`), so an export runs beside the
daemon; everything is read in one snapshot, one row at a time, so memory stays flat however many punches
the window holds. The file is written owner-only under a temporary name and renamed when complete: a
failed export (a full disk) leaves nothing behind. On a terminal, a progress line is kept up to date on
stderr.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

from zkdingsync import history
from zkdingsync.config import Config
from zkdingsync.errors import StoreError, UserError
from zkdingsync.export.columns import RowMaker
from zkdingsync.export.writers import FORMATS, CsvRows, RowWriter, XlsxRows
from zkdingsync.files import written_whole
from zkdingsync.store import ExportWindow, Store

PROGRESS_EVERY_SECONDS = 0.5


def parse_day(text: str, option: str) -> str:
    """Given a command-line date and its option name, return it as "YYYY-MM-DD"; raise UserError naming
    the option when it is not a real date of that form."""
    try:
        return history.parse_day(text).isoformat()
    except ValueError:
        raise UserError(f"{option} {text!r} is not a date of the form YYYY-MM-DD") from None


def choose_format(fmt: str | None, output: Path | None) -> str:
    """Given --format (or None) and -o (or None), return the export format: the option, else the output
    file's suffix, else csv. Raise UserError for an XLSX export without a file."""
    chosen = fmt or ("xlsx" if output is not None and output.suffix.lower() == ".xlsx" else "csv")
    if chosen not in FORMATS:
        raise UserError(f"--format {chosen!r}: choose one of {', '.join(FORMATS)}")
    if chosen == "xlsx" and output is None:
        raise UserError("an XLSX export needs a file: add -o FILE.xlsx")
    return chosen


def export_command(
    config: Config,
    *,
    first_day: str,
    last_day: str,
    devices: Sequence[str] = (),
    enroll_numbers: Sequence[str] = (),
    fmt: str | None = None,
    output: Path | None = None,
    err: TextIO | None = None,
) -> int:
    """Given a loaded Config and the command's options, write the export and return 0.

    CSV goes to stdout when no file is named. Raise UserError (one line) for a bad date, an unknown
    terminal, a missing store or a file that cannot be written.
    """
    err = sys.stderr if err is None else err
    first = parse_day(first_day, "--from")
    last = parse_day(last_day, "--to")
    if last < first:
        raise UserError(f"--to {last} is before --from {first}")
    chosen = choose_format(fmt, output)
    path = Path(config.store.path)
    if not path.exists():
        raise UserError(f"no store yet at {path} (has the daemon run?)")
    window = ExportWindow(first, last, tuple(dict.fromkeys(devices)), tuple(dict.fromkeys(enroll_numbers)))
    try:
        with Store.open(path, read_only=True) as store, store.snapshot():
            _check_devices(store, config, window.devices)
            terminal_names, directory_names = store.employee_names()
            rows = RowMaker(
                zone=ZoneInfo(config.timezone),
                device_zones={device.name: device.timezone for device in config.devices},
                terminal_names=terminal_names,
                directory_names=directory_names,
            )
            total = store.export_count(window)
            progress = Progress(err, total) if err.isatty() else None
            written = _write(store, window, rows, chosen, output, progress)
    except StoreError as error:
        raise UserError(f"cannot read the store: {error}") from error
    where = f" to {output}" if output is not None else ""
    err.write(f"exported {written} punch{'es' if written != 1 else ''} ({first} to {last}){where}\n")
    return 0


def _check_devices(store: Store, config: Config, devices: Sequence[str]) -> None:
    known = {device.name for device in config.devices} | {c.device for c in store.checkpoints()}
    # A terminal taken out of the config (and forgotten by the poller) still has its punches.
    unknown = [name for name in devices if name not in known and not store.has_punches_of(name)]
    if unknown:
        raise UserError(
            f"--device {unknown[0]!r}: no such terminal (known: {', '.join(sorted(known)) or 'none'})"
        )


def _write(
    store: Store,
    window: ExportWindow,
    rows: RowMaker,
    fmt: str,
    output: Path | None,
    progress: Progress | None,
) -> int:
    def copy(writer: RowWriter) -> int:
        count = 0
        for punch in store.export_punches(window):
            writer.write(rows.row(punch))
            count += 1
            if progress is not None:
                progress.update(count)
        writer.close()
        if progress is not None:
            progress.finish(count)
        return count

    if output is None:
        stream = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8-sig", newline="", write_through=False)
        try:
            return copy(CsvRows(stream))
        finally:
            stream.flush()
            stream.detach()
    try:
        with written_whole(output) as temporary:
            if fmt == "xlsx":
                with XlsxRows(temporary) as writer:
                    return copy(writer)
            with temporary.open("w", encoding="utf-8-sig", newline="") as stream:
                return copy(CsvRows(stream))
    except OSError as error:
        raise UserError(f"cannot write {output}: {error.strerror or error}") from error


class Progress:
    """A progress line on a terminal ("exported 120000 of 1000000 punches (12%)"), redrawn at most twice
    a second."""

    def __init__(self, out: TextIO, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._out = out
        self._total = total
        self._clock = clock
        self._next = 0.0

    def update(self, done: int) -> None:
        """Redraw the line if it is due."""
        now = self._clock()
        if now >= self._next:
            self._next = now + PROGRESS_EVERY_SECONDS
            share = f" ({done * 100 // self._total}%)" if self._total else ""
            self._out.write(f"\rexported {done} of {self._total} punches{share}")
            self._out.flush()

    def finish(self, done: int) -> None:
        """Clear the line once the export is complete."""
        self._out.write("\r\033[K")
        self._out.flush()
