"""One poll of one terminal: read what is new in its log, store it, say what changed.

1. read the log knowing the checkpoint's serial, count and last record (`devices.zk.read_log`): nothing
   when neither moved, only the new tail when the stored last record is found where expected, the whole
   log otherwise. Whole-log reads need one of the few full-read slots (`poll.max_full_reads`): without
   one the terminal tries again shortly, and the other terminals' small polls go on meanwhile;
2. when the serial changed (terminal swapped) or the count dropped (log cleared), log it once; a whole
   read re-baselines, and the natural key makes re-reading harmless (a delivered punch is never queued
   again);
3. convert records to punches in the terminal's zone (quarantining impossible, future and too-old ones,
   never dropping them) and store them in batches of `BATCH_RECORDS`; the checkpoint moves only with the
   last batch, so after a crash it never runs ahead of what is stored. A StoreError fails the poll
   closed: the checkpoint does not move.

Firmware found not to read from an offset is logged once and recorded in the checkpoint: that terminal
is read whole from then on, and loses nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

import structlog

from zkdingsync.devices.zk import DeviceLike, KnownLog, LogDigest, LogRead, LogTail, TerminalCancelled
from zkdingsync.errors import StoreError, TerminalError
from zkdingsync.history import HistoryPolicy, log_first_contact
from zkdingsync.model import AttendanceRecord, Punch
from zkdingsync.store import Checkpoint, LogEnd, Store, UidNames
from zkdingsync.terminal_health import TerminalHealth
from zkdingsync.terminal_names import TerminalNames
from zkdingsync.timeconv import Classifier

log = structlog.get_logger(__name__)

BATCH_RECORDS = 5000  # records parsed and stored per transaction of a big read
VERIFY_EVERY = timedelta(hours=1)  # how often a log is read whole even when its count has not moved
SLOT_RETRY = timedelta(seconds=2)  # a terminal waiting for a full-read slot looks again after this


class PollSettings(Protocol):
    """What the poller needs of `config.poll` (`config.PollConfig` fits)."""

    @property
    def interval_seconds(self) -> float: ...
    @property
    def timeout_seconds(self) -> float: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def max_full_reads(self) -> int: ...
    @property
    def backoff_max_seconds(self) -> float: ...
    @property
    def future_tolerance_seconds(self) -> float: ...
    @property
    def drift_threshold_seconds(self) -> float: ...


class PolledDevice(DeviceLike, Protocol):
    """A configured terminal as the poller sees it (`config.DeviceConfig` fits)."""

    @property
    def sync_clock(self) -> bool: ...


class ConfigLike(Protocol):
    """The parts of `config.Config` that `Poller.from_config` reads."""

    @property
    def poll(self) -> PollSettings: ...
    @property
    def devices(self) -> Sequence[PolledDevice]: ...


class TerminalReader(Protocol):
    """The terminal adapter (`devices.zk.ZkReader` in production; a fake in unit tests)."""

    def read_log(
        self,
        device: DeviceLike,
        *,
        timeout_seconds: float,
        known: KnownLog,
        ensure_enabled: bool,
        now: Callable[[], datetime],
        cancel: threading.Event | None,
        allow_full: bool,
    ) -> LogRead:
        """Read a terminal's log (see `devices.zk.read_log`); raise TerminalError."""
        ...

    def set_time(self, device: DeviceLike, *, timeout_seconds: float, at: datetime) -> None:
        """Set a terminal's clock to `at` in its zone; raise TerminalError."""
        ...


@dataclass(frozen=True)
class PollResult:
    """The outcome of one poll of one terminal."""

    device: str
    ok: bool
    next_due: datetime
    new: int = 0  # punches the store did not know yet
    records: int = 0  # the terminal's record count
    downloaded: bool = False
    error: str | None = None
    duration_ms: int = 0
    waiting: bool = False  # a whole-log read is due and every full-read slot was taken


