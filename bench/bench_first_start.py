"""First start, backlogs and parking at scale: the REAL `zkdingsync run` process against in-process fake
terminals and the fake DingTalk, all on 127.0.0.1.

1. first start: 10 terminals holding 100,000 recent punches each (one a minute, ending now: `history_start`)
   of employees missing from `users.map`, no `delivery.since`; 2 s after the daemon starts, one mapped
   punch lands on the first terminal. Measured: when that punch reaches DingTalk (goal: within 60 s of the
   start), the journal lines until the queue is settled (goal: under 1,000), and what `status --json`
   reports as history, parked and pending. `--everything` runs it again with `delivery.since: 2000-01-01`
   (the whole history queued, as before the history policy) for comparison in the same run.
2. live first: 2,000 mapped punches queued, DingTalk answering in 50 ms; a punch that lands meanwhile
   (goal: delivered within the poll interval + 3 s), then the whole backlog (nothing lost or doubled).
3. parking: 50,000 queued punches of unmapped employees (goal: all parked within 30 s, a few hundred journal
   lines at most), and a mapped punch meanwhile (goal: within the poll interval + 3 s).

Run: `python -m bench.bench_first_start [--only first|live|parking] [--terminals 10] [--records 100000]
[--everything] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from bench.bench_daemon import APP_KEY, APP_SECRET, ZONE, Daemon, wait_until, write_config
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.simulator import FakeTerminal, Simulator, TerminalSpec, history_start

INTERVAL_SECONDS = 1.0
LIVE_ENROLL, LIVE_USER = "9001", "liveuser"
UNMAPPED_USERS = 20  # enroll numbers 1001..1020, none in users.map


def config_document(
    store: Path, url: str, devices: Sequence[tuple[str, int]], users: dict[str, str], **delivery: Any
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "dingtalk": {"app_key": APP_KEY, "app_secret": APP_SECRET, "api_base": url, "rate_per_second": 10},
        "store": {"path": str(store)},
        "poll": {"interval_seconds": INTERVAL_SECONDS},
        "users": {"map": users},
        "devices": [{"name": n, "host": "127.0.0.1", "port": p, "timezone": ZONE} for n, p in devices],
        "log": {"format": "json"},
    }
    if delivery:
        document["delivery"] = delivery
    return document


def status(config: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "zkdingsync", "status", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ},
    )
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def settled(config: Path, stored: int | None = None) -> bool:
    """Nothing waits for delivery (and, with `stored`, the store holds that many punches: every first read
    is done)."""
    delivery = status(config)["delivery"]
    held = sum(
        delivery.get(key, 0) for key in ("pending", "in_flight", "delivered_total", "parked", "history")
    )
    held += delivery.get("quarantined", 0)
    return bool(
        delivery["pending"] == 0 and delivery["in_flight"] == 0 and (stored is None or held >= stored)
    )


def journal_lines(daemon: Daemon) -> int:
    return len(daemon.log_path.read_text(encoding="utf-8", errors="replace").splitlines())


def arrived(fake: FakeDingTalk, userid: str) -> bool:
    return any(upload["userid"] == userid for upload in fake.uploads)


def run_daemon(
    work: Path, fake: FakeDingTalk, terminals: Sequence[FakeTerminal], users: dict[str, str], **delivery: Any
) -> tuple[Path, Daemon]:
    devices = [(f"t{i:02d}", t.port) for i, t in enumerate(terminals)]
    config = write_config(
        work / "config.yaml", config_document(work / "zk.db", fake.url, devices, users, **delivery)
    )
    return config, Daemon(config, work / "daemon.log").start()


def live_punch_after(terminal: FakeTerminal, started: float, seconds: float) -> float:
    """Sleep until `seconds` after `started`, record the mapped punch, return when it landed."""
    time.sleep(max(0.0, started + seconds - time.monotonic()))
    landed = time.monotonic()
    terminal.add_punch(LIVE_ENROLL, punch_state=0)
    return landed


# ----------------------------------------------------------------------------------- 1. first start


def waited_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until `condition` held, or None when it did not within `timeout`."""
    started = time.monotonic()
    try:
        wait_until(condition, timeout, "a condition", interval=interval)
    except RuntimeError:
        return None
    return time.monotonic() - started


