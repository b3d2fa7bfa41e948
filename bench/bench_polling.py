"""Polling benchmarks, side by side in one run, against fake terminals served by a CHILD process (so the
fake's CPU is not charged to the poller, as with real terminals on the LAN):

1. a no-change poll vs a full download of a terminal holding 100,000 records (goal: >= 50x cheaper);
2. our linear parser vs pyzk 0.9's `get_attendance()` at 100,000 records (goal: >= 20x faster), with
   the end-to-end figures (download + parse) next to it;
3. one poll cycle over 200 terminals with one new punch each, through the real poller, adapter and
   SQLite store (goal: under 5 s on 2 cores).

Run: `python -m bench.bench_polling [--terminals 200] [--records 1000] [--big 100000] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import json
import os
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

from zk import ZK

from bench.figures import report as print_figures
from zkdingsync.config.objects import DeviceConfig, PollConfig
from zkdingsync.devices import zk as adapter
from zkdingsync.devices.records import parse_attendance_buffer
from zkdingsync.logs import configure_logging
from zkdingsync.poller import Poller
from zkdingsync.store import Store

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"no_change_vs_full": 50.0, "parser_vs_get_attendance": 20.0, "cycle_200_seconds": 5.0}


# ------------------------------------------------------------------------------ the fake terminals


def serve(terminals: int, records: int, big: int) -> None:
    """Child process: serve one big terminal and a fleet; print their ports as JSON, then obey stdin:
    "punch-all" adds one punch to every fleet terminal; "quit" (or end of input) stops."""
    from zkdingsync.simulator import Simulator, TerminalSpec

    configure_logging("warning")

    with Simulator() as simulator:
        large = simulator.add_terminal(
            TerminalSpec(serial="BIG0000001", record_size=40, users=200, records=big, capacity=big * 2)
        )
        fleet = [
            simulator.add_terminal(
                TerminalSpec(
                    serial=f"FLEET{i:05d}", record_size=40, users=50, records=records, capacity=100_000
                )
            )
            for i in range(terminals)
        ]
        print(json.dumps({"big": large.port, "fleet": [t.port for t in fleet]}), flush=True)
        stamp = 0
        base = datetime.now(timezone.utc) - timedelta(hours=1)
        for line in sys.stdin:
            command = line.strip()
            if command == "punch-all":
                stamp += 1
                for terminal in fleet:
                    terminal.add_punch("1001", base + timedelta(seconds=stamp))
                print("ok", flush=True)
            elif command == "quit":
                break


@dataclass
class Child:
    """The fake-terminal process and its ports."""

    process: subprocess.Popen[str]
    big: int
    fleet: list[int]

    def command(self, text: str) -> None:
        stdin, stdout = self._pipes()
        stdin.write(text + "\n")
        stdin.flush()
        if stdout.readline().strip() != "ok":
            raise RuntimeError(f"the fake terminals did not acknowledge {text!r}")

    def _pipes(self) -> tuple[TextIO, TextIO]:
        if self.process.stdin is None or self.process.stdout is None:
            raise RuntimeError("no pipes to the fake terminals")
        return self.process.stdin, self.process.stdout

    def close(self) -> None:
        stdin, _ = self._pipes()
        stdin.write("quit\n")
        stdin.flush()
        self.process.wait(30)


def start_child(terminals: int, records: int, big: int) -> Child:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_polling", "--serve", str(terminals), str(records), str(big)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if process.stdout is None:
        raise RuntimeError("no pipe from the fake terminals")
    ports = json.loads(process.stdout.readline())
    return Child(process, ports["big"], ports["fleet"])


# ---------------------------------------------------------------------------------------- timing


def timed(action: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Run `action` `repeat` times; return (median seconds, last result)."""
    samples = []
    result = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), result


def device(name: str, port: int) -> DeviceConfig:
    return DeviceConfig(name=name, host="127.0.0.1", port=port)


def bench_no_change(port: int) -> dict[str, float]:
    big = device("big", port)
    full_seconds, read = timed(lambda: adapter.read_log(big, 10, known=adapter.KnownLog.NOTHING), 3)
    state = read.state
    idle_seconds, idle = timed(
        lambda: adapter.read_log(
            big, 10, known=adapter.KnownLog(serial=state.serial, count=state.record_count)
        ),
        50,
    )
    assert not idle.downloaded and read.downloaded and len(read.records) == state.record_count
    return {
        "records": state.record_count,
        "full_download_ms": full_seconds * 1000,
        "no_change_poll_ms": idle_seconds * 1000,
        "no_change_vs_full": full_seconds / idle_seconds,
    }


