"""The XLSX writer's rows: what openpyxl reads back is what was written, whatever the text."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import openpyxl
import pytest

from zkdingsync.export.columns import COLUMNS, Cell, clean_text
from zkdingsync.export.writers import XlsxRows

WIDTH = len(COLUMNS)


def row_of(*cells: Cell) -> list[Cell]:
    return [*cells, *([None] * (WIDTH - len(cells)))]


def written(path: Path, rows: list[list[Cell]]) -> openpyxl.Workbook:
    writer = XlsxRows(path)
    for row in rows:
        writer.write(row)
    writer.close()
    return openpyxl.load_workbook(path)


def test_text_numbers_and_times_read_back_as_written(tmp_path: Path) -> None:
    moment = datetime(2026, 3, 1, 8, 59, 1, 500_000)  # noqa: DTZ001 - Excel has no zones
    book = written(
        tmp_path / "cells.xlsx",
        [
            row_of("a & <b> \"c\" 'd'", "  padded  ", clean_text("=SUM(A1)"), None, 7, moment),
            row_of("bad \ufffe end", clean_text("esc\x1b[0m"), "王五", "line\nbreak", "lone \ud800"),
            row_of("<r><t>not markup</t></r>", "<b>", "_x0041_ & more"),
        ],
    )
    sheet = book["punches"]
    first = [cell.value for cell in sheet[2]][:6]
    assert first == ["a & <b> \"c\" 'd'", "  padded  ", "'=SUM(A1)", None, 7, moment]
    assert sheet.cell(row=2, column=6).is_date
    second = [cell.value for cell in sheet[3]][:5]
    assert second == ["bad \\ufffe end", "esc\\x1b[0m", "王五", "line\nbreak", "lone \\ud800"]
    third = [cell.value for cell in sheet[4]][:2]
    assert third == ["\\x3cr><t>not markup</t></r>", "<b>"]  # text, never written as XML
    assert sheet.cell(row=1, column=1).font.bold
    assert sheet.freeze_panes == "A2"


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 12, 31, 23, 59, 59),  # noqa: DTZ001
        datetime(2000, 1, 1),  # noqa: DTZ001
        datetime(1900, 1, 15, 12),  # noqa: DTZ001 - before Excel's phantom 1900-02-29
        datetime(2026, 6, 1, 0, 0, 0, 123_000),  # noqa: DTZ001 - Excel keeps milliseconds
    ],
)
def test_date_times_read_back_to_the_millisecond(tmp_path: Path, moment: datetime) -> None:
    sheet = written(tmp_path / "time.xlsx", [row_of(moment)])["punches"]
    assert sheet.cell(row=2, column=1).value == moment
    assert sheet.cell(row=2, column=1).number_format == "yyyy-mm-dd hh:mm:ss"


def test_a_sheet_past_its_byte_limit_continues_on_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("zkdingsync.export.writers._SHEET_BYTES", 1)  # every row past the first moves on
    book = written(tmp_path / "bytes.xlsx", [row_of(f"row {n}") for n in range(3)])
    assert book.sheetnames == ["punches", "punches 2", "punches 3"]
    assert [sheet.cell(row=2, column=1).value for sheet in book.worksheets] == ["row 0", "row 1", "row 2"]
    assert all(sheet.cell(row=1, column=3).value == "enroll_number 工号" for sheet in book.worksheets)


def test_the_scratch_files_go_however_the_export_ends(tmp_path: Path) -> None:
    with XlsxRows(tmp_path / "done.xlsx") as writer:
        writer.write(row_of("kept"))
        writer.close()
    assert [path.name for path in tmp_path.iterdir()] == ["done.xlsx"]
    with pytest.raises(RuntimeError), XlsxRows(tmp_path / "failed.xlsx") as writer:
        writer.write(row_of("lost"))
        raise RuntimeError("the store went away")
    assert [path.name for path in tmp_path.iterdir()] == ["done.xlsx"]
