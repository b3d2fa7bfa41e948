"""History: punches kept on first contact (or before `delivery.since`) and never queued, until `backfill`
queues a window of them; and the punches per day that `probe --budget` prices."""

from __future__ import annotations

from datetime import datetime

from zkdingsync.history import HistoryHeld
from zkdingsync.store.connection import Connection, iso


class HistoryPunches(Connection):
    """The punches in the `history` delivery state, by terminal and time."""

    def history_held(self, device: str) -> HistoryHeld:
        """Return how many punches of a terminal are kept as history, and their local time range."""
        row = self._query(
            "SELECT count(*), min(local_time), max(local_time) FROM punches "
            "WHERE delivery = 'history' AND device = ?",
            (device,),
        )[0]
        return HistoryHeld(device, int(row[0]), row[1], row[2])

    def history_devices(self) -> list[str]:
        """Return the names of the terminals that have punches kept as history."""
        rows = self._query("SELECT DISTINCT device FROM punches WHERE delivery = 'history' ORDER BY device")
        return [row[0] for row in rows]

    def count_history(self, device: str, start_ms: int, end_ms: int) -> int:
        """Return how many history punches of a terminal lie in [start_ms, end_ms)."""
        rows = self._query(
            "SELECT count(*) FROM punches WHERE delivery = 'history' AND device = ? "
            "AND check_time_ms >= ? AND check_time_ms < ?",
            (device, start_ms, end_ms),
        )
        return int(rows[0][0])

    def queue_history(self, device: str, start_ms: int, end_ms: int, *, now: datetime) -> int:
        """Queue the history punches of a terminal that lie in [start_ms, end_ms), due at `now`; return
        how many. They join the backlog (they were stored long ago): a punch read later still goes first."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE punches SET delivery = 'pending', next_attempt_at = ?, reason = NULL "
                "WHERE delivery = 'history' AND device = ? AND check_time_ms >= ? AND check_time_ms < ?",
                (iso(now), device, start_ms, end_ms),
            )
            return cursor.rowcount

    def punches_per_day(self, first_day: str) -> dict[str, dict[str, int]]:
        """Return, per terminal, how many punches it recorded on each day ("2026-11-19", its wall clock)
        from `first_day` on, whatever their delivery state (a scan of every punch: for `probe --budget`)."""
        per_device: dict[str, dict[str, int]] = {}
        rows = self._query(
            "SELECT device, substr(local_time, 1, 10) AS day, count(*) FROM punches "
            "WHERE local_time >= ? GROUP BY device, day",
            (first_day,),
        )
        for device, day, count in rows:
            per_device.setdefault(device, {})[day] = int(count)
        return per_device