def bench_first_start(
    terminal_count: int, records: int, everything: bool, out: TextIO, limit_s: float = 600.0
) -> dict[str, float | None]:
    with tempfile.TemporaryDirectory(prefix="bench-first-") as directory, Simulator() as simulator:
        work = Path(directory)
        terminals = [
            simulator.add_terminal(
                TerminalSpec(
                    serial=f"FIRST{i:05d}",
                    users=UNMAPPED_USERS,
                    records=records,
                    capacity=records * 2,
                    first_punch=history_start(records, ZONE),
                )
            )
            for i in range(terminal_count)
        ]
        with FakeDingTalk(users=[LIVE_USER], app_key=APP_KEY, app_secret=APP_SECRET) as fake:
            delivery = {"since": "2000-01-01"} if everything else {}
            config, daemon = run_daemon(work, fake, terminals, {LIVE_ENROLL: LIVE_USER}, **delivery)
            started = time.monotonic()
            try:
                # On the last terminal: its first read may well wait for a whole-read slot.
                landed = live_punch_after(terminals[-1], started, 2.0)
                live_wait = waited_until(lambda: arrived(fake, LIVE_USER), limit_s)
                live_at = None if live_wait is None else time.monotonic() - started
                left = max(1.0, limit_s - (time.monotonic() - started))
                expected = terminal_count * records + 1
                settle_wait = waited_until(lambda: settled(config, expected), left, interval=1.0)
                settled_at = None if settle_wait is None else time.monotonic() - started
                lines = journal_lines(daemon)
                document = status(config)
            finally:
                code = daemon.stop()
            if code != 0:
                raise RuntimeError(f"the daemon exited {code}:\n{daemon.tail()}")
    delivery_status = document["delivery"]
    live_text = (
        f"not delivered within {limit_s:.0f} s"
        if live_at is None
        else f"after {live_at:.1f} s ({live_at - (landed - started):.1f} s after it landed)"
    )
    settled_text = (
        f"not settled within {limit_s:.0f} s" if settled_at is None else f"settled after {settled_at:.0f} s"
    )
    out.write(
        f"  {terminal_count} x {records:,} punches{' (everything queued)' if everything else ''}: live punch "
        f"{live_text}, {settled_text}, {lines} journal lines; history {delivery_status.get('history', 0):,}, "
        f"pending {delivery_status['pending']:,}, parked {delivery_status['parked']:,}, delivered "
        f"{delivery_status['delivered_total']:,}\n"
    )
    return {
        "live_delivered_after_start_s": live_at,
        "settled_after_start_s": settled_at,
        "journal_lines": float(lines),
        "history": float(delivery_status.get("history", 0)),
        "parked": float(delivery_status["parked"]),
        "pending": float(delivery_status["pending"]),
    }


# ----------------------------------------------------------------------------------- 2. live first


