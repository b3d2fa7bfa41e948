"""Drains the store's delivery queue to DingTalk, each punch exactly once: a thin loop over the parts in
`zkdingsync.delivery`.

Each step (`step`, one bounded unit of work; `run` loops over it):

1. Settle punches left in flight (`delivery.settler`: by a crash or an upload whose outcome is unknown)
   by reading DingTalk back.
2. Park the pending punches of unmapped employees in bulk (`delivery.parking`), when new ones came.
3. Unless delivery is paused or held (`delivery.gate`: credentials, permission, quota; throttling, an
   outage with the one back-off policy) or the monthly call budget is spent (`delivery.budget`): send one
   batch of due punches (`delivery.dispatch`, live punches first: `delivery.order`) through the rate limit
   with a few concurrent calls.

Every wait goes through the injected `sleep`, by default `stop.wait`, so a stop interrupts it at once. A
store that refuses writes (disk full, read-only) is logged once and probed until it takes writes again.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

import structlog

from zkdingsync.backoff import Backoff
from zkdingsync.delivery.budget import CallBudget
from zkdingsync.delivery.dispatch import Dispatcher
from zkdingsync.delivery.gate import DeliveryGate
from zkdingsync.delivery.health import Health
from zkdingsync.delivery.parking import UnmappedParking
from zkdingsync.delivery.parts import SharedParts
from zkdingsync.delivery.ports import DeliveryStore, Resolver, SentUnder, Uploader
from zkdingsync.delivery.ratelimit import RateLimiter
from zkdingsync.delivery.refresh import MappingRefresher
from zkdingsync.delivery.settler import Settler
from zkdingsync.errors import StoreError
from zkdingsync.model import Delivery, utc_now
from zkdingsync.quota import next_month_start

log = structlog.get_logger(__name__)


class Forwarder:
    """Delivers stored punches to DingTalk. One `run` loop per process; `step` for one unit of work."""

    def __init__(
        self,
        store: DeliveryStore,
        client: Uploader,
        mapper: Resolver,
        *,
        rate_per_second: float = 10.0,
        concurrency: int = 4,
        monthly_call_quota: int | None = 5000,
        batch_size: int | None = None,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] | None = None,
        sleep: Callable[[float], Any] | None = None,
        stop_event: threading.Event | None = None,
        rng: random.Random | None = None,
        backoff_initial_seconds: float = 1.0,
        backoff_max_seconds: float = 300.0,
        idle_seconds: float = 1.0,
        max_wait_seconds: float = 60.0,
        settle_delay_seconds: float = 30.0,
        settle_interval_seconds: float = 60.0,
        alert: Callable[[str], Any] | None = None,
    ) -> None:
        """Given the store, the DingTalk client and the user mapper, build a forwarder.

        `clock` gives aware UTC datetimes (retry times, the month); `monotonic` paces the rate limit
        (default: time.monotonic with the default clock, else the clock's timestamps, so that a fake
        clock drives both); `sleep(seconds)` does every wait (default: the stop event's `wait`).
        `settle_delay_seconds`: how long an unknown outcome rests before it is read back (DingTalk may
        still be writing it). `monthly_call_quota` None or 0: no local budget. `alert(text)` hears the
        events a human should know about (pause, resume, budget); it must not block (RobotNotifier.notify).
        """
        self._store = store
        self._client = client
        self.rate_per_second = rate_per_second
        self.concurrency = concurrency
        self.batch_size = batch_size or max(concurrency, min(500, int(rate_per_second * 2)))
        self._clock = clock
        self._stop = stop_event or threading.Event()
        self._sleep: Callable[[float], Any] = sleep or (lambda seconds: self._stop.wait(seconds))
        if monotonic is None:
            monotonic = time.monotonic if clock is utc_now else (lambda: self._clock().timestamp())
        jitter = (rng or random.Random()).random  # noqa: S311 - jitter, not cryptography
        self._idle_seconds = idle_seconds
        self._max_wait = max_wait_seconds
        self.health = Health(
            DeliveryGate(Backoff(backoff_initial_seconds, backoff_max_seconds, jitter=jitter)), store, alert
        )
        self.budget = CallBudget(monthly_call_quota, store, client, self.health)
        self._refresher = MappingRefresher(mapper, store)
        self._parking = UnmappedParking(store, mapper, lambda: self._refresher.refreshing)
        limiter = RateLimiter(rate_per_second, monotonic=monotonic, sleep=self._sleep)
        self.settler, self._dispatcher = self._compose(
            mapper, limiter, settle_delay_seconds, settle_interval_seconds, concurrency
        )
        self._store_failing = False
        # Set by `wake()` when new punches are stored, so an idle forwarder need not wait out its idle time.
        self._wake = threading.Event()
        self._idle = False
        self._default_sleep = sleep is None

    def _compose(
        self, mapper: Resolver, limiter: RateLimiter, delay: float, interval: float, concurrency: int
    ) -> tuple[Settler, Dispatcher]:
        """Build the settler and the dispatcher over the parts they share."""
        store, client, clock = self._store, self._client, self._clock
        sent = SentUnder()  # dispatch remembers the userid it sends under; the settler reads back under it
        refreshing = lambda: self._refresher.refreshing  # noqa: E731 - one shared accessor
        stopping = self._stop_is_set
        parts = SharedParts(store, client, mapper, self.health, limiter, sent, refreshing, stopping, clock)
        settler = Settler(
            parts,
            self.budget,
            delay=timedelta(seconds=delay),
            interval=timedelta(seconds=interval),
            max_wait_seconds=self._max_wait,
        )
        dispatcher = Dispatcher(parts, settler, self.budget, concurrency=concurrency)
        return settler, dispatcher

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the calls in progress (bounded by the client's timeout) and release the threads."""
        self._dispatcher.close()
        self._client.flush_call_counts()

    def stop(self) -> None:
        """Ask `run` to return after the step in progress; interrupts every wait."""
        self._stop.set()

    def _stop_is_set(self) -> bool:
        return self._stop.is_set()

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self._stop.is_set()

    @property
    def paused(self) -> str | None:
        """Why all delivery is paused (needs a human), or None."""
        pause = self.health.gate.pause
        return pause.reason if pause else None

    @property
    def hold_until(self) -> datetime | None:
        """Until when delivery holds back after transient failures, or None."""
        return self.health.gate.hold_until

    @property
    def monthly_call_quota(self) -> int | None:
        """The monthly call budget, None when there is none."""
        return self.budget.quota

    @property
    def mapping_refreshing(self) -> bool:
        """True while the job number table is being fetched."""
        return self._refresher.refreshing

    def run(self, stop: threading.Event | None = None) -> None:
        """Deliver until `stop` (or the constructor's stop event) is set, then return promptly.

        This is the edge of the delivery thread: an unexpected error is logged with its traceback and the
        loop goes on after a pause, so delivery never dies silently while the terminals are still polled.
        """
        if stop is not None:
            self._stop = stop
        log.info(
            "delivery.started",
            rate_per_second=self.rate_per_second,
            concurrency=self.concurrency,
            monthly_call_quota=self.monthly_call_quota,
        )
        try:
            while not self._stop.is_set():
                try:
                    wait = self.step()
                except Exception:  # the documented edge of the delivery thread; logged with its traceback
                    log.exception("delivery.unexpected_error")
                    wait = self._idle_seconds * 5
                if wait > 0 and not self._stop.is_set():
                    if self._idle and self._default_sleep:
                        # Idle waits are short (stop is still noticed within one), and new punches end them.
                        self._wake.wait(min(wait, self._max_wait))
                        self._wake.clear()
                    else:
                        self._sleep(min(wait, self._max_wait))
        finally:
            self.close()
            log.info("delivery.stopped")

    def wake(self) -> None:
        """New punches were stored: end an idle wait now (a hold or pause still holds), and look for
        punches of unmapped employees to park."""
        self._parking.new_punches()
        self._wake.set()

    def drain(self, *, max_steps: int = 100_000) -> bool:
        """Step (sleeping through waits with the injected sleep) until nothing is pending or in flight.

        Return True when the queue is empty, False after `max_steps` or a stop. For tests and tools.
        """
        for _ in range(max_steps):
            if self._stop.is_set():
                return False
            counts = self._store.delivery_counts()
            if counts[Delivery.PENDING] == 0 and counts[Delivery.IN_FLIGHT] == 0:
                return True
            wait = self.step()
            if wait > 0:
                self._sleep(min(wait, self._max_wait))
        return False

    # ------------------------------------------------------------------ one unit of work

    def step(self) -> float:
        """Do one bounded unit of work: settle what is due, then send at most one batch.

        Return how many seconds to wait before the next step (0: more can be done at once). A store
        that refuses (disk full, read-only) is logged once and retried after a pause.
        """
        self._idle = False
        try:
            wait = self._step(self._clock())
        except StoreError as error:
            if not self._store_failing:
                log.error("delivery.store_failed", error=str(error))
            self._store_failing = True
            return self._idle_seconds * 5
        if self._store_failing:
            log.info("delivery.store_recovered")
            self._store_failing = False
        return wait

    def _step(self, now: datetime) -> float:
        if self._store_failing:
            # Nothing DingTalk says can be recorded while the store refuses writes: check it first, so that
            # no call (and no quota) is spent until it takes writes again.
            self._store.probe_writable(now)
        if self.settler.never_ran:
            # Health published by an earlier run is forgotten: the first call says it again. So are the
            # waits it set (an admin restarting after fixing credentials wants delivery now).
            self.health.forget_published()
            self._store.make_pending_due(now)
        if self.settler.due(now):
            self.settler.settle_in_flight()
        if self._parking.due(now):
            self._parking.sweep(now)  # needs no call to DingTalk: also while paused, held or out of budget
        wait = self.health.gate.blocked_for(now)
        if wait > 0:
            return wait
        room = self.budget.room(now)
        if room == 0:
            return min(self._max_wait, (next_month_start(now) - now).total_seconds())
        self._refresher.start_if_due()
        limit = 1 if self.health.gate.probing() else self.batch_size
        if room is not None:
            limit = min(limit, room)
        if not self._dispatcher.send_batch(now, limit):
            self._idle = True
            return self._idle_seconds
        return 0.0
