"""The `probe` command: connect to terminals and report what each says about itself.

Per terminal: serial, firmware, platform, clock and its drift from this host, users and records against
capacity (a warning above 90 % full: a full log refuses or overwrites punches), and whether it serves tail
reads (a read of its log from an offset, which lets each poll read only the new records; checked with a
few dozen bytes). Terminals are probed concurrently; one failing terminal gets its one-line reason and does
not stop the others. The attendance log is never downloaded and nothing is written to the store. With
`--users` the enrolled users are listed too, each with the DingTalk userid `users.map` gives it: the
quickest way to write that map.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TextIO

from zkdingsync.devices.zk import TerminalState, probe_offset_reads, read_info, read_users
from zkdingsync.errors import TerminalError, UserError
from zkdingsync.mapping import enroll_key
from zkdingsync.model import TerminalUser, utc_now
from zkdingsync.poller import ConfigLike, PolledDevice
from zkdingsync.printable import printable
from zkdingsync.timeconv import describe_duration

FULL_WARNING_RATIO = 0.9

Prober = Callable[[PolledDevice, float], TerminalState]


def _percent(used: int, capacity: int) -> str:
    return f" ({used * 100 // capacity} %)" if capacity > 0 else ""


def describe_drift(drift_seconds: float) -> str:
    """Given terminal-minus-host seconds, return "in step with this host" or "3 min ahead of ..."."""
    if abs(drift_seconds) < 1.5:  # the terminal clock has one-second resolution
        return "in step with this host"
    side = "ahead of" if drift_seconds > 0 else "behind"
    return f"{describe_duration(drift_seconds)} {side} this host"


def format_users(enrolled: Sequence[TerminalUser], user_map: Mapping[str, str]) -> str:
    """Given a terminal's enrolled users and `users.map`, return one line each (enroll number, name,
    DingTalk userid or "not in users.map") and a count of the unmapped."""
    if not enrolled:
        return "  enrolled:  nobody\n"
    width = max(len(user.enroll_number) for user in enrolled)
    lines = ["  enrolled:"]
    unmapped = 0
    for user in sorted(enrolled, key=lambda u: (len(u.enroll_number), u.enroll_number)):
        userid = user_map.get(enroll_key(user.enroll_number))
        unmapped += userid is None
        target = f"-> {userid}" if userid else "(not in users.map)"
        lines.append(f"    {user.enroll_number:>{width}}  {user.name or '-'}  {target}")
    lines.append(f"  {len(enrolled)} enrolled, {unmapped} not in users.map")
    return "\n".join(lines) + "\n"


def format_report(
    device: PolledDevice,
    outcome: TerminalState | TerminalError,
    drift_threshold_seconds: float,
    tail_reads: str | None = None,
) -> tuple[str, bool]:
    """Given a terminal, what probing it gave and (when checked) whether it serves tail reads ("yes",
    "no (why)", "untested (why)"), return (report text, ok)."""
    where = f"{device.host}:{device.port} {device.protocol}"
    if isinstance(outcome, TerminalError):
        return f"{device.name} ({where}): FAILED: {outcome.reason}\n", False
    state = outcome
    lines = [f"{device.name} ({where}): ok"]
    lines.append(f"  serial:    {state.serial}")
    lines.append(f"  firmware:  {state.firmware or '?'}")
    lines.append(f"  platform:  {state.platform or '?'}")
    if state.clock is None:
        lines.append(
            f"  clock:     {state.clock_text} (an impossible date: WARNING, set the terminal's clock)"
        )
    else:
        drift = state.drift_seconds or 0.0
        warning = (
            f"  WARNING: beyond the {drift_threshold_seconds:g} s threshold"
            if abs(drift) > drift_threshold_seconds
            else ""
        )
        lines.append(f"  clock:     {state.clock_text} {device.timezone} ({describe_drift(drift)}){warning}")
    lines.append(
        f"  users:     {state.users} / {state.user_capacity}{_percent(state.users, state.user_capacity)}"
    )
    full = state.record_capacity > 0 and state.record_count > FULL_WARNING_RATIO * state.record_capacity
    lines.append(
        f"  records:   {state.record_count} / {state.record_capacity}"
        f"{_percent(state.record_count, state.record_capacity)}"
        + ("  WARNING: over 90 % full; a full log refuses or overwrites punches" if full else "")
    )
    if tail_reads is not None:
        effect = (
            "; each poll that finds new records reads the whole log" if tail_reads.startswith("no") else ""
        )
        lines.append(f"  tail reads: {tail_reads}{effect}")
    return "\n".join(lines) + "\n", True


def probe(
    config: ConfigLike,
    names: Sequence[str] = (),
    *,
    out: TextIO | None = None,
    prober: Prober | None = None,
    now: Callable[[], datetime] = utc_now,
    users: Mapping[str, str] | None = None,
) -> int:
    """Given the config and terminal names (all when empty), probe them concurrently, write one report
    per terminal to `out` (stdout) in config order, and return 0 if every terminal answered, else 1.
    With `users` (the `users.map`), also list each terminal's enrolled users and their DingTalk userids.

    Raise UserError if a name is not a configured terminal.
    """
    stream = out if out is not None else sys.stdout
    devices = list(config.devices)
    if names:
        known = {device.name for device in devices}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise UserError(
                f"no terminal named {', '.join(map(repr, unknown))} in the configuration "
                f"(configured: {', '.join(sorted(known)) or 'none'})"
            )
        wanted = set(names)
        devices = [device for device in devices if device.name in wanted]
    if not devices:
        stream.write("no terminals configured\n")
        return 1
    poll = config.poll

    def probe_one(
        device: PolledDevice,
    ) -> tuple[TerminalState | TerminalError, list[TerminalUser] | None, str | None]:
        try:
            if prober is not None:
                state, tail = prober(device, poll.timeout_seconds), None
            else:
                state = read_info(device, poll.timeout_seconds, now=now)
                tail = probe_offset_reads(device, poll.timeout_seconds)
            return state, read_users(device, poll.timeout_seconds) if users is not None else None, tail
        except TerminalError as error:
            return error, None, None

    workers = max(1, min(poll.max_concurrency, len(devices)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe") as executor:
        outcomes = list(executor.map(probe_one, devices))
    failures = 0
    for device, (outcome, enrolled, tail) in zip(devices, outcomes, strict=True):
        text, ok = format_report(device, outcome, poll.drift_threshold_seconds, tail)
        if enrolled is not None and users is not None:
            text += format_users(enrolled, users)
        # Serial, firmware, enroll numbers and names are the terminal's to choose: escaped, lines kept.
        stream.write(printable(text, keep_newlines=True))
        failures += not ok
    if len(devices) > 1:
        stream.write(f"{len(devices) - failures} of {len(devices)} terminals answered\n")
    return 0 if failures == 0 else 1
