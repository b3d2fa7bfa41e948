"""Hostile peers: what a 20 MiB config, a 50 MiB DingTalk answer and an upload that never answers cost.

Each part runs the REAL `zkdingsync` process twice in the same run: from this tree, and from the tree
before the hostile-peer work (`--baseline`, default commit 6d0c005, taken with `git archive`), both against
the same in-process fake DingTalk and fake terminal on 127.0.0.1.

1. `validate` on a 20 MiB file: wall time, lines and bytes on stderr. Goal: within 2 s, one problem line.
2. A 50 MiB answer to 3 uploads (DingTalk took them), 12 punches on one terminal: the daemon's peak RSS
   (VmHWM) until every punch is in DingTalk, or 60 s; then SIGTERM: exit code and stop time, and gettoken
   calls after the signal. Goals: peak RSS under 150 MiB, exit 0 within 10 s.
3. An upload that never answers (dingtalk.timeout_seconds 60): SIGTERM while it hangs. Goal: exit 0 within
   10 s.

Run: `python -m bench.bench_hostile [--baseline COMMIT] [--json FILE] [--strict]`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import yaml

from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.simulator import Simulator, TerminalSpec, history_start

ROOT = Path(__file__).resolve().parent.parent
APP_KEY = "dinghostile"
APP_SECRET = "hostile-bench-secret-1234"  # noqa: S105 - the fake DingTalk's, not a real one
USERS = {"1001": "alice", "1002": "bob", "1003": "carol"}
GOALS = {"validate_s": 2.0, "peak_rss_mib": 150.0, "stop_s": 10.0}


def extract_tree(commit: str, into: Path) -> Path:
    """The `zkdingsync` package as of `commit`, under `into` (for PYTHONPATH)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "zkdingsync"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def child_env(tree: Path | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ZKDINGSYNC_")}
    env["PYTHONUNBUFFERED"] = "1"
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_validate(tree: Path | None, work: Path) -> dict[str, float]:
    config = work / "huge.yaml"
    config.write_text("log:\n  level: " + "x" * (20 * 1024 * 1024) + "\n", encoding="utf-8")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "zkdingsync", "validate", "-c", str(config)],
        capture_output=True,
        env=child_env(tree),
        cwd=work,
        timeout=120,
        check=False,
    )
    took = time.monotonic() - started
    return {
        "validate_s": took,
        "validate_exit": result.returncode,
        "validate_stderr_lines": len(result.stderr.splitlines()),
        "validate_stderr_bytes": len(result.stderr),
    }


def start_daemon(tree: Path | None, work: Path, fake: FakeDingTalk, port: int, timeout: float) -> Any:
    document = {
        "dingtalk": {
            "app_key": APP_KEY,
            "app_secret": APP_SECRET,
            "api_base": fake.url,
            "timeout_seconds": timeout,
            "readback_delay_seconds": 1,
        },
        "store": {"path": str(work / "zk.db")},
        "poll": {"interval_seconds": 1},
        "users": {"map": USERS},
        "devices": [{"name": "lobby", "host": "127.0.0.1", "port": port}],
        "log": {"format": "json"},
    }
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(document), encoding="utf-8")
    log = (work / "daemon.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "zkdingsync", "run", "-c", str(config)],
        stdout=log,
        stderr=log,
        env=child_env(tree),
        cwd=work,
    )


def stop(process: Any) -> tuple[float, int]:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = -9
    return time.monotonic() - started, code


def bench_huge_answer(tree: Path | None, work: Path, simulator: Simulator) -> dict[str, float]:
    terminal = simulator.add_terminal(
        TerminalSpec(serial="BENCH50M", users=3, records=12, first_punch=history_start(12))
    )
    try:
        with FakeDingTalk(users=USERS.values(), app_key=APP_KEY, app_secret=APP_SECRET) as fake:
            fake.huge_next(50 * 1024 * 1024, n=3, accept=True, userid="carol")
            process = start_daemon(tree, work, fake, terminal.port, 2.0)
            delivered = wait_until(lambda: len(fake.uploads) >= 12 and fake.calls["upload"] >= 12, 60)
            rss = peak_rss_mib(process.pid)
            tokens = fake.calls["gettoken"]
            took, code = stop(process)
            return {
                "huge_peak_rss_mib": rss,
                "huge_all_in_dingtalk": float(delivered),
                "huge_stop_s": took,
                "huge_stop_exit": code,
                "huge_tokens_after_sigterm": fake.calls["gettoken"] - tokens,
            }
    finally:
        simulator.remove_terminal(terminal)


def bench_hang(tree: Path | None, work: Path, simulator: Simulator) -> dict[str, float]:
    terminal = simulator.add_terminal(
        TerminalSpec(serial="BENCHHNG", users=2, records=2, first_punch=history_start(2))
    )
    try:
        with FakeDingTalk(
            users=USERS.values(), app_key=APP_KEY, app_secret=APP_SECRET, hang_seconds=120
        ) as fake:
            process = start_daemon(tree, work, fake, terminal.port, 60.0)
            wait_until(lambda: len(fake.uploads) >= 2, 30)
            fake.hang_next(n=None, accept=True)
            terminal.add_punch("1001", punch_state=1)
            wait_until(lambda: fake.calls["upload"] >= 3, 30)
            took, code = stop(process)
            return {"hang_stop_s": took, "hang_stop_exit": code}
    finally:
        simulator.remove_terminal(terminal)


def run_tree(label: str, tree: Path | None, simulator: Simulator) -> dict[str, float]:
    """Every part for one tree (None: this one), each in a fresh directory."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix=f"hostile-{label}-") as directory:
        figures.update(bench_validate(tree, Path(directory)))
    for part in (bench_huge_answer, bench_hang):
        with tempfile.TemporaryDirectory(prefix=f"hostile-{label}-") as directory:
            figures.update(part(tree, Path(directory), simulator))
    return figures


def main(argv: list[str]) -> int:
    """Measure this tree and the baseline; print both with the goals."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_hostile", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="6d0c005", help="the commit to compare with")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="hostile-baseline-") as baseline_dir, Simulator() as simulator:
        results = {
            "this tree": run_tree("now", None, simulator),
            f"baseline {args.baseline}": run_tree(
                "base", extract_tree(args.baseline, Path(baseline_dir)), simulator
            ),
        }
    names = sorted({name for figures in results.values() for name in figures})
    print(f"{'figure':30} " + " ".join(f"{label:>22}" for label in results))
    for name in names:
        print(
            f"{name:30} "
            + " ".join(f"{figures.get(name, float('nan')):>22.2f}" for figures in results.values())
        )
    now = results["this tree"]
    met = (
        now["validate_s"] <= GOALS["validate_s"]
        and now["validate_stderr_lines"] <= 2
        and now["huge_peak_rss_mib"] < GOALS["peak_rss_mib"]
        and now["huge_stop_s"] < GOALS["stop_s"]
        and now["huge_stop_exit"] == 0
        and now["hang_stop_s"] < GOALS["stop_s"]
        and now["hang_stop_exit"] == 0
    )
    print("goals:", "met" if met else "MISSED", GOALS)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