class PolledTerminal:
    """One terminal's schedule and what the poller remembers about it between polls (not persisted)."""

    def __init__(self, device: PolledDevice, due: datetime) -> None:
        self.device = device
        self.zone = ZoneInfo(device.timezone)
        self.next_due = due
        self.failures = 0
        self.health = TerminalHealth(device.name)
        self.suspect = False  # its last poll failed or was slow: it gets at most half the workers
        self.digest: LogDigest | None = None  # of the last whole log stored, to skip re-parsing it
        self.ensure_enabled = False  # a failed poll may have left the terminal disabled
        self.in_flight: Future[PollResult] | None = None
        self.verified_at: datetime | None = None  # last whole read; None: never in this process
        self.last_success: datetime | None = None  # when its last successful poll started
        self.uid_names: tuple[str, UidNames] | None = None  # (serial, memo) of an 8-byte terminal

    def busy(self) -> bool:
        """True while a poll of the terminal runs. A terminal replaced by a reload inherits its
        predecessor's future, which the predecessor's poll never clears: a finished one does not count."""
        return self.in_flight is not None and not self.in_flight.done()


class FullReadSlots:
    """At most `limit` whole-log reads at once (memory and the terminals' time); never blocks."""

    def __init__(self, limit: int) -> None:
        self._lock = threading.Lock()
        self.limit = limit
        self._taken = 0
        self.on_release: Callable[[], object] | None = None  # wakes the scheduler

    def try_take(self) -> bool:
        """Take a slot if one is free; return whether it was."""
        with self._lock:
            if self._taken >= self.limit:
                return False
            self._taken += 1
            return True

    def give_back(self) -> None:
        """Return a slot taken with `try_take`."""
        with self._lock:
            self._taken -= 1
        if self.on_release is not None:
            self.on_release()


@contextmanager
def _holding(slots: FullReadSlots, taken: list[bool]) -> Iterator[None]:
    """Give back the slot `taken[0]` says is held, however the block ends."""
    try:
        yield
    finally:
        if taken[0]:
            slots.give_back()


