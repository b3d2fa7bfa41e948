"""`zkdingsync demo`: the whole product on this machine, for trying it out in a minute.

Three simulated terminals (different record layouts) with employees punching, a local fake DingTalk, and the
real daemon (`zkdingsync run`, a child process) with a generated config in a temporary directory. After a
while the daemon is stopped with SIGTERM, and the status table and what DingTalk received are printed.
One employee is deliberately left out of the user map, to show how an undeliverable punch is parked.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TextIO

import yaml

from zkdingsync.config import load_config
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.simulator import FakeTerminal, Simulator, TerminalSpec, history_start
from zkdingsync.status import status_command

# (name, record layout, user-table layout)
TERMINALS = (("lobby", 40, 72), ("warehouse", 16, 28), ("office", 49, 72))
EMPLOYEES = 4  # per terminal: enroll numbers 1001..1004
UNMAPPED = "1004"  # left out of users.map on purpose
PUNCH_INTERVAL_SECONDS = 1.5
HISTORY = 8  # punches each terminal holds before the demo starts (the last few minutes)
POLL_INTERVAL_SECONDS = 2
DRAIN_SECONDS = 2 * POLL_INTERVAL_SECONDS + 5
APP_KEY = "dingdemo"
APP_SECRET = "demo-app-secret-not-real"  # noqa: S105 - the fake server's own, never a real credential


def run_demo(*, seconds: float, log_format: str | None = None, out: TextIO | None = None) -> int:
    """Run the demo for `seconds`, print the final status and what DingTalk received; return 0."""
    out = out or sys.stdout
    mapped = {str(1000 + i): f"user{1000 + i}" for i in range(1, EMPLOYEES + 1) if str(1000 + i) != UNMAPPED}
    with (
        tempfile.TemporaryDirectory(prefix="zkdingsync-demo-") as directory,
        Simulator() as simulator,
        FakeDingTalk(users=mapped.values(), app_key=APP_KEY, app_secret=APP_SECRET) as dingtalk,
    ):
        terminals = _add_terminals(simulator)
        config_path = Path(directory) / "config.yaml"
        config_path.write_text(
            _config_yaml(Path(directory), dingtalk.url, mapped, terminals), encoding="utf-8"
        )
        _say(out, f"demo: config {config_path}")
        _say(
            out,
            f"demo: {len(terminals)} terminals on 127.0.0.1 ports "
            f"{', '.join(str(t.port) for _, t in terminals)}, fake DingTalk at {dingtalk.url}",
        )
        for _, terminal in terminals:
            terminal.punch_every(PUNCH_INTERVAL_SECONDS)
        command = [sys.executable, "-m", "zkdingsync", "run", "-c", str(config_path)]
        if log_format:
            command += ["--log-format", log_format]

        def drained() -> bool:
            return len(dingtalk.uploads) >= _mapped_punches(terminals, mapped)

        code = _run_daemon(command, seconds, drained, terminals)
        _say(out, f"\ndemo: daemon stopped with exit code {code}\n")
        config = load_config(config_path)
        status_command(config, as_json=False, out=out)
        _print_received(dingtalk, terminals, out)
    return 0


def _add_terminals(simulator: Simulator) -> list[tuple[str, FakeTerminal]]:
    terminals: list[tuple[str, FakeTerminal]] = []
    for index, (name, record_size, table_size) in enumerate(TERMINALS):
        terminal = simulator.add_terminal(
            TerminalSpec(
                serial=f"DEMO{index + 1:06d}",
                name=name,
                record_size=record_size,
                user_table_size=table_size,
                users=EMPLOYEES,
                records=HISTORY,
                first_punch=history_start(HISTORY),
            )
        )
        terminals.append((name, terminal))
    return terminals


def _run_daemon(
    command: list[str],
    seconds: float,
    drained: Callable[[], bool],
    terminals: list[tuple[str, FakeTerminal]],
) -> int:
    """Run the daemon for `seconds`, then until `drained()` (at most DRAIN_SECONDS); return its exit code."""
    daemon = subprocess.Popen(command)  # noqa: S603 - our own interpreter and module, fixed arguments
    try:
        with _interruptible() as interrupted:
            interrupted.wait(seconds)
            for _, terminal in terminals:
                terminal.stop_punching()
            # Let the last punches through before stopping, so the table below adds up.
            deadline = time.monotonic() + DRAIN_SECONDS
            while not interrupted.is_set() and time.monotonic() < deadline:
                if drained():
                    break
                interrupted.wait(0.2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = daemon.wait()
    return code


def _mapped_punches(terminals: list[tuple[str, FakeTerminal]], mapped: dict[str, str]) -> int:
    return sum(1 for _, t in terminals for record in t.records if record.enroll_number in mapped)


def _config_yaml(
    directory: Path, url: str, mapped: dict[str, str], terminals: list[tuple[str, FakeTerminal]]
) -> str:
    document = {
        "dingtalk": {"app_key": APP_KEY, "app_secret": APP_SECRET, "api_base": url},
        "store": {"path": str(directory / "zkdingsync.db")},
        "poll": {"interval_seconds": POLL_INTERVAL_SECONDS, "timeout_seconds": 5},
        "users": {"map": mapped},
        "devices": [
            {"name": name, "host": "127.0.0.1", "port": terminal.port, "timezone": "Asia/Shanghai"}
            for name, terminal in terminals
        ],
    }
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def _print_received(dingtalk: FakeDingTalk, terminals: list[tuple[str, FakeTerminal]], out: TextIO) -> None:
    uploads = dingtalk.uploads
    keys = Counter((u["userid"], u["user_check_time"], u["device_id"]) for u in uploads)
    duplicates = sum(n - 1 for n in keys.values() if n > 1)
    recorded = sum(len(t.records) for _, t in terminals)
    _say(out, "\nWhat DingTalk received:")
    by_device = Counter(u["device_name"] for u in uploads)
    for name, terminal in terminals:
        _say(
            out,
            f"  {name:<10} serial {terminal.serial}: {by_device.get(name, 0)} punches "
            f"(terminal recorded {len(terminal.records)})",
        )
    _say(
        out,
        f"  total {len(uploads)} uploads, {duplicates} duplicates; the terminals recorded {recorded} "
        f"punches, those of enroll number {UNMAPPED} (not in users.map) are parked, not lost",
    )
    for upload in uploads[-3:]:
        _say(
            out,
            f"  e.g. userid={upload['userid']} device_id={upload['device_id']} "
            f"user_check_time={upload['user_check_time']}",
        )


@contextmanager
def _interruptible() -> Iterator[threading.Event]:
    """An event set by Ctrl-C or SIGTERM, so the demo can end early and still clean up."""
    event = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        event.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _say(out: TextIO, *parts: str) -> None:
    """Write one line of the demo's own output (not a log event) and flush it."""
    out.write("".join(parts) + "\n")
    out.flush()
