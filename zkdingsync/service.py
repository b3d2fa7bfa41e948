"""The composition root and the daemon's main loop.

`run_daemon` wires the real adapters (terminal reader, SQLite store, DingTalk client) into the poller and
the forwarder, runs each in its own thread, and keeps the main loop for what must happen in one place:
signals (handlers only set flags), configuration reload on SIGHUP, the systemd watchdog and status line,
and the periodic summary. Tests and the demo run this same code through the real `zkdingsync run` process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Protocol
from zoneinfo import ZoneInfo

import structlog

from zkdingsync import systemd
from zkdingsync.alerts import CHECK_EVERY_SECONDS, Watch
from zkdingsync.config import Config, load_config
from zkdingsync.daily_report import DailyReport
from zkdingsync.dingtalk.client import DingTalkClient
from zkdingsync.dingtalk.robot import RobotNotifier
from zkdingsync.errors import ConfigError, StoreError, StoreLockedError, UserError
from zkdingsync.forwarder import Forwarder
from zkdingsync.history import HistoryPolicy
from zkdingsync.malloc import limit_arenas
from zkdingsync.mapping import UserMapper
from zkdingsync.model import Delivery, utc_now
from zkdingsync.poller import Poller
from zkdingsync.reload import ReloadAnswer, answer_path, publish
from zkdingsync.status_line import StatusLine
from zkdingsync.store import Store

log = structlog.get_logger(__name__)

# How long SIGTERM may take: the unit's TimeoutStopSec is 20 s, the contract says 10 s.
STOP_DEADLINE_SECONDS = 8.0
# How long the DingTalk calls in flight at a stop may still take before they are cut off.
CALL_GRACE_SECONDS = 2.0
# The main loop wakes at least this often (watchdog, status line, reload).
TICK_SECONDS = 1.0
SUMMARY_EVERY_SECONDS = 300.0
STATUS_EVERY_SECONDS = 10.0


class _Worker(Protocol):
    def run(self, stop: threading.Event) -> None: ...


@dataclass
class _Signals:
    """What the signal handlers saw; the main loop acts on it."""

    stop: threading.Event = field(default_factory=threading.Event)
    reload: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)

    def install(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.stop.set()
            self.wake.set()

        def on_reload(signum: int, frame: FrameType | None) -> None:
            self.reload.set()
            self.wake.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)


@dataclass
class _Summary:
    """Counters for the periodic `sync.summary` line."""

    last_at: float
    delivered_before: int
    stored_before: int


def _open_store(config: Config, clock: Callable[[], datetime]) -> Store:
    """Open the store with the instance lock, and adopt a backup restored in its place."""
    try:
        store = Store.open(config.store.path, lock=True)
        restored = store.adopt_restored_backup(clock())
    except StoreLockedError:
        raise
    except StoreError as error:
        # At start-up a store that cannot be opened is the admin's to fix (permissions, disk, path).
        raise UserError(f"cannot open the store: {error}") from error
    if restored is not None:
        log.warning(
            "store.restored_from_backup",
            taken_at=restored[0].isoformat(),
            pending_read_back=restored[1],
            note="pending punches are looked up in DingTalk before anything is sent again",
        )
    return store


def _notifier(config: Config, client: DingTalkClient) -> RobotNotifier | None:
    """The robot's notifier, started, when a robot is configured."""
    robot = config.dingtalk.robot
    if not robot:
        return None
    return RobotNotifier(
        client, robot.access_token, robot.secret, min_interval_seconds=robot.min_interval_seconds
    ).start()


def _watch(config: Config) -> Watch | None:
    """What the robot alerts on (terminal down, clock drift), when a robot is configured."""
    robot = config.dingtalk.robot
    if not robot:
        return None
    return Watch(timedelta(minutes=robot.terminal_down_minutes), config.poll.drift_threshold_seconds)