class TerminalPoll:
    """Runs polls of single terminals into the store (any worker thread; one poll per terminal)."""

    def __init__(
        self,
        store: Store,
        reader: TerminalReader,
        *,
        settings: Callable[[], PollSettings],
        clock: Callable[[], datetime],
        timer: Callable[[], float],
        slots: FullReadSlots,
        backoff: Callable[[int], float],
        verify_every: timedelta = VERIFY_EVERY,
        jitter: Callable[[], float],
        on_new_punches: Callable[[], object] | None = None,
        history: Callable[[], HistoryPolicy | None] = lambda: None,
        names: TerminalNames | None = None,
    ) -> None:
        """Given the store, the terminal adapter and the poller's policies (`history`: the history policy
        in force, None: every new punch is queued), prepare to run polls (and, with `names`, keep the names
        of the terminals' users for the export)."""
        self._store = store
        self._reader = reader
        self._settings = settings
        self._clock = clock
        self._timer = timer
        self._slots = slots
        self._backoff = backoff
        self._verify_every = verify_every
        self._jitter = jitter
        self._on_new_punches = on_new_punches
        self._history = history
        self._names = names
        self._store_failing = False

    def run(self, terminal: PolledTerminal, now: datetime, cancel: threading.Event | None) -> PollResult:
        """Run one poll; the edge of a worker thread, so nothing escapes it."""
        started = self._timer()
        try:
            return self._poll(terminal, now, cancel, started)
        # The edge of one terminal's poll: a bug must fail this poll (traceback logged), not the worker.
        except Exception as error:
            log.exception("poll.crashed", device=terminal.device.name)
            return self._failed(terminal, now, f"internal error: {type(error).__name__}: {error}", started)

    def _poll(
        self, terminal: PolledTerminal, now: datetime, cancel: threading.Event | None, started: float
    ) -> PollResult:
        device = terminal.device
        try:
            checkpoint = self._store.checkpoint(device.name)
        except StoreError as error:
            return self._store_failed(terminal, now, error, started)
        terminal.health.learn_down(checkpoint)
        known = (
            checkpoint if checkpoint is not None and checkpoint.last_success and checkpoint.serial else None
        )
        if terminal.verified_at is None:
            # At start-up the checkpoint is trusted (a restart must not download every log at once), and
            # the terminals' hourly whole reads are spread over the hour.
            terminal.verified_at = now - self._verify_every * self._jitter()
        verify = known is None or now - terminal.verified_at >= self._verify_every
        taken = [verify and self._slots.try_take()]
        with _holding(self._slots, taken):
            try:
                read = self._read(terminal, known, verify and taken[0], taken[0], cancel)
                if read.needs_full and not taken[0] and self._slots.try_take():
                    taken[0] = True
                    read = self._read(terminal, known, verify, True, cancel)
            except TerminalCancelled as error:
                log.info("poll.cancelled", device=device.name, reason=error.reason)
                return PollResult(
                    device.name, False, now, error=error.reason, duration_ms=self._since(started)
                )
            except TerminalError as error:
                return self._failed(terminal, now, error.reason, started)
            terminal.ensure_enabled = False
            if read.needs_full:
                log.debug("poll.waiting_for_full_read", device=device.name, limit=self._slots.limit)
                return PollResult(
                    device.name, True, now + SLOT_RETRY, waiting=True, duration_ms=self._since(started)
                )
            result = self._store_read(terminal, known, read, now, started)
        if result.ok and self._names is not None:
            self._names.after_poll(device, read.state.serial, read.state.users, cancel)
        return result

    def _read(
        self,
        terminal: PolledTerminal,
        known: Checkpoint | None,
        verify: bool,
        allow_full: bool,
        cancel: threading.Event | None,
    ) -> LogRead:
        """One session with the terminal (see `devices.zk.read_log`)."""
        tail: LogTail | None = None
        if known is not None and known.serial and known.record_size and known.last_record:
            tail = LogTail(known.serial, known.record_size, known.record_count, known.last_record)
        digest = terminal.digest
        if known is None or (digest is not None and digest.serial != known.serial):
            digest = None  # only trusted while it describes the log the store last saved
        return self._reader.read_log(
            terminal.device,
            timeout_seconds=self._settings().timeout_seconds,
            known=KnownLog(
                serial=known.serial if known else None,
                count=None if verify or known is None else known.record_count,
                digest=digest,
                tail=tail,
                offset_reads=known is None or known.offset_reads is not False,
            ),
            allow_full=allow_full,
            ensure_enabled=terminal.ensure_enabled,
            now=self._clock,
            cancel=cancel,
        )

    def _store_read(
        self, terminal: PolledTerminal, known: Checkpoint | None, read: LogRead, now: datetime, started: float
    ) -> PollResult:
        """Store what a successful read brought, move the checkpoint, log what changed."""
        device, state = terminal.device, read.state
        if known is not None and known.serial is not None:
            terminal.health.check_identity(known.serial, known.record_count, state.serial, state.record_count)
        if read.offset_reads is False:
            terminal.health.no_offset_reads(read.offset_problem)
        wall = self._clock()
        policy = self._history()
        try:
            new, quarantined = self._save(terminal, read, wall, policy)
            if policy is not None and (known is None or known.first_contact is None):
                log_first_contact(self._store.history_held(device.name))
        except StoreError as error:
            return self._store_failed(terminal, now, error, started)
        if self._store_failing:
            self._store_failing = False
            log.info("store.recovered", device=device.name)
        if read.full:
            terminal.digest = read.digest
            terminal.verified_at = now
        if new and self._on_new_punches is not None:
            self._on_new_punches()
        terminal.failures = 0
        terminal.last_success = now
        terminal.health.up(known.down_since if known is not None else None, wall)
        terminal.health.check_full(state.log_full, state.record_count, state.record_capacity)
        threshold = self._settings().drift_threshold_seconds
        if (
            terminal.health.check_drift(state.drift_seconds, threshold, device.sync_clock)
            and device.sync_clock
        ):
            self._set_clock(terminal, state.drift_seconds or 0.0)
        duration_ms = self._since(started)
        (log.info if read.downloaded else log.debug)(
            "poll.finished",
            device=device.name,
            new=new,
            records=state.record_count,
            duration_ms=duration_ms,
            **({"read": "whole"} if read.full else {"read": "tail"} if read.downloaded else {}),
            **({"quarantined": quarantined} if quarantined else {}),
        )
        return PollResult(
            device.name,
            True,
            now + timedelta(seconds=self._settings().interval_seconds),
            new=new,
            records=state.record_count,
            downloaded=read.downloaded,
            duration_ms=duration_ms,
        )

    def _save(
        self, terminal: PolledTerminal, read: LogRead, wall: datetime, policy: HistoryPolicy | None
    ) -> tuple[int, int]:
        """Store the read's records in batches, the checkpoint with the last one (history kept out of the
        queue by `policy`); return (new, quarantined)."""
        history = policy.rule(terminal.zone) if policy is not None else None
        state, poll = read.state, self._settings()
        classifier = Classifier(
            device=terminal.device.name,
            serial=state.serial,
            tz=terminal.zone,
            now=wall,
            future_tolerance_seconds=poll.future_tolerance_seconds,
        )
        new = quarantined = 0
        batch: list[Punch] = []
        for records in read.batches(BATCH_RECORDS):
            if batch:  # not the last batch: stored without moving the checkpoint
                new += self._store.save_punches(batch, polled_at=wall, history=history)
            if read.record_size == 8:
                records = self._resolve_uids(terminal, state.serial, records, read.users_by_uid or {})
            batch = classifier.classify_all(records)
            quarantined += sum(1 for punch in batch if punch.quarantine_reason)
        log_end = None
        if read.downloaded or read.offset_reads is not None or read.full:
            log_end = LogEnd(read.tail.last_record if read.tail else None, read.offset_reads)
        new += self._store.save_poll(
            terminal.device.name,
            serial=state.serial,
            record_count=state.record_count,
            record_size=read.record_size,
            punches=batch,
            polled_at=wall,
            info=state.info,
            drift_seconds=state.drift_seconds,
            log_end=log_end,
            history=history,
        )
        return new, quarantined

    def _resolve_uids(
        self, terminal: PolledTerminal, serial: str, records: list[AttendanceRecord], live: dict[int, str]
    ) -> list[AttendanceRecord]:
        """Give 8-byte records the enroll numbers they were first stored under (see `UidNames`), saving
        the memo before the punches so a crash in between resolves them the same way next time."""
        if terminal.uid_names is None or terminal.uid_names[0] != serial:
            terminal.uid_names = (serial, self._store.uid_names(serial))
        names = terminal.uid_names[1]
        # Past this, a time is a garbled record or a clock far ahead (quarantined as in the future).
        horizon = (self._clock() + timedelta(days=1)).astimezone(terminal.zone).strftime("%Y-%m-%d %H:%M:%S")
        resolved = names.resolve(records, live, horizon)
        if names.changed:
            try:
                self._store.save_uid_names(serial, names)
            except StoreError:
                terminal.uid_names = None  # reload what the store really holds next time
                raise
            names.changed = False
        return resolved

    def _set_clock(self, terminal: PolledTerminal, drift: float) -> None:
        """Set a drifting terminal's clock (`sync_clock`)."""
        device = terminal.device
        try:
            self._reader.set_time(device, timeout_seconds=self._settings().timeout_seconds, at=self._clock())
        except TerminalError as error:
            log.warning("terminal.clock_set_failed", device=device.name, reason=error.reason)
        else:
            log.info("terminal.clock_set", device=device.name, was_off_by_seconds=round(drift, 1))

    def _failed(self, terminal: PolledTerminal, now: datetime, reason: str, started: float) -> PollResult:
        """Record a failed poll, log the terminal down once, back off."""
        device = terminal.device
        terminal.failures += 1
        terminal.ensure_enabled = True
        try:
            self._store.record_poll_failure(device.name, error=reason, at=self._clock())
        except StoreError as error:
            self._log_store_failure(device.name, error)
        terminal.health.down(reason, terminal.failures)
        delay = self._backoff(terminal.failures)
        return PollResult(
            device.name, False, now + timedelta(seconds=delay), error=reason, duration_ms=self._since(started)
        )

    def _store_failed(
        self, terminal: PolledTerminal, now: datetime, error: StoreError, started: float
    ) -> PollResult:
        """The store refused: nothing moved; try again at the normal interval (the terminal is fine)."""
        self._log_store_failure(terminal.device.name, error)
        return PollResult(
            terminal.device.name,
            False,
            now + timedelta(seconds=self._settings().interval_seconds),
            error=f"store: {error}",
            duration_ms=self._since(started),
        )

    def _log_store_failure(self, device: str, error: StoreError) -> None:
        if not self._store_failing:
            self._store_failing = True
            log.error(
                "store.failing", device=device, error=str(error), effect="polls fail closed until it recovers"
            )

    def _since(self, started: float) -> int:
        return int((self._timer() - started) * 1000)
