"""What `zkdingsync status` shows: terminals, delivery states and DingTalk health, read from the store.

`status` runs beside the daemon: it opens the store read-only without the instance lock (WAL lets it read
while the daemon writes) and never creates a store. It exits 0 when nothing needs attention and 1
otherwise, so a monitoring script can run `zkdingsync status --json` and alert on the exit code, then read
`needs_attention` for the reasons.

DingTalk's health is what the forwarder last published in the store (`Store.dingtalk_health`, see
`model.DingTalkHealth`): "ok", "paused: <reason>" while delivery is stopped for a human (credentials,
permission, quota), "error: <reason>" while calls fail transiently, and when it was written.

DingTalk calls are counted per month (`quota.call_month`, in the configured top-level timezone): the
client, the forwarder and `status` use the same function, so the count `status` reads is the one written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from zoneinfo import ZoneInfo

from zkdingsync.errors import StoreError
from zkdingsync.model import Delivery, HealthState
from zkdingsync.printable import printable
from zkdingsync.quota import QUOTA_WARNING_SHARE, RATE_DAYS, Forecast, call_month, forecast_month
from zkdingsync.redaction import redact_text
from zkdingsync.store import Checkpoint, Store

if TYPE_CHECKING:
    from zkdingsync.config import Config

HEALTH_PAUSED_PREFIX = f"{HealthState.PAUSED.value}:"
HEALTH_ERROR_PREFIX = f"{HealthState.ERROR.value}:"

# Thresholds of `needs_attention`.
DEFAULT_PENDING_AGE = timedelta(hours=1)
FULL_WARNING_FRACTION = 0.9
TOP_REASONS = 5

STATE_OK = "ok"
STATE_DOWN = "down"
STATE_NEVER_POLLED = "never polled"

_ERROR_WIDTH = 70


@dataclass(frozen=True)
class TerminalStatus:
    """One terminal as the store last saw it."""

    name: str
    state: str  # STATE_OK, STATE_DOWN or STATE_NEVER_POLLED
    serial: str | None
    firmware: str | None
    last_poll: datetime | None
    last_success: datetime | None
    last_error: str | None
    down_since: datetime | None
    records: int | None
    record_capacity: int | None
    drift_seconds: float | None
    new_today: int

    @property
    def fraction_full(self) -> float | None:
        """How full the terminal's attendance log is (0..1), or None when its capacity is unknown."""
        if self.records is None or not self.record_capacity:
            return None
        return self.records / self.record_capacity


@dataclass(frozen=True)
class ReasonCount:
    """A parking or quarantine reason and how many punches carry it."""

    reason: str
    count: int


@dataclass(frozen=True)
class DeliveryStatus:
    """How many punches are in each delivery state."""

    pending: int
    in_flight: int
    delivered_today: int
    delivered_total: int
    parked: int
    parked_reasons: tuple[ReasonCount, ...]
    quarantined: int
    quarantined_reasons: tuple[ReasonCount, ...]
    oldest_pending_stored_at: datetime | None
    outcome_unknown: int  # punches whose upload outcome was ever unknown (a duplicate may exist)
    history: int = 0  # kept but not queued: recorded before delivery began (`backfill` sends them)


@dataclass(frozen=True)
class DingTalkStatus:
    """DingTalk health as the forwarder last wrote it, and this month's call budget."""

    health: str | None  # None: the forwarder has not written it yet
    health_at: datetime | None
    month: str
    calls_this_month: int
    monthly_call_quota: int
    forecast: Forecast | None = None  # the month at the last 7 days' rate


@dataclass(frozen=True)
class StatusReport:
    """Everything `status` shows, as pure data (rendered by `render_text` / `render_json`)."""

    generated_at: datetime
    timezone: str
    store_path: str | None
    terminals: tuple[TerminalStatus, ...]
    delivery: DeliveryStatus
    dingtalk: DingTalkStatus
    drift_threshold_seconds: float | None
    pending_age_threshold: timedelta
    stale_after: timedelta | None  # a terminal not polled for longer means the daemon may be stopped


