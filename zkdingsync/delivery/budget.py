"""The monthly DingTalk call budget: how many calls are left, a warning at the share, a stop at 100 %."""

from __future__ import annotations

from datetime import datetime

import structlog

from zkdingsync.delivery.health import Health
from zkdingsync.delivery.ports import DeliveryStore, Uploader
from zkdingsync.quota import QUOTA_WARNING_SHARE

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

    def room(self, now: datetime) -> int | None:
        """Calls the budget still allows at `now` (None: no budget); warns at the share and at 100 %."""
        quota = self.quota
        if quota is None:
            return None
        self._client.flush_call_counts()  # the client counts in memory between flushes
        month = self._client.month_of(now)
        if month != self._month:
            if self._exhausted:
                log.info("delivery.quota_renewed", month=month)
            self._month, self._warned, self._exhausted = month, False, False
        used = self._store.calls_in_month(month)
        if used >= quota:
            if not self._exhausted:
                log.error(
                    "delivery.quota_exhausted",
                    month=month,
                    calls=used,
                    quota=quota,
                    action="uploads stop until next month; punches keep being stored",
                )
                self._exhausted = True
                self._health.tell(
                    f"DingTalk call budget spent ({used}/{quota} in {month}): uploads stop until next month"
                )
            return 0
        if used >= quota * QUOTA_WARNING_SHARE and not self._warned:
            log.warning("delivery.quota_warning", month=month, calls=used, quota=quota)
            self._warned = True
            self._health.tell(f"{used} of {quota} DingTalk calls used in {month}")
        return quota - used
