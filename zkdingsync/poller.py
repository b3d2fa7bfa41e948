"""Polls every terminal on its own schedule and stores what it finds.

One schedule per terminal (its next due time); due polls run on a bounded thread pool, so one slow or
hostile terminal occupies one worker and never delays the others. Per poll:

1. read the log with the checkpoint's serial and record count (the adapter skips the download when
   neither moved);
2. when the serial changed (terminal swapped) or the count dropped (log cleared), log it once and
   re-baseline: the whole log is read and stored; the natural key makes re-reading harmless and a
   punch already delivered is never queued again;
3. convert records to punches in the terminal's configured zone (quarantining impossible, future and
   too-old ones, never dropping them) and `store.save_poll` them with the checkpoint in ONE transaction.
   A StoreError fails the poll closed: the checkpoint does not move.

Failures are recorded in the store and back off exponentially with jitter by moving the next due time
(a worker never sleeps). A terminal going down is logged once (`terminal.down`), its recovery once with
the outage length (`terminal.recovered`). Every successful poll ends in one canonical `poll.finished`
line (info when something was downloaded, debug for an unchanged poll so that 200 idle terminals do not
flood the journal).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

import structlog

from zkdingsync.backoff import Backoff
from zkdingsync.devices.zk import DeviceLike, LogDigest, LogRead, TerminalCancelled, ZkReader
from zkdingsync.errors import StoreError, TerminalError
from zkdingsync.model import AttendanceRecord, utc_now
from zkdingsync.store import Store, UidNames
from zkdingsync.timeconv import Classifier, describe_duration

log = structlog.get_logger(__name__)

# How often a terminal's whole log is read even when its record count has not moved.
VERIFY_EVERY = timedelta(hours=1)
_IDLE_WAIT_SECONDS = 0.5  # longest wait of the run loop: how fast it notices stop and reloads


class PollSettings(Protocol):
    """What the poller needs of `config.poll` (`config.PollConfig` fits)."""

    @property
    def interval_seconds(self) -> float: ...
    @property
    def timeout_seconds(self) -> float: ...
    @property
    def max_concurrency(self) -> int: ...
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
        known_serial: str | None,
        known_count: int | None,
        known_digest: LogDigest | None,
        ensure_enabled: bool,
        now: Callable[[], datetime],
        cancel: threading.Event | None,
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


class _Terminal:
    """One terminal's schedule and what the poller remembers about it between polls (not persisted)."""

    def __init__(self, device: PolledDevice, due: datetime) -> None:
        self.device = device
        self.zone = ZoneInfo(device.timezone)
        self.next_due = due
        self.failures = 0
        self.down: bool | None = None  # unknown until the first poll reads the checkpoint
        self.down_logged = False  # this process has said so (a restart says it again, once)
        self.drifting = False
        self.log_full = False  # warned that the terminal's log is at capacity
        self.suspect = False  # its last poll failed or was slow: it gets at most half the workers
        self.digest: LogDigest | None = None  # of the last log stored, to skip re-parsing it
        self.ensure_enabled = False  # a failed poll may have left the terminal disabled
        self.in_flight: Future[PollResult] | None = None
        self.verified_at: datetime | None = None  # last full download; None: never in this process
        self.uid_names: tuple[str, UidNames] | None = None  # (serial, memo) of an 8-byte terminal


