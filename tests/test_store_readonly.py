"""The operator's side of the store: `status` reads without writing, sees one consistent snapshot, uses
indexes on a large store; `status` and `retry` run as root beside a daemon of another user leave nothing
the daemon cannot use."""

from __future__ import annotations

import io
import os
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from zkdingsync.config import Config, DeviceConfig, DingTalkConfig, StoreConfig
from zkdingsync.errors import StoreError
from zkdingsync.model import Delivery, Punch
from zkdingsync.retry import retry_command
from zkdingsync.status import collect_status, status_command
from zkdingsync.store import Store

NOW = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)
SHANGHAI = ZoneInfo("Asia/Shanghai")


def punch(n: int, device: str = "lobby") -> Punch:
    return Punch(
        device=device,
        serial=f"SN-{device}",
        enroll_number=str(1000 + n % 7),
        local_time=f"2026-11-25 09:{n // 60 % 60:02d}:{n % 60:02d}",
        punch_state=0,
        verify_mode=1,
        check_time_ms=1_764_032_400_000 + n * 1000,
    )


def fill(path: Path, count: int = 20) -> None:
    with Store.open(path) as store:
        store.save_poll(
            "lobby",
            serial="SN-lobby",
            record_count=count,
            record_size=40,
            punches=[punch(n) for n in range(count)],
            polled_at=NOW,
        )
        for stored in store.claim_due(NOW, limit=count // 2):
            store.mark_delivered(stored.id, at=NOW, userid="u")
        store.park(store.claim_due(NOW, limit=1)[0].id, reason="enroll number 1003 has no DingTalk user")


def config_for(path: Path) -> Config:
    return Config(
        dingtalk=DingTalkConfig(app_key="dingabc123", app_secret="secret-123456"),
        devices=(DeviceConfig(name="lobby", host="127.0.0.1"),),
        store=StoreConfig(path=path),
        timezone="Asia/Shanghai",
    )


def snapshot_files(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {entry.name: (entry.stat().st_mtime_ns, entry.read_bytes()) for entry in directory.iterdir()}


def test_status_opens_the_store_read_only_and_changes_nothing_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "zk.db"
    fill(path)
    before = snapshot_files(tmp_path)
    assert sorted(before) == ["zk.db"]  # a cleanly closed store: no -wal, no -shm
    out, err = io.StringIO(), io.StringIO()
    code = status_command(config_for(path), as_json=True, out=out, err=err, now=NOW)
    assert code == 1, err.getvalue()  # one punch parked
    assert '"parked": 1' in out.getvalue()
    assert snapshot_files(tmp_path) == before


def test_read_only_store_refuses_writes_and_needs_an_existing_store(tmp_path: Path) -> None:
    path = tmp_path / "zk.db"
    with pytest.raises(StoreError, match="no such file"):
        Store.open(path, read_only=True)
    assert not path.exists()
    fill(path)
    with Store.open(path, read_only=True) as store:
        assert store.count_in(Delivery.PARKED) == 1
        with pytest.raises(StoreError, match=r"readonly|query_only"):
            store.set_value("x", "y")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreError, match="not a zkdingsync store"):
        Store.open(other, read_only=True)


def test_status_figures_come_from_one_snapshot_while_the_daemon_writes(tmp_path: Path) -> None:
    path = tmp_path / "zk.db"
    fill(path)
    with Store.open(path, lock=True) as daemon, Store.open(path, read_only=True) as reader:
        with reader.snapshot():
            first = reader.delivery_counts()
            for stored in daemon.claim_due(NOW, limit=100):
                daemon.mark_delivered(stored.id, at=NOW, userid="u")
            # The daemon's commits after the snapshot began are not mixed into it.
            assert reader.delivery_counts() == first
            assert reader.delivered_since(NOW - timedelta(days=1)) == first[Delivery.DELIVERED]
        assert reader.delivery_counts()[Delivery.PENDING] == 0


def test_status_queries_use_indexes_not_a_scan_of_every_punch(tmp_path: Path) -> None:
    path = tmp_path / "zk.db"
    fill(path)
    with Store.open(path, read_only=True) as store:
        statements: list[str] = []
        store._conn.set_trace_callback(statements.append)
        collect_status(store, ["lobby"], NOW, month_quota=5000, local_tz=SHANGHAI)
        store._conn.set_trace_callback(None)
        scans = {}
        for sql in dict.fromkeys(statements):
            if not sql.lstrip().upper().startswith("SELECT") or "punches" not in sql:
                continue
            plan = [row[3] for row in store._conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
            if any(step.startswith("SCAN punches") and "INDEX" not in step for step in plan):
                scans[sql] = plan
    assert len(statements) > 5
    assert not scans, scans


# ------------------------------------------------------------------ root beside a daemon of another user

NOBODY = 65534


@pytest.fixture
def foreign_store(tmp_path: Path) -> Path:
    """A store owned by another user (uid 65534), as the systemd unit's `zkdingsync` user leaves it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    path = tmp_path / "state" / "zk.db"
    fill(path)
    for entry in [path.parent, *path.parent.iterdir()]:
        os.chown(entry, NOBODY, NOBODY)
    return path


def owners(directory: Path) -> dict[str, int]:
    return {entry.name: entry.stat().st_uid for entry in directory.iterdir()}


def test_root_status_and_retry_leave_no_root_owned_file_for_the_daemon(foreign_store: Path) -> None:
    config = config_for(foreign_store)
    out, err = io.StringIO(), io.StringIO()
    assert status_command(config, as_json=False, out=out, err=err, now=NOW) == 1, err.getvalue()
    assert retry_command(config, out=out, err=err, now=NOW) == 0, err.getvalue()
    assert "re-queued 1 parked punch" in out.getvalue()
    assert set(owners(foreign_store.parent).values()) == {NOBODY}
    # Root's connections still open (a `retry` killed mid-way, a `status` beside it): the -wal and -shm
    # files they created belong to the database's owner, so the daemon's user can go on writing.
    with Store.open(foreign_store) as writer, Store.open(foreign_store, read_only=True) as reader:
        writer.set_value("left", "open")
        assert reader.get_value("left", now=NOW) == "open"
        found = owners(foreign_store.parent)
        assert {"zk.db-wal", "zk.db-shm"} <= set(found), found
        assert set(found.values()) == {NOBODY}, found
    assert set(owners(foreign_store.parent).values()) == {NOBODY}