def start_of_day(at: datetime, zone: tzinfo) -> datetime:
    """Given a moment and a timezone, return local midnight of that day as an aware UTC datetime."""
    local = at.astimezone(zone)
    return datetime(local.year, local.month, local.day, tzinfo=zone).astimezone(timezone.utc)


def collect_status(
    store: Store,
    config_devices: Sequence[str] | None,
    now: datetime,
    *,
    month_quota: int,
    local_tz: tzinfo,
    drift_threshold_seconds: float | None = None,
    pending_age_threshold: timedelta = DEFAULT_PENDING_AGE,
    stale_after: timedelta | None = None,
    secrets: Collection[str] = (),
) -> StatusReport:
    """Given an open store, the configured terminal names (None: every terminal the store knows) and the
    current time, read everything `status` shows and return it as a StatusReport.

    Terminals in the config but absent from the store appear as "never polled"; terminals only in the
    store (removed from the config) are left out when names are given. Every text read from the store is
    scrubbed of `secrets`. Everything is read in one snapshot, so the figures agree with each other
    while the daemon writes. Raise StoreError when the store cannot be read.
    """
    with store.snapshot():
        return _collect(
            store,
            config_devices,
            now,
            month_quota=month_quota,
            local_tz=local_tz,
            drift_threshold_seconds=drift_threshold_seconds,
            pending_age_threshold=pending_age_threshold,
            stale_after=stale_after,
            secrets=secrets,
        )


def _collect(
    store: Store,
    config_devices: Sequence[str] | None,
    now: datetime,
    *,
    month_quota: int,
    local_tz: tzinfo,
    drift_threshold_seconds: float | None,
    pending_age_threshold: timedelta,
    stale_after: timedelta | None,
    secrets: Collection[str],
) -> StatusReport:
    today = start_of_day(now, local_tz)
    known = {checkpoint.device: checkpoint for checkpoint in store.checkpoints()}
    names = list(config_devices) if config_devices is not None else sorted(known)
    terminals = tuple(
        _terminal(name, known.get(name), store.punches_since(today, device=name), secrets) for name in names
    )
    return StatusReport(
        generated_at=now,
        timezone=str(local_tz),
        store_path=str(store.path),
        terminals=terminals,
        delivery=_delivery(store, today, secrets),
        dingtalk=_dingtalk(store, now, local_tz, month_quota, secrets),
        drift_threshold_seconds=drift_threshold_seconds,
        pending_age_threshold=pending_age_threshold,
        stale_after=stale_after,
    )


def _delivery(store: Store, today: datetime, secrets: Collection[str]) -> DeliveryStatus:
    counts = store.delivery_counts()
    return DeliveryStatus(
        pending=counts[Delivery.PENDING],
        in_flight=counts[Delivery.IN_FLIGHT],
        delivered_today=store.delivered_since(today),
        delivered_total=counts[Delivery.DELIVERED],
        parked=counts[Delivery.PARKED],
        parked_reasons=_reasons(store.park_reasons(TOP_REASONS), secrets),
        quarantined=counts[Delivery.QUARANTINED],
        quarantined_reasons=_reasons(store.park_reasons(TOP_REASONS, delivery=Delivery.QUARANTINED), secrets),
        oldest_pending_stored_at=store.oldest_stored_at(Delivery.PENDING),
        outcome_unknown=store.outcome_unknown_count(),
        history=counts[Delivery.HISTORY],
    )


def _dingtalk(
    store: Store, now: datetime, local_tz: tzinfo, month_quota: int, secrets: Collection[str]
) -> DingTalkStatus:
    health = store.dingtalk_health()
    month = call_month(now, local_tz)
    used = store.calls_in_month(month)
    local_day = now.astimezone(local_tz).date()
    forecast = forecast_month(
        used=used,
        calls_by_day=store.calls_by_day(
            (local_day - timedelta(days=RATE_DAYS)).isoformat(), local_day.isoformat()
        ),
        now=now,
        zone=local_tz,
        quota=month_quota,
        counting_since=store.first_counted_day(),
    )
    return DingTalkStatus(
        health=None if health is None else _scrub(health.text(), secrets),
        health_at=None if health is None else health.at,
        month=month,
        calls_this_month=used,
        monthly_call_quota=month_quota,
        forecast=forecast,
    )


