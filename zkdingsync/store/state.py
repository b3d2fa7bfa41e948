"""The daemon's small state, kept beside the punches: the key-value table behind typed methods (the
DingTalk token, DingTalk's health for `status`, `retry`'s request for a job-number refresh, the store
probe), the monthly call counts and the job-number cache.

Every key lives here and nowhere else: the modules that share a value (the forwarder writes the health,
`status` reads it) share a method, not a string.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone

from zkdingsync.model import DingTalkHealth
from zkdingsync.store.connection import UPSERT_KV, Connection, iso, parse_time

# An app's cached access token (not a secret in the code: the key under which the store keeps it).
_TOKEN_KEY = "dingtalk.token.{app_key}"  # noqa: S105
_HEALTH_KEY = "dingtalk.health"  # "ok", "paused: <reason>", "error: <reason>" (see model.DingTalkHealth)
_HEALTH_AT_KEY = "dingtalk.health_at"  # when the health was last written, ISO-8601 with offset
_MAPPING_REFRESH_KEY = "mapping.refresh_requested"  # set by `retry`: the time of the request, ISO-8601
_STORE_PROBE_KEY = "delivery.store_probe"  # written to see whether a failing store takes writes again
JOB_NUMBERS_UPDATED_KEY = "job_numbers.updated_at"
# Set in a backup copy only (when it was taken); the daemon that opens a restored copy acts on it once.
BACKUP_TAKEN_KEY = "backup.taken_at"
_DAILY_REPORT_KEY = "report.daily_sent_for"  # the day ("YYYY-MM-DD") the last daily report was about


class SmallState(Connection):
    """Key-values, call counts and job numbers."""

    # ------------------------------------------------------------------ key-value

    def get_value(self, key: str, *, now: datetime) -> str | None:
        """Return the value stored under `key`, or None when missing or expired at `now`."""
        rows = self._query("SELECT value, expires_at FROM kv WHERE key = ?", (key,))
        if not rows:
            return None
        expires = parse_time(rows[0]["expires_at"])
        if expires is not None and expires <= now:
            return None
        return str(rows[0]["value"])

    def set_value(self, key: str, value: str, *, expires_at: datetime | None = None) -> None:
        """Store `value` under `key`, optionally expiring at `expires_at`."""
        self._update(UPSERT_KV, (key, value, iso(expires_at) if expires_at else None))

    def delete_value(self, key: str) -> None:
        """Forget the value under `key`."""
        self._update("DELETE FROM kv WHERE key = ?", (key,))

    def _take_value(self, key: str) -> str | None:
        """Return the value under `key` and forget it, in one transaction."""
        with self._transaction() as conn:
            row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            return str(row[0])

    # ------------------------------------------------------------------ typed values

    def daily_report_sent_for(self) -> str | None:
        """Return the day ("YYYY-MM-DD") the last daily report was about, or None."""
        rows = self._query("SELECT value FROM kv WHERE key = ?", (_DAILY_REPORT_KEY,))
        return str(rows[0][0]) if rows else None

    def record_daily_report(self, day: str) -> None:
        """Remember that the daily report about `day` was handed to the robot (a restart sends it once)."""
        self._update(UPSERT_KV, (_DAILY_REPORT_KEY, day, None))

    def cached_token(self, app_key: str, *, now: datetime) -> str | None:
        """Return the DingTalk access token cached for `app_key`, or None when missing or due for renewal."""
        return self.get_value(_TOKEN_KEY.format(app_key=app_key), now=now)

    def cache_token(self, app_key: str, token: str, *, refresh_at: datetime) -> None:
        """Cache the access token of `app_key` until `refresh_at` (shared with the next run)."""
        self.set_value(_TOKEN_KEY.format(app_key=app_key), token, expires_at=refresh_at)

    def forget_token(self, app_key: str) -> None:
        """Drop the cached access token of `app_key` (DingTalk refused it)."""
        self.delete_value(_TOKEN_KEY.format(app_key=app_key))

    def set_dingtalk_health(self, health: DingTalkHealth) -> None:
        """Publish DingTalk's health for `status` (the forwarder writes it when it changes)."""
        if health.at is None:
            raise ValueError("a published health needs the moment it was seen")
        with self._transaction() as conn:
            conn.execute(UPSERT_KV, (_HEALTH_KEY, health.text(), None))
            conn.execute(UPSERT_KV, (_HEALTH_AT_KEY, health.at.isoformat(), None))

    def dingtalk_health(self) -> DingTalkHealth | None:
        """Return DingTalk's health as last published, or None when this run has not published it yet."""
        rows = self._query("SELECT key, value FROM kv WHERE key IN (?, ?)", (_HEALTH_KEY, _HEALTH_AT_KEY))
        values = {row[0]: row[1] for row in rows}
        text = values.get(_HEALTH_KEY)
        if text is None:
            return None
        return DingTalkHealth.parse(text, _parse_aware(values.get(_HEALTH_AT_KEY)))

    def clear_dingtalk_health(self) -> None:
        """Forget the health an earlier run published (the first call of this run says it again)."""
        self.delete_value(_HEALTH_KEY)

    def request_mapping_refresh(self, at: datetime) -> None:
        """Ask the daemon to fetch the DingTalk job number table before it delivers again (`retry`)."""
        self.set_value(_MAPPING_REFRESH_KEY, at.isoformat())

    def take_mapping_refresh_request(self) -> bool:
        """Return True (once) when a job-number refresh was asked for since the last call."""
        return self._take_value(_MAPPING_REFRESH_KEY) is not None

    def mapping_refresh_requested(self) -> datetime | None:
        """Return when a job-number refresh still waiting to be taken was asked for, or None."""
        rows = self._query("SELECT value FROM kv WHERE key = ?", (_MAPPING_REFRESH_KEY,))
        return _parse_aware(rows[0][0]) if rows else None

    def probe_writable(self, at: datetime) -> None:
        """Write a small value: raise StoreError while the store refuses writes (disk full, read-only)."""
        self.set_value(_STORE_PROBE_KEY, at.isoformat())

    # ------------------------------------------------------------------ monthly call budget

    def count_calls(self, month: str, n: int = 1, *, day: str | None = None) -> int:
        """Add `n` DingTalk calls to `month` ("2026-11") and, when given, to `day` ("2026-11-19", in the
        same month) for the forecast; return the month's new total."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO api_calls (month, calls) VALUES (?, ?) "
                "ON CONFLICT (month) DO UPDATE SET calls = calls + excluded.calls",
                (month, n),
            )
            if day is not None:
                conn.execute(
                    "INSERT INTO api_calls_daily (day, calls) VALUES (?, ?) "
                    "ON CONFLICT (day) DO UPDATE SET calls = calls + excluded.calls",
                    (day, n),
                )
            return int(conn.execute("SELECT calls FROM api_calls WHERE month = ?", (month,)).fetchone()[0])

    def calls_by_day(self, first_day: str, last_day: str) -> dict[str, int]:
        """Return the calls counted on each day from `first_day` to `last_day` ("2026-11-19"), both
        included; days without calls are left out."""
        rows = self._query(
            "SELECT day, calls FROM api_calls_daily WHERE day >= ? AND day <= ? ORDER BY day",
            (first_day, last_day),
        )
        return {row[0]: int(row[1]) for row in rows}

    def first_counted_day(self) -> str | None:
        """Return the first day ("2026-11-19") on which calls were counted per day, or None."""
        rows = self._query("SELECT min(day) FROM api_calls_daily")
        return rows[0][0] if rows and rows[0][0] else None

    def calls_in_month(self, month: str) -> int:
        """Return how many DingTalk calls were counted in `month`."""
        rows = self._query("SELECT calls FROM api_calls WHERE month = ?", (month,))
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------------------ job numbers

    def replace_job_numbers(self, mapping: Mapping[str, str], *, at: datetime) -> None:
        """Replace the cached job number -> DingTalk userid table."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM job_numbers")
            conn.executemany("INSERT INTO job_numbers (job_number, userid) VALUES (?, ?)", mapping.items())
            conn.execute(UPSERT_KV, (JOB_NUMBERS_UPDATED_KEY, iso(at), None))

    def job_numbers(self) -> dict[str, str]:
        """Return the cached job number -> DingTalk userid table."""
        return {row[0]: row[1] for row in self._query("SELECT job_number, userid FROM job_numbers")}

    def job_numbers_updated_at(self) -> datetime | None:
        """Return when the job number table was last replaced, or None."""
        rows = self._query("SELECT value FROM kv WHERE key = ?", (JOB_NUMBERS_UPDATED_KEY,))
        return parse_time(rows[0][0]) if rows else None


def _parse_aware(text: str | None) -> datetime | None:
    """Given an ISO-8601 time another version may have written (or None), return it aware (UTC if naive),
    or None when it cannot be read."""
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)