class Daemon:
    """The running service: one store, one poller, one forwarder, the main loop."""

    def __init__(
        self,
        config: Config,
        config_path: Path,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.signals = _Signals()
        self.store = _open_store(config, clock)
        self.client = DingTalkClient.from_settings(
            config.dingtalk, store=self.store, org_timezone=config.timezone
        )
        self.mapper = UserMapper(
            config.users.map,
            match_job_number=config.users.match_job_number,
            source=self.client,
            cache=self.store,
        )
        self.notifier = _notifier(config, self.client)
        self.watch = _watch(config)
        self.daily_report = self._daily_report()
        self.forwarder = self._forwarder()
        self.poller = Poller.from_config(
            config,
            store=self.store,
            on_new_punches=self.forwarder.wake,
            history=HistoryPolicy(config.delivery.since),
        )
        self.status_line = StatusLine(
            self.store, self.forwarder, self._terminal_names, clock=clock, every_seconds=STATUS_EVERY_SECONDS
        )
        self._threads: list[threading.Thread] = []
        self.crashed = False  # a worker thread died of a bug: exit 1 so that systemd restarts us
        self.abandoned = False  # a thread was still busy at the stop deadline

    def _terminal_names(self) -> list[str]:
        # Read at each call: a reload may change the configured terminals.
        return [device.name for device in self.config.devices]

    def _daily_report(self) -> DailyReport | None:
        robot = self.config.dingtalk.robot
        if not (robot and robot.daily_report_at and self.notifier):
            return None
        return DailyReport(
            self.store,
            self.notifier.notify,
            at=robot.daily_report_at,
            zone=ZoneInfo(self.config.timezone),
            terminals=self._terminal_names,
            quota=self.config.dingtalk.monthly_call_quota,
            clock=self.clock,
        )

    def _forwarder(self) -> Forwarder:
        dingtalk = self.config.dingtalk
        return Forwarder(
            self.store,
            self.client,
            self.mapper,
            rate_per_second=dingtalk.rate_per_second,
            concurrency=dingtalk.concurrency,
            monthly_call_quota=dingtalk.monthly_call_quota,
            settle_delay_seconds=dingtalk.readback_delay_seconds,
            stop_event=self.signals.stop,
            alert=self.notifier.notify if self.notifier else None,
        )

    def _start(self, name: str, worker: _Worker) -> None:
        def target() -> None:
            try:
                worker.run(self.signals.stop)
            except Exception:  # the edge of a worker thread: log the traceback, stop the daemon
                log.exception("worker.crashed", worker=name)
                self.crashed = True
                self.signals.stop.set()
                self.signals.wake.set()

        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code (0 after a clean stop)."""
        self.signals.install()
        self._start("poller", self.poller)
        self._start("forwarder", self.forwarder)
        systemd.ready()
        log.info(
            "daemon.started",
            terminals=len(self.config.devices),
            store=str(self.config.store.path),
            config=str(self.config_path),
        )
        summary = _Summary(time.monotonic(), *self._totals())
        interval = systemd.watchdog_interval()
        under_systemd = bool(os.environ.get("NOTIFY_SOCKET"))
        alerts_due = 0.0
        store_failing = False
        while not self.signals.stop.is_set():
            self.signals.wake.wait(min(TICK_SECONDS, interval / 2) if interval else TICK_SECONDS)
            self.signals.wake.clear()
            if self.signals.reload.is_set():
                self.signals.reload.clear()
                self.reload()
            systemd.watchdog()
            try:
                if under_systemd:
                    self.status_line.tick()
                if self.watch is not None and time.monotonic() >= alerts_due:
                    self._alert()
                    if self.daily_report is not None:
                        self.daily_report.check()
                    alerts_due = time.monotonic() + CHECK_EVERY_SECONDS
                if time.monotonic() - summary.last_at >= SUMMARY_EVERY_SECONDS:
                    summary = self._log_summary(summary)
            except StoreError as error:
                # The poller and forwarder report their own store trouble; this is only the bookkeeping.
                if not store_failing:
                    log.warning("daemon.store_unreadable", error=str(error))
                store_failing = True
            else:
                store_failing = False
        return self.stop()

    def stop(self) -> int:
        """Stop in order, within STOP_DEADLINE_SECONDS whatever a peer does; return 0 (1 after a crash).

        1. The workers get CALL_GRACE_SECONDS to finish the step in flight (an upload answered in time is
           recorded as delivered).
        2. The DingTalk calls still waiting are cut off and later ones refused (`client.abort`): nothing
           that hangs, drips or floods can hold the stop, and no token is asked for after it.
        3. The threads are joined (until the deadline).
        4. The last call counts are written and the store is closed: nothing writes after that.
        """
        systemd.stopping()
        log.info("daemon.stopping")
        self.forwarder.wake()  # an idle wait ends now rather than at its timeout
        started = time.monotonic()
        self._join(started + CALL_GRACE_SECONDS)
        self.client.abort()
        if self.notifier is not None:
            self.notifier.close()
        self._join(started + STOP_DEADLINE_SECONDS)
        stuck = [thread.name for thread in self._threads if thread.is_alive()]
        if stuck:
            # Whatever they were doing is safe to abandon: the store only moves on commit (and refuses
            # every write once closed), and uploads left in flight are settled by reading DingTalk back at
            # the next start.
            log.warning("daemon.stop_timeout", still_running=stuck)
            self.abandoned = True
        self.client.close()
        self.store.close()
        log.info("daemon.stopped")
        return 1 if self.crashed else 0

    def _join(self, deadline: float) -> None:
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def reload(self) -> None:
        """Re-read the configuration and apply it; keep the old one if the new one is invalid. Answer
        `zkdingsync reload` (the unit's ExecReload=) either way."""
        systemd.reloading()
        started = time.monotonic()
        try:
            # The store is already open: whether its directory is writable right now is not the config's
            # problem (a full disk must not block a reload).
            new = load_config(self.config_path, check_store=False)
        except ConfigError as error:
            log.error("config.reload_rejected", problems=error.problems, kept="previous configuration")
            systemd.ready()
            self._answer(ReloadAnswer(os.getpid(), started, applied=False, problems=tuple(error.problems)))
            return
        if new.store.path != self.config.store.path:
            log.warning("config.reload_store_path_ignored", kept=str(self.config.store.path))
        if new.dingtalk != self.config.dingtalk:
            # The client holds a token for the old app and a pool of connections: a restart is cleaner.
            log.warning(
                "config.reload_dingtalk_ignored", hint="restart the service to apply dingtalk changes"
            )
        self.poller.update_devices(new.devices, new.poll)
        self.poller.history = HistoryPolicy(new.delivery.since)  # for punches stored from now on
        self.mapper.update(new.users.map, match_job_number=new.users.match_job_number)
        self.config = new
        log.info("config.reloaded", terminals=len(new.devices))
        systemd.ready()
        self._answer(ReloadAnswer(os.getpid(), started, applied=True))

    def _answer(self, answer: ReloadAnswer) -> None:
        """Tell a waiting `zkdingsync reload` how the reload went (under systemd: RuntimeDirectory=)."""
        path = answer_path()
        if path is None:
            return
        try:
            publish(answer, path)
        except OSError as error:
            log.warning("config.reload_unanswered", path=str(path), error=error.strerror or str(error))

    def _alert(self) -> None:
        """Tell the group robot about terminals down for long, newly parked punches, clock drift."""
        if self.watch is None or self.notifier is None:
            return
        reasons = self.store.park_reasons(1)
        messages = self.watch.check(
            self.store.checkpoints(),
            self.store.count_in(Delivery.PARKED),
            reasons[0][0] if reasons else None,
            self.clock(),
            [device.name for device in self.config.devices],
        )
        for message in messages:
            self.notifier.notify(message)

    def _totals(self) -> tuple[int, int]:
        """(delivered, stored) punches so far: both only grow, so differences make the summary."""
        counts = self.store.delivery_counts()
        return counts[Delivery.DELIVERED], sum(counts.values())

    def _log_summary(self, summary: _Summary) -> _Summary:
        delivered, stored = self._totals()
        counts = self.store.delivery_counts()
        checkpoints = self.store.checkpoints()
        since = self.clock() - timedelta(seconds=time.monotonic() - summary.last_at)
        log.info(
            "sync.summary",
            polled=sum(1 for c in checkpoints if c.last_success and c.last_success >= since),
            new=stored - summary.stored_before,
            delivered=delivered - summary.delivered_before,
            pending=counts[Delivery.PENDING] + counts[Delivery.IN_FLIGHT],
            parked=counts[Delivery.PARKED],
            quarantined=counts[Delivery.QUARANTINED],
        )
        return _Summary(time.monotonic(), delivered, stored)


def run_daemon(config_path: Path, config: Config) -> int:
    """Given the config (loaded from `config_path`, re-read on SIGHUP), run the daemon until stopped and
    return the exit code. Raise StoreLockedError when another instance holds the store."""
    limit_arenas()  # before the poll and delivery threads start
    daemon = Daemon(config, config_path)
    code = daemon.run()
    if daemon.abandoned:
        # The interpreter's exit would join the pool threads still busy (a poll, a call): the store is
        # closed, nothing of theirs can be committed any more, so leave now rather than past TimeoutStopSec.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
