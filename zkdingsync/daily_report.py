"""The optional daily message to the DingTalk group (`dingtalk.robot.daily_report_at`).

At the configured time (in the configured timezone) the group gets one message about the day before:
punches per terminal and whether all were delivered or how many wait, parked punches per enroll number,
terminals that were down, and the month's DingTalk calls against the quota. `DailyReport.check()` is
called from the daemon's main loop; the day reported is remembered in the store, so a restart never sends
it twice, and a daemon that was stopped at that time sends it when it starts again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo

from zkdingsync.printable import printable
from zkdingsync.quota import call_month
from zkdingsync.store import Store
from zkdingsync.timeconv import describe_duration

WAITING = ("pending", "in_flight")
MAX_TERMINAL_LINES = 30  # a robot message is read on a phone (and capped at 2000 characters)
MAX_PARKED_NUMBERS = 10


@dataclass(frozen=True)
class DaySummary:
    """What the daily report says about one day."""

    day: date
    punches: dict[str, dict[str, int]]  # terminal -> delivery state -> punches recorded that day
    parked_by_enroll_number: list[tuple[str, int]]  # every punch parked now, by enroll number
    outages: list[tuple[str, datetime, datetime | None]]  # terminal, down since, back at (None: still down)
    calls_this_month: int
    monthly_call_quota: int


def summarize_day(
    store: Store, day: date, terminals: Sequence[str], zone: tzinfo, *, now: datetime, quota: int
) -> DaySummary:
    """Given the store, a day, the configured terminal names, the configured zone, the time and the monthly
    quota, read what the report about that day says."""
    punches: dict[str, dict[str, int]] = {name: {} for name in terminals}
    for device, delivery, count in store.day_counts(day.isoformat()):
        punches.setdefault(device, {})[delivery] = count
    start = datetime.combine(day, time(0), tzinfo=zone)
    return DaySummary(
        day=day,
        punches=punches,
        parked_by_enroll_number=store.parked_by_enroll_number(MAX_PARKED_NUMBERS),
        outages=store.outages_between(start, start + timedelta(days=1)),
        calls_this_month=store.calls_in_month(call_month(now, zone)),
        monthly_call_quota=quota,
    )


def render(summary: DaySummary, zone: tzinfo) -> str:
    """Given a day's summary and the configured zone, return the message text."""
    total = sum(sum(states.values()) for states in summary.punches.values())
    waiting = sum(states.get(state, 0) for states in summary.punches.values() for state in WAITING)
    verdict = "all delivered" if not waiting else f"{waiting} waiting to be delivered"
    lines = [f"daily report for {summary.day.isoformat()}: {total} punches, {verdict}"]
    for device, states in list(summary.punches.items())[:MAX_TERMINAL_LINES]:
        count = sum(states.values())
        parts = ", ".join(f"{state.replace('_', ' ')} {n}" for state, n in sorted(states.items()))
        lines.append(f"- {device}: {count}" + (f" ({parts})" if parts else ""))
    if len(summary.punches) > MAX_TERMINAL_LINES:
        lines.append(f"- and {len(summary.punches) - MAX_TERMINAL_LINES} more terminals")
    if summary.parked_by_enroll_number:
        parked = ", ".join(f"{printable(number, 24)}: {n}" for number, n in summary.parked_by_enroll_number)
        lines.append(f"parked, by enroll number: {parked} (fix the cause, then `zkdingsync retry`)")
    else:
        lines.append("parked: none")
    if summary.outages:
        lines.append("terminals down: " + "; ".join(_outage(outage, zone) for outage in summary.outages))
    else:
        lines.append("terminals down: none")
    quota = summary.monthly_call_quota
    share = f" ({summary.calls_this_month * 100 // quota}%)" if quota else ""
    lines.append(f"DingTalk calls this month: {summary.calls_this_month} of {quota}{share}")
    return "\n".join(lines)


def _outage(outage: tuple[str, datetime, datetime | None], zone: tzinfo) -> str:
    device, down, up = outage
    since = down.astimezone(zone).strftime("%m-%d %H:%M")
    if up is None:
        return f"{device} since {since}, still down"
    length = describe_duration((up - down).total_seconds())
    return f"{device} {since} to {up.astimezone(zone):%m-%d %H:%M} ({length})"


class DailyReport:
    """Decides when the daily report is due and hands it to the robot, once per day."""

    def __init__(
        self,
        store: Store,
        notify: Callable[[str], None],
        *,
        at: str,
        zone: tzinfo,
        terminals: Callable[[], Sequence[str]],
        quota: int,
        clock: Callable[[], datetime],
    ) -> None:
        """Given the store, the robot's `notify`, the time of day ("HH:MM"), the configured zone, a
        function giving the configured terminal names, the monthly quota and the clock."""
        hours, minutes = (int(part) for part in at.split(":"))
        self._store = store
        self._notify = notify
        self._at = time(hours, minutes)
        self._zone = zone
        self._terminals = terminals
        self._quota = quota
        self._clock = clock

    def check(self) -> bool:
        """Send the report about yesterday if its time has come and it was not sent yet; return True when
        it was handed to the robot now. Raise StoreError when the store cannot be read."""
        now = self._clock()
        local = now.astimezone(self._zone)
        if local.time() < self._at:
            return False
        day = local.date() - timedelta(days=1)
        if self._store.daily_report_sent_for() == day.isoformat():
            return False
        summary = summarize_day(self._store, day, self._terminals(), self._zone, now=now, quota=self._quota)
        self._notify(render(summary, self._zone))
        self._store.record_daily_report(day.isoformat())
        return True
