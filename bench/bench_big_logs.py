"""Big logs: what a poll costs against terminals holding 100,000 and 200,000 records, in one run.

Fake terminals are served by a CHILD process (their CPU is not charged to the poller); the real adapter,
poller and SQLite store run here. Side by side:

1. a new-punch poll read as a tail (now) vs the whole-log read every poll did before (the same poller
   with its whole-log check every poll): log bytes read, CPU of this process, seconds the terminal was
   disabled (measured by the fake terminal), poll duration;
2. an unchanged and a changing rotating full log (100,000 records, one new punch per poll);
3. the first read of one 100,000-record log in a fresh process: peak RSS, next to that process's RSS
   before the read;
4. a first start of the real daemon on 10 x 100,000 records (and one small terminal): peak RSS, seconds
   until every record is stored, and how long a live punch on the small terminal takes to reach the fake
   DingTalk meanwhile; `poll.max_full_reads` 2 (the default) next to 10 (no limit in effect).

Run: `python -m bench.bench_big_logs [--rounds 5] [--only NAME] [--json FILE] [--strict]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO

import yaml

from bench.figures import report as print_figures
from zkdingsync.config.objects import DeviceConfig, PollConfig
from zkdingsync.devices.zk import LogRead, ZkReader
from zkdingsync.logs import configure_logging
from zkdingsync.poller import Poller
from zkdingsync.store import Store

ROOT = Path(__file__).resolve().parent.parent
BIG = {"big100k": 100_000, "big200k": 200_000, "rotating": 100_000}
GOALS = {
    "tail_bytes_per_punch": 1024.0,
    "tail_disabled_ms": 50.0,
    "bytes_ratio": 1000.0,
    "rotating_bytes_per_poll": 1024.0,
    "rotating_cpu_ms": 20.0,
    "first_read_peak_rss_mib": 100.0,
    "first_start_peak_rss_mib": 100.0,
    "first_start_stored_seconds": 90.0,
}


# ------------------------------------------------------------------------------ the fake terminals


def serve(spec: dict[str, Any]) -> None:
    """Child process: serve the terminals of `spec` (name -> TerminalSpec fields); print their ports as
    JSON, then obey stdin: "punch NAME" adds one punch now, "disabled NAME" prints how long the last
    disable lasted, "quit" (or end of input) stops."""
    from zkdingsync.simulator import Simulator, TerminalSpec

    configure_logging("warning")
    with Simulator() as simulator:
        terminals = {name: simulator.add_terminal(TerminalSpec(**fields)) for name, fields in spec.items()}
        print(json.dumps({name: t.port for name, t in terminals.items()}), flush=True)
        stamp = 0
        base = datetime.now(timezone.utc) - timedelta(hours=2)
        for line in sys.stdin:
            command, _, name = line.strip().partition(" ")
            if command == "punch":
                stamp += 1
                terminals[name].add_punch("1001", base + timedelta(seconds=stamp))
                print("ok", flush=True)
            elif command == "disabled":
                print(f"{terminals[name].last_disabled_seconds:.6f}", flush=True)
            elif command == "quit":
                break


@dataclass
class Child:
    """The fake-terminal process and its ports."""

    process: subprocess.Popen[str]
    ports: dict[str, int]

    def ask(self, text: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
        self.process.wait(60)


def start_child(spec: dict[str, Any]) -> Child:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_big_logs", "--serve", json.dumps(spec)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return Child(process, json.loads(process.stdout.readline()))


def device(name: str, port: int) -> DeviceConfig:
    return DeviceConfig(name=name, host="127.0.0.1", port=port, timezone="Asia/Shanghai")


def rss_mib(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -------------------------------------------------------------------------------- per-poll costs


class MeasuringReader(ZkReader):
    """The real adapter, remembering the last read."""

    last: LogRead | None = None

    def read_log(self, device: Any, **kwargs: Any) -> LogRead:
        self.last = super().read_log(device, **kwargs)
        return self.last


@dataclass
class PollCost:
    bytes: int
    cpu_ms: float
    disabled_ms: float
    duration_ms: float
    new: int


def poll_costs(
    child: Child, name: str, *, whole_every_poll: bool, rounds: int, punch: bool
) -> list[PollCost]:
    """Poll one terminal `rounds` times (after a first, untimed full read), a new punch before each when
    `punch`; return each poll's cost."""
    reader = MeasuringReader()
    poll = PollConfig(interval_seconds=1, timeout_seconds=10, max_concurrency=2)
    verify = timedelta(0) if whole_every_poll else timedelta(hours=1)
    costs: list[PollCost] = []
    with tempfile.TemporaryDirectory() as directory, Store.open(Path(directory) / "bench.db") as store:
        poller = Poller(
            [device(name, child.ports[name])], store, poll=poll, reader=reader, verify_every=verify
        )
        now = datetime.now(timezone.utc)
        poller.poll_due(now)
        for _ in range(rounds):
            if punch:
                child.ask(f"punch {name}")
            now += timedelta(seconds=1)
            child_disabled_before = float(child.ask(f"disabled {name}"))
            cpu, wall = time.process_time(), time.perf_counter()
            (result,) = poller.poll_due(now)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            disabled = float(child.ask(f"disabled {name}"))
            read = reader.last
            assert result.ok and read is not None, result
            costs.append(
                PollCost(
                    read.log_bytes,
                    cpu * 1000,
                    disabled * 1000 if disabled != child_disabled_before else 0.0,
                    wall * 1000,
                    result.new,
                )
            )
        poller.close()
    return costs


