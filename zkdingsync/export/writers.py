"""Writing export rows as CSV or XLSX, one row at a time, in bounded memory.

CSV is UTF-8 with a byte-order mark (Excel then reads the Chinese correctly) and English headers.
XLSX is written by openpyxl in write-only mode (rows go to a temporary file, not to memory): a bold
header row in English and Chinese, frozen below the header, fixed column widths, times as real Excel
date-times. A sheet holds at most Excel's 1,048,576 rows; a longer export continues on the next sheet.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol, TextIO

from zkdingsync.export.columns import COLUMNS, Cell

FORMATS = ("csv", "xlsx")
EXCEL_MAX_ROWS = 1_048_576
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
SHEET_TITLE = "punches"

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
    """XLSX through openpyxl's write-only mode; the workbook is saved to `path` by `close()`."""

    def __init__(self, path: Path) -> None:
        from openpyxl import Workbook  # imported here: only XLSX exports pay for it

        self._path = path
        self._book = Workbook(write_only=True)
        self._rows_in_sheet = 0
        self._sheets = 0
        self._new_sheet()

    def _new_sheet(self) -> None:
        from openpyxl.cell import WriteOnlyCell
        from openpyxl.styles import Font
        from openpyxl.utils import get_column_letter

        self._sheets += 1
        title = SHEET_TITLE if self._sheets == 1 else f"{SHEET_TITLE} {self._sheets}"
        sheet = self._book.create_sheet(title)
        sheet.freeze_panes = "A2"
        for index, (english, _) in enumerate(COLUMNS, start=1):
            sheet.column_dimensions[get_column_letter(index)].width = _WIDTHS.get(english, 16)
        bold = Font(bold=True)
        header = []
        for english, chinese in COLUMNS:
            cell = WriteOnlyCell(sheet, value=f"{english} {chinese}")
            cell.font = bold
            header.append(cell)
        sheet.append(header)
        self._sheet = sheet
        self._rows_in_sheet = 1

    def write(self, row: Sequence[Cell]) -> None:
        """Append one row (a full sheet continues on a new one, under the same header)."""
        if self._rows_in_sheet >= EXCEL_MAX_ROWS:
            self._new_sheet()
        self._sheet.append(row)
        self._rows_in_sheet += 1

    def close(self) -> None:
        """Write the workbook to its file."""
        self._book.save(self._path)
