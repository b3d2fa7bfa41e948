"""The history policy: which newly stored punches are queued for DingTalk and which are kept as history.

On its first contact a terminal holds months of punches. Sending them all would spend DingTalk's monthly
call budget (every upload is metered) and duplicate what HR may already have imported by hand. So delivery
begins on a day: `delivery.since` when configured, else the day the terminal was first polled, in its own
zone. A punch recorded before that day is stored as history: counted by `status`, never queued, never
parked, and sent only when an admin asks for it with `zkdingsync backfill`.

The store applies `HistoryRule.delivery_starts_ms` as it inserts a poll's punches (`Store.save_poll`), in
the same transaction that records the first contact, so a crash cannot queue a terminal's history.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo

import structlog

log = structlog.get_logger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_MILLISECOND = timedelta(milliseconds=1)


def parse_day(text: str) -> date:
    """Given "YYYY-MM-DD" (the command line's and `delivery.since`'s dates), return the date. Raise
    ValueError with a readable message otherwise."""
    # Not fromisoformat alone: from Python 3.11 it also takes week dates such as 2026-W48-2.
    if _DAY.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    raise ValueError(f"{text!r} is not a date YYYY-MM-DD")


def day_start(day: date, zone: tzinfo) -> datetime:
    """Given a calendar day and a zone, return that day's local midnight as an aware UTC datetime."""
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(timezone.utc)


def day_start_ms(day: date, zone: tzinfo) -> int:
    """Given a calendar day and a zone, return that day's local midnight in epoch milliseconds."""
    return (day_start(day, zone) - _EPOCH) // _MILLISECOND


@dataclass(frozen=True)
class HistoryRule:
    """When delivery begins for one terminal: `since` (from `delivery.since`) or its first-contact day."""

    zone: tzinfo
    since: date | None = None

    def delivery_starts_ms(self, first_contact: datetime) -> int:
        """Given when the terminal was first polled, return the first epoch millisecond that is delivered:
        local midnight (in the terminal's zone) of `since`, or of the first-contact day."""
        day = self.since if self.since is not None else first_contact.astimezone(self.zone).date()
        return day_start_ms(day, self.zone)


@dataclass(frozen=True)
class HistoryPolicy:
    """The daemon's history policy: `delivery.since`, or None for each terminal's first-contact day."""

    since: date | None = None

    def rule(self, zone: tzinfo) -> HistoryRule:
        """Given a terminal's zone, return the rule the store applies to its new punches."""
        return HistoryRule(zone, self.since)


@dataclass(frozen=True)
class HistoryHeld:
    """What a terminal's first contact kept as history: how many punches and their local date range."""

    device: str
    count: int
    first_local_time: str | None
    last_local_time: str | None


def log_first_contact(held: HistoryHeld) -> None:
    """Say once, at a terminal's first contact, what was kept as history and how to deliver it."""
    if held.count == 0:
        log.info("history.none", device=held.device, note="every punch on the terminal is delivered")
        return
    first = (held.first_local_time or "")[:10]
    last = (held.last_local_time or "")[:10]
    log.info(
        "history.held",
        device=held.device,
        punches=held.count,
        first=first,
        last=last,
        note="kept in the store, not sent to DingTalk (each upload is a metered call)",
        deliver_with=(
            f"zkdingsync backfill --since {first} --until {last} --device {shlex.quote(held.device)}"
        ),
    )
