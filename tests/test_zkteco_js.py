"""An independent client, zkteco-js 1.7.2 (Node.js, from the npm registry), reads users and attendance
from `zkdingsync simulate` every time: it parses one protocol packet per TCP segment, as a real terminal
sends them, so it shows the simulator does too.

Skipped with the reason where `node`/`npm` are missing or the package cannot be installed (offline). The
package goes into a cache directory outside the source tree (`$ZKDINGSYNC_TEST_CACHE`, default
`~/.cache/zkdingsync-tests`), installed once and reused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "zkteco-js@1.7.2"
TRIES = 20
RECORDS = 3000  # two READ_BUFFER chunks
USERS = 20
SCRIPT = Path(__file__).parent / "zkteco_js" / "read_terminal.js"
SIMULATE = (sys.executable, "-m", "zkdingsync", "simulate", "--base-port", "0")


def _module_dir() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: the zkteco-js client cannot run here")
    cache = Path(os.environ.get("ZKDINGSYNC_TEST_CACHE", Path.home() / ".cache" / "zkdingsync-tests"))
    target = cache / PACKAGE.replace("@", "-")
    if (target / "node_modules" / "zkteco-js" / "package.json").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            [npm, "install", "--prefix", str(target), "--no-audit", "--no-fund", "--no-save", PACKAGE],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm could not install {PACKAGE} within 120 s (offline?)")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"npm could not install {PACKAGE} (offline?): {last}")
    return target


@pytest.fixture(name="simulated_port")
def simulated_port_fixture(tmp_path: Path) -> Iterator[int]:
    """`zkdingsync simulate` as its own process, one terminal on a free port."""
    out = tmp_path / "simulate.out"
    with out.open("wb") as stdout:
        process = subprocess.Popen(
            [*SIMULATE, "--users", str(USERS), "--records", str(RECORDS)],
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        from fixtures_simulator import wait_for

        line = wait_for(lambda: "port=" in out.read_text() and out.read_text(), timeout=20)
        yield int(line.split("port=", 1)[1].split()[0])
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_zkteco_js_reads_users_and_attendance_every_time(simulated_port: int) -> None:
    module_dir = _module_dir()
    done = subprocess.run(
        ["node", str(SCRIPT), str(module_dir), "127.0.0.1", str(simulated_port), str(TRIES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == TRIES, done.stderr[-2000:]
    failed = [r for r in results if (r["users"], r["records"], r["error"]) != (USERS, RECORDS, None)]
    assert not failed, f"{len(failed)} of {TRIES} tries failed: {failed[:3]}"
