"""`zkdingsync backfill`: queue history punches (kept on first contact, never sent) of a window of days.

Every upload is a metered DingTalk call, so the command first says what the window costs against the calls
left this month, and refuses (exit 1) a window larger than that unless `--yes` is given. Like `retry`, it
only changes the store, without the instance lock: a running daemon sends the punches on its next rounds,
after any punch it has just read; a stopped one when it starts. Dates are read in each terminal's zone.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from zoneinfo import ZoneInfo

from zkdingsync.errors import StoreError, UserError
from zkdingsync.history import day_start_ms, parse_day
from zkdingsync.quota import call_month
from zkdingsync.store import Store

if TYPE_CHECKING:
    from zkdingsync.config import Config

__all__ = ["BackfillRequest", "backfill_command", "parse_day"]

_NO_END_MS = 2**62  # no --until: every history punch from --since on


@dataclass(frozen=True)
class _Window:
    """One terminal's share of the backfill: its name and the epoch-ms range its zone gives the dates."""

    device: str
    start_ms: int
    end_ms: int


def _windows(
    config: Config, store: Store, names: Sequence[str], since: date, until: date | None
) -> tuple[list[_Window], list[str]]:
    """The window of each named terminal (all with history when none are named), and notes to print."""
    zones = {device.name: device.timezone for device in config.devices}
    with_history = store.history_devices()
    notes: list[str] = []
    if names:
        unknown = [name for name in names if name not in zones and name not in with_history]
        if unknown:
            raise UserError(
                f"no terminal named {', '.join(map(repr, unknown))} in the configuration or the store "
                f"(configured: {', '.join(sorted(zones)) or 'none'})"
            )
        chosen = list(dict.fromkeys(names))
    else:
        chosen = sorted(set(zones) | set(with_history))
    windows = []
    for name in chosen:
        if name not in zones:
            notes.append(f"note: {name} is no longer configured; its dates are read in {config.timezone}")
        zone = ZoneInfo(zones.get(name, config.timezone))
        end_ms = _NO_END_MS if until is None else day_start_ms(until + timedelta(days=1), zone)
        windows.append(_Window(name, day_start_ms(since, zone), end_ms))
    return windows, notes


@dataclass(frozen=True)
class BackfillRequest:
    """What the admin asked for: the days (`until` None: no end), the terminals (none: all), the flags."""

    since: date
    until: date | None = None
    devices: tuple[str, ...] = ()
    dry_run: bool = False
    yes: bool = False


def backfill_command(
    config: Config,
    request: BackfillRequest,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    now: datetime | None = None,
) -> int:
    """Given a loaded Config and a request, queue the history punches of its window (of its terminals,
    or of every terminal) and print what that costs against this month's DingTalk calls.

    Return 0 when queued (or nothing to queue, or a dry run), 1 when the window needs more calls than are
    left this month and `yes` is not given, or when the store cannot be used. Raise UserError for a date
    range that ends before it starts or a terminal nobody knows.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    now = datetime.now(timezone.utc) if now is None else now
    if request.until is not None and request.until < request.since:
        raise UserError(f"--until {request.until} is before --since {request.since}")
    path = Path(config.store.path)
    if not path.exists():
        out.write(f"no store yet at {path}: nothing to backfill\n")
        return 0
    try:
        with Store.open(path, read_only=request.dry_run) as store:
            code = _backfill(config, store, request, out, err, now)
    except StoreError as error:
        err.write(f"zkdingsync backfill: cannot use the store: {error}\n")
        return 1
    out.flush()
    return code


def _backfill(
    config: Config, store: Store, request: BackfillRequest, out: TextIO, err: TextIO, now: datetime
) -> int:
    since, until = request.since, request.until
    windows, notes = _windows(config, store, request.devices, since, until)
    for note in notes:
        out.write(note + "\n")
    counts = {w.device: store.count_history(w.device, w.start_ms, w.end_ms) for w in windows}
    total = sum(counts.values())
    span = f"from {since}" + (f" to {until}" if until is not None else " on")
    for window in windows:
        out.write(f"{window.device}: {counts[window.device]} history punches {span}\n")
    month = call_month(now, ZoneInfo(config.timezone))
    quota = config.dingtalk.monthly_call_quota
    used = store.calls_in_month(month)
    left = max(0, quota - used)
    out.write(
        f"{total} upload{'s' if total != 1 else ''} ({total} DingTalk calls); {left} calls left this month "
        f"({month}: {used} of {quota} used)\n"
    )
    if total == 0:
        out.write("nothing to backfill\n")
        return 0
    refused = total > left and not request.yes
    if refused:
        err.write(
            f"zkdingsync backfill: {total} uploads is more than the {left} calls left in {month}; narrow the "
            "window (--until, --device), or add --yes to queue them anyway (delivery then pauses when the "
            "month's calls are spent and goes on by itself on the 1st)\n"
        )
    if request.dry_run:
        out.write("dry run: nothing queued\n")
        return 0
    if refused:
        return 1
    queued = sum(store.queue_history(w.device, w.start_ms, w.end_ms, now=now) for w in windows)
    out.write(
        f"queued {queued} punch{'es' if queued != 1 else ''}; the daemon sends them after the punches it "
        "reads meanwhile (or when it next starts)\n"
    )
    return 0