def _terminal(
    name: str, checkpoint: Checkpoint | None, new_today: int, secrets: Collection[str]
) -> TerminalStatus:
    if checkpoint is None:
        return TerminalStatus(
            name=name,
            state=STATE_NEVER_POLLED,
            serial=None,
            firmware=None,
            last_poll=None,
            last_success=None,
            last_error=None,
            down_since=None,
            records=None,
            record_capacity=None,
            drift_seconds=None,
            new_today=new_today,
        )
    # A checkpoint written only by failures has no serial and no successful poll yet.
    down = checkpoint.down_since is not None or checkpoint.last_success is None
    return TerminalStatus(
        name=name,
        state=STATE_DOWN if down else STATE_OK,
        serial=checkpoint.serial,
        firmware=checkpoint.firmware,
        last_poll=checkpoint.last_poll,
        last_success=checkpoint.last_success,
        last_error=None if checkpoint.last_error is None else _scrub(checkpoint.last_error, secrets),
        down_since=checkpoint.down_since or (checkpoint.last_poll if down else None),
        records=checkpoint.record_count if checkpoint.last_success is not None else None,
        record_capacity=checkpoint.record_capacity,
        drift_seconds=checkpoint.drift_seconds,
        new_today=new_today,
    )


def _reasons(pairs: list[tuple[str, int]], secrets: Collection[str]) -> tuple[ReasonCount, ...]:
    return tuple(
        ReasonCount(_scrub(reason, secrets) or "(no reason recorded)", count) for reason, count in pairs
    )


def _scrub(text: str, secrets: Collection[str]) -> str:
    """Replace every secret (and every secret the logging set-up knows) inside `text` by `***`."""
    return redact_text(text, secrets)


# ---------------------------------------------------------------------------------------- what needs a human


def needs_attention(report: StatusReport) -> list[str]:
    """Given a report, return one line per thing a human should look at (empty when all is well)."""
    lines: list[str] = []
    for terminal in report.terminals:
        lines += _terminal_attention(terminal, report)
    return lines + _delivery_attention(report) + _dingtalk_attention(report)


def _terminal_attention(terminal: TerminalStatus, report: StatusReport) -> list[str]:
    now = report.generated_at
    zone = _zone(report)
    lines: list[str] = []
    if terminal.state == STATE_DOWN:
        since = _local(terminal.down_since, zone) if terminal.down_since else "?"
        why = f": {terminal.last_error}" if terminal.last_error else ""
        lines.append(f"terminal {terminal.name} is down since {since}{why}")
    if (
        report.stale_after is not None
        and terminal.last_poll is not None
        and now - terminal.last_poll > report.stale_after
    ):
        lines.append(
            f"terminal {terminal.name} was last polled {_age(now - terminal.last_poll)} ago "
            "(is the daemon running?)"
        )
    fraction = terminal.fraction_full
    if fraction is not None and fraction > FULL_WARNING_FRACTION:
        lines.append(
            f"terminal {terminal.name} is {fraction:.0%} full ({terminal.records} of "
            f"{terminal.record_capacity} records)"
        )
    threshold = report.drift_threshold_seconds
    if (
        threshold is not None
        and terminal.drift_seconds is not None
        and abs(terminal.drift_seconds) > threshold
    ):
        lines.append(
            f"terminal {terminal.name} clock is off by {terminal.drift_seconds:+.0f} s "
            f"(threshold {threshold:.0f} s)"
        )
    return lines


def _delivery_attention(report: StatusReport) -> list[str]:
    now = report.generated_at
    lines: list[str] = []
    delivery = report.delivery
    if delivery.parked:
        top = f" (most: {delivery.parked_reasons[0].reason})" if delivery.parked_reasons else ""
        lines.append(
            f"{delivery.parked} punch{_es(delivery.parked)} parked{top}; fix the cause, then run "
            "`zkdingsync retry`"
        )
    if delivery.quarantined:
        top = f" (most: {delivery.quarantined_reasons[0].reason})" if delivery.quarantined_reasons else ""
        lines.append(f"{delivery.quarantined} punch{_es(delivery.quarantined)} quarantined{top}")
    oldest = delivery.oldest_pending_stored_at
    if delivery.pending and oldest is not None and now - oldest > report.pending_age_threshold:
        lines.append(f"oldest pending punch has waited {_age(now - oldest)} for delivery")
    return lines


