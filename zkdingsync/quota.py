"""The monthly DingTalk call budget's calendar and warning share, one definition for every module.

DingTalk counts an organisation's calls per calendar month in its own timezone (the configured top-level
`timezone`): the client counts each call under `call_month`, and `status` and the forwarder read the
count under the same month. The client also counts each day, for `status`'s forecast (`forecast_month`).

The forecast, by hand: take the calls counted on the last 7 days (today included) and divide by the days
elapsed since the first of them began (since counting began, if later; at least one day). That is the rate
per day. The month's forecast is the calls used so far plus the rate times the days left until the 1st of
next month; the quota runs out on the day the same rate reaches it (None if not this month). `edition_for`
names the smallest DingTalk edition whose quota covers a monthly load (`probe --budget`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo

# DingTalk's answer once the organisation's monthly calls are spent (until the 1st).
QUOTA_EXHAUSTED_CODE = "90020"

# Share of the monthly call quota at which the forwarder warns (once a month) and `status` asks for
# attention.
QUOTA_WARNING_SHARE = 0.8


def call_month(at: datetime, zone: tzinfo = timezone.utc) -> str:
    """Given a moment and the organisation's timezone, return the month its calls count in ("2026-11")."""
    return at.astimezone(zone).strftime("%Y-%m")


def call_day(at: datetime, zone: tzinfo = timezone.utc) -> str:
    """Given a moment and the organisation's timezone, return the day its calls count in ("2026-11-19",
    within `call_month`'s month)."""
    return at.astimezone(zone).strftime("%Y-%m-%d")


def next_month_start(at: datetime, zone: tzinfo = timezone.utc) -> datetime:
    """Given a moment and a timezone, return the first moment of the next calendar month there."""
    first = at.astimezone(zone).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    # Wall-clock arithmetic (aware datetimes keep their zone's fields), so a DST change cannot shift it.
    return (first + timedelta(days=32)).replace(day=1)


def month_after(month: str) -> str:
    """Given a month ("2026-12"), return the next one ("2027-01")."""
    year, number = (int(part) for part in month.split("-"))
    return f"{year + number // 12:04d}-{number % 12 + 1:02d}"


RATE_DAYS = 7
_DAY = timedelta(days=1)

# (name shown, monthly metered calls) of DingTalk's editions, smallest first (dingtalk-api.md).
STANDARD_QUOTA = 5_000
PROFESSIONAL_QUOTA = 200_000
ADD_ON_QUOTA = 5_000_000


@dataclass(frozen=True)
class Forecast:
    """This month's calls so far, the recent rate, and where that rate leads by the month's end."""

    month: str  # "2026-11", in the organisation's zone
    used: int
    per_day: float  # the last 7 days' rate
    forecast: int  # the month's calls at that rate
    exhausted_on: date | None  # the day the quota runs out at that rate (today if spent already)


def forecast_month(
    *,
    used: int,
    calls_by_day: Mapping[str, int],
    now: datetime,
    zone: tzinfo,
    quota: int | None,
    counting_since: str | None = None,
) -> Forecast:
    """Given this month's calls `used`, the calls per day ("2026-11-19" -> n, at least the last 7 days),
    the time, the organisation's zone, the quota (None: none) and the first day calls were counted per
    day, return the month's Forecast (see the module docstring for the computation)."""
    today = now.astimezone(zone).date()
    first_day = today - timedelta(days=RATE_DAYS - 1)
    if counting_since is not None:
        first_day = max(first_day, date.fromisoformat(counting_since))
    recent = sum(
        calls for day, calls in calls_by_day.items() if first_day <= date.fromisoformat(day) <= today
    )
    elapsed_days = max(1.0, (now - datetime.combine(first_day, time(), tzinfo=zone)) / _DAY)
    per_day = recent / elapsed_days
    end = next_month_start(now, zone)
    forecast = used + round(per_day * ((end - now) / _DAY))
    exhausted_on: date | None = None
    if quota:
        if used >= quota:
            exhausted_on = today
        elif per_day > 0:
            at = now + _DAY * ((quota - used) / per_day)
            exhausted_on = at.astimezone(zone).date() if at < end else None
    return Forecast(
        month=now.astimezone(zone).strftime("%Y-%m"),
        used=used,
        per_day=per_day,
        forecast=forecast,
        exhausted_on=exhausted_on,
    )


def edition_for(monthly_calls: int) -> str:
    """Given the metered calls a month needs, return the smallest DingTalk edition that covers them."""
    if monthly_calls <= STANDARD_QUOTA:
        return f"标准版 (standard edition, {STANDARD_QUOTA:,} calls a month)"
    if monthly_calls <= PROFESSIONAL_QUOTA:
        return f"专业版 (professional edition, {PROFESSIONAL_QUOTA:,} calls a month)"
    add_ons = math.ceil((monthly_calls - PROFESSIONAL_QUOTA) / ADD_ON_QUOTA)
    return (
        f"专业版 with {add_ons} 增购包 add-on{'s' if add_ons > 1 else ''} "
        f"({PROFESSIONAL_QUOTA + add_ons * ADD_ON_QUOTA:,} calls a month)"
    )
