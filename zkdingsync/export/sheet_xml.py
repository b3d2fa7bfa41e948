"""The XLSX export's sheets: openpyxl writes the workbook around the rows, the rows are written here.

openpyxl (write-only mode) builds every part of the package: the workbook, the styles, the content types,
and each sheet's frame (frozen panes, column widths, the bold bilingual header row). `SheetFrame.build`
has it write such a workbook in memory, with one sample date-time row, and takes the sheet apart around
its data rows. The data rows are written here, one formatted string per row: through openpyxl every cell
became a cell object, its checks and an element tree of its own (about 20 µs a cell, seven minutes for a
million rows). Strings are written inline, as openpyxl's write-only mode writes them (no table of shared
strings held in memory), and times as Excel serial days in the date-time style openpyxl registered for
the sample row.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from zkdingsync.export.columns import Cell

_EPOCH_ORDINAL = datetime(1899, 12, 30).toordinal()  # noqa: DTZ001 - Excel's day 0 has no zone
_SECONDS_PER_DAY = 86_400
# Characters XML 1.0 cannot carry at all (`printable` has escaped the control characters among them).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_SAMPLE_TIME = datetime(2000, 1, 1)  # noqa: DTZ001 - a naive time is what openpyxl styles as a date-time
_SAMPLE_ROW = '<row r="2"'


def sheet_part(number: int) -> str:
    """Given a sheet's number (from 1), return its part name in the package, as openpyxl names it."""
    return f"xl/worksheets/sheet{number}.xml"


def column_letters(count: int) -> tuple[str, ...]:
    """Given a number of columns, return their letters: A, B, ..., Z, AA, ..."""
    letters = []
    for index in range(1, count + 1):
        name = ""
        while index:
            index, rest = divmod(index - 1, 26)
            name = chr(65 + rest) + name
        letters.append(name)
    return tuple(letters)


def excel_days(moment: datetime) -> float:
    """Given a naive date-time, return it as Excel's serial day (openpyxl's `to_excel`, 1900 date
    system, with Excel's phantom 1900-02-29 below day 61)."""
    days = moment.toordinal() - _EPOCH_ORDINAL
    if 0 < days <= 60:
        days -= 1
    seconds = moment.hour * 3600 + moment.minute * 60 + moment.second + moment.microsecond / 1e6
    return days + seconds / _SECONDS_PER_DAY


def text_xml(text: str) -> str:
    """Given a cell's text, return it as the content of an XML element: `&`, `<` and `>` escaped, a
    character XML cannot carry at all escaped as `printable` escapes (`\\ufffe`)."""
    if _NOT_XML.search(text):
        text = _NOT_XML.sub(_escape, text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@lru_cache(maxsize=8192)  # the words, terminals, zones and enroll numbers repeat row after row
def inline_text(text: str) -> str:
    """Given a cell's text, return its `<t>` element (whitespace at either end kept)."""
    space = ' xml:space="preserve"' if text[:1].isspace() or text[-1:].isspace() else ""
    return f"<t{space}>{text_xml(text)}</t>"


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


@dataclass(frozen=True)
class SheetFrame:
    """What openpyxl writes around a sheet's data rows, and the style number of its date-times."""

    header: tuple[str, ...]
    widths: tuple[float, ...]
    prefix: bytes  # the sheet's XML up to its first data row (frame and header row)
    suffix: bytes  # from the end of the data rows to the end of the sheet
    date_style: str
    letters: tuple[str, ...]

    @classmethod
    def build(cls, header: Sequence[str], widths: Sequence[float]) -> SheetFrame:
        """Given the header's cells and the columns' widths, have openpyxl write a one-sheet workbook and
        return the frame of its sheet. Raise RuntimeError if openpyxl's sheet is not shaped as expected."""
        parts = workbook_parts(("sheet",), header, widths)
        sheet = parts[sheet_part(1)]
        start = sheet.find(_SAMPLE_ROW.encode())
        end = sheet.find(b"</sheetData>")
        style = re.search(rb'<c r="A2" s="(\d+)"', sheet)
        if start < 0 or end < start or style is None:
            raise RuntimeError("openpyxl wrote a sheet of an unexpected shape: " + sheet[:200].decode())
        return cls(
            header=tuple(header),
            widths=tuple(widths),
            prefix=sheet[:start],
            suffix=sheet[end:],
            date_style=style.group(1).decode(),
            letters=column_letters(len(header)),
        )

    def package(self, titles: Sequence[str]) -> dict[str, bytes]:
        """Given the titles of the sheets written, return the workbook's other parts (every part but the
        sheets), as openpyxl writes them for those sheets."""
        parts = workbook_parts(titles, self.header, self.widths)
        return {name: data for name, data in parts.items() if not name.startswith("xl/worksheets/sheet")}

    def row(self, number: int, row: Sequence[Cell]) -> str:
        """Given a row's number in its sheet (the header is 1) and its cells, return the row's XML (an
        empty cell is left out)."""
        r = str(number)
        cells = [f'<row r="{r}">']
        for letter, value in zip(self.letters, row, strict=False):
            if value is None:
                continue
            if isinstance(value, str):
                cells.append(f'<c r="{letter}{r}" t="inlineStr"><is>{inline_text(value)}</is></c>')
            elif isinstance(value, datetime):
                days = "%.16g" % excel_days(value)  # noqa: UP031 - openpyxl's number format
                cells.append(f'<c r="{letter}{r}" s="{self.date_style}" t="n"><v>{days}</v></c>')
            else:
                cells.append(f'<c r="{letter}{r}" t="n"><v>{int(value)}</v></c>')
        cells.append("</row>")
        return "".join(cells)


def workbook_parts(titles: Sequence[str], header: Sequence[str], widths: Sequence[float]) -> dict[str, bytes]:
    """Given sheet titles, the header's cells and the columns' widths, return the parts of the workbook
    openpyxl writes (write-only mode) with those sheets, each holding the frozen bold header and one
    sample date-time row."""
    from openpyxl import Workbook  # imported here: only XLSX exports pay for it
    from openpyxl.cell import WriteOnlyCell
    from openpyxl.styles import Font
    from openpyxl.utils import get_column_letter

    book = Workbook(write_only=True)
    bold = Font(bold=True)
    for title in titles:
        sheet = book.create_sheet(title)
        sheet.freeze_panes = "A2"
        for index, width in enumerate(widths, start=1):
            sheet.column_dimensions[get_column_letter(index)].width = width
        cells = []
        for text in header:
            cell = WriteOnlyCell(sheet, value=text)
            cell.font = bold
            cells.append(cell)
        sheet.append(cells)
        sheet.append([_SAMPLE_TIME])
    buffer = io.BytesIO()
    book.save(buffer)
    with zipfile.ZipFile(buffer) as package:
        return {name: package.read(name) for name in package.namelist()}