def bench_parser(port: int) -> dict[str, float]:
    def raw_download() -> tuple[bytes, int]:
        client = ZK("127.0.0.1", port=port, timeout=30, ommit_ping=True)
        client.connect()
        try:
            client.read_sizes()
            client.get_users()  # get_attendance() downloads the user table too
            buffer, _ = client.read_with_buffer(13)
            return bytes(buffer), int(client.records)
        finally:
            client.disconnect()

    def get_attendance() -> int:
        client = ZK("127.0.0.1", port=port, timeout=60, ommit_ping=True)
        client.connect()
        try:
            return len(client.get_attendance())
        finally:
            client.disconnect()

    download_seconds, (buffer, count) = timed(raw_download, 3)
    ours_seconds, (_, records) = timed(lambda: parse_attendance_buffer(buffer, count), 5)
    pyzk_seconds, pyzk_count = timed(get_attendance, 1)
    ours_end_to_end, read = timed(
        lambda: adapter.read_log(device("big", port), 30, known=adapter.KnownLog.NOTHING), 3
    )
    assert len(records) == pyzk_count == count == len(read.records)
    pyzk_parse = max(pyzk_seconds - download_seconds, 1e-9)
    return {
        "records": count,
        "our_parse_ms": ours_seconds * 1000,
        "pyzk_get_attendance_ms": pyzk_seconds * 1000,
        "pyzk_parse_only_ms": pyzk_parse * 1000,
        "parser_vs_get_attendance": pyzk_parse / ours_seconds,
        "our_read_log_ms": ours_end_to_end * 1000,
        "end_to_end_vs_get_attendance": pyzk_seconds / ours_end_to_end,
    }


def bench_cycle(child: Child, rounds: int = 3) -> dict[str, float]:
    devices = [device(f"t{i:03d}", port) for i, port in enumerate(child.fleet)]
    poll = PollConfig(interval_seconds=60, timeout_seconds=10, max_concurrency=32)
    with tempfile.TemporaryDirectory() as directory, Store.open(Path(directory) / "bench.db") as store:
        poller = Poller(devices, store, poll=poll)
        now = datetime.now(timezone.utc)

        def cycle() -> list[Any]:
            nonlocal now
            now += timedelta(seconds=60)
            results = poller.poll_due(now)
            failed = [result for result in results if not result.ok]
            if failed:
                raise RuntimeError(f"{len(failed)} polls failed, e.g. {failed[0]}")
            return results

        first_seconds, _ = timed(cycle, 1)
        idle_seconds, idle = timed(cycle, 1)
        assert all(not result.downloaded for result in idle)
        samples = []
        for _ in range(rounds):
            child.command("punch-all")
            seconds, results = timed(cycle, 1)
            assert sum(result.new for result in results) == len(devices), "every new punch stored once"
            samples.append(seconds)
        poller.close()
    return {
        "terminals": len(devices),
        "first_cycle_s": first_seconds,
        "no_change_cycle_s": idle_seconds,
        "cycle_200_seconds": statistics.median(samples),
    }


def report(results: dict[str, dict[str, float]], out: TextIO) -> bool:
    """Print the figures with their goals (times must stay under theirs, ratios reach theirs)."""
    return print_figures(results, GOALS, out, higher_is_better=lambda key: not key.endswith("_seconds"))


def main(argv: list[str]) -> int:
    """Run the three polling benchmarks and print the figures; return 1 on a missed goal with --strict."""
    if argv[:1] == ["--serve"]:
        serve(int(argv[1]), int(argv[2]), int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_polling", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--terminals", type=int, default=200)
    parser.add_argument("--records", type=int, default=1000, help="records on each fleet terminal")
    parser.add_argument("--big", type=int, default=100_000, help="records on the big terminal")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    configure_logging("warning")  # one poll.finished line per terminal would bury the figures
    print(
        f"cpus={os.cpu_count()} python={sys.version.split()[0]} big={args.big} "
        f"fleet={args.terminals}x{args.records} records; fake terminals in a child process",
        flush=True,
    )
    child = start_child(args.terminals, args.records, args.big)
    try:
        results = {
            "no-change poll vs full download": bench_no_change(child.big),
            "parser vs pyzk get_attendance()": bench_parser(child.big),
            "cycle over the fleet, one new punch each": bench_cycle(child),
        }
    finally:
        child.close()
    ok = report(results, sys.stdout)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
