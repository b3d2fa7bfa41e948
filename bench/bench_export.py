"""Export benchmark: `zkdingsync export` of 1,000,000 stored punches, as CSV and as XLSX, in bounded memory.

A store of N punches (10,000 a day on 20 terminals, every delivery state, request ids on the delivered
ones) is built once, in a child process; then the real `zkdingsync export` process runs, and its peak
resident memory is read from the kernel (`wait4`'s ru_maxrss) and its time measured. The bench process
itself imports nothing of zkdingsync and stays small: a child's ru_maxrss starts from its parent's size
at the fork. Baselines of the same run: the same program doing nothing (`zkdingsync --version`), and the
same export of one day (10,000 rows), so the memory the rows add shows as the difference. Goal: peak RSS
under 150 MB for the whole store, in both formats.

Run: `python -m bench.bench_export [--rows 1000000] [--formats csv,xlsx] [--keep DIR] [--json FILE]
[--strict]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

PER_DAY = 10_000
TERMINALS = 20
GOAL_BYTES = 150 * 1024 * 1024
FIRST_DAY = date(2026, 1, 1)
CONFIG = """\
dingtalk:
  app_key: dingbench
  app_secret: bench-secret-0123
store:
  path: {store}
users:
  map:
    "1001": user1001
devices:
{devices}
"""


def build_store(path: Path, rows: int) -> None:
    """Store `rows` punches through the store's own poll path, then give them their delivery states."""
    from zkdingsync.model import Punch
    from zkdingsync.store import Store

    shanghai = timezone(timedelta(hours=8))
    batch: list[Punch] = []
    with Store.open(path) as store:
        for n in range(rows):
            day, rest = divmod(n, PER_DAY)
            local = datetime.combine(FIRST_DAY + timedelta(days=day), datetime.min.time()) + timedelta(
                seconds=6 * 3600 + rest * 4
            )
            device = f"t{n % TERMINALS:02d}"
            batch.append(
                Punch(
                    device=device,
                    serial=f"SN{n % TERMINALS:06d}",
                    enroll_number=str(1000 + rest % 2000),
                    local_time=local.strftime("%Y-%m-%d %H:%M:%S"),
                    punch_state=n % 2,
                    verify_mode=(1, 15, 4)[n % 3],
                    check_time_ms=int(local.replace(tzinfo=shanghai).timestamp() * 1000),
                )
            )
            if len(batch) == 50_000 or n == rows - 1:
                store.save_poll(
                    device,
                    serial=f"SN{n % TERMINALS:06d}",
                    record_count=n + 1,
                    record_size=40,
                    punches=batch,
                    polled_at=datetime.now(timezone.utc),
                )
                batch = []
    # Delivery states in bulk (one statement, not a million store calls): 97 % delivered with a request id,
    # the rest parked, quarantined or pending.
    db = sqlite3.connect(path)
    with db:
        db.execute(
            "UPDATE punches SET delivery = 'delivered', delivered_at = stored_at, "
            "userid = 'user' || enroll_number, request_id = printf('req%012d', id) WHERE id % 100 >= 3"
        )
        db.execute(
            "UPDATE punches SET delivery = 'parked', reason = 'enroll number is not mapped' "
            "WHERE id % 100 = 0"
        )
        db.execute(
            "UPDATE punches SET delivery = 'quarantined', reason = 'clock too far ahead' WHERE id % 100 = 1"
        )
    db.close()


def run_export(config: Path, first: str, last: str, output: Path) -> dict[str, Any]:
    """Run the real `zkdingsync export` process; return its seconds, peak RSS and the file's size."""
    result = measure(["export", "-c", str(config), "--from", first, "--to", last, "-o", str(output)])
    result["output_bytes"] = output.stat().st_size
    return result


def measure(arguments: list[str]) -> dict[str, Any]:
    """Run `python -m zkdingsync ARGUMENTS`; return its seconds, peak RSS and what it said on stderr."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "zkdingsync", *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"zkdingsync {arguments[0]} failed: {stderr}")
    return {"seconds": round(seconds, 2), "peak_rss_bytes": usage.ru_maxrss * 1024, "said": stderr.strip()}


def main(argv: list[str]) -> int:
    """Build the store, run the exports, print the figures; return 1 on a missed goal with --strict."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_export", description=__doc__)
    parser.add_argument(
        "--rows", type=int, default=1_000_000, help="punches in the store (default 1,000,000)"
    )
    parser.add_argument("--formats", default="csv,xlsx", help="comma-separated: csv, xlsx (default both)")
    parser.add_argument("--keep", type=Path, default=None, help="build the store in DIR and keep it (reused)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--build-store", type=Path, default=None, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args(argv)
    if args.build_store is not None:
        build_store(args.build_store, args.rows)
        return 0
    with tempfile.TemporaryDirectory(prefix="zkdingsync-bench-export-") as scratch:
        workdir = args.keep or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        store = workdir / f"export-{args.rows}.db"
        if not store.exists():
            started = time.perf_counter()
            child = [sys.executable, "-m", "bench.bench_export", "--rows", str(args.rows)]
            subprocess.run([*child, "--build-store", str(store)], check=True)
            print(
                f"built a store of {args.rows:,} punches in {time.perf_counter() - started:.0f} s", flush=True
            )
        devices = "\n".join(
            f"  - name: t{i:02d}\n    host: 10.0.0.{i + 1}\n    timezone: Asia/Shanghai"
            for i in range(TERMINALS)
        )
        config = workdir / "config.yaml"
        config.write_text(CONFIG.format(store=store, devices=devices), encoding="utf-8")
        days = -(-args.rows // PER_DAY)
        first, last = FIRST_DAY.isoformat(), (FIRST_DAY + timedelta(days=days - 1)).isoformat()
        results: dict[str, Any] = {"rows": args.rows, "load": os.getloadavg()[0]}
        idle = measure(["--version"])
        results["program_only"] = idle
        print(
            f"baseline: `zkdingsync --version` peak RSS {idle['peak_rss_bytes'] / 2**20:.0f} MB", flush=True
        )
        ok = True
        for fmt in args.formats.split(","):
            baseline = run_export(config, first, first, workdir / f"day.{fmt}")
            whole = run_export(config, first, last, workdir / f"all.{fmt}")
            met = whole["peak_rss_bytes"] < GOAL_BYTES
            ok = ok and met
            results[fmt] = {"one_day": baseline, "all": whole, "goal_met": met}
            print(
                f"{fmt}: {args.rows:,} rows in {whole['seconds']:.1f} s "
                f"({args.rows / whole['seconds']:,.0f} rows/s), "
                f"peak RSS {whole['peak_rss_bytes'] / 2**20:.0f} MB (one day, {PER_DAY:,} rows: "
                f"{baseline['peak_rss_bytes'] / 2**20:.0f} MB in {baseline['seconds']:.1f} s); "
                f"file {whole['output_bytes'] / 2**20:.0f} MB; goal < 150 MB: {'met' if met else 'MISSED'}",
                flush=True,
            )
        print(f"load average at start: {results['load']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
