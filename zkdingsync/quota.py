"""The monthly DingTalk call budget's calendar and warning share, one definition for every module.

DingTalk counts an organisation's calls per calendar month in its own timezone (the configured top-level
`timezone`): the client counts each call under `call_month`, and `status` and the forwarder read the
count under the same month.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone, tzinfo

# Share of the monthly call quota at which the forwarder warns (once a month) and `status` asks for
# attention.
QUOTA_WARNING_SHARE = 0.8


def call_month(at: datetime, zone: tzinfo = timezone.utc) -> str:
    """Given a moment and the organisation's timezone, return the month its calls count in ("2026-11")."""
    return at.astimezone(zone).strftime("%Y-%m")


def next_month_start(at: datetime, zone: tzinfo = timezone.utc) -> datetime:
    """Given a moment and a timezone, return the first moment of the next calendar month there."""
    first = at.astimezone(zone).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    # Wall-clock arithmetic (aware datetimes keep their zone's fields), so a DST change cannot shift it.
    return (first + timedelta(days=32)).replace(day=1)
