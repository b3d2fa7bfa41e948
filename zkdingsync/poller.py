"""Polls every terminal on its own schedule (one poll is `terminal_poll.TerminalPoll`).

One schedule per terminal (its next due time); due polls run on a bounded thread pool, so one slow or
hostile terminal occupies one worker and never delays the others; slow or failing terminals get at
most half of the workers. Failures back off exponentially with jitter by moving the next due time (a
worker never sleeps). Whole-log reads share a few slots (`poll.max_full_reads`), so a first start on
many big terminals neither exhausts memory nor stalls the small polls. A reload applies new poll
settings from each terminal's next poll: a shorter interval cuts the wait already running.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime, timedelta

import structlog

from zkdingsync.backoff import Backoff
from zkdingsync.devices.zk import ZkReader
from zkdingsync.history import HistoryPolicy
from zkdingsync.model import utc_now
from zkdingsync.store import Store
from zkdingsync.terminal_names import TerminalNames
from zkdingsync.terminal_poll import (
    VERIFY_EVERY,
    ConfigLike,
    FullReadSlots,
    PolledDevice,
    PolledTerminal,
    PollResult,
    PollSettings,
    TerminalPoll,
    TerminalReader,
)

__all__ = [
    "VERIFY_EVERY",
    "ConfigLike",
    "PollResult",
    "PollSettings",
    "PolledDevice",
    "Poller",
    "TerminalReader",
]

log = structlog.get_logger(__name__)

_IDLE_WAIT_SECONDS = 0.5  # longest wait of the run loop: how fast it notices stop and reloads


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
        history: HistoryPolicy | None = None,
    ) -> None:
        """Given the terminals, the store and the poll settings, prepare a poller (no thread started).

        `clock` gives aware UTC wall-clock time (stamps, clock drift, quarantine); `reader` is the
        terminal adapter; `jitter` returns a float in [0, 1) for backoff jitter (tests pin it); `timer`
        measures poll durations (monotonic seconds). `history` keeps punches recorded before delivery
        begins out of the queue (see `zkdingsync.history`; None: every new punch is queued).
        """
        self.history = history  # replaced whole by a reload
        self._poll = poll
        self._clock = clock
        adapter = ZkReader()
        self._reader: TerminalReader = reader if reader is not None else adapter
        # With the real adapter, the names of the terminals' users are kept for HR's export.
        names = (
            TerminalNames(store, adapter, timeout=lambda: self._poll.timeout_seconds)
            if reader is None
            else None
        )
        self._jitter = jitter if jitter is not None else random.Random().random  # noqa: S311 - not crypto
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._slots = FullReadSlots(poll.max_full_reads)
        self._slots.on_release = self._wake.set
        self._one = TerminalPoll(
            store,
            self._reader,
            settings=lambda: self._poll,
            clock=clock,
            timer=timer,
            slots=self._slots,
            backoff=self.backoff_seconds,
            verify_every=verify_every,
            jitter=self._jitter,
            on_new_punches=on_new_punches,
            history=lambda: self.history,
            names=names,
        )
        now = clock()
        self._terminals: dict[str, PolledTerminal] = {d.name: PolledTerminal(d, now) for d in devices}
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
        history: HistoryPolicy | None = None,
    ) -> Poller:
        """Given a loaded Config and the store, return a poller of its terminals with the real adapter."""
        return cls(
            config.devices,
            store,
            poll=config.poll,
            clock=clock,
            reader=reader,
            on_new_punches=on_new_punches,
            history=history,
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
                self._apply_settings(poll)
            old = self._terminals
            fresh: dict[str, PolledTerminal] = {}
            for device in devices:
                kept = old.get(device.name)
                if kept is not None and kept.device == device:
                    fresh[device.name] = kept
                    continue
                terminal = PolledTerminal(device, now)
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

    def _apply_settings(self, poll: PollSettings) -> None:
        """Take reloaded poll settings (lock held). A changed interval applies from each terminal's
        next poll: a healthy terminal's wait already running is measured again from its last poll."""
        interval = timedelta(seconds=poll.interval_seconds)
        changed = poll.interval_seconds != self._poll.interval_seconds
        self._poll = poll
        self._slots.limit = poll.max_full_reads
        if not changed:
            return
        for terminal in self._terminals.values():
            if terminal.failures == 0 and terminal.last_success is not None and not terminal.busy():
                terminal.next_due = terminal.last_success + interval

    def _held_back(self) -> int:
        """How many suspect terminals (failing, or slow at their last poll) may start a poll now: at
        most half the workers go to them, so they cannot starve the healthy ones."""
        limit = max(1, self._workers // 2)
        return limit - sum(1 for t in self._terminals.values() if t.suspect and t.busy())

    def _submit_due(
        self,
        now: datetime,
        cancel: threading.Event | None,
        skip: frozenset[str] = frozenset(),
        force: frozenset[str] = frozenset(),
    ) -> tuple[list[Future[PollResult]], set[str]]:
        """Start a poll for every terminal due at `now` (or named in `force`) that has none in flight
        (except `skip`); return the polls started and the due terminals held back (suspects over their
        share)."""
        started: list[Future[PollResult]] = []
        held: set[str] = set()
        with self._lock:
            room = self._held_back()
            for name, terminal in self._terminals.items():
                if terminal.busy() or (terminal.next_due > now and name not in force) or name in skip:
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
        workers, and terminals waiting for a full-read slot, are polled again as soon as a worker of
        that share or a slot is free."""
        at = now if now is not None else self._clock()
        results: list[PollResult] = []
        futures, held = self._submit_due(at, cancel)
        pending = set(futures)
        waiting: set[str] = set()
        while pending or waiting:
            if not pending:  # nothing in flight holds a slot any more
                more, _ = self._submit_due(at, cancel, force=frozenset(waiting))
                pending, waiting = set(more), set()
                continue
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            finished = [future.result() for future in done]
            waiting |= {result.device for result in finished if result.waiting}
            results.extend(result for result in finished if not result.waiting)
            freed = any(not result.waiting for result in finished)
            if held or (waiting and freed):
                retry = frozenset(waiting) if freed else frozenset()
                skip = frozenset(r.device for r in results)
                more, held = self._submit_due(at, cancel, skip, force=retry)
                pending |= set(more)
                waiting -= retry
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
                        t.next_due for name, t in self._terminals.items() if not t.busy() and name not in held
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

    def _poll_edge(
        self, terminal: PolledTerminal, now: datetime, cancel: threading.Event | None
    ) -> PollResult:
        """Run one poll (on a worker) and reschedule its terminal."""
        result = self._one.run(terminal, now, cancel)
        with self._lock:
            terminal.in_flight = None
            terminal.next_due = result.next_due
            # Slow but successful polls count too: ten replies each just under the timeout hold a
            # worker as long as a dead terminal does.
            terminal.suspect = (
                terminal.failures > 0 or result.duration_ms >= self._poll.timeout_seconds * 1000
            )
        return result

    def backoff_seconds(self, failures: int) -> float:
        """Given consecutive failures (>= 1), return the wait before the next poll: the interval doubled
        per failure, capped at `backoff_max_seconds`, with "equal jitter" (between half and all of it)
        so that terminals behind one broken switch do not retry in lockstep."""
        poll = self._poll
        cap = max(poll.backoff_max_seconds, poll.interval_seconds)
        return Backoff(poll.interval_seconds, cap, jitter=self._jitter).seconds(failures)
