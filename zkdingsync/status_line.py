"""The line `systemctl status` shows (systemd's STATUS=): the worst current condition first, then counts.

    delivery paused: DingTalk rejected app_key/app_secret (errcode 40096: ...); 1 terminal down: gate;
    1/2 terminals ok, 12 pending, 0 parked

Conditions, worst first: delivery paused (needs the admin), delivery held (DingTalk failing, retried),
terminals down. Counting punches per state reads an index of every punch, so the whole line is sent every
`every_seconds`; the conditions are cheap (memory and one row per terminal) and are checked every tick,
so that a pause or a terminal going down shows at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from zkdingsync import systemd
from zkdingsync.model import Delivery
from zkdingsync.redaction import redact_text

_NAMES_SHOWN = 3  # terminals named in "N terminals down: ..." before "and N more"


class _Delivery(Protocol):
    @property
    def paused(self) -> str | None: ...

    @property
    def hold_until(self) -> datetime | None: ...


class _Checkpoint(Protocol):
    @property
    def device(self) -> str: ...

    @property
    def down_since(self) -> datetime | None: ...


class _Store(Protocol):
    def checkpoints(self) -> Sequence[_Checkpoint]: ...

    def delivery_counts(self) -> dict[Delivery, int]: ...


class StatusLine:
    """Builds and sends STATUS=; `tick()` from the daemon's main loop."""

    def __init__(
        self,
        store: _Store,
        delivery: _Delivery,
        terminal_names: Callable[[], Sequence[str]],
        *,
        clock: Callable[[], datetime],
        every_seconds: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._delivery = delivery
        self._names = terminal_names
        self._clock = clock
        self._every = every_seconds
        self._monotonic = monotonic
        self._due = 0.0
        self._shown: tuple[str, ...] | None = None

    def tick(self) -> None:
        """Send the line when it is due or when the conditions changed since the last one. Raise
        StoreError when the store cannot be read."""
        conditions = self.conditions()
        if self._monotonic() < self._due and conditions == self._shown:
            return
        systemd.status(self.text(conditions))
        self._shown = conditions
        self._due = self._monotonic() + self._every

    def conditions(self) -> tuple[str, ...]:
        """Return what is wrong now, worst first (empty when all is well)."""
        found: list[str] = []
        paused = self._delivery.paused
        if paused:
            found.append(f"delivery paused: {redact_text(paused)}")
        hold_until = self._delivery.hold_until
        if hold_until is not None and hold_until > self._clock():
            found.append("delivery held: DingTalk failing, retrying")
        _, down = self._terminals()
        if down:
            shown = ", ".join(down[:_NAMES_SHOWN])
            more = f" and {len(down) - _NAMES_SHOWN} more" if len(down) > _NAMES_SHOWN else ""
            found.append(f"{len(down)} terminal{'s' if len(down) != 1 else ''} down: {shown}{more}")
        return tuple(found)

    def text(self, conditions: Sequence[str] | None = None) -> str:
        """Return the whole line: the conditions (default: as they are now), then the counts."""
        if conditions is None:
            conditions = self.conditions()
        up, _ = self._terminals()
        counts = self._store.delivery_counts()
        pending = counts[Delivery.PENDING] + counts[Delivery.IN_FLIGHT]
        parked = counts[Delivery.PARKED]
        tally = f"{len(up)}/{len(self._names())} terminals ok, {pending} pending, {parked} parked"
        return "; ".join([*conditions, tally])

    def _terminals(self) -> tuple[list[str], list[str]]:
        """The configured terminals (polled at least once) that answer, and those that are down."""
        checkpoints = {checkpoint.device: checkpoint for checkpoint in self._store.checkpoints()}
        known = [name for name in self._names() if name in checkpoints]
        up = [name for name in known if checkpoints[name].down_since is None]
        return up, [name for name in known if checkpoints[name].down_since is not None]
