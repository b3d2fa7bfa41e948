"""Counts and lists of stored punches (what `status` and the tools read; no writes)."""

from __future__ import annotations

from datetime import datetime

from zkdingsync.model import Delivery, StoredPunch
from zkdingsync.store.connection import Connection, iso, parse_time
from zkdingsync.store.queue import PUNCH_COLUMNS, stored_punch


class PunchCounts(Connection):
    """How many punches are where, and since when."""

    def delivery_counts(self) -> dict[Delivery, int]:
        """Return how many punches are in each delivery state (every state present)."""
        counts = dict.fromkeys(Delivery, 0)
        for row in self._query("SELECT delivery, count(*) FROM punches GROUP BY delivery"):
            counts[Delivery(row[0])] = row[1]
        return counts

    def count_in(self, delivery: Delivery) -> int:
        """Return how many punches are in one delivery state (an index range: cheap on a large store)."""
        return int(self._query("SELECT count(*) FROM punches WHERE delivery = ?", (delivery.value,))[0][0])

    def park_reasons(self, limit: int = 5, *, delivery: Delivery = Delivery.PARKED) -> list[tuple[str, int]]:
        """Return the most frequent reasons of parked (or quarantined) punches with their counts."""
        rows = self._query(
            "SELECT coalesce(reason, ''), count(*) AS n FROM punches WHERE delivery = ? "
            "GROUP BY reason ORDER BY n DESC, reason LIMIT ?",
            (delivery.value, limit),
        )
        return [(row[0], row[1]) for row in rows]

    def delivered_since(self, at: datetime) -> int:
        """Return how many punches were delivered at or after `at`."""
        return int(self._query("SELECT count(*) FROM punches WHERE delivered_at >= ?", (iso(at),))[0][0])

    def punches_since(self, at: datetime, device: str | None = None) -> int:
        """Return how many punches were stored at or after `at` (of one terminal, when named)."""
        if device is None:
            rows = self._query("SELECT count(*) FROM punches WHERE stored_at >= ?", (iso(at),))
        else:
            rows = self._query(
                "SELECT count(*) FROM punches WHERE device = ? AND stored_at >= ?", (device, iso(at))
            )
        return int(rows[0][0])

    def outcome_unknown_count(self) -> int:
        """Return how many punches ever had an upload whose outcome was unknown (possible duplicates)."""
        return int(self._query("SELECT count(*) FROM punches WHERE outcome_unknown = 1")[0][0])

    def punches(self, *, delivery: Delivery | None = None) -> list[StoredPunch]:
        """Return stored punches (all, or those in one delivery state), oldest first. For tests and tools."""
        if delivery is None:
            rows = self._query(f"SELECT {PUNCH_COLUMNS} FROM punches ORDER BY id")  # noqa: S608
        else:
            rows = self._query(
                f"SELECT {PUNCH_COLUMNS} FROM punches WHERE delivery = ? ORDER BY id",  # noqa: S608
                (delivery.value,),
            )
        return [stored_punch(row) for row in rows]

    def oldest_stored_at(self, delivery: Delivery = Delivery.PENDING) -> datetime | None:
        """Given a delivery state, return when its oldest punch was stored, or None when it has none."""
        rows = self._query("SELECT min(stored_at) FROM punches WHERE delivery = ?", (delivery.value,))
        return parse_time(rows[0][0])