def median_costs(costs: list[PollCost]) -> dict[str, float]:
    return {
        "bytes": statistics.median(c.bytes for c in costs),
        "cpu_ms": statistics.median(c.cpu_ms for c in costs),
        "disabled_ms": statistics.median(c.disabled_ms for c in costs),
        "duration_ms": statistics.median(c.duration_ms for c in costs),
        "new_per_poll": statistics.median(c.new for c in costs),
    }


def bench_new_punch(child: Child, rounds: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    for name in ("big100k", "big200k"):
        tail = median_costs(poll_costs(child, name, whole_every_poll=False, rounds=rounds, punch=True))
        whole = median_costs(poll_costs(child, name, whole_every_poll=True, rounds=rounds, punch=True))
        idle = median_costs(poll_costs(child, name, whole_every_poll=False, rounds=rounds, punch=False))
        size = name.removeprefix("big")
        for key, value in tail.items():
            figures[f"{size}_tail_{key}"] = value
        for key, value in whole.items():
            figures[f"{size}_whole_{key}"] = value
        figures[f"{size}_unchanged_bytes"] = idle["bytes"]
        figures[f"{size}_unchanged_cpu_ms"] = idle["cpu_ms"]
        figures[f"{size}_bytes_ratio"] = whole["bytes"] / max(tail["bytes"], 1)
    figures["tail_bytes_per_punch"] = max(figures["100k_tail_bytes"], figures["200k_tail_bytes"])
    figures["tail_disabled_ms"] = max(figures["100k_tail_disabled_ms"], figures["200k_tail_disabled_ms"])
    figures["bytes_ratio"] = min(figures["100k_bytes_ratio"], figures["200k_bytes_ratio"])
    return figures


def bench_rotating(child: Child, rounds: int) -> dict[str, float]:
    idle = median_costs(poll_costs(child, "rotating", whole_every_poll=False, rounds=rounds, punch=False))
    busy = median_costs(poll_costs(child, "rotating", whole_every_poll=False, rounds=rounds, punch=True))
    whole = median_costs(poll_costs(child, "rotating", whole_every_poll=True, rounds=rounds, punch=True))
    figures = {f"unchanged_{k}": v for k, v in idle.items()}
    figures |= {f"changing_{k}": v for k, v in busy.items()}
    figures |= {f"whole_every_poll_{k}": v for k, v in whole.items()}
    figures["rotating_bytes_per_poll"] = max(idle["bytes"], busy["bytes"])
    figures["rotating_cpu_ms"] = max(idle["cpu_ms"], busy["cpu_ms"])
    return figures


# ------------------------------------------------------------------------------ first read, fresh


def first_read(port: int) -> None:
    """Child process: one first poll of a big terminal into a fresh store; print RSS before and peak."""
    configure_logging("warning")
    before = rss_mib(os.getpid(), "VmRSS")
    with tempfile.TemporaryDirectory() as directory, Store.open(Path(directory) / "first.db") as store:
        poller = Poller([device("big", port)], store, poll=PollConfig(timeout_seconds=10))
        started = time.perf_counter()
        (result,) = poller.poll_due()
        seconds = time.perf_counter() - started
        poller.close()
    print(json.dumps({"before": before, "peak": rss_mib(os.getpid()), "new": result.new, "seconds": seconds}))


def bench_first_read(child: Child) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_big_logs", "--first-read", str(child.ports["big100k"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "first_read_peak_rss_mib": figures["peak"],
        "rss_before_the_read_mib": figures["before"],
        "records_stored": figures["new"],
        "seconds": figures["seconds"],
    }


# ------------------------------------------------------------------------------ first start, daemon


