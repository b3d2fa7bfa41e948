"""What the daily robot report reads: a day's punches per terminal and state, parked punches per
enroll number, and the terminals' outages."""

from __future__ import annotations

from datetime import datetime

from zkdingsync.store.connection import Connection, iso, parse_time
from zkdingsync.store.evidence import ExportWindow, export_filter


class DayReports(Connection):
    """A day's figures for the daily report."""

    def day_counts(self, day: str) -> list[tuple[str, str, int]]:
        """Given a terminal-local day ("YYYY-MM-DD"), return (terminal, delivery state, punches) of the
        punches recorded that day (an index range)."""
        where, params = export_filter(ExportWindow(day, day))
        rows = self._query(
            f"SELECT device, delivery, count(*) FROM punches WHERE {where} GROUP BY device, delivery",  # noqa: S608
            params,
        )
        return [(row[0], row[1], int(row[2])) for row in rows]

    def parked_by_enroll_number(self, limit: int) -> list[tuple[str, int]]:
        """Return the enroll numbers with the most parked punches, with their counts."""
        rows = self._query(
            "SELECT enroll_number, count(*) AS n FROM punches WHERE delivery = 'parked' "
            "GROUP BY enroll_number ORDER BY n DESC, enroll_number LIMIT ?",
            (limit,),
        )
        return [(row[0], int(row[1])) for row in rows]

    def outages_between(self, start: datetime, end: datetime) -> list[tuple[str, datetime, datetime | None]]:
        """Return (terminal, down since, back at or None while still down) of every outage that overlapped
        [start, end), oldest first."""
        rows = self._query(
            "SELECT device, down_since, up_at FROM outages WHERE up_at > ? AND down_since < ? "
            "UNION ALL SELECT device, down_since, NULL FROM checkpoints WHERE down_since < ? "
            "ORDER BY 2, 1",
            (iso(start), iso(end), iso(end)),
        )
        return [(row[0], datetime.fromisoformat(row[1]), parse_time(row[2])) for row in rows]
