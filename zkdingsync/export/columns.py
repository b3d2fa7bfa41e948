"""The export's columns: from a stored punch to the row HR reads.

Punch state, verify mode and delivery state are written in words, English then Chinese ("check-in 上班"),
an unknown code as its number. The punch's own time is the terminal's wall clock with the terminal's zone
beside it; when it was stored and delivered are shown in the configured timezone. Text that came from a
terminal or DingTalk is escaped (control characters) and never starts a formula.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from functools import lru_cache

from zkdingsync.printable import printable
from zkdingsync.store import ExportedPunch

# (English header, Chinese for the XLSX header)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("device", "考勤机"),
    ("serial", "序列号"),
    ("enroll_number", "工号"),
    ("name", "姓名"),
    ("userid", "钉钉用户ID"),
    ("local_time", "打卡时间"),
    ("timezone", "时区"),
    ("punch_state", "打卡类型"),
    ("verify_mode", "验证方式"),
    ("stored_at", "入库时间"),
    ("delivery", "同步状态"),
    ("reason", "原因"),
    ("delivered_at", "送达时间"),
    ("request_id", "钉钉请求ID"),
    ("record_id", "钉钉记录ID"),
    ("outcome_unknown", "曾结果未知"),
)

PUNCH_STATES = {
    0: "check-in 上班",
    1: "check-out 下班",
    2: "break-out 外出",
    3: "break-in 外出返回",
    4: "overtime-in 加班上班",
    5: "overtime-out 加班下班",
    255: "none 未指定",
}
VERIFY_MODES = {
    0: "password 密码",
    1: "fingerprint 指纹",
    2: "card 卡",
    3: "password 密码",
    4: "card 卡",
    15: "face 人脸",
    25: "palm 掌纹",
}
DELIVERY_STATES = {
    "delivered": "delivered 已送达",
    "pending": "pending 待发送",
    "in_flight": "in flight 发送中",
    "parked": "parked 已搁置",
    "quarantined": "quarantined 已隔离",
    "history": "history 历史",
}

# Leading characters a spreadsheet would take as the start of a formula.
_FORMULA_STARTS = ("=", "+", "@")

Cell = str | int | datetime | None
_MAX_OFFSET_MINUTES = 14 * 60  # beyond any zone: the terminal's clock and its stored moment disagree


def clean_text(text: str) -> str:
    """Given text from a terminal or DingTalk, return it safe for a spreadsheet cell: control characters
    escaped (`printable`), and a leading formula character behind an apostrophe."""
    text = printable(text)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def in_words(table: Mapping[int, str], code: int, other: str) -> str:
    """Given a code table, a code and the word for unknown codes, return the code in words."""
    return table.get(code) or f"{other} ({code})"


@dataclass(frozen=True)
class RowMaker:
    """Makes export rows; knows the configured zones and the employees' names."""

    zone: tzinfo  # the configured timezone, for stored_at and delivered_at
    device_zones: Mapping[str, str]  # configured terminal name -> IANA zone
    terminal_names: Mapping[tuple[str, str], str]  # (serial, enroll number) -> name
    directory_names: Mapping[str, str]  # DingTalk userid -> name

    def row(self, punch: ExportedPunch) -> list[Cell]:
        """Given an exported punch, return its cells in COLUMNS order (times as naive local datetimes,
        or the stored text for an impossible terminal time)."""
        name = self.terminal_names.get((punch.serial, punch.enroll_number)) or (
            self.directory_names.get(punch.userid) if punch.userid else None
        )
        local = _local_time(punch.local_time)
        return [
            clean_text(punch.device),
            clean_text(punch.serial),
            clean_text(punch.enroll_number),
            clean_text(name) if name else None,
            clean_text(punch.userid) if punch.userid else None,
            local if local is not None else clean_text(punch.local_time),
            self._zone_of(punch, local),
            in_words(PUNCH_STATES, punch.punch_state, "other 其他"),
            in_words(VERIFY_MODES, punch.verify_mode, "other 其他"),
            self._shown(punch.stored_at),
            DELIVERY_STATES.get(punch.delivery) or clean_text(punch.delivery),
            clean_text(punch.reason) if punch.reason else None,
            self._shown(punch.delivered_at) if punch.delivered_at else None,
            clean_text(punch.request_id) if punch.request_id else None,
            clean_text(punch.record_id) if punch.record_id else None,
            "yes 是" if punch.outcome_unknown else None,
        ]

    def _shown(self, at: datetime) -> datetime:
        return at.astimezone(self.zone).replace(tzinfo=None, microsecond=0)

    def _zone_of(self, punch: ExportedPunch, local: datetime | None) -> str | None:
        """The terminal's configured zone and the UTC offset the punch was read with ("Asia/Shanghai
        +08:00"); the offset alone for a terminal no longer configured."""
        minutes = None
        if local is not None and punch.check_time_ms is not None:
            wall_ms = local.replace(tzinfo=timezone.utc).timestamp() * 1000
            minutes = round((wall_ms - punch.check_time_ms) / 60_000)
        return _zone_text(self.device_zones.get(punch.device), minutes)


@lru_cache(maxsize=1024)  # a few zones and offsets, asked for on every row
def _zone_text(zone: str | None, minutes: int | None) -> str | None:
    offset = None
    if minutes is not None and abs(minutes) <= _MAX_OFFSET_MINUTES:
        sign = "+" if minutes >= 0 else "-"
        offset = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    parts = [part for part in (zone, offset) if part]
    return " ".join(parts) or None


def _local_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # the terminal wrote an impossible date; it is exported as the text it was
        return None
