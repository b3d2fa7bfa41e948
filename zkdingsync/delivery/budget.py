"""The monthly DingTalk call budget: how many calls are left, a warning at the share, a stop at 100 %.

The month is spent when the local count reaches `monthly_call_quota`, or when DingTalk answers 90020
(the organisation's quota is shared by all its apps, and the local count may lag). Either way delivery
pauses for the rest of the month in the organisation's zone: punches keep being stored, the journal says
so once, `status` shows it, and on the 1st delivery resumes by itself (live punches first: the order of
`delivery.order` is unchanged). Read-backs count too, so the settler asks the same budget.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from zkdingsync.delivery.health import Health
from zkdingsync.delivery.ports import DeliveryStore, Uploader
from zkdingsync.model import DingTalkHealth, HealthState
from zkdingsync.quota import QUOTA_WARNING_SHARE, month_after

log = structlog.get_logger(__name__)


class CallBudget:
    """Counts against `quota` calls a month (None: no local budget); warns and stops once a month each."""

    def __init__(self, quota: int | None, store: DeliveryStore, client: Uploader, health: Health) -> None:
        """Given the monthly quota, the store (the counts), the client (its month) and the health (alerts)."""
        self.quota = quota or None
        self._store = store
        self._client = client
        self._health = health
        self._month: str | None = None
        self._warned = False
        self._exhausted = False
        self._refused = False  # DingTalk answered 90020 this month

    def room(self, now: datetime) -> int | None:
        """Calls the budget still allows at `now` (None: no budget); warns at the share and at 100 %."""
        month = self._renew(now)
        if self._refused:
            return 0
        quota = self.quota
        if quota is None:
            return None
        self._client.flush_call_counts()  # the client counts in memory between flushes
        used = self._store.calls_in_month(month)
        if used >= quota:
            self._spent(now, month, f"{used} of {quota} calls used in {month}")
            return 0
        if used >= quota * QUOTA_WARNING_SHARE and not self._warned:
            log.warning("delivery.quota_warning", month=month, calls=used, quota=quota)
            self._warned = True
            self._health.tell(f"{used} of {quota} DingTalk calls used in {month}")
        return quota - used

    def refused(self, now: datetime) -> None:
        """DingTalk answered 90020 (the organisation's month is spent): no metered call until its 1st."""
        month = self._renew(now)
        self._refused = True
        self._spent(now, month, f"DingTalk refuses calls (errcode 90020) in {month}")

    def spent(self, now: datetime) -> bool:
        """True while DingTalk refuses this month's calls (checked before each upload of a batch)."""
        self._renew(now)
        return self._refused

    def _renew(self, now: datetime) -> str:
        """The organisation's month at `now`; a new one ends the last one's warning and stop."""
        month = self._client.month_of(now)
        if month != self._month:
            if self._exhausted:
                log.warning(
                    "delivery.quota_renewed", month=month, action="delivery resumes, live punches first"
                )
                self._health.tell(f"a new month of DingTalk calls ({month}): delivery resumes")
                self._health.publish(DingTalkHealth(HealthState.OK, at=now))
            self._month, self._warned, self._exhausted, self._refused = month, False, False, False
        return month

    def _spent(self, now: datetime, month: str, how: str) -> None:
        """Say once a month that the budget is spent, in the journal, to the group and to `status`."""
        if self._exhausted:
            return
        self._exhausted = True
        resumes = f"{month_after(month)}-01"
        log.error(
            "delivery.quota_exhausted",
            month=month,
            how=how,
            resumes_on=resumes,
            action="punches keep being stored; delivery resumes by itself on the 1st (or raise "
            "dingtalk.monthly_call_quota after upgrading the DingTalk edition, and restart)",
        )
        reason = f"the month's DingTalk calls are spent ({how}); delivery resumes on {resumes}"
        self._health.tell(f"DingTalk call budget spent: {how}; uploads resume on {resumes}")
        self._health.publish(DingTalkHealth(HealthState.PAUSED, reason, now))
