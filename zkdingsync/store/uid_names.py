"""The enroll number each uid of an 8-byte-record terminal stood for: a persisted memo kept by the store."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import structlog

from zkdingsync.model import AttendanceRecord

log = structlog.get_logger(__name__)


class UidNames:
    """Which enroll number each uid of one 8-byte terminal stood for, and since when.

    An 8-byte record names only the terminal's internal uid; the enroll number comes from the user
    table, which an admin changes (a user deleted: the uid is gone; a uid given to a new employee).
    Resolving an already-stored record again with today's table would give it a new natural key and
    store it twice (as a different person, or as the bare uid). So the first resolution sticks: per
    uid, the periods (enroll number, first local time under it) and the latest local time stored.
    A record no later than that time is history and keeps the enroll number of its period; a later
    one is new and takes the live table's (the last known one when its uid has left the table).
    Kept in the store per serial (`Store.uid_names`), written before the punches it resolved.
    """

    def __init__(self, periods: dict[int, list[tuple[str, str]]], last: dict[int, str]) -> None:
        self.periods = periods
        self.last = last
        self.changed = False

    @classmethod
    def load(cls, text: str | None) -> UidNames:
        """Given what `dump` wrote (or None), return the memo; an unreadable one starts empty."""
        if not text:
            return cls({}, {})
        try:
            data = json.loads(text)
            periods = {
                int(uid): [(str(enroll), str(since)) for enroll, since in spans]
                for uid, spans in data["periods"].items()
            }
            last = {int(uid): str(when) for uid, when in data["last"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("poller.uid_names_unreadable", hint="8-byte enroll numbers resolved afresh")
            return cls({}, {})
        return cls(periods, last)

    def dump(self) -> str:
        """Return the memo as compact JSON."""
        return json.dumps(
            {
                "periods": {str(uid): spans for uid, spans in self.periods.items()},
                "last": {str(uid): when for uid, when in self.last.items()},
            },
            separators=(",", ":"),
        )

    def resolve(
        self, records: Sequence[AttendanceRecord], live: Mapping[int, str], horizon: str = "9999"
    ) -> list[AttendanceRecord]:
        """Given 8-byte records (in log order), the live user table and the latest plausible local
        time ("YYYY-MM-DD HH:MM:SS"), return the records with the enroll number each one was (or now
        is) first stored under; `changed` tells whether to save. A record past `horizon` (a garbled
        date, quarantined anyway) takes today's name but moves nothing: it must not make every later
        punch of its uid look like history."""
        resolved: list[AttendanceRecord] = []
        for record in records:
            uid, when = record.uid, record.local_time
            if uid is None:
                resolved.append(record)
                continue
            if when > horizon:
                periods = self.periods.get(uid)
                enroll = live.get(uid) or (periods[-1][0] if periods else record.enroll_number)
                resolved.append(
                    record if enroll == record.enroll_number else record._replace(enroll_number=enroll)
                )
                continue
            periods = self.periods.get(uid)
            last = self.last.get(uid)
            if periods and last is not None and when <= last:
                enroll = periods[0][0]
                for name, since in periods:
                    if since <= when:
                        enroll = name
            else:
                enroll = live.get(uid) or (periods[-1][0] if periods else record.enroll_number)
                if not periods:
                    self.periods[uid] = [(enroll, "")]
                    self.changed = True
                elif periods[-1][0] != enroll:
                    periods.append((enroll, when))
                    self.changed = True
                if last is None or when > last:
                    self.last[uid] = when
                    self.changed = True
            resolved.append(
                record if enroll == record.enroll_number else record._replace(enroll_number=enroll)
            )
        return resolved
