"""What the journal is told about one terminal, each once: down and recovered (with the outage length),
swapped, log cleared, log full and room again, clock drift and back, no offset reads."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import structlog

from zkdingsync.timeconv import describe_duration

log = structlog.get_logger(__name__)


class _CheckpointLike(Protocol):
    @property
    def down_since(self) -> datetime | None: ...


class TerminalHealth:
    """One terminal's conditions as this process has logged them (a restart logs a standing one again)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.is_down: bool | None = None  # unknown until the first poll reads the checkpoint
        self.down_logged = False  # this process has said so
        self.drifting = False
        self.log_full = False
        self.offset_reads_logged = False

    def learn_down(self, checkpoint: _CheckpointLike | None) -> None:
        """At the first poll, take over whether the store says the terminal is down."""
        if self.is_down is None:
            self.is_down = checkpoint is not None and checkpoint.down_since is not None

    def down(self, reason: str, failures: int) -> None:
        """A poll failed: log the terminal down once (per outage and process)."""
        if not self.is_down or not self.down_logged:
            self.is_down = self.down_logged = True
            log.warning("terminal.down", device=self.device, reason=reason)
        else:
            log.debug("poll.failed", device=self.device, reason=reason, failures=failures)

    def up(self, down_since: datetime | None, wall: datetime) -> None:
        """A poll succeeded: log the recovery once, with how long the terminal was down."""
        if self.is_down:
            log.info(
                "terminal.recovered",
                device=self.device,
                down_for=describe_duration((wall - down_since).total_seconds()) if down_since else "unknown",
            )
        self.is_down = self.down_logged = False

    def check_identity(self, old_serial: str, old_count: int, serial: str, count: int) -> None:
        """Log a swapped terminal (new serial) or a cleared log (fewer records than stored)."""
        if serial != old_serial:
            log.warning(
                "terminal.swapped",
                device=self.device,
                old_serial=old_serial,
                new_serial=serial,
                action="storing its whole log as a new terminal",
            )
        elif count < old_count:
            log.warning(
                "terminal.log_reset",
                device=self.device,
                serial=serial,
                old_count=old_count,
                new_count=count,
                action="re-reading the whole log; punches already stored are not queued again",
            )

    def no_offset_reads(self, problem: str) -> None:
        """Log once that the firmware cannot read from an offset (the terminal is read whole from now)."""
        if not self.offset_reads_logged:
            self.offset_reads_logged = True
            # Not a fault to fix: the firmware is what it is, and nothing is lost; so not a warning.
            log.info(
                "terminal.no_tail_reads",
                device=self.device,
                reason=problem,
                effect="its whole log is read whenever it changes; nothing is lost",
            )

    def check_full(self, full: bool, records: int, capacity: int) -> None:
        """Warn once when a terminal's log reaches capacity (it then refuses or overwrites punches,
        which no poll can bring back), and once when there is room again."""
        if full and not self.log_full:
            log.warning(
                "terminal.log_full",
                device=self.device,
                records=records,
                capacity=capacity,
                effect="the terminal refuses or overwrites new punches; each poll reads the log's end",
                hint="clear the log at the terminal once `status` shows every punch delivered",
            )
        elif not full and self.log_full:
            log.info("terminal.log_space", device=self.device, records=records, capacity=capacity)
        self.log_full = full

    def check_drift(self, drift: float | None, threshold: float, sync_clock: bool) -> bool:
        """Log a clock drift beyond `threshold` once (and once when it is back); return True while the
        clock is off (the caller sets it when the terminal is configured with `sync_clock`)."""
        if drift is None:
            return False
        if abs(drift) <= threshold:
            if self.drifting:
                self.drifting = False
                log.info("terminal.clock_ok", device=self.device, drift_seconds=round(drift, 1))
            return False
        if not self.drifting:
            self.drifting = True
            log.warning(
                "terminal.clock_drift",
                device=self.device,
                drift_seconds=round(drift, 1),
                threshold_seconds=threshold,
                sync_clock=sync_clock,
            )
        return True
