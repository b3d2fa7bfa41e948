"""Daemon benchmarks: the REAL `zkdingsync run` process (JSON log to a file) against fake terminals and
the in-process fake DingTalk, all on 127.0.0.1:

1. end-to-end latency from a punch at a terminal to its arrival at DingTalk: 3 terminals (in-process
   simulator), `poll.interval_seconds: 1`, default rate; ~60 punches at seeded random moments, each on a
   random terminal by a rotating mapped user. An upload's arrival is seen by a thread watching the fake's
   uploads every 2 ms. Goal: median under poll interval + 1 s.
2. the daemon's resident memory with 200 terminals (the real `zkdingsync simulate` in a child process,
   punching every 20 s) and a store already holding 1,000,000 delivered punches, over ~60 s at a 5 s poll
   interval: peak RSS (VmHWM), RSS after the first poll cycle, punches delivered meanwhile, and how long
   `zkdingsync status --json` takes on that store while the daemon runs. Goal: peak RSS under 100 MB.

Run: `python -m bench.bench_daemon [--punches 60] [--seed 1] [--terminals 200] [--store-punches 1000000]
[--seconds 60] [--only latency|memory] [--json FILE] [--strict]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, TextIO
from zoneinfo import ZoneInfo

import yaml

from bench.figures import report as print_figures
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.logs import configure_logging
from zkdingsync.model import Punch
from zkdingsync.simulator import Simulator, TerminalSpec, history_start
from zkdingsync.store import Store

ROOT = Path(__file__).resolve().parent.parent
ZONE = "Asia/Shanghai"
APP_KEY = "dingbench"
APP_SECRET = "bench-secret-value-5678"  # noqa: S105 - the fake DingTalk's, not a real one
USER_COUNT = 10  # the simulator's default: enroll numbers 1001..1010
USERS = {str(1000 + i): f"user{i:02d}" for i in range(1, USER_COUNT + 1)}
LATENCY_INTERVAL_SECONDS = 1.0
MEMORY_INTERVAL_SECONDS = 5.0
GOALS = {"latency_median_s": LATENCY_INTERVAL_SECONDS + 1.0, "peak_rss_mb": 100.0}


# ----------------------------------------------------------------------------------- the daemon


def config_document(
    store: Path, dingtalk_url: str, devices: Sequence[tuple[str, int]], interval_seconds: float
) -> dict[str, Any]:
    """A config for the daemon: the given (name, port) terminals on 127.0.0.1, every user mapped."""
    return {
        "dingtalk": {"app_key": APP_KEY, "app_secret": APP_SECRET, "api_base": dingtalk_url},
        "store": {"path": str(store)},
        "poll": {"interval_seconds": interval_seconds},
        "users": {"map": dict(USERS)},
        "devices": [
            {"name": name, "host": "127.0.0.1", "port": port, "timezone": ZONE} for name, port in devices
        ],
        "log": {"format": "json"},
    }


@dataclass
class Daemon:
    """One `python -m zkdingsync run` child process, its log in a file (JSON lines)."""

    config: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    _offset: int = 0
    _partial: str = ""

    def start(self) -> Daemon:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "zkdingsync", "run", "-c", str(self.config)],
            stdout=self._log,
            stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.process is not None and self._log is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self._log.close()
        return code

    def new_events(self) -> list[dict[str, Any]]:
        """The JSON log lines written since the last call (non-JSON lines are skipped)."""
        with self.log_path.open("r", encoding="utf-8", errors="replace") as handle:
            handle.seek(self._offset)
            text = self._partial + handle.read()
            self._offset = handle.tell()
        lines = text.split("\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next call
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def problems(self) -> Counter[str]:
        """How many warning-or-worse lines the daemon logged, per event name (tracebacks included)."""
        found: Counter[str] = Counter()
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                found["(not JSON)"] += 1
                continue
            if event.get("level") in ("warning", "error", "critical") or "Traceback" in line:
                found[str(event.get("event"))] += 1
        return found

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


def write_config(path: Path, document: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(document), sort_keys=False), encoding="utf-8")
    return path


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def check_time_ms(local_time: str, zone: ZoneInfo) -> int:
    """A terminal-local "YYYY-MM-DD HH:MM:SS" read in `zone`, as epoch milliseconds (what DingTalk gets)."""
    return int(datetime.fromisoformat(local_time).replace(tzinfo=zone).timestamp() * 1000)


def nearest_rank(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))]


# ------------------------------------------------------------------------- 1. end-to-end latency


class ArrivalWatcher:
    """Notes the monotonic time at which each upload first appears in the fake, polling every `every` s."""

    def __init__(self, fake: FakeDingTalk, every: float = 0.002) -> None:
        self.fake = fake
        self.every = every
        self.arrivals: dict[tuple[str, str, int], list[float]] = {}
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="arrival-watcher", daemon=True)

    def __enter__(self) -> ArrivalWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            uploads = self.fake.uploads
            now = time.monotonic()
            for upload in uploads[self._seen :]:
                key = (str(upload["device_id"]), str(upload["userid"]), int(upload["user_check_time"]))
                self.arrivals.setdefault(key, []).append(now)
            self._seen = len(uploads)


def bench_latency(punches: int, seed: int, out: TextIO) -> dict[str, float]:
    zone = ZoneInfo(ZONE)
    rng = random.Random(seed)
    enrolls = list(USERS)
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as directory, Simulator() as simulator:
        work = Path(directory)
        terminals = [
            simulator.add_terminal(
                TerminalSpec(
                    serial=f"LAT{i:05d}", users=USER_COUNT, records=1, first_punch=history_start(1, ZONE)
                )
            )
            for i in range(1, 4)
        ]
        with FakeDingTalk(users=USERS.values(), app_key=APP_KEY, app_secret=APP_SECRET) as fake:
            config = write_config(
                work / "config.yaml",
                config_document(
                    work / "zk.db",
                    fake.url,
                    [(f"lat{i}", t.port) for i, t in enumerate(terminals, 1)],
                    LATENCY_INTERVAL_SECONDS,
                ),
            )
            daemon = Daemon(config, work / "daemon.log").start()
            try:
                # Warm-up: each terminal's one old record delivered, so a token is held and polls run.
                wait_until(lambda: len(fake.uploads) >= len(terminals), 30, "the first uploads")
                sent: dict[tuple[str, str, int], float] = {}
                with ArrivalWatcher(fake) as watcher:
                    for i in range(punches):
                        time.sleep(rng.uniform(0.2, 1.8))
                        terminal = rng.choice(terminals)
                        for turn in range(len(enrolls)):
                            enroll = enrolls[(i + turn) % len(enrolls)]
                            local = terminal.terminal_time().strftime("%Y-%m-%d %H:%M:%S")
                            key = (terminal.serial, USERS[enroll], check_time_ms(local, zone))
                            if key not in sent:  # one user, one terminal, one second: the natural key merges
                                break
                        started = time.monotonic()
                        record = terminal.add_punch(enroll, local_time=local, punch_state=i % 2)
                        assert record is not None, "the fake terminal's log is full"
                        sent[key] = started
                    wait_until(
                        lambda: all(key in watcher.arrivals for key in sent), 30, "every punch to arrive"
                    )
                    time.sleep(2 * LATENCY_INTERVAL_SECONDS)  # a late duplicate would show up here
                arrivals = dict(watcher.arrivals)
            finally:
                code = daemon.stop()
            if code != 0:
                raise RuntimeError(f"the daemon exited {code}:\n{daemon.tail()}")
            problems = daemon.problems()
    latencies = [arrivals[key][0] - started for key, started in sent.items()]
    duplicates = sum(len(times) - 1 for key, times in arrivals.items() if key in sent)
    out.write(f"  {len(sent)} punches on {len(terminals)} terminals, seed {seed}\n")
    if problems:
        out.write(f"  the daemon logged warnings/errors: {dict(problems)}\n")
    return {
        "punches": float(len(sent)),
        "delivered": float(sum(1 for key in sent if key in arrivals)),
        "duplicates": float(duplicates),
        "latency_min_s": min(latencies),
        "latency_median_s": statistics.median(latencies),
        "latency_p90_s": nearest_rank(latencies, 0.9),
        "latency_max_s": max(latencies),
    }


# ------------------------------------------------------------------------------- 2. memory


def populate_store(path: Path, devices: Sequence[tuple[str, str]], total: int, days: float) -> float:
    """Fill a new store with `total` punches spread over the `days` before yesterday across `devices`
    (name, serial), all delivered. Return the seconds it took.

    The punches go in through `Store.save_poll` (the daemon's own write path); marking them delivered is
    one SQL UPDATE, acceptable in a bench. Stored and delivered times follow each punch's own time, so
    `status` sees a store built up over months rather than in one afternoon.
    """
    started = time.monotonic()
    zone = ZoneInfo(ZONE)
    end = datetime.now(zone).replace(microsecond=0) - timedelta(days=1)
    begin = end - timedelta(days=days)
    per_device = total // len(devices)
    step = int((end - begin).total_seconds() // per_device)
    enrolls = list(USERS)
    polled_at = datetime.now(timezone.utc)
    with Store.open(path) as store:
        for index, (name, serial) in enumerate(devices):
            count = per_device + (1 if index < total - per_device * len(devices) else 0)
            first = begin + timedelta(seconds=index)  # terminals' punches do not share a second
            batch = []
            for k in range(count):
                at = first + timedelta(seconds=k * step)
                batch.append(
                    Punch(
                        device=name,
                        serial=serial,
                        enroll_number=enrolls[k % len(enrolls)],
                        local_time=at.strftime("%Y-%m-%d %H:%M:%S"),
                        punch_state=k % 2,
                        verify_mode=1,
                        check_time_ms=int(at.timestamp() * 1000),
                    )
                )
            store.save_poll(
                name, serial=serial, record_count=count, record_size=40, punches=batch, polled_at=polled_at
            )
    connection = sqlite3.connect(str(path))
    try:
        cases = " ".join(f"WHEN '{enroll}' THEN '{userid}'" for enroll, userid in USERS.items())
        stamp = "strftime('%Y-%m-%dT%H:%M:%S', check_time_ms / 1000 + {}, 'unixepoch') || '.000000+00:00'"
        with connection:
            connection.execute(
                f"UPDATE punches SET delivery = 'delivered', attempts = 1, "  # noqa: S608 - constants only
                f"stored_at = {stamp.format(5)}, next_attempt_at = {stamp.format(5)}, "
                f"delivered_at = {stamp.format(8)}, userid = CASE enroll_number {cases} END"
            )
            # The terminals have never been polled by this daemon: no checkpoints, the first poll reads all.
            connection.execute("DELETE FROM checkpoints")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()
    return time.monotonic() - started


@dataclass
class FleetChild:
    """`zkdingsync simulate` in a child process, and the terminals it printed."""

    process: subprocess.Popen[str]
    terminals: list[tuple[str, int, str]]  # (name, port, serial)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


LINE = re.compile(r"^(?P<name>\S+) port=(?P<port>\d+) serial=(?P<serial>\S+) ")


def start_fleet(terminals: int, records: int, punch_interval: float) -> FleetChild:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zkdingsync",
            "simulate",
            "--terminals",
            str(terminals),
            "--base-port",
            "0",
            "--users",
            str(USER_COUNT),
            "--records",
            str(records),
            "--punch-interval",
            f"{punch_interval:g}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    found = []
    for _ in range(terminals):
        line = process.stdout.readline()
        match = LINE.match(line)
        if match is None:
            process.kill()
            raise RuntimeError(f"unexpected line from `zkdingsync simulate`: {line!r}")
        found.append((match["name"], int(match["port"]), match["serial"]))
    return FleetChild(process, found)


class RssSampler:
    """Reads VmRSS of a process every `every` seconds (kB -> MB) until stopped."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, float]] = []  # (monotonic, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def status_mb(self, key: str) -> float | None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        return int(match[1]) / 1024 if match else None

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            rss = self.status_mb("VmRSS")
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            if self._stop.wait(self.every):
                return

    def first_after(self, moment: float) -> float | None:
        return next((mb for at, mb in self.samples if at >= moment), None)


def time_status(config: Path, runs: int) -> tuple[float, dict[str, Any]]:
    """Run `zkdingsync status --json` `runs` times; return the median wall time and the last document."""
    samples = []
    document: dict[str, Any] = {}
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "zkdingsync", "status", "--json", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        samples.append(time.perf_counter() - started)
        document = json.loads(result.stdout)  # exit 1 only means "needs attention"; the JSON is there
    return statistics.median(samples), document


def bench_memory(terminals: int, store_punches: int, seconds: float, out: TextIO) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as directory:
        work = Path(directory)
        fleet = start_fleet(terminals, records=20, punch_interval=20)
        try:
            devices = [(name, port) for name, port, _ in fleet.terminals]
            populate_seconds = populate_store(
                work / "zk.db", [(name, serial) for name, _, serial in fleet.terminals], store_punches, 150
            )
            out.write(
                f"  store of {store_punches:,} delivered punches over 150 days across {terminals} serials "
                f"built in {populate_seconds:.1f} s ({(work / 'zk.db').stat().st_size / 2**20:.0f} MB)\n"
            )
            with FakeDingTalk(users=USERS.values(), app_key=APP_KEY, app_secret=APP_SECRET) as fake:
                config = write_config(
                    work / "config.yaml",
                    config_document(work / "zk.db", fake.url, devices, MEMORY_INTERVAL_SECONDS),
                )
                daemon = Daemon(config, work / "daemon.log").start()
                polled: set[str] = set()
                first_cycle_at: float | None = None
                started = time.monotonic()
                status_seconds = 0.0
                status_doc: dict[str, Any] = {}
                try:
                    with RssSampler(daemon.pid) as sampler:
                        while time.monotonic() - started < seconds:
                            if daemon.process is not None and daemon.process.poll() is not None:
                                raise RuntimeError(f"the daemon died:\n{daemon.tail()}")
                            for event in daemon.new_events():
                                if event.get("event") == "poll.finished":
                                    polled.add(str(event.get("device")))
                            if first_cycle_at is None and len(polled) >= terminals:
                                first_cycle_at = time.monotonic()
                            if not status_doc and time.monotonic() - started >= seconds / 2:
                                status_seconds, status_doc = time_status(config, 3)
                            time.sleep(0.25)
                        peak = sampler.status_mb("VmHWM")
                    delivered = len(fake.uploads)
                finally:
                    code = daemon.stop()
                if code != 0:
                    raise RuntimeError(f"the daemon exited {code}:\n{daemon.tail()}")
                problems = daemon.problems()
        finally:
            fleet.stop()
    if first_cycle_at is None:
        raise RuntimeError(f"only {len(polled)} of {terminals} terminals were polled in {seconds:g} s")
    after_first = sampler.first_after(first_cycle_at)
    total = status_doc.get("delivery", {}).get("delivered_total")
    out.write(
        f"  {terminals} terminals (zkdingsync simulate child, 20 records each, a punch every 20 s), "
        f"interval {MEMORY_INTERVAL_SECONDS:g} s, {seconds:g} s run; status saw delivered_total={total}\n"
    )
    if problems:
        out.write(f"  the daemon logged warnings/errors: {dict(problems)}\n")
    return {
        "first_cycle_done_s": first_cycle_at - started,
        "rss_after_first_cycle_mb": after_first or 0.0,
        "rss_max_sampled_mb": max(mb for _, mb in sampler.samples),
        "peak_rss_mb": peak or 0.0,
        "delivered_during_run": float(delivered),
        "status_json_s": status_seconds,
    }


# ------------------------------------------------------------------------------------- report


def report(results: dict[str, dict[str, float]], out: TextIO) -> bool:
    """Print the figures with their goals (every daemon figure must stay at or under its goal), then the
    delivery checks; return True when all hold."""
    ok = print_figures(results, GOALS, out, higher_is_better=lambda key: False)
    if "latency" in results:
        figures = results["latency"]
        if figures["delivered"] != figures["punches"] or figures["duplicates"]:
            out.write("  WRONG: every punch must arrive exactly once\n")
            ok = False
    return ok


def main(argv: list[str]) -> int:
    """Run the daemon benchmarks and print the figures; return 1 on a missed goal with --strict."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_daemon", description=__doc__.splitlines()[0])
    parser.add_argument("--punches", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--terminals", type=int, default=200)
    parser.add_argument("--store-punches", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the memory run lasts")
    parser.add_argument("--only", choices=("latency", "memory"), default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    configure_logging("warning")  # the in-process fakes stay quiet; the daemon logs to its own file
    print(
        f"cpus={os.cpu_count()} python={sys.version.split()[0]}; the real daemon in a child process",
        flush=True,
    )
    results: dict[str, dict[str, float]] = {}
    if args.only in (None, "latency"):
        print("latency", flush=True)
        results["latency"] = bench_latency(args.punches, args.seed, sys.stdout)
    if args.only in (None, "memory"):
        print("memory", flush=True)
        results["memory"] = bench_memory(args.terminals, args.store_punches, args.seconds, sys.stdout)
    ok = report(results, sys.stdout)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