def _dingtalk_attention(report: StatusReport) -> list[str]:
    lines: list[str] = []
    health = report.dingtalk.health
    if health is not None and health.startswith(HEALTH_PAUSED_PREFIX):
        lines.append(f"DingTalk delivery is paused: {health[len(HEALTH_PAUSED_PREFIX) :].strip()}")
    elif health is not None and health.startswith(HEALTH_ERROR_PREFIX):
        lines.append(f"DingTalk calls are failing: {health[len(HEALTH_ERROR_PREFIX) :].strip()}")
    quota = report.dingtalk.monthly_call_quota
    calls = report.dingtalk.calls_this_month
    if quota > 0 and calls >= QUOTA_WARNING_SHARE * quota:
        lines.append(f"DingTalk calls this month: {calls} of {quota} ({calls / quota:.0%})")
    forecast = report.dingtalk.forecast
    if quota > 0 and forecast is not None and forecast.forecast > quota and calls < quota:
        runs_out = f"; the quota runs out on {forecast.exhausted_on}" if forecast.exhausted_on else ""
        lines.append(
            f"DingTalk calls this month are forecast at {forecast.forecast} of {quota} at the last "
            f"{RATE_DAYS} days' rate ({forecast.per_day:.0f} a day){runs_out}"
        )
    return lines


def _es(count: int) -> str:
    return "" if count == 1 else "es"


# ---------------------------------------------------------------------------------------- rendering


def render_json(report: StatusReport) -> str:
    """Given a report, return it as one JSON document (times ISO-8601 in the configured zone)."""
    zone = _zone(report)
    attention = needs_attention(report)
    document: dict[str, Any] = {
        "generated_at": _iso(report.generated_at, zone),
        "timezone": report.timezone,
        "store": report.store_path,
        "ok": not attention,
        "needs_attention": attention,
        "terminals": [_terminal_json(terminal, zone) for terminal in report.terminals],
        "delivery": _delivery_json(report.delivery, zone),
        "dingtalk": _dingtalk_json(report.dingtalk, zone),
    }
    return json.dumps(document, ensure_ascii=False, indent=2)


def _terminal_json(t: TerminalStatus, zone: tzinfo) -> dict[str, Any]:
    return {
        "name": t.name,
        "state": t.state,
        "reachable": t.state == STATE_OK,
        "serial": t.serial,
        "firmware": t.firmware,
        "last_poll": _iso(t.last_poll, zone),
        "last_success": _iso(t.last_success, zone),
        "last_error": t.last_error,
        "down_since": _iso(t.down_since, zone),
        "records": t.records,
        "record_capacity": t.record_capacity,
        "percent_full": None if t.fraction_full is None else round(t.fraction_full * 100, 1),
        "drift_seconds": t.drift_seconds,
        "new_today": t.new_today,
    }


def _delivery_json(delivery: DeliveryStatus, zone: tzinfo) -> dict[str, Any]:
    return {
        "pending": delivery.pending,
        "in_flight": delivery.in_flight,
        "delivered_today": delivery.delivered_today,
        "delivered_total": delivery.delivered_total,
        "parked": delivery.parked,
        "parked_reasons": [{"reason": r.reason, "count": r.count} for r in delivery.parked_reasons],
        "quarantined": delivery.quarantined,
        "quarantined_reasons": [{"reason": r.reason, "count": r.count} for r in delivery.quarantined_reasons],
        "oldest_pending_stored_at": _iso(delivery.oldest_pending_stored_at, zone),
        "outcome_unknown": delivery.outcome_unknown,
        "history": delivery.history,
    }


