"""`zkdingsync probe --budget`: how many DingTalk calls a month this office's punches need.

Every punch costs one metered upload call (DingTalk has no batch upload), so the punches per day over the
last 30 days, per terminal, tell which edition's monthly quota covers the office. They are counted from
the store (every punch it holds, whatever its delivery state), or, while the store is new and holds none,
from the terminals' own logs (read like a poll, nothing stored).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from zoneinfo import ZoneInfo

from zkdingsync.devices.zk import KnownLog, read_log
from zkdingsync.errors import StoreError, TerminalError, UserError
from zkdingsync.model import utc_now
from zkdingsync.quota import edition_for
from zkdingsync.store import Store

if TYPE_CHECKING:
    from zkdingsync.config import Config, DeviceConfig

DAYS = 30
MONTH_DAYS = 30

# Per terminal: day ("2026-11-19") -> punches; or the reason it could not be read.
DailyCounts = dict[str, dict[str, int] | str]
LogCounter = Callable[["DeviceConfig", str], dict[str, int]]


def _from_store(path: Path, devices: Sequence[DeviceConfig], first_day: str) -> DailyCounts | None:
    """The store's counts, or None when it holds no punch of these terminals (a new store)."""
    if not path.exists():
        return None
    with Store.open(path, read_only=True) as store:
        per_device = store.punches_per_day(first_day)
    if not any(per_device.get(device.name) for device in devices):
        return None
    return {device.name: per_device.get(device.name, {}) for device in devices}


def count_log(device: DeviceConfig, first_day: str, *, timeout_seconds: float = 10.0) -> dict[str, int]:
    """Given a terminal, read its whole log and return its punches per day from `first_day` on. Raise
    TerminalError."""
    read = read_log(device, timeout_seconds, known=KnownLog.NOTHING)
    counts: dict[str, int] = {}
    for record in read.records:
        day = record.local_time[:10]
        if day >= first_day:
            counts[day] = counts.get(day, 0) + 1
    return counts


def _from_terminals(devices: Sequence[DeviceConfig], first_day: str, counter: LogCounter) -> DailyCounts:
    def one(device: DeviceConfig) -> dict[str, int] | str:
        try:
            return counter(device, first_day)
        except TerminalError as error:
            return error.reason

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(devices))), thread_name_prefix="probe") as pool:
        return dict(zip((d.name for d in devices), pool.map(one, devices), strict=True))


def format_budget(
    counts: Mapping[str, dict[str, int] | str],
    *,
    first_day: date,
    today: date,
    source: str,
    quota: int,
) -> str:
    """Given the punches per day of each terminal (or why it could not be read), return the report."""
    lines = [f"Punches per day, {first_day} to {today} ({source})"]
    totals: dict[str, int] = {}
    observed_from = today
    width = max((len(name) for name in counts), default=4)
    for name, days in counts.items():
        if isinstance(days, str):
            lines.append(f"  {name:<{width}}  FAILED: {days}")
            continue
        for day, count in days.items():
            totals[day] = totals.get(day, 0) + count
            observed_from = min(observed_from, date.fromisoformat(day))
        busiest = max(days.items(), key=lambda item: item[1], default=None)
        peak = f", busiest {busiest[0]} with {busiest[1]}" if busiest else ""
        lines.append(f"  {name:<{width}}  {sum(days.values()):>8} punches{peak}")
    lines.append("  day         punches (all terminals)")
    for offset in range((today - first_day).days + 1):
        key = (first_day + timedelta(days=offset)).isoformat()
        if key in totals:
            lines.append(f"  {key}  {totals[key]:>8}")
    span = (today - observed_from).days + 1
    per_day = sum(totals.values()) / span
    monthly = round(per_day * MONTH_DAYS)
    lines.append(
        f"About {per_day:,.0f} punches a day over {span} day{'s' if span != 1 else ''}: about {monthly:,} "
        f"upload calls a month (one per punch; read-backs add a few)."
    )
    lines.append(f"Covered by: {edition_for(monthly)}.")
    verdict = "enough" if monthly <= quota else "NOT enough (set your edition's quota, or expect 90020)"
    lines.append(f"dingtalk.monthly_call_quota is {quota:,}: {verdict}.")
    return "\n".join(lines) + "\n"


def probe_budget(
    config: Config,
    names: Sequence[str] = (),
    *,
    out: TextIO | None = None,
    now: Callable[[], datetime] = utc_now,
    counter: LogCounter | None = None,
) -> int:
    """Given the config and terminal names (all when empty), print the punches per day of the last 30
    days, the monthly calls they imply and the edition that covers them; return 0 (1 when the counts had
    to come from terminals and none answered). Raise UserError for an unknown name."""
    stream = out if out is not None else sys.stdout
    devices = list(config.devices)
    if names:
        unknown = sorted(set(names) - {device.name for device in devices})
        if unknown:
            raise UserError(f"no terminal named {', '.join(map(repr, unknown))} in the configuration")
        devices = [device for device in devices if device.name in set(names)]
    today = now().astimezone(ZoneInfo(config.timezone)).date()
    first_day = today - timedelta(days=DAYS - 1)
    try:
        counts = _from_store(Path(config.store.path), devices, first_day.isoformat())
    except StoreError as error:
        raise UserError(f"cannot read the store: {error}") from error
    source = "from the store"
    if counts is None:
        source = "from the terminals: the store holds no punches yet"
        timeout = config.poll.timeout_seconds

        def default_counter(device: DeviceConfig, first: str) -> dict[str, int]:
            return count_log(device, first, timeout_seconds=timeout)

        counts = _from_terminals(devices, first_day.isoformat(), counter or default_counter)
    stream.write(
        format_budget(
            counts, first_day=first_day, today=today, source=source, quota=config.dingtalk.monthly_call_quota
        )
    )
    answered = [days for days in counts.values() if not isinstance(days, str)]
    return 0 if answered or not counts else 1
