"""Reliability scenario 3 at the store: a writer process killed with SIGKILL again and again in the middle
of heavy writes. Afterwards SQLite's integrity check is "ok", every punch the writer reported as stored
is there, and every punch it reported delivered (after `mark_delivered` returned) is still delivered.

The writer reports on a pipe only after the store call returned, so each report is a promise the store
made; the parent kills it at the moment a given number of reports has arrived (no fixed sleeps). Process
death is not power loss, but it is the failure a test can produce honestly: the durable state must be
exactly what was committed (power loss on top is what `synchronous=FULL` in WAL mode is for).
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

from zkdingsync.model import Delivery
from zkdingsync.store import Store

KILLS = 6

WRITER = textwrap.dedent(
    """
    import sys
    from datetime import datetime, timedelta, timezone
    from zkdingsync.model import Punch
    from zkdingsync.store import Store

    path, start = sys.argv[1], int(sys.argv[2])
    now = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)
    store = Store.open(path, lock=True)
    n = start
    while True:
        batch = [
            Punch(
                device="lobby",
                serial="SN1",
                enroll_number=str(1000 + k % 50),
                local_time=(
                    f"2026-11-{1 + k // 86400:02d} {k // 3600 % 24:02d}:{k // 60 % 60:02d}:{k % 60:02d}"
                ),
                punch_state=0,
                verify_mode=1,
                check_time_ms=1_764_000_000_000 + k * 1000,
            )
            for k in range(n, n + 25)
        ]
        store.save_poll(
            "lobby", serial="SN1", record_count=n + 25, record_size=40, punches=batch, polled_at=now
        )
        print(f"stored {n + 25}", flush=True)
        n += 25
        for stored in store.claim_due(now + timedelta(days=1), limit=20):
            store.mark_delivered(stored.id, at=now, userid="u")
            print(f"delivered {stored.punch.local_time}", flush=True)
    """
)


def _run_and_kill(path: Path, start: int, reports: int) -> tuple[int, list[str]]:
    """Start a writer at punch number `start`, SIGKILL it once `reports` lines arrived; return the highest
    stored count it reported and the local times it reported delivered."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line.strip())
        if len(lines) >= reports:
            break
    process.kill()
    process.wait(timeout=10)
    assert len(lines) >= reports, process.stderr.read() if process.stderr else ""
    stored = max((int(line.split()[1]) for line in lines if line.startswith("stored")), default=start)
    return stored, [line.split(" ", 1)[1] for line in lines if line.startswith("delivered")]


def test_repeated_kill_9_during_heavy_writes_keeps_every_promise(tmp_path: Path) -> None:
    path = tmp_path / "zk.db"
    rng = random.Random(20261125)
    promised_stored = 0
    promised_delivered: set[str] = set()
    for _ in range(KILLS):
        stored, delivered = _run_and_kill(path, promised_stored, rng.randint(5, 120))
        promised_stored = max(promised_stored, stored)
        promised_delivered.update(delivered)
        # Each restart opens the store the killed writer left (lock released by the kernel, WAL recovered).
        with Store.open(path, lock=True) as store:
            assert store.integrity_check() == "ok"
            times = {row.punch.local_time for row in store.punches()}
            assert len(times) >= promised_stored
            now_delivered = {row.punch.local_time for row in store.punches(delivery=Delivery.DELIVERED)}
            assert promised_delivered <= now_delivered, sorted(promised_delivered - now_delivered)[:5]
            # A claim the killed writer never settled is left in flight, never silently delivered or lost.
            states = store.delivery_counts()
            assert sum(states.values()) == len(times)
    assert promised_delivered