def bench_first_start(terminals: int, records: int, max_full_reads: int) -> dict[str, float]:
    from zkdingsync.dingtalk.fake import DEFAULT_APP_KEY, DEFAULT_APP_SECRET, FakeDingTalk

    spec = {
        f"t{i:02d}": {"serial": f"FS{i:05d}", "records": records, "capacity": records, "users": 50}
        for i in range(terminals)
    }
    spec["live"] = {"serial": "FSLIVE001", "records": 10, "users": 5}
    child = start_child(spec)
    with tempfile.TemporaryDirectory() as directory, FakeDingTalk(["u1001"]) as fake:
        base = Path(directory)
        config = {
            "dingtalk": {"app_key": DEFAULT_APP_KEY, "app_secret": DEFAULT_APP_SECRET, "api_base": fake.url},
            "store": {"path": str(base / "zk.db")},
            "poll": {"interval_seconds": 1, "timeout_seconds": 10, "max_full_reads": max_full_reads},
            "users": {"map": {"1001": "u1001"}},
            "devices": [
                {"name": name, "host": "127.0.0.1", "port": port, "timezone": "Asia/Shanghai"}
                for name, port in child.ports.items()
            ],
            "log": {"format": "json", "level": "warning"},
        }
        (base / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZKDINGSYNC_")}
        with (base / "daemon.err").open("wb") as err:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "zkdingsync", "run", "-c", str(base / "config.yaml")],
                stdout=subprocess.DEVNULL,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        started = time.perf_counter()
        total = terminals * records + 10
        live_at = live_seen = None
        stored_after = None
        try:
            while time.perf_counter() - started < 300:
                time.sleep(0.2)
                if live_at is None and time.perf_counter() - started > 3:
                    child.ask("punch live")
                    live_at, uploads = time.perf_counter(), len(fake.uploads)
                if live_at is not None and live_seen is None and len(fake.uploads) > uploads:
                    live_seen = time.perf_counter() - live_at
                if stored_after is None and stored(base / "zk.db") >= total + 1:
                    stored_after = time.perf_counter() - started
                if stored_after is not None and live_seen is not None:
                    break
            peak = rss_mib(daemon.pid)
        finally:
            daemon.terminate()
            daemon.wait(30)
            child.close()
    return {
        "first_start_peak_rss_mib": peak,
        "first_start_stored_seconds": stored_after if stored_after is not None else float("inf"),
        "live_punch_delivered_after_s": live_seen if live_seen is not None else float("inf"),
    }


def stored(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT count(*) FROM punches").fetchone()[0])
    except sqlite3.Error:
        return 0


# ------------------------------------------------------------------------------------------ report


def report(results: dict[str, dict[str, float]], out: TextIO) -> bool:
    """Print the figures with their goals (ratios must reach theirs from below)."""
    return print_figures(results, GOALS, out, higher_is_better=lambda key: key.endswith("ratio"))


def main(argv: list[str]) -> int:
    """Run the big-log benchmarks and print the figures; return 1 on a missed goal with --strict."""
    if argv[:1] == ["--serve"]:
        serve(json.loads(argv[1]))
        return 0
    if argv[:1] == ["--first-read"]:
        first_read(int(argv[1]))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_big_logs", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=5, help="polls per measured case (medians)")
    parser.add_argument("--only", choices=("polls", "first-read", "first-start"), default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    configure_logging("warning")
    print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f} python={sys.version.split()[0]}", flush=True)
    results: dict[str, dict[str, float]] = {}
    run: Callable[[str], bool] = lambda name: args.only in (None, name)  # noqa: E731
    if run("polls") or run("first-read"):
        child = start_child(
            {
                "big100k": {
                    "serial": "BIG100K01",
                    "records": BIG["big100k"],
                    "capacity": 300_000,
                    "users": 200,
                },
                "big200k": {
                    "serial": "BIG200K01",
                    "records": BIG["big200k"],
                    "capacity": 300_000,
                    "users": 200,
                },
                "rotating": {
                    "serial": "ROTATE001",
                    "records": BIG["rotating"],
                    "capacity": BIG["rotating"],
                    "overwrite_when_full": True,
                    "users": 200,
                },
            }
        )
        try:
            if run("polls"):
                results["a new punch: tail read vs the whole log every poll"] = bench_new_punch(
                    child, args.rounds
                )
                report({k: v for k, v in results.items()}, sys.stdout)
                results["rotating full log of 100,000"] = bench_rotating(child, args.rounds)
            if run("first-read"):
                results["first read of 100,000 records, fresh process"] = bench_first_read(child)
        finally:
            child.close()
    if run("first-start"):
        for slots in (2, 10):
            results[f"first start, 10 x 100,000, max_full_reads {slots}"] = bench_first_start(
                10, 100_000, slots
            )
    print(f"load after: {os.getloadavg()[0]:.2f}")
    ok = report(results, sys.stdout)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
