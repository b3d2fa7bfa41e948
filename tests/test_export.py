"""`zkdingsync export`: every punch of a window, whatever its state, as CSV (UTF-8 with BOM) or XLSX."""

from __future__ import annotations

import csv
import io
import os
import stat
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import openpyxl
import pytest

from zkdingsync.cli import main
from zkdingsync.export.columns import RowMaker, clean_text
from zkdingsync.export.command import Progress
from zkdingsync.history import HistoryRule
from zkdingsync.model import Punch
from zkdingsync.store import ExportedPunch, Store

CONFIG = """\
dingtalk:
  app_key: dingabc123
  app_secret: test-app-secret-0123
store:
  path: {store}
users:
  map:
    "1001": alice
devices:
  - name: lobby
    host: 127.0.0.1
    timezone: Asia/Shanghai
  - name: gate
    host: 127.0.0.2
    timezone: Asia/Shanghai
"""
POLLED = datetime(2026, 3, 10, 1, 0, tzinfo=timezone.utc)
SHANGHAI_OFFSET_MS = 8 * 3600 * 1000


def punch(device: str, enroll: str, local_time: str, *, quarantine: str | None = None) -> Punch:
    naive = datetime.fromisoformat(local_time).replace(tzinfo=timezone.utc)
    return Punch(
        device=device,
        serial=f"SN-{device}",
        enroll_number=enroll,
        local_time=local_time,
        punch_state=1 if enroll == "1002" else 0,
        verify_mode=15 if device == "gate" else 1,
        check_time_ms=int(naive.timestamp() * 1000) - SHANGHAI_OFFSET_MS,
        quarantine_reason=quarantine,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A store holding punches in every delivery state, on two terminals and several days."""
    store_path = tmp_path / "zk.db"
    with Store.open(store_path) as store:
        store.save_poll(
            "lobby",
            serial="SN-lobby",
            record_count=5,
            record_size=40,
            polled_at=POLLED,
            punches=[
                punch("lobby", "1001", "2026-03-01 08:59:01"),  # delivered
                punch("lobby", "1002", "2026-03-01 18:01:02"),  # parked
                punch("lobby", "1003", "2026-03-02 09:00:00"),  # in flight
                punch("lobby", "1001", "2026-03-05 08:58:00"),  # pending
                punch("lobby", "1001", "2026-03-06 08:58:00"),  # after the window
            ],
        )
        store.save_poll(
            "gate",
            serial="SN-gate",
            record_count=2,
            record_size=40,
            polled_at=POLLED,
            punches=[
                punch("gate", "1001", "2026-03-01 12:00:00", quarantine="clock too far ahead"),
                punch("gate", "1003", "2026-02-28 23:59:59"),  # before the window; history
            ],
            history=HistoryRule(ZoneInfo("Asia/Shanghai"), since=date(2026, 3, 1)),
        )
        ids = {(p.punch.enroll_number, p.punch.local_time): p.id for p in store.punches()}
        store.mark_delivered(
            ids[("1001", "2026-03-01 08:59:01")],
            at=POLLED + timedelta(seconds=3),
            userid="alice",
            request_id="req-abc123",
        )
        store.park(ids[("1002", "2026-03-01 18:01:02")], reason="enroll number 1002 is not mapped")
        store.claim_due(POLLED, 10)  # everything pending is now in flight ...
        for key in [
            ("1001", "2026-03-05 08:58:00"),
            ("1001", "2026-03-06 08:58:00"),
        ]:
            store.mark_pending(ids[key], retry_at=POLLED, reason="DingTalk is busy")  # ... but these
        store.save_terminal_names("SN-lobby", {"1001": "张三"})
        store.save_directory_names({"bob-id": "Bob"})
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(store=store_path), encoding="utf-8")
    return path


def export_csv(config: Path, *args: str) -> list[dict[str, str]]:
    out = config.parent / "out.csv"
    assert main(["export", "-c", str(config), *args, "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf")  # the BOM Excel needs to read UTF-8
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline="")))


def test_csv_holds_every_state_of_the_window_with_words_and_evidence(config: Path) -> None:
    rows = export_csv(config, "--from", "2026-03-01", "--to", "2026-03-05")
    assert [(r["device"], r["enroll_number"], r["local_time"]) for r in rows] == [
        ("lobby", "1001", "2026-03-01 08:59:01"),
        ("gate", "1001", "2026-03-01 12:00:00"),
        ("lobby", "1002", "2026-03-01 18:01:02"),
        ("lobby", "1003", "2026-03-02 09:00:00"),
        ("lobby", "1001", "2026-03-05 08:58:00"),
    ]
    states = [r["delivery"] for r in rows]
    assert states == [
        "delivered 已送达",
        "quarantined 已隔离",
        "parked 已搁置",
        "in flight 发送中",
        "pending 待发送",
    ]
    delivered, quarantined, parked = rows[0], rows[1], rows[2]
    assert delivered["request_id"] == "req-abc123"
    assert delivered["userid"] == "alice"
    assert delivered["name"] == "张三"
    assert delivered["delivered_at"] == "2026-03-10 09:00:03"  # the configured zone (Shanghai)
    assert delivered["stored_at"] == "2026-03-10 09:00:00"
    assert delivered["timezone"] == "Asia/Shanghai +08:00"
    assert delivered["punch_state"] == "check-in 上班"
    assert delivered["verify_mode"] == "fingerprint 指纹"
    assert parked["punch_state"] == "check-out 下班"
    assert parked["reason"] == "enroll number 1002 is not mapped"
    assert parked["delivered_at"] == parked["request_id"] == ""
    assert quarantined["verify_mode"] == "face 人脸"
    assert quarantined["reason"] == "clock too far ahead"


def test_device_and_enroll_filters_and_the_file_is_owner_only(config: Path) -> None:
    rows = export_csv(config, "--from", "2026-02-28", "--to", "2026-03-31", "--device", "gate")
    assert [(r["enroll_number"], r["local_time"], r["delivery"]) for r in rows] == [
        ("1003", "2026-02-28 23:59:59", "history 历史"),  # kept, never sent: exported all the same
        ("1001", "2026-03-01 12:00:00", "quarantined 已隔离"),
    ]
    rows = export_csv(
        config, "--from", "2026-03-01", "--to", "2026-03-31", "--enroll", "1001", "--enroll", "1002"
    )
    assert {r["enroll_number"] for r in rows} == {"1001", "1002"}
    assert len(rows) == 5
    assert stat.S_IMODE(os.stat(config.parent / "out.csv").st_mode) == 0o600
    with Store.open(config.parent / "zk.db") as store:
        store.forget_terminal("gate")  # taken out of the config: its punches stay, and stay exportable
    config.write_text(config.read_text().replace("  - name: gate\n", "  - name: gate2\n"), encoding="utf-8")
    rows = export_csv(config, "--from", "2026-02-28", "--to", "2026-03-31", "--device", "gate")
    assert len(rows) == 2
    assert not [p for p in config.parent.iterdir() if p.name.endswith(".partial")]


def test_xlsx_has_a_bilingual_frozen_header_widths_and_real_date_times(config: Path) -> None:
    out = config.parent / "march.xlsx"
    assert (
        main(["export", "-c", str(config), "--from", "2026-03-01", "--to", "2026-03-31", "-o", str(out)]) == 0
    )
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    book = openpyxl.load_workbook(out)
    sheet = book["punches"]
    header = [cell.value for cell in sheet[1]]
    assert header[2] == "enroll_number 工号"
    assert header[0] == "device 考勤机"
    assert sheet.freeze_panes == "A2"
    assert int(sheet.column_dimensions["L"].width) == 40  # reason: 40 characters, stored with their padding
    rows = [[cell.value for cell in row] for row in sheet.iter_rows(min_row=2)]
    assert len(rows) == 6
    first = dict(zip(header, rows[0], strict=True))
    assert first["local_time 打卡时间"] == datetime(2026, 3, 1, 8, 59, 1)  # noqa: DTZ001 - Excel has no zones
    assert first["request_id 钉钉请求ID"] == "req-abc123"
    assert first["delivery 同步状态"] == "delivered 已送达"
    assert sheet.cell(row=2, column=6).is_date


def test_export_reads_beside_a_running_daemon_and_to_stdout(
    config: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    with Store.open(config.parent / "zk.db", lock=True):  # the daemon holds the store
        assert main(["export", "-c", str(config), "--from", "2026-03-01", "--to", "2026-03-01"]) == 0
    out, err = capfdbinary.readouterr()
    assert out.startswith(b"\xef\xbb\xbfdevice,serial,enroll_number")
    assert len(out.decode("utf-8-sig").splitlines()) == 4
    assert b"exported 3 punches (2026-03-01 to 2026-03-01)" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--from", "2026-02-30", "--to", "2026-03-01"],
            "--from '2026-02-30' is not a date of the form YYYY-MM-DD",
        ),
        (["--from", "2026-03-02", "--to", "2026-03-01"], "--to 2026-03-01 is before --from 2026-03-02"),
        (
            ["--from", "2026-03-01", "--to", "2026-03-01", "--device", "roof"],
            "--device 'roof': no such terminal",
        ),
        (["--from", "2026-03-01", "--to", "2026-03-01", "--format", "xlsx"], "an XLSX export needs a file"),
    ],
)
def test_user_mistakes_are_one_line(
    config: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["export", "-c", str(config), *args]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_a_failed_write_leaves_no_file(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = config.parent / "missing-dir" / "out.csv"
    assert (
        main(["export", "-c", str(config), "--from", "2026-03-01", "--to", "2026-03-01", "-o", str(out)]) == 1
    )
    assert "cannot write" in capsys.readouterr().err
    assert not out.parent.exists()


def test_terminal_text_cannot_become_a_formula_or_a_control_sequence() -> None:
    assert clean_text("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert clean_text("a\x1b[31mb\x07") == "a\\x1b[31mb\\x07"
    assert clean_text("王五-1") == "王五-1"


def test_progress_line_is_redrawn_at_most_twice_a_second() -> None:
    out = io.StringIO()
    now = [0.0]
    progress = Progress(out, 1000, clock=lambda: now[0])
    progress.update(1)
    progress.update(2)  # not due yet
    now[0] = 0.6
    progress.update(500)
    progress.finish(1000)
    assert out.getvalue() == "\rexported 1 of 1000 punches (0%)\rexported 500 of 1000 punches (50%)\r\x1b[K"


def test_names_come_from_the_terminal_first_then_the_dingtalk_directory() -> None:
    maker = RowMaker(
        zone=timezone.utc,
        device_zones={},
        terminal_names={("SN-1", "1001"): "张三"},
        directory_names={"alice": "Alice (directory)", "bob": "Bob (directory)"},
    )

    def name_of(enroll: str, userid: str | None) -> object:
        exported = ExportedPunch(
            device="gone",
            serial="SN-1",
            enroll_number=enroll,
            local_time="2026-03-01 08:00:00",
            punch_state=7,
            verify_mode=99,
            check_time_ms=None,
            stored_at=POLLED,
            delivery="history",
            reason=None,
            delivered_at=None,
            userid=userid,
            outcome_unknown=False,
            request_id=None,
            record_id=None,
        )
        row = maker.row(exported)
        assert row[6] is None  # neither a configured zone nor a moment to derive an offset from
        assert row[7:9] == ["other 其他 (7)", "other 其他 (99)"]
        assert row[10] == "history 历史"
        return row[3]

    assert name_of("1001", "alice") == "张三"
    assert name_of("1002", "bob") == "Bob (directory)"
    assert name_of("1003", None) is None


def test_a_full_sheet_continues_on_the_next_under_the_same_header(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("zkdingsync.export.writers.EXCEL_MAX_ROWS", 3)  # a header and two rows a sheet
    out = config.parent / "sheets.xlsx"
    assert (
        main(["export", "-c", str(config), "--from", "2026-02-01", "--to", "2026-03-31", "-o", str(out)]) == 0
    )
    book = openpyxl.load_workbook(out)
    assert book.sheetnames == ["punches", "punches 2", "punches 3", "punches 4"]
    rows = [[cell.value for cell in row] for sheet in book.worksheets for row in sheet.iter_rows(min_row=2)]
    assert len(rows) == 7
    assert all(sheet.cell(row=1, column=3).value == "enroll_number 工号" for sheet in book.worksheets)
    assert all(sheet.freeze_panes == "A2" for sheet in book.worksheets)
