"""The delivery queue: each punch's delivery state, in the row that holds the punch.

A claim commits the switch to in flight before any upload goes out, so a crash during the upload leaves
the punch in flight: its outcome is then unknown and settled by reading DingTalk back.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from zkdingsync.model import Delivery, Punch, StoredPunch
from zkdingsync.store.connection import Connection, iso, parse_time
from zkdingsync.store.state import BACKUP_TAKEN_KEY

PUNCH_COLUMNS = (
    "id, serial, enroll_number, local_time, punch_state, verify_mode, device, check_time_ms, workcode, "
    "delivery, reason, attempts, outcome_unknown, in_flight_since, userid"
)


def stored_punch(row: sqlite3.Row) -> StoredPunch:
    """Given a row selected with PUNCH_COLUMNS, return the stored punch."""
    punch = Punch(
        device=row["device"],
        serial=row["serial"],
        enroll_number=row["enroll_number"],
        local_time=row["local_time"],
        punch_state=row["punch_state"],
        verify_mode=row["verify_mode"],
        check_time_ms=row["check_time_ms"],
        workcode=row["workcode"],
        quarantine_reason=row["reason"] if row["delivery"] == Delivery.QUARANTINED.value else None,
    )
    return StoredPunch(
        id=row["id"],
        punch=punch,
        delivery=Delivery(row["delivery"]),
        reason=row["reason"],
        attempts=row["attempts"],
        outcome_unknown=bool(row["outcome_unknown"]),
        in_flight_since=parse_time(row["in_flight_since"]),
        userid=row["userid"],
    )


class PunchQueue(Connection):
    """Claims due punches and records what became of each (the forwarder's side; `retry` requeues)."""

    def claim_due(
        self, now: datetime, limit: int, *, fresh_since: datetime | None = None, fresh_limit: int = 0
    ) -> list[StoredPunch]:
        """Switch up to `limit` due pending punches to in flight and return them, in the order to send.

        With `fresh_since`, up to `fresh_limit` of them are punches stored since then and never tried,
        newest first; the rest are the oldest due (the backlog). Without, all are the oldest due. The
        switch is committed before this returns, so a crash during the upload leaves them in flight: their
        outcome is then unknown and must be settled by reading DingTalk back.
        """
        at = iso(now)
        with self._transaction() as conn:
            ids: list[int] = []
            if fresh_since is not None and fresh_limit > 0:
                # The partial index on stored_at walks the pending punches newest first and stops at
                # `fresh_since`: cheap however long the backlog behind them.
                ids = [
                    row[0]
                    for row in conn.execute(
                        "SELECT id FROM punches INDEXED BY punches_pending_stored "
                        "WHERE delivery = 'pending' AND stored_at >= ? AND attempts = 0 "
                        "AND next_attempt_at <= ? ORDER BY stored_at DESC, id DESC LIMIT ?",
                        (iso(fresh_since), at, min(fresh_limit, limit)),
                    )
                ]
            taken = f"AND id NOT IN ({','.join('?' * len(ids))}) " if ids else ""
            ids += [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM punches WHERE delivery = 'pending' AND next_attempt_at <= ? "  # noqa: S608 - placeholders only
                    f"{taken}ORDER BY next_attempt_at, id LIMIT ?",
                    (at, *ids, limit - len(ids)),
                )
            ]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            conn.execute(
                f"UPDATE punches SET delivery = 'in_flight', attempts = attempts + 1, "  # noqa: S608 - placeholders only
                f"in_flight_since = ? WHERE id IN ({marks})",
                (at, *ids),
            )
            rows = conn.execute(
                f"SELECT {PUNCH_COLUMNS} FROM punches WHERE id IN ({marks})",  # noqa: S608
                ids,
            ).fetchall()
        place = {punch_id: index for index, punch_id in enumerate(ids)}
        return sorted((stored_punch(row) for row in rows), key=lambda stored: place[stored.id])

    def record_upload_userids(self, userids: Mapping[int, str]) -> None:
        """Remember, before the uploads go out, which DingTalk userid each punch is sent as: should its
        outcome become unknown, DingTalk is read back under that userid, even if `users.map` changed."""
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE punches SET userid = ? WHERE id = ?",
                [(userid, pid) for pid, userid in userids.items()],
            )

    def make_pending_due(self, now: datetime) -> int:
        """Make every pending punch due at `now` (a restart or `retry` ends the waits of the last run).
        Return how many were waiting."""
        at = iso(now)
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE punches SET next_attempt_at = ? WHERE delivery = 'pending' AND next_attempt_at > ?",
                (at, at),
            )
            return cursor.rowcount

    def mark_delivered(
        self,
        punch_id: int,
        *,
        at: datetime,
        userid: str,
        request_id: str | None = None,
        record_id: str | None = None,
    ) -> None:
        """DingTalk confirmed the punch at `at`: its answer to the upload carried `request_id`, or a
        read-back found it as the record `record_id`. Both are kept as HR's evidence."""
        self._update(
            "UPDATE punches SET delivery = 'delivered', delivered_at = ?, userid = ?, reason = NULL, "
            "in_flight_since = NULL, request_id = ?, record_id = ? WHERE id = ?",
            (iso(at), userid, request_id, record_id, punch_id),
        )

    def mark_pending(
        self, punch_id: int, *, retry_at: datetime, reason: str, outcome_unknown: bool = False
    ) -> None:
        """Put a punch back in the queue, due at `retry_at`.

        `outcome_unknown=True` records that an earlier upload's outcome was never known, which explains a
        duplicate in DingTalk should one appear.
        """
        self._update(
            "UPDATE punches SET delivery = 'pending', next_attempt_at = ?, reason = ?, "
            "in_flight_since = NULL, outcome_unknown = MAX(outcome_unknown, ?) WHERE id = ?",
            (iso(retry_at), reason, int(outcome_unknown), punch_id),
        )

    def mark_unknown(self, punch_id: int, *, reason: str) -> None:
        """An upload's outcome is unknown: keep the punch in flight, flagged, until a read-back settles it."""
        self._update(
            "UPDATE punches SET delivery = 'in_flight', outcome_unknown = 1, reason = ? WHERE id = ?",
            (reason, punch_id),
        )

    def park(self, punch_id: int, *, reason: str) -> None:
        """Set a punch aside with its reason until a human fixes the cause and runs `retry`."""
        self._update(
            "UPDATE punches SET delivery = 'parked', reason = ?, in_flight_since = NULL WHERE id = ?",
            (reason, punch_id),
        )

    def pending_enroll_numbers(self) -> dict[str, int]:
        """Return the enroll numbers of the pending punches, with how many each has (an index walk)."""
        rows = self._query(
            "SELECT enroll_number, count(*) FROM punches INDEXED BY punches_pending_enroll "
            "WHERE delivery = 'pending' GROUP BY enroll_number"
        )
        return {row[0]: int(row[1]) for row in rows}

    def park_enroll_numbers(self, reasons: Mapping[str, str]) -> dict[str, int]:
        """Park every pending punch of each enroll number (employees nobody mapped) with its reason: one
        statement per number, all in one transaction; return how many each had."""
        parked: dict[str, int] = {}
        with self._transaction() as conn:
            for enroll_number, reason in reasons.items():
                cursor = conn.execute(
                    "UPDATE punches SET delivery = 'parked', reason = ? "
                    "WHERE delivery = 'pending' AND enroll_number = ?",
                    (reason, enroll_number),
                )
                parked[enroll_number] = cursor.rowcount
        return parked

    def in_flight(self) -> list[StoredPunch]:
        """Return every punch left in flight (after a crash, or an upload whose outcome is unknown)."""
        rows = self._query(
            f"SELECT {PUNCH_COLUMNS} FROM punches WHERE delivery = 'in_flight' ORDER BY id"  # noqa: S608
        )
        return [stored_punch(row) for row in rows]

    def adopt_restored_backup(self, now: datetime) -> tuple[datetime, int] | None:
        """If this store is a restored backup, make it safe to deliver from, once; return when the backup
        was taken and how many punches will be read back (None for a store that is not a restored copy).

        A punch pending in the copy may have been delivered by the daemon after the backup was taken, so
        every pending punch is put in flight with its outcome unknown: the settler reads DingTalk back
        before anything is sent again, and sends only what DingTalk does not have.
        """
        with self._transaction() as conn:
            row = conn.execute("SELECT value FROM kv WHERE key = ?", (BACKUP_TAKEN_KEY,)).fetchone()
            if row is None:
                return None
            taken_at = datetime.fromisoformat(str(row[0]))
            cursor = conn.execute(
                "UPDATE punches SET delivery = 'in_flight', outcome_unknown = 1, in_flight_since = ?, "
                "reason = ? WHERE delivery = 'pending'",
                (
                    iso(now),
                    f"restored from a backup of {taken_at:%Y-%m-%d %H:%M} UTC: reading DingTalk back first",
                ),
            )
            conn.execute("DELETE FROM kv WHERE key = ?", (BACKUP_TAKEN_KEY,))
            return taken_at, cursor.rowcount

    def requeue_parked(
        self, *, reason_contains: str | None = None, device: str | None = None, now: datetime | None = None
    ) -> int:
        """Put parked punches (optionally only those whose reason contains a text, or of one terminal) back
        in the queue, due now. Return how many."""
        return self._requeue(["delivery = 'parked'"], reason_contains, device, now)

    def requeue_quarantined(
        self, *, reason_contains: str | None = None, device: str | None = None, now: datetime | None = None
    ) -> int:
        """Put quarantined punches (optionally filtered like `requeue_parked`) back in the queue, due now.

        Only punches with a real moment (`check_time_ms` set) move: an impossible local time can never be
        uploaded, so such a punch stays quarantined whatever a human asks. Return how many moved.
        """
        return self._requeue(
            ["delivery = 'quarantined'", "check_time_ms IS NOT NULL"], reason_contains, device, now
        )

    def _requeue(
        self, clauses: list[str], reason_contains: str | None, device: str | None, now: datetime | None
    ) -> int:
        params: list[Any] = [iso(now or datetime.now(timezone.utc))]
        if reason_contains:
            clauses.append("instr(reason, ?) > 0")
            params.append(reason_contains)
        if device:
            clauses.append("device = ?")
            params.append(device)
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE punches SET delivery = 'pending', next_attempt_at = ?, reason = NULL "  # noqa: S608
                f"WHERE {' AND '.join(clauses)}",
                params,
            )
            return cursor.rowcount
