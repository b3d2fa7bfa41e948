"""What the DingTalk group robot is told: terminals down for long, punches parked, clock drift.

`Watch` looks at the store's checkpoints and delivery counts (cheap reads) and returns the messages to send,
each once when a condition starts and once when it ends; the daemon's main loop calls it every
`CHECK_EVERY_SECONDS` and hands the messages to the robot notifier, which paces and sends them without
ever blocking anything. Delivery pauses (credentials, quota) are told by the forwarder itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from zkdingsync.store import Checkpoint
from zkdingsync.timeconv import describe_duration

CHECK_EVERY_SECONDS = 5.0


@dataclass
class Watch:
    """Turns store readings into robot messages, each condition told once when it starts and ends."""

    terminal_down_after: timedelta
    drift_threshold_seconds: float
    _down: set[str] = field(default_factory=set)
    _drifting: set[str] = field(default_factory=set)
    _parked: int | None = None

    def check(
        self,
        checkpoints: Sequence[Checkpoint],
        parked: int,
        top_reason: str | None,
        now: datetime,
        devices: Sequence[str],
    ) -> list[str]:
        """Given the checkpoints of the configured terminals, how many punches are parked, the most
        frequent park reason and the time, return the messages to send now."""
        messages: list[str] = []
        configured = set(devices)
        for checkpoint in checkpoints:
            name = checkpoint.device
            if name not in configured:
                continue
            down_for = now - checkpoint.down_since if checkpoint.down_since else None
            if down_for is not None and down_for >= self.terminal_down_after and name not in self._down:
                self._down.add(name)
                how_long = describe_duration(down_for.total_seconds())
                messages.append(
                    f"zkdingsync: terminal {name} unreachable for {how_long} "
                    f"({checkpoint.last_error or 'no answer'}); its punches wait on it until it is back"
                )
            elif down_for is None and name in self._down:
                self._down.discard(name)
                messages.append(f"zkdingsync: terminal {name} is reachable again; polling resumed")
            drift = checkpoint.drift_seconds
            drifting = drift is not None and abs(drift) > self.drift_threshold_seconds
            if drifting and name not in self._drifting:
                self._drifting.add(name)
                messages.append(f"zkdingsync: terminal {name} clock is off by {drift:+.0f} s; check its time")
            elif not drifting and name in self._drifting:
                self._drifting.discard(name)
                messages.append(f"zkdingsync: terminal {name} clock is right again")
        if self._parked is not None and parked > self._parked:
            messages.append(
                f"zkdingsync: {parked} punches parked (most: {top_reason or 'see zkdingsync status'}); "
                "fix the cause, then run `zkdingsync retry`"
            )
        self._parked = parked
        return messages
