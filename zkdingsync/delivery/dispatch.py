"""One batch: claim due punches, turn each into an Upload, send them through the rate limit from a few
concurrent workers, and record each answer as it comes: delivered only after DingTalk said so; back to
pending with a retry time; parked with the reason; or left in flight, flagged, for the next settle.

One canonical line per batch that uploaded something:
`delivery.batch delivered=.. pending=.. parked=.. unknown=.. duration_ms=..`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta

import structlog

from zkdingsync.delivery.budget import CallBudget
from zkdingsync.delivery.order import claim_batch
from zkdingsync.delivery.parts import SharedParts
from zkdingsync.delivery.ports import (
    SECOND_MS,
    invalid_moment,
    ms_to_datetime,
)
from zkdingsync.delivery.settler import MAPPING_WAIT, Settler
from zkdingsync.dingtalk.client import DINGTALK_WINDOW
from zkdingsync.errors import StoreError
from zkdingsync.model import Outcome, OutcomeKind, PunchResult, StoredPunch, Upload
from zkdingsync.quota import QUOTA_EXHAUSTED_CODE

log = structlog.get_logger(__name__)


class Dispatcher:
    """Sends batches with at most `concurrency` calls under way."""

    def __init__(self, parts: SharedParts, settler: Settler, budget: CallBudget, *, concurrency: int) -> None:
        """Given the shared parts, the settler (told of unknown outcomes), the monthly call budget (spent
        when DingTalk says so) and how many uploads may be under way at once, build it."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._p = parts
        self._settler = settler
        self._budget = budget
        self.concurrency = concurrency
        self._executor: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(concurrency)

    def close(self) -> None:
        """Wait for the calls in progress (bounded by the client's timeout) and release the threads."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def send_batch(self, now: datetime, limit: int) -> bool:
        """Claim up to `limit` due punches and send them; return False when none was due."""
        store = self._p.store
        batch = claim_batch(store, now, limit)
        if not batch:
            return False
        # Durably, before anything is sent: the userid each punch goes out as (read back under it if needed).
        resolve = self._p.mapper.resolve
        userids = {s.id: u for s in batch if (u := resolve(s.punch.enroll_number)) is not None}
        if userids:
            store.record_upload_userids(userids)
        started = time.monotonic()
        counts: Counter[PunchResult] = Counter()
        futures = self._submit(batch, now, counts)
        for future in futures:
            counts[future.result()] += 1
        if not futures:
            return True  # nothing was uploaded: the periodic summary covers what was parked or put back
        log.info(
            "delivery.batch",
            delivered=counts[PunchResult.DELIVERED],
            pending=counts[PunchResult.PENDING] + counts[PunchResult.DEFERRED],
            parked=counts[PunchResult.PARKED],
            unknown=counts[PunchResult.UNKNOWN],
            duration_ms=round((time.monotonic() - started) * 1000),
        )
        return True

    def _submit(
        self, batch: Sequence[StoredPunch], now: datetime, counts: Counter[PunchResult]
    ) -> list[Future[PunchResult]]:
        """Start an upload per punch while delivery may go on; put the rest back in the queue."""
        futures: list[Future[PunchResult]] = []
        for index, stored in enumerate(batch):
            deferred = self._why_not_now()
            if deferred is None:
                upload = self._prepare(stored, now, counts)
                if upload is None:
                    continue
                started = self._start(stored, upload)
                if isinstance(started, Future):
                    futures.append(started)
                    continue
                deferred = started
            # Claimed but not sent: back in the queue (this one and the rest), due when delivery may go on.
            resume_at = self._p.health.gate.resume_at(self._p.clock())
            for left in batch[index:]:
                self._p.store.mark_pending(left.id, retry_at=resume_at, reason=f"not sent yet: {deferred}")
            counts[PunchResult.DEFERRED] += len(batch) - index
            break
        return futures

    def _why_not_now(self) -> str | None:
        if self._p.stopping():
            return "stopping"
        now = self._p.clock()
        if self._budget.spent(now):
            return "the month's DingTalk calls are spent"
        return self._p.health.gate.why_not(now)

    def _start(self, stored: StoredPunch, upload: Upload) -> Future[PunchResult] | str:
        """Wait for the rate limit and a free slot, then start the upload; or say why it may not go."""
        self._p.limiter.acquire()
        if not self._acquire_slot():
            return "stopping"
        # Checked again now that a slot is free: the call that held it may just have failed.
        blocked = self._why_not_now()
        permit = blocked if blocked is not None else self._p.health.gate.permit(self._p.clock())
        if isinstance(permit, str):
            self._slots.release()
            return permit
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="delivery")
        future = self._executor.submit(self._deliver, stored, upload, permit)
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def _acquire_slot(self) -> bool:
        """Wait for one of the `concurrency` call slots; False if a stop came first."""
        while not self._slots.acquire(timeout=0.05):
            if self._p.stopping():
                return False
        return True

    def _prepare(self, stored: StoredPunch, now: datetime, counts: Counter[PunchResult]) -> Upload | None:
        """Turn a claimed punch into an Upload, or settle it here (park, or postpone) and return None."""
        store, punch = self._p.store, stored.punch
        if punch.check_time_ms is None:
            store.park(stored.id, reason=invalid_moment(punch))
            counts[PunchResult.PARKED] += 1
            return None
        userid = self._p.mapper.resolve(punch.enroll_number)
        if userid is None and self._p.refreshing():
            reason = "waiting for the DingTalk job number table being fetched"
            store.mark_pending(stored.id, retry_at=now + MAPPING_WAIT, reason=reason)
            counts[PunchResult.PENDING] += 1
            return None
        if userid is None:
            store.park(stored.id, reason=self._p.mapper.report_unmapped(punch.enroll_number))
            counts[PunchResult.PARKED] += 1
            return None
        now_ms = int(now.timestamp() * 1000)
        if punch.check_time_ms < now_ms - int(DINGTALK_WINDOW.total_seconds() * 1000):
            store.park(stored.id, reason="the punch is older than the 180 days DingTalk accepts")
            counts[PunchResult.PARKED] += 1
            return None
        if punch.check_time_ms > now_ms:
            # DingTalk refuses times in the future: send it once its moment has come (terminal clock ahead).
            retry_at = ms_to_datetime(punch.check_time_ms + SECOND_MS)
            store.mark_pending(stored.id, retry_at=retry_at, reason="its time has not come yet")
            counts[PunchResult.PENDING] += 1
            return None
        return Upload(
            userid=userid,
            device_name=punch.device,
            device_id=punch.serial or punch.device,
            user_check_time_ms=punch.check_time_ms,
        )

    def _deliver(self, stored: StoredPunch, upload: Upload, call: int) -> PunchResult:
        """Upload one punch and record the answer at once (worker thread); return what became of it."""
        self._p.sent.remember(stored.id, upload.userid)
        try:
            outcome = self._p.client.upload(upload)
        except Exception:  # edge of a worker: the call may or may not have gone out
            log.exception("delivery.upload_crashed", punch_id=stored.id)
            outcome = Outcome(OutcomeKind.UNKNOWN, "the upload failed unexpectedly (see the traceback)")
        try:
            result = self._record(stored, upload, outcome, call)
        except StoreError as error:
            # The row stays in flight: the next settle reads DingTalk back, so nothing is lost or doubled.
            log.error("delivery.store_failed", punch_id=stored.id, error=str(error))
            self._settler.schedule(self._p.clock() + self._settler.delay)
            return PunchResult.UNKNOWN
        if result is not PunchResult.UNKNOWN:
            self._p.sent.forget(stored.id)
        return result

    def _record(self, stored: StoredPunch, upload: Upload, outcome: Outcome, call: int) -> PunchResult:
        now = self._p.clock()
        store, health, kind = self._p.store, self._p.health, outcome.kind
        if kind is OutcomeKind.DELIVERED:
            store.mark_delivered(stored.id, at=now, userid=upload.userid, request_id=outcome.request_id)
            health.answered(now, call)
            return PunchResult.DELIVERED
        if kind is OutcomeKind.PERMANENT:
            store.park(stored.id, reason=outcome.reason)
            health.answered(now, call)
            log.warning(
                "delivery.parked",
                punch_id=stored.id,
                device=stored.punch.device,
                enroll_number=stored.punch.enroll_number,
                reason=outcome.reason,
            )
            return PunchResult.PARKED
        if kind is OutcomeKind.NEEDS_HUMAN and outcome.code == QUOTA_EXHAUSTED_CODE:
            self._budget.refused(now)  # no pause to recheck: the budget waits for the 1st
            store.mark_pending(stored.id, retry_at=now, reason=outcome.reason)
            return PunchResult.PENDING
        if kind is OutcomeKind.NEEDS_HUMAN:
            recheck_at = health.needs_human(outcome, now, call)
            store.mark_pending(stored.id, retry_at=recheck_at, reason=outcome.reason)
            return PunchResult.PENDING
        wait = health.failed(outcome, now, call)
        if kind is OutcomeKind.UNKNOWN:
            store.mark_unknown(stored.id, reason=f"upload outcome unknown: {outcome.reason}")
            self._settler.schedule(now + self._settler.delay)
            return PunchResult.UNKNOWN
        store.mark_pending(stored.id, retry_at=now + timedelta(seconds=wait), reason=outcome.reason)
        return PunchResult.PENDING