def bench_live_first(queued: int, out: TextIO) -> dict[str, float | None]:
    users = {str(1000 + i): f"user{i:02d}" for i in range(1, 11)}
    with tempfile.TemporaryDirectory(prefix="bench-live-") as directory, Simulator() as simulator:
        work = Path(directory)
        terminal = simulator.add_terminal(
            TerminalSpec(
                serial="LIVE00001", users=10, records=queued, first_punch=history_start(queued, ZONE)
            )
        )
        with FakeDingTalk(
            users=[*users.values(), LIVE_USER], app_key=APP_KEY, app_secret=APP_SECRET, latency_seconds=0.05
        ) as fake:
            _, daemon = run_daemon(
                work, fake, [terminal], users | {LIVE_ENROLL: LIVE_USER}, since="2000-01-01"
            )
            started = time.monotonic()
            try:
                wait_until(lambda: len(fake.uploads) >= 50, 120, "the backlog to start draining")
                landed = live_punch_after(terminal, time.monotonic(), 0.0)
                backlog_before = len(fake.uploads)
                wait_until(lambda: arrived(fake, LIVE_USER), 120, "the live punch")
                live_s = time.monotonic() - landed
                wait_until(
                    lambda: len(fake.uploads) >= queued + 1, 3600, "the backlog to drain", interval=0.5
                )
                drained_s = time.monotonic() - started
                time.sleep(2 * INTERVAL_SECONDS)  # a late duplicate would show up here
                uploads = list(fake.uploads)
            finally:
                code = daemon.stop()
            if code != 0:
                raise RuntimeError(f"the daemon exited {code}:\n{daemon.tail()}")
    keys = [(u["userid"], u["user_check_time"]) for u in uploads]
    duplicates = len(keys) - len(set(keys))
    out.write(
        f"  {queued:,} queued, DingTalk 50 ms: live punch delivered {live_s:.2f} s after it landed "
        f"(with {backlog_before} of the backlog sent before it landed); backlog drained after "
        f"{drained_s:.0f} s; {len(set(keys)):,} distinct uploads of {queued + 1:,}, {duplicates} duplicates\n"
    )
    return {
        "live_delivered_s": live_s,
        "drained_s": drained_s,
        "uploads": float(len(set(keys))),
        "expected": float(queued + 1),
        "duplicates": float(duplicates),
    }


# ----------------------------------------------------------------------------------- 3. parking


def bench_parking(queued: int, out: TextIO) -> dict[str, float | None]:
    with tempfile.TemporaryDirectory(prefix="bench-park-") as directory, Simulator() as simulator:
        work = Path(directory)
        terminal = simulator.add_terminal(
            TerminalSpec(
                serial="PARK00001",
                users=UNMAPPED_USERS,
                records=queued,
                capacity=queued * 2,
                first_punch=history_start(queued, ZONE),
            )
        )
        with FakeDingTalk(users=[LIVE_USER], app_key=APP_KEY, app_secret=APP_SECRET) as fake:
            config, daemon = run_daemon(work, fake, [terminal], {LIVE_ENROLL: LIVE_USER}, since="2000-01-01")
            started = time.monotonic()
            try:
                landed = live_punch_after(terminal, started, 2.0)
                wait_until(lambda: arrived(fake, LIVE_USER), 120, "the mapped punch")
                live_s = time.monotonic() - landed
                wait_until(
                    lambda: status(config)["delivery"]["parked"] >= queued, 300, "parking", interval=0.5
                )
                parked_s = time.monotonic() - started
                lines = journal_lines(daemon)
            finally:
                code = daemon.stop()
            if code != 0:
                raise RuntimeError(f"the daemon exited {code}:\n{daemon.tail()}")
    out.write(
        f"  {queued:,} unmapped punches queued: all parked {parked_s:.1f} s after the start, {lines} journal "
        f"lines; a mapped punch delivered {live_s:.2f} s after it landed\n"
    )
    return {"parked_after_start_s": parked_s, "journal_lines": float(lines), "mapped_delivered_s": live_s}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", choices=("first", "live", "parking"))
    parser.add_argument("--terminals", type=int, default=10)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--queued", type=int, default=2_000)
    parser.add_argument("--parking", type=int, default=50_000)
    parser.add_argument(
        "--everything", action="store_true", help="also the first start with all history queued"
    )
    parser.add_argument("--limit", type=float, default=600.0, help="give up on a first start after this")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out = sys.stdout
    out.write(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}\n")
    results: dict[str, dict[str, float | None]] = {}
    runs: list[tuple[str, Callable[[], dict[str, float | None]]]] = [
        ("first", lambda: bench_first_start(args.terminals, args.records, False, out, args.limit)),
        ("live", lambda: bench_live_first(args.queued, out)),
        ("parking", lambda: bench_parking(args.parking, out)),
    ]
    if args.everything:
        runs.insert(
            1,
            (
                "first_everything",
                lambda: bench_first_start(args.terminals, args.records, True, out, args.limit),
            ),
        )
    for name, run in runs:
        if args.only and not name.startswith(args.only):
            continue
        out.write(f"{name}:\n")
        out.flush()
        results[name] = run()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
