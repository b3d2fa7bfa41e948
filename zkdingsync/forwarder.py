"""Drains the store's delivery queue to DingTalk, each punch exactly once.

The loop (`run`, or `step` for one bounded unit of work):

1. Settle punches left in flight, by a crash or by an upload whose outcome is unknown, by reading
   DingTalk back (listRecord, at most 50 users and 7 days per call): found -> delivered; not found ->
   pending again (flagged `outcome_unknown`, so a duplicate would be explained); read-back impossible
   (older than DingTalk's window, no permission) -> sent again, counted and logged. A read-back that
   merely fails (DingTalk down) leaves them in flight and tries later: sending blind would risk a duplicate.
2. Unless delivery is paused (credentials, permission, quota: logged once, rechecked after a while), held
   (throttling, outage: exponential back-off with jitter, at least the wait the answer called for) or the
   monthly call budget is spent: claim a batch of due punches, resolve each enroll number, and upload
   through a token-bucket rate limit with a few concurrent calls.
3. Each answer moves its punch at once: delivered only after DingTalk said so; back to pending with a
   retry time; parked with the reason; or left in flight, flagged, for the next settle.

One canonical line per batch: `delivery.batch delivered=.. pending=.. parked=.. unknown=.. duration_ms=..`.
Every wait goes through the injected `sleep`, by default `stop.wait`, so a stop interrupts it at once.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Protocol

import structlog

from zkdingsync.dingtalk.client import (
    DINGTALK_WINDOW,
    MAX_READ_BACK_SPAN,
    MAX_READ_BACK_USERS,
    DingTalkError,
)
from zkdingsync.errors import StoreError
from zkdingsync.mapping import unmapped_reason
from zkdingsync.model import Delivery, Outcome, OutcomeKind, Upload, utc_now
from zkdingsync.retry import MAPPING_REFRESH_KEY
from zkdingsync.status import (
    DINGTALK_HEALTH_AT_KEY,
    DINGTALK_HEALTH_KEY,
    HEALTH_ERROR_PREFIX,
    HEALTH_OK,
    HEALTH_PAUSED_PREFIX,
)

log = structlog.get_logger(__name__)

# Store key under which a pause of all delivery is published (for `status`); deleted on resume.
QUOTA_WARNING_SHARE = 0.8
# Each read-back window reaches this far beyond the punches it settles: listRecord reads its dates in the
# organisation's zone, which may not be the configured one (terminals abroad) or may fold at a DST change.
# Matching is by exact epoch ms, so a wider window costs nothing but a few more records in the answer.
READ_BACK_PAD = timedelta(days=1)
# A read-back asks for windows this far inside DingTalk's 180 days (padding included), so that the request
# itself is valid.
READ_BACK_MARGIN = READ_BACK_PAD + timedelta(days=1)
_SECOND_MS = 1000
# While the job number table is being fetched, a punch whose enroll number resolves to nobody waits this
# long instead of being parked: the fresh table may well know it.
MAPPING_WAIT = timedelta(seconds=5)


STORE_PROBE_KEY = "delivery.store_probe"


class DeliveryStore(Protocol):
    """The store as the forwarder uses it."""

    def claim_due(self, now: datetime, limit: int) -> Sequence[Any]: ...

    def mark_delivered(self, punch_id: int, *, at: datetime, userid: str) -> None: ...

    def make_pending_due(self, now: datetime) -> int: ...

    def record_upload_userids(self, userids: Mapping[int, str]) -> None: ...

    def mark_pending(
        self, punch_id: int, *, retry_at: datetime, reason: str, outcome_unknown: bool = False
    ) -> None: ...

    def mark_unknown(self, punch_id: int, *, reason: str) -> None: ...

    def park(self, punch_id: int, *, reason: str) -> None: ...

    def in_flight(self) -> Sequence[Any]: ...

    def calls_in_month(self, month: str) -> int: ...

    def get_value(self, key: str, *, now: datetime) -> str | None: ...

    def set_value(self, key: str, value: str, *, expires_at: datetime | None = None) -> None: ...

    def delete_value(self, key: str) -> None: ...

    def delivery_counts(self) -> Mapping[Delivery, int]: ...


class Uploader(Protocol):
    """The DingTalk client as the forwarder uses it."""

    def upload(self, upload: Upload) -> Outcome: ...

    def list_records(
        self, userids: Sequence[str], start: datetime, end: datetime
    ) -> list[dict[str, Any]]: ...

    def flush_call_counts(self) -> None: ...

    def month_of(self, at: datetime) -> str: ...


class Resolver(Protocol):
    """The user mapper as the forwarder uses it."""

    def resolve(self, enroll_number: str) -> str | None: ...

    def report_unmapped(self, enroll_number: str) -> str: ...

    def refresh_due(self) -> bool: ...

    def maybe_refresh(self) -> bool: ...

    def request_refresh(self) -> None: ...


def _ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def _next_month(now: datetime) -> datetime:
    first = now.astimezone(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


class RateLimiter:
    """A token bucket of depth one: calls leave at most `rate_per_second` a second, evenly spaced.

    Depth one (no burst) keeps every one-second window at or below the rate, which is what DingTalk's
    per-second limit counts. `acquire` waits through `sleep`, so a stop interrupts it.
    """

    def __init__(
        self, rate_per_second: float, *, monotonic: Callable[[], float], sleep: Callable[[float], Any]
    ) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        # A hair over 1/rate, so that float rounding never fits rate + 1 calls into one second.
        self.interval = 1.001 / rate_per_second
        self._monotonic = monotonic
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = float("-inf")

    def acquire(self) -> float:
        """Wait for the next slot; return how long this call waited (seconds)."""
        with self._lock:
            now = self._monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        wait = slot - now
        if wait > 0:
            self._sleep(wait)
        return wait


@dataclass(frozen=True)
class ReadBackCall:
    """One listRecord call: up to 50 users, a window of at most 7 days, and the punches it settles."""

    userids: tuple[str, ...]
    start_ms: int
    end_ms: int
    items: tuple[Any, ...] = field(default=())


def plan_read_back(
    items: Sequence[Any],
    key: Callable[[Any], tuple[str, int]],
    *,
    max_users: int = MAX_READ_BACK_USERS,
    max_span_ms: int = int(MAX_READ_BACK_SPAN.total_seconds() * 1000),
    pad_ms: int = int(READ_BACK_PAD.total_seconds() * 1000),
) -> list[ReadBackCall]:
    """Given items and how to get (userid, check time ms) from each, plan the fewest simple listRecord calls.

    Items are cut, in time order, into windows of at most `max_span_ms` (padding included, and one second
    kept free so rounding the end up to a whole second stays inside the limit); within a window their
    users go 50 to a call, and each call asks for the span its own punches cover, `pad_ms` wider each side.
    """
    ordered = sorted(items, key=lambda item: key(item)[1])
    windows: list[list[Any]] = []
    for item in ordered:
        ms = key(item)[1]
        if windows and ms - key(windows[-1][0])[1] <= max_span_ms - 2 * pad_ms - _SECOND_MS:
            windows[-1].append(item)
        else:
            windows.append([item])
    calls: list[ReadBackCall] = []
    for window in windows:
        by_user: dict[str, list[Any]] = {}
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


@dataclass
class _Pause:
    reason: str
    code: str | None
    since: datetime
    recheck_at: datetime


@dataclass
class _Unsettled:
    stored: Any  # StoredPunch
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
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._store = store
        self._client = client
        self._mapper = mapper
        self.rate_per_second = rate_per_second
        self.concurrency = concurrency
        self.monthly_call_quota = monthly_call_quota or None
        self.batch_size = batch_size or max(concurrency, min(500, int(rate_per_second * 2)))
        self._clock = clock
        self._stop = stop_event or threading.Event()
        self._sleep: Callable[[float], Any] = sleep or (lambda seconds: self._stop.wait(seconds))
        if monotonic is None:
            monotonic = time.monotonic if clock is utc_now else (lambda: self._clock().timestamp())
        self._limiter = RateLimiter(rate_per_second, monotonic=monotonic, sleep=self._sleep)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._backoff_initial = backoff_initial_seconds
        self._backoff_max = backoff_max_seconds
        self._idle_seconds = idle_seconds
        self._max_wait = max_wait_seconds
        self._settle_delay = timedelta(seconds=settle_delay_seconds)
        self._settle_interval = timedelta(seconds=settle_interval_seconds)
        self._executor: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(concurrency)
        self._state = threading.Lock()
        # Delivery-wide conditions, shared by the workers.
        self._pause: _Pause | None = None
        self._hold_until: datetime | None = None
        self._hold_reason = ""
        self._failures = 0
        self._outage_since: datetime | None = None
        # Calls are numbered as they are issued; `_barrier` is the last number issued when a failure or
        # pause was last seen. Only later calls may end a hold or a pause, or escalate the back-off.
        self._calls_issued = 0
        self._barrier = 0
        self._next_settle_at: datetime | None = None  # None: at the first step
        # Punch id -> the userid its upload went out under, while its outcome is not settled: a read-back
        # must look under that userid even if users.map changed since (a reload while it was in flight).
        self._sent_as: dict[int, str] = {}
        # The job number refresh (a walk of every department) runs beside delivery, not in its way.
        self._refresher: threading.Thread | None = None
        # Monthly budget.
        self._quota_month: str | None = None
        self._quota_warned = False
        self._quota_exhausted = False
        self._store_failing = False
        self._health: str | None = None  # last published to the store for `status`
        # Set by `wake()` when new punches are stored, so an idle forwarder need not wait out its idle time.
        self._wake = threading.Event()
        self._idle = False
        self._default_sleep = sleep is None
        self._alert = alert

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the calls in progress (bounded by the client's timeout) and release the threads."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self._client.flush_call_counts()

    def stop(self) -> None:
        """Ask `run` to return after the step in progress; interrupts every wait."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self._stop.is_set()

    @property
    def paused(self) -> str | None:
        """Why all delivery is paused (needs a human), or None."""
        pause = self._pause
        return pause.reason if pause else None

    @property
    def hold_until(self) -> datetime | None:
        """Until when delivery holds back after transient failures, or None."""
        return self._hold_until

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
        """New punches were stored: end an idle wait now (a hold or pause still holds)."""
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
        now = self._clock()
        self._idle = False
        try:
            if self._store_failing:
                # Nothing DingTalk says can be recorded while the store refuses writes: check it first, so
                # that no call (and no quota) is spent until it takes writes again.
                self._store.set_value(STORE_PROBE_KEY, now.isoformat())
            if self._next_settle_at is None:
                # Health published by an earlier run is forgotten: the first call says it again. So are the
                # waits it set (an admin restarting after fixing credentials wants delivery now).
                self._store.delete_value(DINGTALK_HEALTH_KEY)
                self._store.make_pending_due(now)
            if self._next_settle_at is None or now >= self._next_settle_at:
                self.settle_in_flight()
            wait = self._blocked_for(now)
            if wait > 0:
                return wait
            room = self._quota_room(now)
            if room == 0:
                return min(self._max_wait, (_next_month(now) - now).total_seconds())
            if self._store.get_value(MAPPING_REFRESH_KEY, now=now) is not None:
                # `retry` ran (HR may have filled in job numbers): fetch them before sending again.
                self._store.delete_value(MAPPING_REFRESH_KEY)
                self._mapper.request_refresh()
            self._start_mapping_refresh()
            result = self._send_batch(now, room)
        except StoreError as error:
            if not self._store_failing:
                log.error("delivery.store_failed", error=str(error))
            self._store_failing = True
            return self._idle_seconds * 5
        if self._store_failing:
            log.info("delivery.store_recovered")
            self._store_failing = False
        return result

    def _start_mapping_refresh(self) -> None:
        """Fetch the job number table in a background thread when it is due (daily, or asked for).

        A walk of every department takes a call or two per department: in the delivery thread it would
        hold every punch back for that long. The mapper swaps its table whole, so resolving never waits.
        """
        if self.mapping_refreshing or not self._mapper.refresh_due():
            return
        thread = threading.Thread(target=self._refresh_mapping, name="job-numbers", daemon=True)
        self._refresher = thread
        thread.start()

    def _refresh_mapping(self) -> None:
        try:
            self._mapper.maybe_refresh()  # logs its own failures
        except Exception:  # the edge of the refresh thread; delivery goes on with the cached table
            log.exception("mapping.refresh_crashed")

    @property
    def mapping_refreshing(self) -> bool:
        """True while the job number table is being fetched."""
        thread = self._refresher
        return thread is not None and thread.is_alive()

    def _blocked_for(self, now: datetime) -> float:
        """Seconds until delivery may send again (pause or hold), 0 when it may send now."""
        with self._state:
            if self._pause is not None and now < self._pause.recheck_at:
                return (self._pause.recheck_at - now).total_seconds()
            if self._hold_until is not None and now < self._hold_until:
                return (self._hold_until - now).total_seconds()
        return 0.0

    def _probing(self) -> bool:
        """After a pause or an outage, send one punch first to see whether the cause has gone."""
        with self._state:
            return self._pause is not None or self._failures > 0

    def _quota_room(self, now: datetime) -> int | None:
        """How many calls the monthly budget still allows (None: no budget), warning at 80 % and 100 %."""
        quota = self.monthly_call_quota
        if quota is None:
            return None
        self._client.flush_call_counts()  # the client counts in memory between flushes
        month = self._client.month_of(now)
        if month != self._quota_month:
            if self._quota_exhausted:
                log.info("delivery.quota_renewed", month=month)
            self._quota_month, self._quota_warned, self._quota_exhausted = month, False, False
        used = self._store.calls_in_month(month)
        if used >= quota:
            if not self._quota_exhausted:
                log.error(
                    "delivery.quota_exhausted",
                    month=month,
                    calls=used,
                    quota=quota,
                    action="uploads stop until next month; punches keep being stored",
                )
                self._quota_exhausted = True
                self._tell(
                    f"DingTalk call budget spent ({used}/{quota} in {month}): uploads stop until next month"
                )
            return 0
        if used >= quota * QUOTA_WARNING_SHARE and not self._quota_warned:
            log.warning("delivery.quota_warning", month=month, calls=used, quota=quota)
            self._quota_warned = True
            self._tell(f"{used} of {quota} DingTalk calls used in {month}")
        return quota - used

    # ------------------------------------------------------------------ sending

    def _send_batch(self, now: datetime, room: int | None) -> float:
        limit = 1 if self._probing() else self.batch_size
        if room is not None:
            limit = min(limit, room)
        batch = self._store.claim_due(now, limit)
        self._idle = not batch
        if not batch:
            return self._idle_seconds
        # Durably, before anything is sent: the userid each punch goes out as (read back under it if needed).
        userids = {s.id: u for s in batch if (u := self._mapper.resolve(s.punch.enroll_number)) is not None}
        if userids:
            self._store.record_upload_userids(userids)
        started = time.monotonic()
        counts: Counter[str] = Counter()
        futures: list[Future[str]] = []
        executor = self._executor_or_new()
        for index, stored in enumerate(batch):
            deferred = self._why_not_now()
            if deferred is None:
                upload = self._prepare(stored, now, counts)
                if upload is None:
                    continue
                self._limiter.acquire()
                if not self._acquire_slot():
                    deferred = "stopping"
                else:
                    # Checked again now that a slot is free: the call that held it may just have failed.
                    permit = self._why_not_now(number_call=True)
                    if isinstance(permit, int):
                        future = executor.submit(self._deliver, stored, upload, permit)
                        future.add_done_callback(lambda _: self._slots.release())
                        futures.append(future)
                        continue
                    self._slots.release()
                    deferred = permit
            # Claimed but not sent: back in the queue (this one and the rest), due when delivery may go on.
            resume_at = self._resume_at()
            for left in batch[index:]:
                self._store.mark_pending(left.id, retry_at=resume_at, reason=f"not sent yet: {deferred}")
            counts["deferred"] += len(batch) - index
            break
        for future in futures:
            counts[future.result()] += 1
        log.info(
            "delivery.batch",
            delivered=counts["delivered"],
            pending=counts["pending"] + counts["deferred"],
            parked=counts["parked"],
            unknown=counts["unknown"],
            duration_ms=round((time.monotonic() - started) * 1000),
        )
        return 0.0

    def _executor_or_new(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="delivery")
        return self._executor

    def _acquire_slot(self) -> bool:
        """Wait for one of the `concurrency` call slots; False if a stop came first."""
        while not self._slots.acquire(timeout=0.05):
            if self._stop.is_set():
                return False
        return True

    def _why_not_now(self, *, number_call: bool = False) -> str | int | None:
        """Return why delivery may not send now, or (with `number_call`) the number of the call it may
        send. Checking and numbering under one lock: a failure seen in between would otherwise let a
        call numbered after it (and sent before the hold) end that hold."""
        if self._stop.is_set():
            return "stopping"
        now = self._clock()
        with self._state:
            if self._pause is not None and now < self._pause.recheck_at:
                return f"delivery paused: {self._pause.reason}"
            if self._hold_until is not None and now < self._hold_until:
                return f"delivery held: {self._hold_reason}"
            if number_call:
                self._calls_issued += 1
                return self._calls_issued
        return None

    def _resume_at(self) -> datetime:
        now = self._clock()
        with self._state:
            moments = [now]
            if self._pause is not None:
                moments.append(self._pause.recheck_at)
            if self._hold_until is not None:
                moments.append(self._hold_until)
        return max(moments)

    def _prepare(self, stored: Any, now: datetime, counts: Counter[str]) -> Upload | None:
        """Turn a claimed punch into an Upload, or settle it here (park, or postpone) and return None."""
        punch = stored.punch
        if punch.check_time_ms is None:
            self._store.park(stored.id, reason=f"the punch time {punch.local_time!r} is not a valid moment")
            counts["parked"] += 1
            return None
        userid = self._mapper.resolve(punch.enroll_number)
        if userid is None and self.mapping_refreshing:
            reason = "waiting for the DingTalk job number table being fetched"
            self._store.mark_pending(stored.id, retry_at=now + MAPPING_WAIT, reason=reason)
            counts["pending"] += 1
            return None
        if userid is None:
            self._store.park(stored.id, reason=self._mapper.report_unmapped(punch.enroll_number))
            counts["parked"] += 1
            return None
        now_ms = int(now.timestamp() * 1000)
        if punch.check_time_ms < now_ms - int(DINGTALK_WINDOW.total_seconds() * 1000):
            self._store.park(stored.id, reason="the punch is older than the 180 days DingTalk accepts")
            counts["parked"] += 1
            return None
        if punch.check_time_ms > now_ms:
            # DingTalk refuses times in the future: send it once its moment has come (terminal clock ahead).
            retry_at = _ms_to_datetime(punch.check_time_ms + _SECOND_MS)
            self._store.mark_pending(stored.id, retry_at=retry_at, reason="its time has not come yet")
            counts["pending"] += 1
            return None
        return Upload(
            userid=userid,
            device_name=punch.device,
            device_id=punch.serial or punch.device,
            user_check_time_ms=punch.check_time_ms,
        )

    def _deliver(self, stored: Any, upload: Upload, call: int) -> str:
        """Upload one punch and record the answer at once (worker thread); return what became of it."""
        with self._state:
            self._sent_as[stored.id] = upload.userid
        try:
            outcome = self._client.upload(upload)
        except Exception:  # edge of a worker: the call may or may not have gone out
            log.exception("delivery.upload_crashed", punch_id=stored.id)
            outcome = Outcome(OutcomeKind.UNKNOWN, "the upload failed unexpectedly (see the traceback)")
        try:
            result = self._record(stored, upload, outcome, call)
        except StoreError as error:
            # The row stays in flight: the next settle reads DingTalk back, so nothing is lost or doubled.
            log.error("delivery.store_failed", punch_id=stored.id, error=str(error))
            self._schedule_settle(self._clock() + self._settle_delay)
            return "unknown"
        if result != "unknown":
            self._forget_sent(stored.id)
        return result

    def _forget_sent(self, punch_id: int) -> None:
        with self._state:
            self._sent_as.pop(punch_id, None)

    def _record(self, stored: Any, upload: Upload, outcome: Outcome, call: int) -> str:
        now = self._clock()
        kind = outcome.kind
        if kind is OutcomeKind.DELIVERED:
            self._store.mark_delivered(stored.id, at=now, userid=upload.userid)
            self._on_answer(now, call)
            return "delivered"
        if kind is OutcomeKind.PERMANENT:
            self._store.park(stored.id, reason=outcome.reason)
            self._on_answer(now, call)
            log.warning(
                "delivery.parked",
                punch_id=stored.id,
                device=stored.punch.device,
                enroll_number=stored.punch.enroll_number,
                reason=outcome.reason,
            )
            return "parked"
        if kind is OutcomeKind.NEEDS_HUMAN:
            recheck_at = self._on_needs_human(outcome, now, call)
            self._store.mark_pending(stored.id, retry_at=recheck_at, reason=outcome.reason)
            return "pending"
        wait = self._on_failure(outcome, now, call)
        if kind is OutcomeKind.UNKNOWN:
            self._store.mark_unknown(stored.id, reason=f"upload outcome unknown: {outcome.reason}")
            self._schedule_settle(now + self._settle_delay)
            return "unknown"
        self._store.mark_pending(stored.id, retry_at=now + timedelta(seconds=wait), reason=outcome.reason)
        return "pending"

    # ------------------------------------------------------------------ delivery-wide conditions

    def backoff_seconds(self, failures: int) -> float:
        """The hold after `failures` consecutive failed probes: exponential, capped, with "equal jitter"
        (between half and all of the exponential value)."""
        exponential = min(self._backoff_max, self._backoff_initial * 2.0 ** max(0, failures - 1))
        return exponential * (0.5 + 0.5 * self._rng.random())

    def _next_call(self) -> int:
        """Number a call as it is issued (see `_barrier`)."""
        with self._state:
            self._calls_issued += 1
            return self._calls_issued

    def _on_failure(self, outcome: Outcome, now: datetime, call: int) -> float:
        """A transient failure or an unknown outcome: hold all delivery; return the wait for this punch."""
        with self._state:
            # Only a call issued after the last failure was seen (a probe) escalates the back-off; the
            # failures of calls that were already under way say nothing new.
            if call > self._barrier:
                self._failures += 1
            self._barrier = self._calls_issued
            failures = self._failures
            wait = max(outcome.wait_seconds, self.backoff_seconds(failures))
            until = now + timedelta(seconds=wait)
            if self._hold_until is None or until > self._hold_until:
                self._hold_until = until
                self._hold_reason = outcome.reason
            first = self._outage_since is None
            if first:
                self._outage_since = now
        if first:
            log.warning(
                "delivery.held", reason=outcome.reason, code=outcome.code, wait_seconds=round(wait, 1)
            )
            self._publish_health(f"{HEALTH_ERROR_PREFIX} {outcome.reason}", now)
        else:
            log.debug(
                "delivery.still_held", reason=outcome.reason, failures=failures, wait_seconds=round(wait, 1)
            )
        return wait

    def _on_answer(self, now: datetime, call: int, *, ends_pause: bool = True) -> None:
        """DingTalk answered a call properly: end a hold, and (for an upload) a pause.

        Only a call issued after the last failure was seen counts: a concurrent call that went out
        before it proves nothing. A read-back that works says nothing about the upload's permission or
        quota, so it ends no pause.
        """
        with self._state:
            if call <= self._barrier:
                return
            outage_since, pause = self._outage_since, self._pause if ends_pause else None
            self._failures = 0
            self._hold_until = None
            self._outage_since = None
            if ends_pause:
                self._pause = None
        if outage_since is not None:
            log.info("delivery.recovered", outage_seconds=round((now - outage_since).total_seconds(), 1))
        if pause is not None:
            log.warning("delivery.resumed", paused_seconds=round((now - pause.since).total_seconds(), 1))
            self._tell("delivery to DingTalk resumed")
        if ends_pause:
            self._publish_health(HEALTH_OK, now)

    def _on_needs_human(self, outcome: Outcome, now: datetime, call: int) -> datetime:
        """Pause all delivery (logged loudly once, again if the reason changes); return the recheck time."""
        recheck_at = now + timedelta(seconds=max(outcome.wait_seconds, 1.0))
        with self._state:
            self._barrier = max(self._barrier, call, self._calls_issued)
            previous = self._pause
            changed = previous is None or previous.code != outcome.code or previous.reason != outcome.reason
            since = now if previous is None else previous.since
            self._pause = _Pause(outcome.reason, outcome.code, since, recheck_at)
        if changed:
            log.error(
                "delivery.paused",
                reason=outcome.reason,
                code=outcome.code,
                recheck_in_seconds=round(outcome.wait_seconds),
                action="fix the cause; punches keep being stored and are sent once DingTalk accepts them",
            )
            self._tell(f"delivery to DingTalk paused: {outcome.reason}")
            self._publish_health(f"{HEALTH_PAUSED_PREFIX} {outcome.reason}", now)
        return recheck_at

    def _publish_health(self, health: str, now: datetime) -> None:
        """Write DingTalk's health for `status` when it changes (each write is a commit: not every call)."""
        with self._state:
            if health == self._health:
                return
            self._health = health
        try:
            self._store.set_value(DINGTALK_HEALTH_KEY, health)
            self._store.set_value(DINGTALK_HEALTH_AT_KEY, now.isoformat())
        except StoreError as error:
            log.warning("delivery.status_unwritable", error=str(error))

    def _tell(self, text: str) -> None:
        """Pass an event to the alert hook, if any (best effort: delivery goes on whatever it does)."""
        if self._alert is None:
            return
        try:
            self._alert(text)
        except Exception:  # the hook is someone else's code; an alert must never stop delivery
            log.exception("delivery.alert_failed")

    def _schedule_settle(self, at: datetime) -> None:
        with self._state:
            if self._next_settle_at is None or at < self._next_settle_at:
                self._next_settle_at = at

    # ------------------------------------------------------------------ settling unknown outcomes

    def settle_in_flight(self) -> SettleReport:
        """Settle every punch in flight whose upload started at least `settle_delay` ago.

        Call only while no upload of this process is under way (`step` does, between batches): every row
        in flight is then a crash leftover or an unknown outcome.
        """
        now = self._clock()
        report = SettleReport()
        rows = list(self._store.in_flight())
        ready: list[_Unsettled] = []
        later: list[datetime] = []
        oldest_readable = int((now - DINGTALK_WINDOW + READ_BACK_MARGIN).timestamp() * 1000)
        for stored in rows:
            since = stored.in_flight_since
            if since is not None and since + self._settle_delay > now:
                later.append(since + self._settle_delay)
                report.waiting += 1
                continue
            report.checked += 1
            punch = stored.punch
            if punch.check_time_ms is None:
                self._store.park(
                    stored.id, reason=f"the punch time {punch.local_time!r} is not a valid moment"
                )
                report.parked += 1
                continue
            with self._state:
                userid = self._sent_as.get(stored.id)
            if userid is None:  # left by an earlier run: the userid recorded before its upload went out
                userid = stored.userid
            if userid is None:  # a store from before userids were recorded: resolve again
                userid = self._mapper.resolve(punch.enroll_number)
            if userid is None and self.mapping_refreshing:
                later.append(now + MAPPING_WAIT)
                report.checked -= 1
                report.waiting += 1
                continue
            if userid is None:
                self._mapper.report_unmapped(punch.enroll_number)
                reason = unmapped_reason(punch.enroll_number) + " (an earlier upload's outcome is unknown)"
                self._store.park(stored.id, reason=reason)
                self._forget_sent(stored.id)
                report.parked += 1
                continue
            if punch.check_time_ms < oldest_readable:
                self._resend_unverified(stored, now, "too old to read DingTalk back", report)
                continue
            ready.append(_Unsettled(stored, userid, punch.check_time_ms))
        aborted = self._read_back(ready, now, report)
        next_at = now + self._settle_interval
        if later:
            next_at = min(next_at, min(later))
        if aborted is not None:
            next_at = max(aborted, now + timedelta(seconds=1))
        with self._state:
            self._next_settle_at = next_at
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
        return report

    def _resend_unverified(self, stored: Any, now: datetime, why: str, report: SettleReport) -> None:
        reason = f"upload outcome unknown and {why}: sending again (a duplicate is possible)"
        self._store.mark_pending(stored.id, retry_at=now, reason=reason, outcome_unknown=True)
        self._forget_sent(stored.id)
        report.resent_unverified += 1

    def _read_back(self, ready: list[_Unsettled], now: datetime, report: SettleReport) -> datetime | None:
        """Read DingTalk back for `ready` punches; return when to try again if it had to stop early."""
        if not ready:
            return None
        calls = plan_read_back(ready, key=lambda item: (item.userid, item.ms))
        for number, call in enumerate(calls):
            room = self._quota_room(now)
            blocked = self._blocked_for(self._clock())
            if blocked > 0 or room == 0:
                report.waiting += sum(len(rest.items) for rest in calls[number:])
                return self._clock() + timedelta(seconds=blocked or self._max_wait)
            self._limiter.acquire()
            if self._stop.is_set():
                report.waiting += sum(len(rest.items) for rest in calls[number:])
                return self._clock()
            call_number = self._next_call()
            try:
                records = self._client.list_records(
                    call.userids, _ms_to_datetime(call.start_ms), _ms_to_datetime(call.end_ms)
                )
            except DingTalkError as error:
                outcome = error.outcome
                impossible = outcome.kind is OutcomeKind.PERMANENT or (
                    outcome.kind is OutcomeKind.NEEDS_HUMAN and outcome.code == "60011"
                )
                if impossible:
                    for item in call.items:
                        self._resend_unverified(
                            item.stored, now, f"DingTalk cannot be read back ({outcome.reason})", report
                        )
                    continue
                if outcome.kind is OutcomeKind.NEEDS_HUMAN:
                    again = self._on_needs_human(outcome, self._clock(), call_number)
                else:
                    wait = self._on_failure(outcome, self._clock(), call_number)
                    again = self._clock() + timedelta(seconds=wait)
                log.info("delivery.read_back_failed", reason=outcome.reason, retry_at=again.isoformat())
                report.waiting += sum(len(rest.items) for rest in calls[number:])
                return again
            self._on_answer(self._clock(), call_number, ends_pause=False)
            self._match(call, records, report)
        return None

    def _match(self, call: ReadBackCall, records: list[dict[str, Any]], report: SettleReport) -> None:
        """Settle the call's punches: each DingTalk record (userid, time, device) vouches for one punch.

        Counted, not merely looked up: the upload carries no punch state or verify mode, so check-in and
        check-out in the same second on one terminal are the same record, and one record must not settle
        two punches. (A punch already delivered earlier with the same record is not in this count: such a
        pair can still settle on one record, which then holds exactly what the second upload would add.)
        """
        seen: Counter[tuple[str, int, str]] = Counter()
        for record in records:
            try:
                when = int(record.get("userCheckTime"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            seen[(str(record.get("userId")), when, str(record.get("deviceId") or ""))] += 1
        now = self._clock()
        for item in sorted(call.items, key=lambda unsettled: unsettled.stored.id):
            serial = item.stored.punch.serial or item.stored.punch.device
            for device in (serial, ""):  # a record without a deviceId vouches for any terminal
                key = (item.userid, item.ms, device)
                if seen[key] > 0:
                    seen[key] -= 1
                    self._store.mark_delivered(item.stored.id, at=now, userid=item.userid)
                    report.found += 1
                    break
            else:
                reason = "upload outcome unknown, not found in DingTalk: sending again"
                self._store.mark_pending(item.stored.id, retry_at=now, reason=reason, outcome_unknown=True)
                report.resent += 1
            self._forget_sent(item.stored.id)
