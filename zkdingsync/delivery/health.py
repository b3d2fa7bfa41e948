"""The gate's changes told to people: one journal line per change, the alert hook, and the health
`status` shows (written to the store only when it changes: each write is a commit)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog

from zkdingsync.delivery.gate import DeliveryGate
from zkdingsync.delivery.ports import DeliveryStore
from zkdingsync.errors import StoreError
from zkdingsync.model import DingTalkHealth, HealthState, Outcome

log = structlog.get_logger(__name__)


class Health:
    """Feeds answers to the gate and reports what changed."""

    def __init__(
        self, gate: DeliveryGate, store: DeliveryStore, alert: Callable[[str], Any] | None = None
    ) -> None:
        """Given the gate, the store (for `status`) and the alert hook (None: no alerts), build it."""
        self.gate = gate
        self._store = store
        self._alert = alert
        self._lock = threading.Lock()
        self._published: DingTalkHealth | None = None

    def failed(self, outcome: Outcome, now: datetime, call: int) -> float:
        """A transient failure or an unknown outcome: hold all delivery; return the wait for this punch."""
        held = self.gate.failed(outcome.reason, outcome.wait_seconds, now, call)
        if held.began:
            log.warning(
                "delivery.held",
                reason=outcome.reason,
                code=outcome.code,
                wait_seconds=round(held.wait_seconds, 1),
            )
            self.publish(DingTalkHealth(HealthState.ERROR, outcome.reason, now))
        else:
            log.debug(
                "delivery.still_held",
                reason=outcome.reason,
                failures=held.failures,
                wait_seconds=round(held.wait_seconds, 1),
            )
        return held.wait_seconds

    def answered(self, now: datetime, call: int, *, ends_pause: bool = True) -> None:
        """DingTalk answered a call properly: end a hold, and (for an upload) a pause.

        A read-back that works says nothing about the upload's permission or quota, so it ends no pause.
        """
        ended = self.gate.answered(call, ends_pause=ends_pause)
        if ended is None:
            return
        if ended.outage_since is not None:
            outage = (now - ended.outage_since).total_seconds()
            log.info("delivery.recovered", outage_seconds=round(outage, 1))
        if ended.pause is not None:
            paused = (now - ended.pause.since).total_seconds()
            log.warning("delivery.resumed", paused_seconds=round(paused, 1))
            self.tell("delivery to DingTalk resumed")
        if ends_pause:
            self.publish(DingTalkHealth(HealthState.OK, at=now))

    def needs_human(self, outcome: Outcome, now: datetime, call: int) -> datetime:
        """Pause all delivery (logged loudly once, again if the reason changes); return the recheck time."""
        paused = self.gate.needs_human(outcome.reason, outcome.code, outcome.wait_seconds, now, call)
        if paused.changed:
            log.error(
                "delivery.paused",
                reason=outcome.reason,
                code=outcome.code,
                recheck_in_seconds=round(outcome.wait_seconds),
                action="fix the cause; punches keep being stored and are sent once DingTalk accepts them",
            )
            self.tell(f"delivery to DingTalk paused: {outcome.reason}")
            self.publish(DingTalkHealth(HealthState.PAUSED, outcome.reason, now))
        return paused.recheck_at

    def forget_published(self) -> None:
        """Forget the health an earlier run published: the first call of this one says it again."""
        self._store.clear_dingtalk_health()

    def publish(self, health: DingTalkHealth) -> None:
        """Write DingTalk's health for `status` when it changes (state or reason)."""
        with self._lock:
            last = self._published
            if last is not None and (last.state, last.reason) == (health.state, health.reason):
                return
            self._published = health
        try:
            self._store.set_dingtalk_health(health)
        except StoreError as error:
            log.warning("delivery.status_unwritable", error=str(error))

    def tell(self, text: str) -> None:
        """Pass an event to the alert hook, if any (best effort: delivery goes on whatever it does)."""
        if self._alert is None:
            return
        try:
            self._alert(text)
        except Exception:  # the hook is someone else's code; an alert must never stop delivery
            log.exception("delivery.alert_failed")
