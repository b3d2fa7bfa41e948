"""Delivery benchmark: the real forwarder, client and SQLite store against the fake DingTalk in a CHILD
process with 50 ms latency per call and DingTalk's 20-QPS limit enforced (errcode 90018 above it).

For each rate: store N punches, deliver them all, and report the throughput, the throttle errors the fake
answered, and that every punch arrived exactly once. Goal: at the configured rate (default 10/s) and
just below the limit (18/s), zero throttle errors and the rate achieved within 10 %. One scenario above
the limit (30/s) shows what happens when the rate is set too high: throttles, holds, still no loss.

Run: `python -m bench.bench_delivery [--punches 200] [--rates 10,18,30] [--concurrency 4] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import requests

from zkdingsync.dingtalk.client import DingTalkClient
from zkdingsync.dingtalk.fake import DEFAULT_APP_KEY, DEFAULT_APP_SECRET
from zkdingsync.forwarder import Forwarder
from zkdingsync.logs import configure_logging
from zkdingsync.mapping import UserMapper
from zkdingsync.model import Delivery, Punch
from zkdingsync.store import Store

USERS = {f"{1000 + i}": f"user{i:03d}" for i in range(100)}
LATENCY_MS = 50.0
QPS_LIMIT = 20.0
GOAL_SHARE = 0.9  # at least 90 % of the configured rate


class Child:
    """The fake DingTalk in its own process, so its CPU is not charged to the forwarder."""

    def __init__(self, workdir: Path) -> None:
        users = workdir / "users.json"
        users.write_text(json.dumps(sorted(USERS.values())), encoding="utf-8")
        command = [
            sys.executable,
            "-m",
            "zkdingsync.dingtalk.fake",
            "--users-file",
            str(users),
            "--latency-ms",
            str(LATENCY_MS),
            "--qps-limit",
            str(QPS_LIMIT),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            raise RuntimeError("the fake DingTalk did not start")

    def seen(self) -> dict[str, Any]:
        answer: dict[str, Any] = requests.get(f"{self.url}/_fake/uploads", timeout=10).json()
        return answer

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def make_punches(count: int, offset: int) -> list[Punch]:
    first = (int(time.time()) - 7200 - offset) * 1000
    enrolls = list(USERS)
    punches = []
    for i in range(count):
        ms = first + i * 1000
        local = datetime.fromtimestamp(ms / 1000, tz=timezone(timedelta(hours=8))).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
        punches.append(Punch("bench", "BENCH-SN-0001", enrolls[i % len(enrolls)], local, 0, 1, ms))
    return punches


def run_rate(
    child: Child, workdir: Path, rate: float, punches: int, concurrency: int, offset: int
) -> dict[str, Any]:
    """Deliver `punches` at `rate` per second; return the figures."""
    before = child.seen()
    with Store.open(workdir / f"rate-{rate:g}.db") as store:
        batch = make_punches(punches, offset)
        store.save_poll(
            "bench",
            serial="BENCH-SN-0001",
            record_count=punches,
            record_size=40,
            punches=batch,
            polled_at=datetime.now(timezone.utc),
        )
        client = DingTalkClient(DEFAULT_APP_KEY, DEFAULT_APP_SECRET, child.url, 10.0, store=store)
        client.check_credentials()  # the token is fetched once, outside the measurement
        stop = threading.Event()
        forwarder = Forwarder(
            store,
            client,
            UserMapper(USERS),
            rate_per_second=rate,
            concurrency=concurrency,
            monthly_call_quota=None,
            stop_event=stop,
        )
        started = time.monotonic()
        with forwarder:
            done = forwarder.drain(max_steps=100_000)
        elapsed = time.monotonic() - started
        counts = store.delivery_counts()
        client.close()
    after = child.seen()
    uploads = after["uploads"][len(before["uploads"]) :]
    copies = Counter((u["userid"], u["user_check_time"]) for u in uploads)
    return {
        "rate_configured": rate,
        "punches": punches,
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "rate_achieved": round(punches / elapsed, 2),
        "throttled_90018": after["throttled"] - before["throttled"],
        "calls": after["calls"].get("upload", 0) - before["calls"].get("upload", 0),
        "delivered": counts[Delivery.DELIVERED],
        "duplicates": sum(n - 1 for n in copies.values() if n > 1),
        "all_delivered": done and counts[Delivery.DELIVERED] == punches and len(copies) == punches,
    }


def main(argv: list[str]) -> int:
    """Run the delivery benchmark, print the figures; return 1 on a missed goal with --strict."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_delivery", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--punches", type=int, default=200, help="punches per rate")
    parser.add_argument("--rates", default="10,18,30", help="comma-separated rates per second")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    configure_logging("warning")  # one delivery.batch line per batch would bury the figures
    rates = [float(rate) for rate in args.rates.split(",") if rate.strip()]
    print(
        f"cpus={os.cpu_count()} python={sys.version.split()[0]} fake DingTalk in a child process: "
        f"latency {LATENCY_MS:g} ms per call, {QPS_LIMIT:g} QPS limit (90018 above it)",
        flush=True,
    )
    results = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="zkdingsync-bench-") as tmp:
        child = Child(Path(tmp))
        try:
            for number, rate in enumerate(rates):
                figures = run_rate(child, Path(tmp), rate, args.punches, args.concurrency, number * 100_000)
                results.append(figures)
                within_limit = rate < QPS_LIMIT
                met = figures["all_delivered"] and figures["duplicates"] == 0
                if within_limit:
                    met = met and figures["throttled_90018"] == 0
                    met = met and figures["rate_achieved"] >= rate * GOAL_SHARE
                ok = ok and met
                verdict = ("ok" if met else "MISSED") if within_limit else ("no loss" if met else "LOSS")
                print(
                    f"rate {rate:>5g}/s: {figures['punches']} punches in {figures['seconds']:>6.2f} s = "
                    f"{figures['rate_achieved']:>6.2f}/s, 90018 answers {figures['throttled_90018']:>3}, "
                    f"calls {figures['calls']}, duplicates {figures['duplicates']}, "
                    f"all delivered {figures['all_delivered']}  [{verdict}]",
                    flush=True,
                )
        finally:
            child.close()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
