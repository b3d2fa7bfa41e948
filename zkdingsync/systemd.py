"""Tell systemd how the daemon is doing (sd_notify), without a dependency.

The unit is `Type=notify`: systemd considers the service started only after `ready()`, shows the
`status(...)` text in `systemctl status`, restarts the service when `watchdog()` pings stop for
`WatchdogSec`, and knows a stop is deliberate after `stopping()`.

Every function is a no-op returning False when not run under systemd (no `NOTIFY_SOCKET`), and none ever
raises: telling systemd is best effort and must never take the daemon down. Call `watchdog()` from the main
loop only, so that a stuck main loop stops the pings and systemd restarts it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


def notify(message: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Given a notification ("READY=1", "STATUS=...", several joined by newlines), send it to systemd.

    Return True when it was sent, False when not under systemd or when sending failed (logged at debug).
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        # Abstract namespace: the leading '@' stands for a NUL byte.
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        # vsock:... and other address kinds are for VMs and containers we do not target.
        log.debug("systemd.notify_unsupported_socket", address=address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8", errors="replace"))
    except OSError as error:
        log.debug("systemd.notify_failed", error=str(error))
        return False
    return True


def ready(*, environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd that start-up is finished (the store is open and polling has begun)."""
    return notify("READY=1", environ=environ)


def reloading(*, environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd a configuration reload has begun; send `ready()` when it is done."""
    return notify("RELOADING=1", environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Given a one-line summary, show it in `systemctl status` (newlines would end the field early)."""
    one_line = " ".join(text.split())
    return notify(f"STATUS={one_line}", environ=environ)


def watchdog(*, environ: Mapping[str, str] | None = None) -> bool:
    """Ping the watchdog; call it from the main loop at least every `watchdog_interval() / 2` seconds."""
    return notify("WATCHDOG=1", environ=environ)


def stopping(*, environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd the daemon is shutting down on purpose."""
    return notify("STOPPING=1", environ=environ)


def watchdog_interval(*, environ: Mapping[str, str] | None = None) -> float | None:
    """Return systemd's watchdog timeout in seconds, or None when no watchdog watches this process.

    systemd sets WATCHDOG_USEC (and WATCHDOG_PID, the process meant); a WATCHDOG_PID naming another
    process (the variables were inherited) means the watchdog is not ours.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000
