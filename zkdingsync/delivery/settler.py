"""Punches left in flight, by a crash or by an upload whose outcome is unknown, settled by reading
DingTalk back (listRecord, at most 50 users and 7 days per call).

Found -> delivered; not found -> pending again (flagged `outcome_unknown`, so a duplicate would be
explained); read-back impossible (older than DingTalk's window, no permission) -> sent again, counted and
logged. A read-back that merely fails (DingTalk down) leaves them in flight and tries later: sending blind
would risk a duplicate.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import structlog

from zkdingsync.delivery.budget import CallBudget
from zkdingsync.delivery.parts import SharedParts
from zkdingsync.delivery.ports import (
    SECOND_MS,
    invalid_moment,
    ms_to_datetime,
)
from zkdingsync.dingtalk.answers import evidence_id
from zkdingsync.dingtalk.client import DINGTALK_WINDOW, MAX_READ_BACK_SPAN, MAX_READ_BACK_USERS, DingTalkError
from zkdingsync.mapping import unmapped_reason
from zkdingsync.model import OutcomeKind, StoredPunch
from zkdingsync.quota import QUOTA_EXHAUSTED_CODE

log = structlog.get_logger(__name__)

# Each read-back window reaches this far beyond the punches it settles: listRecord reads its dates in the
# organisation's zone, which may not be the configured one (terminals abroad) or may fold at a DST change.
# Matching is by exact epoch ms, so a wider window costs nothing but a few more records in the answer.
READ_BACK_PAD = timedelta(days=1)
# A read-back asks for windows this far inside DingTalk's 180 days (padding included), so that the request
# itself is valid.
READ_BACK_MARGIN = READ_BACK_PAD + timedelta(days=1)
# While the job number table is being fetched, a punch whose enroll number resolves to nobody waits this
# long instead of being parked: the fresh table may well know it.
MAPPING_WAIT = timedelta(seconds=5)

T = TypeVar("T")


@dataclass(frozen=True)
class ReadBackCall(Generic[T]):
    """One listRecord call: up to 50 users, a window of at most 7 days, and the items it settles."""

    userids: tuple[str, ...]
    start_ms: int
    end_ms: int
    items: tuple[T, ...] = field(default=())


def plan_read_back(
    items: Sequence[T],
    key: Callable[[T], tuple[str, int]],
    *,
    max_users: int = MAX_READ_BACK_USERS,
    max_span_ms: int = int(MAX_READ_BACK_SPAN.total_seconds() * 1000),
    pad_ms: int = int(READ_BACK_PAD.total_seconds() * 1000),
) -> list[ReadBackCall[T]]:
    """Given items and how to get (userid, check time ms) from each, plan the fewest simple listRecord calls.

    Items are cut, in time order, into windows of at most `max_span_ms` (padding included, and one second
    kept free so rounding the end up to a whole second stays inside the limit); within a window their
    users go 50 to a call, and each call asks for the span its own punches cover, `pad_ms` wider each side.
    """
    ordered = sorted(items, key=lambda item: key(item)[1])
    windows: list[list[T]] = []
    for item in ordered:
        ms = key(item)[1]
        if windows and ms - key(windows[-1][0])[1] <= max_span_ms - 2 * pad_ms - SECOND_MS:
            windows[-1].append(item)
        else:
            windows.append([item])
    calls: list[ReadBackCall[T]] = []
    for window in windows:
        by_user: dict[str, list[T]] = {}
        for item in window:
            by_user.setdefault(key(item)[0], []).append(item)
        users = sorted(by_user)
        for offset in range(0, len(users), max_users):
            chunk = users[offset : offset + max_users]
            chunk_items = [item for user in chunk for item in by_user[user]]
            times = [key(item)[1] for item in chunk_items]
            calls.append(
                ReadBackCall(tuple(chunk), min(times) - pad_ms, max(times) + pad_ms, tuple(chunk_items))
            )
    return calls


@dataclass(frozen=True)
class Unsettled:
    """A punch ready to be read back: under which userid, at which epoch ms."""

    stored: StoredPunch
    userid: str
    ms: int


@dataclass
class SettleReport:
    """What one settling round did."""

    checked: int = 0
    found: int = 0
    resent: int = 0  # not found by the read-back: sent again
    resent_unverified: int = 0  # read-back impossible: sent again without knowing
    parked: int = 0
    waiting: int = 0  # still in flight: too recent, or the read-back failed for now

    def any(self) -> bool:
        """Return True if the round settled or re-sent anything."""
        return bool(self.found or self.resent or self.resent_unverified or self.parked)


class Settler:
    """Settles in-flight punches; knows when the next round is due."""

    def __init__(
        self,
        parts: SharedParts,
        budget: CallBudget,
        *,
        delay: timedelta,
        interval: timedelta,
        max_wait_seconds: float,
    ) -> None:
        """`delay`: how long an unknown outcome rests before it is read back (DingTalk may still be
        writing it); `interval`: how often in-flight punches are looked at at the latest."""
        self._p = parts
        self._budget = budget
        self.delay = delay
        self._interval = interval
        self._max_wait = max_wait_seconds
        self._lock = threading.Lock()
        self._next_at: datetime | None = None  # None: never ran in this process

    @property
    def never_ran(self) -> bool:
        """True until the first round of this process has run."""
        return self._next_at is None

    def due(self, now: datetime) -> bool:
        """True when a round is due at `now` (always before the first)."""
        with self._lock:
            return self._next_at is None or now >= self._next_at

    def schedule(self, at: datetime) -> None:
        """Make a round due at `at` at the latest."""
        with self._lock:
            if self._next_at is None or at < self._next_at:
                self._next_at = at

    def settle_in_flight(self) -> SettleReport:
        """Settle every punch in flight whose upload started at least `delay` ago.

        Call only while no upload of this process is under way (the forwarder does, between batches):
        every row in flight is then a crash leftover or an unknown outcome.
        """
        now = self._p.clock()
        report = SettleReport()
        ready: list[Unsettled] = []
        later: list[datetime] = []
        for stored in self._p.store.in_flight():
            item = self._triage(stored, now, report, later)
            if item is not None:
                ready.append(item)
        aborted = self._read_back(ready, now, report)
        next_at = now + self._interval
        if later:
            next_at = min(next_at, min(later))
        if aborted is not None:
            next_at = max(aborted, now + timedelta(seconds=1))
        with self._lock:
            self._next_at = next_at
        _log_report(report)
        return report

    def _triage(
        self, stored: StoredPunch, now: datetime, report: SettleReport, later: list[datetime]
    ) -> Unsettled | None:
        """Return the punch ready to be read back, or settle it here (park, re-send, wait) and return None."""
        since = stored.in_flight_since
        if since is not None and since + self.delay > now:
            later.append(since + self.delay)
            report.waiting += 1
            return None
        punch = stored.punch
        if punch.check_time_ms is None:
            self._p.store.park(stored.id, reason=invalid_moment(punch))
            report.checked += 1
            report.parked += 1
            return None
        # The userid its upload went out under: this process's, else the one recorded before it went out,
        # else (a store from before userids were recorded) resolved again.
        userid = self._p.sent.get(stored.id) or stored.userid or self._p.mapper.resolve(punch.enroll_number)
        if userid is None and self._p.refreshing():
            later.append(now + MAPPING_WAIT)
            report.waiting += 1
            return None
        report.checked += 1
        if userid is None:
            self._p.mapper.report_unmapped(punch.enroll_number)
            reason = unmapped_reason(punch.enroll_number) + " (an earlier upload's outcome is unknown)"
            self._p.store.park(stored.id, reason=reason)
            self._p.sent.forget(stored.id)
            report.parked += 1
            return None
        oldest_readable = int((now - DINGTALK_WINDOW + READ_BACK_MARGIN).timestamp() * 1000)
        if punch.check_time_ms < oldest_readable:
            self._resend_unverified(stored, now, "too old to read DingTalk back", report)
            return None
        return Unsettled(stored, userid, punch.check_time_ms)

    def _resend_unverified(self, stored: StoredPunch, now: datetime, why: str, report: SettleReport) -> None:
        reason = f"upload outcome unknown and {why}: sending again (a duplicate is possible)"
        self._p.store.mark_pending(stored.id, retry_at=now, reason=reason, outcome_unknown=True)
        self._p.sent.forget(stored.id)
        report.resent_unverified += 1

    def _read_back(self, ready: list[Unsettled], now: datetime, report: SettleReport) -> datetime | None:
        """Read DingTalk back for `ready` punches; return when to try again if it had to stop early."""
        calls = plan_read_back(ready, key=lambda item: (item.userid, item.ms)) if ready else []
        for number, call in enumerate(calls):
            again = self._read_back_call(call, now, report)
            if again is not None:
                report.waiting += sum(len(rest.items) for rest in calls[number:])
                return again
        return None

    def _read_back_call(
        self, call: ReadBackCall[Unsettled], now: datetime, report: SettleReport
    ) -> datetime | None:
        """Make one listRecord call and settle its punches; return when to retry if it could not be made."""
        clock, health = self._p.clock, self._p.health
        room = self._budget.room(now)
        blocked = health.gate.blocked_for(clock())
        if blocked > 0 or room == 0:
            return clock() + timedelta(seconds=blocked or self._max_wait)
        self._p.limiter.acquire()
        if self._p.stopping():
            return clock()
        call_number = health.gate.next_call()
        try:
            records = self._p.client.list_records(
                call.userids, ms_to_datetime(call.start_ms), ms_to_datetime(call.end_ms)
            )
        except DingTalkError as error:
            outcome = error.outcome
            impossible = outcome.kind is OutcomeKind.PERMANENT or (
                outcome.kind is OutcomeKind.NEEDS_HUMAN and outcome.code == "60011"
            )
            if impossible:
                for item in call.items:
                    why = f"DingTalk cannot be read back ({outcome.reason})"
                    self._resend_unverified(item.stored, now, why, report)
                return None
            if outcome.code == QUOTA_EXHAUSTED_CODE:
                self._budget.refused(clock())
                again = clock() + timedelta(seconds=self._max_wait)
            elif outcome.kind is OutcomeKind.NEEDS_HUMAN:
                again = health.needs_human(outcome, clock(), call_number)
            else:
                again = clock() + timedelta(seconds=health.failed(outcome, clock(), call_number))
            log.info("delivery.read_back_failed", reason=outcome.reason, retry_at=again.isoformat())
            return again
        health.answered(clock(), call_number, ends_pause=False)
        self._match(call, records, report)
        return None

    def _match(
        self, call: ReadBackCall[Unsettled], records: list[dict[str, Any]], report: SettleReport
    ) -> None:
        """Settle the call's punches: each DingTalk record (userid, time, device) vouches for one punch.

        Counted, not merely looked up: the upload carries no punch state or verify mode, so check-in and
        check-out in the same second on one terminal are the same record, and one record must not settle
        two punches. (A punch already delivered earlier with the same record is not in this count: such a
        pair can still settle on one record, which then holds exactly what the second upload would add.)
        """
        # (userid, time, device) -> the ids of the records not yet vouching for a punch (kept as evidence)
        seen: dict[tuple[str, int, str], list[str | None]] = defaultdict(list)
        for record in records:
            try:
                when = int(record.get("userCheckTime"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            key = (str(record.get("userId")), when, str(record.get("deviceId") or ""))
            seen[key].append(evidence_id(record.get("id")))
        now = self._p.clock()
        store = self._p.store
        for item in sorted(call.items, key=lambda unsettled: unsettled.stored.id):
            serial = item.stored.punch.serial or item.stored.punch.device
            for device in (serial, ""):  # a record without a deviceId vouches for any terminal
                key = (item.userid, item.ms, device)
                if seen.get(key):
                    record_id = seen[key].pop(0)
                    store.mark_delivered(item.stored.id, at=now, userid=item.userid, record_id=record_id)
                    report.found += 1
                    break
            else:
                reason = "upload outcome unknown, not found in DingTalk: sending again"
                store.mark_pending(item.stored.id, retry_at=now, reason=reason, outcome_unknown=True)
                report.resent += 1
            self._p.sent.forget(item.stored.id)


def _log_report(report: SettleReport) -> None:
    if report.any():
        log.info(
            "delivery.settled",
            checked=report.checked,
            found=report.found,
            resent=report.resent,
            resent_unverified=report.resent_unverified,
            parked=report.parked,
            waiting=report.waiting,
        )
    if report.resent_unverified:
        log.warning(
            "delivery.resent_unverified",
            count=report.resent_unverified,
            note="DingTalk could not be read back; a duplicate is possible for these punches",
        )
