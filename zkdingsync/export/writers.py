"""Writing export rows as CSV or XLSX, one row at a time, in bounded memory.

CSV is UTF-8 with a byte-order mark (Excel then reads the Chinese correctly) and English headers.
XLSX: openpyxl (write-only mode) writes the workbook and each sheet's frame, a bold header row in English
and Chinese, frozen below the header, fixed column widths; the rows are streamed compressed into the
file (`sheet_xml`), times as real Excel date-times. A sheet holds at most Excel's 1,048,576 rows; a longer
export continues on the next sheet.
"""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Protocol, TextIO

from zkdingsync.export.columns import COLUMNS, Cell
from zkdingsync.export.sheet_xml import SheetFrame, sheet_part

FORMATS = ("csv", "xlsx")
EXCEL_MAX_ROWS = 1_048_576
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
SHEET_TITLE = "punches"
# A sheet's XML stays under 1.5 GiB (a zip entry past 2 GiB needs the Zip64 extension, which Excel answers
# with a repair prompt); at about 1 KB a row, Excel's row limit comes first.
_SHEET_BYTES = 1536 * 1024 * 1024
_ROWS_PER_WRITE = 500
_COMPRESS_LEVEL = 6

# Column widths in characters, wide enough for the usual content (a time, "fingerprint 指纹", an id).
_WIDTHS = {
    "device": 14,
    "serial": 16,
    "enroll_number": 12,
    "name": 14,
    "userid": 18,
    "local_time": 20,
    "timezone": 22,
    "punch_state": 18,
    "verify_mode": 18,
    "stored_at": 20,
    "delivery": 18,
    "reason": 40,
    "delivered_at": 20,
    "request_id": 24,
    "record_id": 14,
    "outcome_unknown": 12,
}


class RowWriter(Protocol):
    """Writes rows of COLUMNS to one file; `close()` finishes the file."""

    def write(self, row: Sequence[Cell]) -> None: ...

    def close(self) -> None: ...


class CsvRows:
    """CSV, UTF-8 with BOM, English headers; times as "YYYY-MM-DD HH:MM:SS"."""

    def __init__(self, stream: TextIO) -> None:
        """Given a text stream opened with encoding "utf-8-sig" (which writes the byte-order mark) and
        newline="" (the csv module ends rows with CRLF), write the header row."""
        self._file = stream
        self._csv = csv.writer(stream)
        self._csv.writerow([english for english, _ in COLUMNS])

    def write(self, row: Sequence[Cell]) -> None:
        """Write one row."""
        self._csv.writerow(
            [value.strftime(TIME_FORMAT) if isinstance(value, datetime) else value for value in row]
        )

    def close(self) -> None:
        """Flush the rows to the stream (its owner closes it)."""
        self._file.flush()


class XlsxRows:
    """XLSX: openpyxl's workbook around rows streamed into the file's zip (`sheet_xml`); `close()`
    finishes the file."""

    def __init__(self, path: Path) -> None:
        """Given the file to write, start its first sheet."""
        self._frame = SheetFrame.build(
            [f"{english} {chinese}" for english, chinese in COLUMNS],
            [_WIDTHS.get(english, 16) for english, _ in COLUMNS],
        )
        self._zip = zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=_COMPRESS_LEVEL)
        self._titles: list[str] = []
        self._sheet: IO[bytes] | None = None
        self._rows: list[str] = []
        self._rows_in_sheet = 0
        self._bytes_in_sheet = 0
        self._new_sheet()

    def _new_sheet(self) -> None:
        self._end_sheet()
        self._titles.append(SHEET_TITLE if not self._titles else f"{SHEET_TITLE} {len(self._titles) + 1}")
        self._sheet = self._zip.open(sheet_part(len(self._titles)), "w")
        self._sheet.write(self._frame.prefix)
        self._rows_in_sheet = 1  # the header
        self._bytes_in_sheet = 0  # of rows

    def _flush(self) -> None:
        if self._rows and self._sheet is not None:
            data = "".join(self._rows).encode()
            self._sheet.write(data)
            self._bytes_in_sheet += len(data)
            self._rows.clear()

    def _end_sheet(self) -> None:
        if self._sheet is not None:
            self._flush()
            self._sheet.write(self._frame.suffix)
            self._sheet.close()
            self._sheet = None

    def write(self, row: Sequence[Cell]) -> None:
        """Append one row (a full sheet continues on a new one, under the same header)."""
        if self._rows_in_sheet >= EXCEL_MAX_ROWS or self._bytes_in_sheet >= _SHEET_BYTES:
            self._new_sheet()
        self._rows_in_sheet += 1
        self._rows.append(self._frame.row(self._rows_in_sheet, row))
        if len(self._rows) >= _ROWS_PER_WRITE:
            self._flush()

    def close(self) -> None:
        """Finish the last sheet and write the workbook's other parts."""
        self._end_sheet()
        for name, data in self._frame.package(self._titles).items():
            self._zip.writestr(name, data)
        self._zip.close()