def _dingtalk_json(dingtalk: DingTalkStatus, zone: tzinfo) -> dict[str, Any]:
    quota = dingtalk.monthly_call_quota
    forecast = dingtalk.forecast
    return {
        "health": dingtalk.health,
        "health_at": _iso(dingtalk.health_at, zone),
        "month": dingtalk.month,
        "calls_this_month": dingtalk.calls_this_month,
        "monthly_call_quota": quota,
        "quota_used_percent": round(100 * dingtalk.calls_this_month / quota, 1) if quota else None,
        "calls_per_day": round(forecast.per_day, 1) if forecast else None,
        "forecast_calls_this_month": forecast.forecast if forecast else None,
        "quota_exhausted_on": (
            forecast.exhausted_on.isoformat() if forecast and forecast.exhausted_on else None
        ),
    }


def render_text(report: StatusReport) -> str:
    """Given a report, return it as a readable table for a terminal."""
    zone = _zone(report)
    lines = [
        f"zkdingsync status at {_local(report.generated_at, zone)} ({report.timezone}), "
        f"store {report.store_path}",
        "",
        *_terminals_text(report, zone),
        "",
        *_delivery_text(report),
        "",
        *_dingtalk_text(report.dingtalk, zone),
        "",
        *_attention_text(report),
    ]
    # Terminals supply serials, errors and enroll numbers (in park reasons): escaped, line by line.
    return "\n".join(printable(line) for line in lines) + "\n"


def _terminals_text(report: StatusReport, zone: tzinfo) -> list[str]:
    now = report.generated_at
    if not report.terminals:
        return ["Terminals", "  (no terminals)"]
    rows = [["NAME", "STATE", "LAST SUCCESS", "RECORDS", "DRIFT", "NEW TODAY", "LAST ERROR"]]
    for t in report.terminals:
        rows.append(
            [
                t.name,
                _terminal_state(t, zone),
                _when(t.last_success, now, zone),
                _records(t),
                "-" if t.drift_seconds is None else f"{round(t.drift_seconds) or 0:+d} s",
                str(t.new_today),
                _shorten(t.last_error or "-", _ERROR_WIDTH),
            ]
        )
    return ["Terminals", *("  " + line for line in _table(rows))]


def _delivery_text(report: StatusReport) -> list[str]:
    delivery = report.delivery
    oldest = delivery.oldest_pending_stored_at
    pending_note = (
        f" (oldest stored {_age(report.generated_at - oldest)} ago)" if delivery.pending and oldest else ""
    )
    lines = [
        "Delivery",
        f"  pending          {delivery.pending}{pending_note}",
        f"  in flight        {delivery.in_flight}",
        f"  delivered today  {delivery.delivered_today} (total {delivery.delivered_total})",
        f"  parked           {delivery.parked}",
    ]
    lines.extend(f"    {r.count:>6}  {r.reason}" for r in delivery.parked_reasons)
    lines.append(f"  quarantined      {delivery.quarantined}")
    lines.extend(f"    {r.count:>6}  {r.reason}" for r in delivery.quarantined_reasons)
    if delivery.history:
        lines.append(
            f"  history          {delivery.history} (kept, not sent: recorded before delivery began; "
            "`zkdingsync backfill` sends them)"
        )
    if delivery.outcome_unknown:
        lines.append(
            f"  unknown outcome  {delivery.outcome_unknown} (an upload's answer was lost; read back)"
        )
    return lines


def _dingtalk_text(dingtalk: DingTalkStatus, zone: tzinfo) -> list[str]:
    health = dingtalk.health or "unknown (nothing delivered yet)"
    health_at = f" (at {_local(dingtalk.health_at, zone)})" if dingtalk.health_at else ""
    quota = dingtalk.monthly_call_quota
    share = f" ({dingtalk.calls_this_month / quota:.0%})" if quota else ""
    lines = [
        "DingTalk",
        f"  health           {health}{health_at}",
        f"  calls {dingtalk.month}    {dingtalk.calls_this_month} of {quota}{share}",
    ]
    if dingtalk.forecast is not None:
        forecast = dingtalk.forecast
        runs_out = f", quota runs out on {forecast.exhausted_on}" if forecast.exhausted_on else ""
        lines.append(
            f"  forecast         {forecast.forecast} this month at {forecast.per_day:.0f} a day{runs_out}"
        )
    return lines


def _attention_text(report: StatusReport) -> list[str]:
    attention = needs_attention(report)
    if not attention:
        return ["Nothing needs attention."]
    return ["Needs attention", *(f"  - {line}" for line in attention)]