class Poller:
    """Schedules and runs terminal polls into the store. Thread-safe; `run(stop)` is the daemon loop."""

    def __init__(
        self,
        devices: Iterable[PolledDevice],
        store: Store,
        *,
        poll: PollSettings,
        clock: Callable[[], datetime] = utc_now,
        reader: TerminalReader | None = None,
        jitter: Callable[[], float] | None = None,
        verify_every: timedelta = VERIFY_EVERY,
        on_new_punches: Callable[[], object] | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        """Given the terminals, the store and the poll settings, prepare a poller (no thread started).

        `clock` gives aware UTC wall-clock time (stamps, clock drift, quarantine); `reader` is the
        terminal adapter; `jitter` returns a float in [0, 1) for backoff jitter (tests pin it); `timer`
        measures poll durations (monotonic seconds).
        """
        self._timer = timer
        self._store = store
        self._poll = poll
        self._verify_every = verify_every
        # Called after new punches are committed (the daemon wakes the forwarder with it).
        self._on_new_punches = on_new_punches
        self._clock = clock
        self._reader: TerminalReader = reader if reader is not None else ZkReader()
        self._jitter = jitter if jitter is not None else random.Random().random  # noqa: S311 - not crypto
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._store_failing = False
        now = clock()
        self._terminals: dict[str, _Terminal] = {d.name: _Terminal(d, now) for d in devices}
        self._workers = self._pool_size()
        self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="poll")
        self._retired: list[ThreadPoolExecutor] = []  # pools replaced by a reload, polls maybe in flight

    @classmethod
    def from_config(
        cls,
        config: ConfigLike,
        *,
        store: Store,
        reader: TerminalReader | None = None,
        clock: Callable[[], datetime] = utc_now,
        on_new_punches: Callable[[], object] | None = None,
    ) -> Poller:
        """Given a loaded Config and the store, return a poller of its terminals with the real adapter."""
        return cls(
            config.devices, store, poll=config.poll, clock=clock, reader=reader, on_new_punches=on_new_punches
        )

    # --------------------------------------------------------------------------------- schedule

    def _pool_size(self) -> int:
        return max(1, min(self._poll.max_concurrency, len(self._terminals)))

    def schedule(self) -> dict[str, datetime]:
        """Return each terminal's next due time."""
        with self._lock:
            return {name: terminal.next_due for name, terminal in self._terminals.items()}

    def update_devices(self, devices: Iterable[PolledDevice], poll: PollSettings | None = None) -> None:
        """Replace the terminal list (config reload): unchanged terminals keep their schedule and
        state, new or changed ones are due now, removed ones are dropped (a poll in flight finishes)."""
        now = self._clock()
        with self._lock:
            if poll is not None:
                self._poll = poll
            old = self._terminals
            fresh: dict[str, _Terminal] = {}
            for device in devices:
                kept = old.get(device.name)
                if kept is not None and kept.device == device:
                    fresh[device.name] = kept
                    continue
                terminal = _Terminal(device, now)
                if kept is not None:
                    terminal.in_flight = kept.in_flight  # never two sessions to one terminal at once
                fresh[device.name] = terminal
            self._terminals = fresh
            workers = self._pool_size()
            if workers != self._workers:
                retired, self._executor = (
                    self._executor,
                    ThreadPoolExecutor(max_workers=workers, thread_name_prefix="poll"),
                )
                self._workers = workers
                retired.shutdown(wait=False)  # polls in flight there finish on their own
                self._retired.append(retired)  # and close() waits for them
        added, removed = sorted(set(fresh) - set(old)), sorted(set(old) - set(fresh))
        if added or removed:
            log.info("poller.devices_updated", terminals=len(fresh), added=added, removed=removed)
        self._wake.set()

    def _held_back(self) -> int:
        """How many suspect terminals (failing, or slow at their last poll) may start a poll now: at
        most half the workers go to them, so they cannot starve the healthy ones."""
        limit = max(1, self._workers // 2)
        return limit - sum(1 for t in self._terminals.values() if t.suspect and _busy(t))

    def _submit_due(
        self, now: datetime, cancel: threading.Event | None, skip: frozenset[str] = frozenset()
    ) -> tuple[list[Future[PollResult]], set[str]]:
        """Start a poll for every terminal due at `now` that has none in flight (except `skip`);
        return the polls started and the due terminals held back (suspects over their share)."""
        started: list[Future[PollResult]] = []
        held: set[str] = set()
        with self._lock:
            room = self._held_back()
            for name, terminal in self._terminals.items():
                if _busy(terminal) or terminal.next_due > now or name in skip:
                    continue
                if terminal.suspect:
                    if room <= 0:
                        held.add(name)
                        continue
                    room -= 1
                future = self._executor.submit(self._poll_edge, terminal, now, cancel)
                terminal.in_flight = future
                future.add_done_callback(lambda _future: self._wake.set())
                started.append(future)
        return started, held

    def poll_due(
        self, now: datetime | None = None, *, cancel: threading.Event | None = None
    ) -> list[PollResult]:
        """Poll every terminal due at `now` (default: the clock) and wait for those polls; return
        their results ordered by terminal name. Suspect terminals held back for their share of the
        workers are polled as soon as a worker of that share is free."""
        at = now if now is not None else self._clock()
        results: list[PollResult] = []
        futures, held = self._submit_due(at, cancel)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            results.extend(future.result() for future in done)
            if held:
                more, held = self._submit_due(at, cancel, frozenset(r.device for r in results))
                pending |= set(more)
        return sorted(results, key=lambda result: result.device)

    def run(self, stop: threading.Event) -> None:
        """Poll on schedule until `stop` is set; then cancel polls in flight (their sessions notice
        within a fraction of a second and still re-enable their terminal) and return."""
        log.info("poller.started", terminals=len(self._terminals), workers=self._workers)
        try:
            while not stop.is_set():
                self._wake.clear()
                now = self._clock()
                _, held = self._submit_due(now, stop)
                with self._lock:
                    # A held-back terminal waits for a worker to finish (which wakes this loop).
                    waiting = [
                        t.next_due for name, t in self._terminals.items() if not _busy(t) and name not in held
                    ]
                wait = min(waiting, default=now + timedelta(seconds=_IDLE_WAIT_SECONDS)) - now
                self._wake.wait(min(max(wait.total_seconds(), 0.0), _IDLE_WAIT_SECONDS))
        finally:
            self.close()
            log.info("poller.stopped")

    def close(self) -> None:
        """Wait for polls in flight (cancel them first by setting the event given to run/poll_due)."""
        with self._lock:
            executors = [*self._retired, self._executor]
        for executor in executors:
            executor.shutdown(wait=True)

    # ------------------------------------------------------------------------------------ a poll

    def _poll_edge(self, terminal: _Terminal, now: datetime, cancel: threading.Event | None) -> PollResult:
        """Run one poll; the edge of a worker thread, so nothing escapes it."""
        started = self._timer()
        try:
            result = self._poll_terminal(terminal, now, cancel, started)
        # The edge of one terminal's poll: a bug must fail this poll (traceback logged), not the worker.
        except Exception as error:
            log.exception("poll.crashed", device=terminal.device.name)
            result = self._failed(terminal, now, f"internal error: {type(error).__name__}: {error}", started)
        with self._lock:
            terminal.in_flight = None
            terminal.next_due = result.next_due
            # Slow but successful polls count too: ten replies each just under the timeout hold a
            # worker as long as a dead terminal does.
            terminal.suspect = (
                terminal.failures > 0 or result.duration_ms >= self._poll.timeout_seconds * 1000
            )
        return result

    def _poll_terminal(
        self, terminal: _Terminal, now: datetime, cancel: threading.Event | None, started: float
    ) -> PollResult:
        device = terminal.device
        poll = self._poll
        try:
            checkpoint = self._store.checkpoint(device.name)
        except StoreError as error:
            return self._store_failed(terminal, now, error, started)
        if terminal.down is None:
            terminal.down = checkpoint is not None and checkpoint.down_since is not None
        known_serial: str | None = None
        known_count: int | None = None
        if checkpoint is not None and checkpoint.last_success is not None and checkpoint.serial:
            known_serial, known_count = checkpoint.serial, checkpoint.record_count
        digest = terminal.digest
        if digest is not None and (digest.serial != known_serial or digest.record_count != known_count):
            digest = None  # only trusted while it describes exactly what the store last saved
        # The count alone cannot show a log cleared and refilled to the same count between two polls:
        # now and then read the whole log anyway (the digest keeps an unchanged one cheap to store).
        if terminal.verified_at is None:
            # At start-up the checkpoint is trusted (a restart must not download every log at once), and
            # the terminals' hourly full reads are spread over the hour.
            terminal.verified_at = now - self._verify_every * self._jitter()
        verify = now - terminal.verified_at >= self._verify_every
        try:
            read = self._reader.read_log(
                device,
                timeout_seconds=poll.timeout_seconds,
                known_serial=known_serial,
                known_count=None if verify else known_count,
                known_digest=digest,
                ensure_enabled=terminal.ensure_enabled,
                now=self._clock,
                cancel=cancel,
            )
        except TerminalCancelled as error:
            log.info("poll.cancelled", device=device.name, reason=error.reason)
            return PollResult(device.name, False, now, error=error.reason, duration_ms=self._since(started))
        except TerminalError as error:
            return self._failed(terminal, now, error.reason, started)
        terminal.ensure_enabled = False
        state = read.state
        if known_serial is not None:
            if state.serial != known_serial:
                log.warning(
                    "terminal.swapped",
                    device=device.name,
                    old_serial=known_serial,
                    new_serial=state.serial,
                    action="storing its whole log as a new terminal",
                )
            elif known_count is not None and state.record_count < known_count:
                log.warning(
                    "terminal.log_reset",
                    device=device.name,
                    serial=state.serial,
                    old_count=known_count,
                    new_count=state.record_count,
                    action="re-reading the whole log; punches already stored are not queued again",
                )
        records = read.records
        if read.record_size == 8 and records:
            try:
                records = self._resolve_uids(terminal, state.serial, read)
            except StoreError as error:
                return self._store_failed(terminal, now, error, started)
        wall = self._clock()
        punches = (
            Classifier(
                device=device.name,
                serial=state.serial,
                tz=terminal.zone,
                now=wall,
                future_tolerance_seconds=poll.future_tolerance_seconds,
            ).classify_all(records)
            if read.downloaded
            else []
        )
        drift = state.drift_seconds
        try:
            new = self._store.save_poll(
                device.name,
                serial=state.serial,
                record_count=state.record_count,
                record_size=read.record_size,
                punches=punches,
                polled_at=wall,
                info=state.info,
                drift_seconds=drift,
            )
        except StoreError as error:
            return self._store_failed(terminal, now, error, started)
        if self._store_failing:
            self._store_failing = False
            log.info("store.recovered", device=device.name)
        if read.downloaded:
            terminal.digest = read.digest
            terminal.verified_at = now
        if new and self._on_new_punches is not None:
            self._on_new_punches()
        terminal.failures = 0
        if terminal.down:
            down_since = checkpoint.down_since if checkpoint is not None else None
            log.info(
                "terminal.recovered",
                device=device.name,
                down_for=describe_duration((wall - down_since).total_seconds()) if down_since else "unknown",
            )
        terminal.down = terminal.down_logged = False
        self._check_full(terminal, state.log_full, state.record_count, state.record_capacity)
        self._check_drift(terminal, drift, wall)
        quarantined = sum(1 for punch in punches if punch.quarantine_reason)
        duration_ms = self._since(started)
        (log.info if read.downloaded else log.debug)(
            "poll.finished",
            device=device.name,
            new=new,
            records=state.record_count,
            duration_ms=duration_ms,
            **({"quarantined": quarantined} if quarantined else {}),
        )
        return PollResult(
            device.name,
            True,
            now + timedelta(seconds=poll.interval_seconds),
            new=new,
            records=state.record_count,
            downloaded=read.downloaded,
            duration_ms=duration_ms,
        )

    def _resolve_uids(self, terminal: _Terminal, serial: str, read: LogRead) -> list[AttendanceRecord]:
        """Give 8-byte records the enroll numbers they were first stored under (see `UidNames`), saving
        the memo before the punches so a crash in between resolves them the same way next time."""
        if terminal.uid_names is None or terminal.uid_names[0] != serial:
            terminal.uid_names = (serial, self._store.uid_names(serial))
        names = terminal.uid_names[1]
        # Past this, a time is a garbled record or a clock far ahead (quarantined as in the future).
        horizon = (self._clock() + timedelta(days=1)).astimezone(terminal.zone).strftime("%Y-%m-%d %H:%M:%S")
        records = names.resolve(read.records, read.users_by_uid or {}, horizon)
        if names.changed:
            try:
                self._store.save_uid_names(serial, names)
            except StoreError:
                terminal.uid_names = None  # reload what the store really holds next time
                raise
            names.changed = False
        return records

    def _check_full(self, terminal: _Terminal, full: bool, records: int, capacity: int) -> None:
        """Warn once when a terminal's log reaches capacity (it then refuses or overwrites punches,
        which no poll can bring back), and once when there is room again."""
        if full and not terminal.log_full:
            log.warning(
                "terminal.log_full",
                device=terminal.device.name,
                records=records,
                capacity=capacity,
                effect="the terminal refuses or overwrites new punches; its whole log is read every poll",
                hint="clear the log at the terminal once `status` shows every punch delivered",
            )
        elif not full and terminal.log_full:
            log.info("terminal.log_space", device=terminal.device.name, records=records, capacity=capacity)
        terminal.log_full = full

    def _check_drift(self, terminal: _Terminal, drift: float | None, wall: datetime) -> None:
        """Log a clock drift beyond the threshold once (and once when it is back); set the clock when
        the terminal is configured with `sync_clock`."""
        if drift is None:
            return
        device = terminal.device
        threshold = self._poll.drift_threshold_seconds
        if abs(drift) <= threshold:
            if terminal.drifting:
                terminal.drifting = False
                log.info("terminal.clock_ok", device=device.name, drift_seconds=round(drift, 1))
            return
        if not terminal.drifting:
            terminal.drifting = True
            log.warning(
                "terminal.clock_drift",
                device=device.name,
                drift_seconds=round(drift, 1),
                threshold_seconds=threshold,
                sync_clock=device.sync_clock,
            )
        if device.sync_clock:
            try:
                self._reader.set_time(device, timeout_seconds=self._poll.timeout_seconds, at=self._clock())
            except TerminalError as error:
                log.warning("terminal.clock_set_failed", device=device.name, reason=error.reason)
            else:
                log.info("terminal.clock_set", device=device.name, was_off_by_seconds=round(drift, 1))

    def _failed(self, terminal: _Terminal, now: datetime, reason: str, started: float) -> PollResult:
        """Record a failed poll, log the terminal down once, back off."""
        device = terminal.device
        terminal.failures += 1
        terminal.ensure_enabled = True
        try:
            self._store.record_poll_failure(device.name, error=reason, at=self._clock())
        except StoreError as error:
            self._log_store_failure(device.name, error)
        if not terminal.down or not terminal.down_logged:
            terminal.down = terminal.down_logged = True
            log.warning("terminal.down", device=device.name, reason=reason)
        else:
            log.debug("poll.failed", device=device.name, reason=reason, failures=terminal.failures)
        delay = self.backoff_seconds(terminal.failures)
        return PollResult(
            device.name,
            False,
            now + timedelta(seconds=delay),
            error=reason,
            duration_ms=self._since(started),
        )

    def _store_failed(
        self, terminal: _Terminal, now: datetime, error: StoreError, started: float
    ) -> PollResult:
        """The store refused: nothing moved; try again at the normal interval (the terminal is fine)."""
        self._log_store_failure(terminal.device.name, error)
        return PollResult(
            terminal.device.name,
            False,
            now + timedelta(seconds=self._poll.interval_seconds),
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

    def backoff_seconds(self, failures: int) -> float:
        """Given consecutive failures (>= 1), return the wait before the next poll: the interval doubled
        per failure, capped at `backoff_max_seconds`, with "equal jitter" (between half and all of it)
        so that terminals behind one broken switch do not retry in lockstep."""
        poll = self._poll
        cap = max(poll.backoff_max_seconds, poll.interval_seconds)
        return Backoff(poll.interval_seconds, cap, jitter=self._jitter).seconds(failures)


def _busy(terminal: _Terminal) -> bool:
    """True while a poll of the terminal runs. A terminal replaced by a reload inherits its
    predecessor's future, which the predecessor's poll never clears: a finished one does not count."""
    return terminal.in_flight is not None and not terminal.in_flight.done()
