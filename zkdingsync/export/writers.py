"""Writing export rows as CSV or XLSX, one row at a time, in bounded memory.

CSV is UTF-8 with a byte-order mark (Excel then reads the Chinese correctly) and English headers.
XLSX: XlsxWriter (constant-memory mode) writes the whole file: a bold header row in English and Chinese,
frozen below the header, fixed column widths, times as real Excel date-times. A sheet holds at most
Excel's 1,048,576 rows; a longer export continues on the next sheet.
"""

from __future__ import annotations

import csv
import re
import tempfile
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Protocol, TextIO

from zkdingsync.export.columns import COLUMNS, Cell

FORMATS = ("csv", "xlsx")
EXCEL_MAX_ROWS = 1_048_576
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
DATE_FORMAT = "yyyy-mm-dd hh:mm:ss"  # the same, as Excel's number format
SHEET_TITLE = "punches"
# A sheet's XML stays under 1.5 GiB (a zip entry past 2 GiB would need the Zip64 extension, which
# XlsxWriter refuses unless asked); counted as a row's markup plus its text at up to 3 bytes a character,
# so at about 1 KB a row Excel's row limit comes first.
_SHEET_BYTES = 1536 * 1024 * 1024
_ROW_BYTES = 16 * 40
# Characters XML 1.0 cannot carry at all (`printable` has escaped the control characters among them).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

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
    """XLSX through XlsxWriter's constant-memory mode (each row goes to its sheet's scratch file as soon
    as the next one starts); `close()` writes the workbook to its file. Used as a context manager, the
    scratch files are removed however the block ends."""

    def __init__(self, path: Path) -> None:
        """Given the file to write, start its first sheet."""
        from xlsxwriter import Workbook  # imported here: only XLSX exports pay for it

        # The sheets' rows wait beside the file (owner-only, like it), not in a /tmp that may be memory.
        self._scratch = tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent)
        self._book = Workbook(
            str(path),
            {
                "constant_memory": True,
                "tmpdir": self._scratch.name,
                # Text is text: never a formula, a link or a number (`clean_text` guards Excel's own
                # reading of a leading "=" too).
                "strings_to_formulas": False,
                "strings_to_urls": False,
                "strings_to_numbers": False,
            },
        )
        self._bold = self._book.add_format({"bold": True})
        self._time = self._book.add_format({"num_format": DATE_FORMAT})  # shared by every date-time cell
        self._header = [f"{english} {chinese}" for english, chinese in COLUMNS]
        self._sheets = 0
        self._rows_in_sheet = 0
        self._bytes_in_sheet = 0
        self._new_sheet()

    def _new_sheet(self) -> None:
        self._sheets += 1
        title = SHEET_TITLE if self._sheets == 1 else f"{SHEET_TITLE} {self._sheets}"
        self._sheet = self._book.add_worksheet(title)
        self._sheet.freeze_panes(1, 0)
        for index, (english, _) in enumerate(COLUMNS):
            self._sheet.set_column(index, index, _WIDTHS.get(english, 16))
        self._sheet.write_row(0, 0, self._header, self._bold)
        self._rows_in_sheet = 1
        self._bytes_in_sheet = 0

    def write(self, row: Sequence[Cell]) -> None:
        """Append one row (a full sheet continues on a new one, under the same header)."""
        if self._rows_in_sheet >= EXCEL_MAX_ROWS or self._bytes_in_sheet >= _SHEET_BYTES:
            self._new_sheet()
        sheet, number, size = self._sheet, self._rows_in_sheet, _ROW_BYTES
        # One typed call a cell (an empty one is left out): XlsxWriter's own dispatch by type costs more.
        for column, value in enumerate(row):
            if value is None:
                continue
            if isinstance(value, str):
                text = cell_text(value)
                size += 3 * len(text)
                sheet.write_string(number, column, text)
            elif isinstance(value, datetime):
                sheet.write_datetime(number, column, value, self._time)
            else:
                sheet.write_number(number, column, value)
        self._bytes_in_sheet += size
        self._rows_in_sheet += 1

    def close(self) -> None:
        """Write the workbook to its file, then remove the scratch files."""
        try:
            self._book.close()
        finally:
            self._scratch.cleanup()

    def __enter__(self) -> XlsxRows:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._scratch.cleanup()


@lru_cache(maxsize=8192)  # the words, terminals, zones and enroll numbers repeat row after row
def cell_text(text: str) -> str:
    """Given a cell's text, return what to hand XlsxWriter so the cell reads back as that text: a character
    XML cannot carry at all escaped as `printable` escapes (`\\ufffe`), and the "<" of a text shaped like
    XlsxWriter's rich-string markup ("<r>...</r>", which it would write as XML) escaped the same way."""
    if _NOT_XML.search(text):
        text = _NOT_XML.sub(_escape, text)
    if text.startswith("<r>") and text.endswith("</r>"):
        text = "\\x3c" + text[1:]
    return text


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