def _terminal_state(terminal: TerminalStatus, zone: tzinfo) -> str:
    if terminal.state == STATE_DOWN:
        return f"DOWN since {_local(terminal.down_since, zone)}" if terminal.down_since else "DOWN"
    return terminal.state


def _records(terminal: TerminalStatus) -> str:
    if terminal.records is None:
        return "-"
    if not terminal.record_capacity:
        return str(terminal.records)
    fraction = terminal.fraction_full or 0.0
    return f"{terminal.records} / {terminal.record_capacity} ({fraction:.0%})"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _zone(report: StatusReport) -> tzinfo:
    try:
        return ZoneInfo(report.timezone)
    except (ValueError, KeyError):
        return timezone.utc


def _iso(at: datetime | None, zone: tzinfo) -> str | None:
    return None if at is None else at.astimezone(zone).isoformat(timespec="seconds")


def _local(at: datetime | None, zone: tzinfo) -> str:
    return "-" if at is None else at.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


def _when(at: datetime | None, now: datetime, zone: tzinfo) -> str:
    if at is None:
        return "never"
    return f"{_local(at, zone)} ({_age(now - at)} ago)"


def _age(delta: timedelta) -> str:
    """A duration as a person reads it: "45 s", "12 min", "3 h 5 min", "2 d 4 h"."""
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


# ---------------------------------------------------------------------------------------- the command


def config_secrets(config: Config) -> list[str]:
    """Given a Config, return the secret values that must never appear in `status` output."""
    values: list[str | None] = [config.dingtalk.app_secret]
    if config.dingtalk.robot is not None:
        values += [config.dingtalk.robot.access_token, config.dingtalk.robot.secret]
    values += [str(device.comm_key) for device in config.devices if device.comm_key]
    return [value for value in values if value]


def stale_after(config: Config) -> timedelta:
    """Given a Config, return how long a terminal may go unpolled before the daemon looks stopped.

    A down terminal is retried at most every `backoff_max_seconds`, so allow that plus a few intervals.
    """
    interval = config.poll.interval_seconds
    slowest = max(3 * interval, config.poll.backoff_max_seconds + 2 * interval + config.poll.timeout_seconds)
    return timedelta(seconds=max(slowest, 300.0))


def status_command(
    config: Config,
    *,
    as_json: bool,
    out: TextIO | None = None,
    err: TextIO | None = None,
    now: datetime | None = None,
) -> int:
    """Given a loaded Config, print the status (text or one JSON document) and return the exit code.

    Return 0 when nothing needs attention, 1 when something does or when the store is missing or
    unreadable. The store is opened read-only without the instance lock, so this works while the daemon
    runs, and is never created: a missing store is reported as such.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    now = datetime.now(timezone.utc) if now is None else now
    zone = ZoneInfo(config.timezone)
    path = Path(config.store.path)
    if not path.exists():
        return _fail(f"no store yet at {path} (has the daemon run?)", as_json, out, err, now, zone)
    try:
        # Read-only: nothing is created or migrated, even when root runs this beside the daemon.
        with Store.open(path, read_only=True) as store:
            report = collect_status(
                store,
                [device.name for device in config.devices],
                now,
                month_quota=config.dingtalk.monthly_call_quota,
                local_tz=zone,
                drift_threshold_seconds=config.poll.drift_threshold_seconds,
                stale_after=stale_after(config),
                secrets=config_secrets(config),
            )
    except StoreError as error:
        return _fail(f"cannot read the store: {error}", as_json, out, err, now, zone)
    out.write(render_json(report) + "\n" if as_json else render_text(report))
    out.flush()
    return 0 if not needs_attention(report) else 1


def _fail(message: str, as_json: bool, out: TextIO, err: TextIO, now: datetime, zone: tzinfo) -> int:
    if as_json:
        # Monitoring scripts parse stdout: give them a document that says what is wrong.
        document = {
            "generated_at": now.astimezone(zone).isoformat(timespec="seconds"),
            "ok": False,
            "error": message,
            "needs_attention": [message],
        }
        out.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
        out.flush()
    else:
        err.write(f"zkdingsync status: {message}\n")
        err.flush()
    return 1
