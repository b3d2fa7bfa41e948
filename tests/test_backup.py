"""`zkdingsync backup`: an online, integrity-checked copy of the store; and owner-only store files."""

from __future__ import annotations

import io
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401
from harness import DaemonProcess, run_cli, sample_punch, write_config

from zkdingsync.backup import backup_command
from zkdingsync.cli import main
from zkdingsync.config import load_config
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.simulator import FakeTerminal, history_start
from zkdingsync.store import Store

START = datetime(2026, 11, 25, 1, 0, tzinfo=timezone.utc)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def filled_store(path: Path, punches: int) -> None:
    with Store.open(path) as store:
        store.save_poll(
            "lobby",
            serial="SN-lobby",
            record_count=punches,
            record_size=40,
            punches=[sample_punch(n % 60, device="lobby") for n in range(min(punches, 60))]
            + [
                sample_punch(0, device=f"t{n}")
                for n in range(max(0, punches - 60))  # distinct natural keys: one per "terminal"
            ],
            polled_at=START,
        )


def test_store_wal_shm_and_lock_are_owner_only_under_umask_022(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "state" / "zk.db"
    with Store.open(path, lock=True) as store:
        store.save_poll(
            "lobby",
            serial="SN-lobby",
            record_count=1,
            record_size=40,
            punches=[sample_punch(1)],
            polled_at=START,
        )
        companions = [
            path,
            path.with_name("zk.db-wal"),
            path.with_name("zk.db-shm"),
            path.with_name("zk.db.lock"),
        ]
        assert all(p.exists() for p in companions)
        assert {p.name: mode(p) for p in companions} == {p.name: 0o600 for p in companions}


def test_a_store_left_world_readable_is_tightened_when_opened(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "zk.db"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    Store.open(path).close()
    assert mode(path) == 0o600


def config_for(tmp_path: Path, store: Path) -> Path:
    path = tmp_path / "config.yaml"
    write_config(
        path,
        store=store,
        api_base="http://127.0.0.1:9",
        devices=[("lobby", 4370)],
        users={},
        app_key="k",
        app_secret="s",
    )
    return path


def test_backup_into_a_directory_is_dated_checked_counted_and_pruned(tmp_path: Path, umask_022: None) -> None:
    store = tmp_path / "zk.db"
    filled_store(store, 100)
    config = load_config(config_for(tmp_path, store), require_secrets=False, check_store=False)
    backups = tmp_path / "backups"
    lines = []
    for day in range(4):
        out = io.StringIO()
        assert backup_command(config, f"{backups}/", keep=3, out=out, now=START + timedelta(days=day)) == 0
        lines.append(out.getvalue())
    names = sorted(p.name for p in backups.iterdir())
    # Dated in the configured zone (Shanghai: 09:00 on the 25th, 26th, ...); the oldest of four was pruned.
    assert names == [
        "zkdingsync-20261126-090000.db",
        "zkdingsync-20261127-090000.db",
        "zkdingsync-20261128-090000.db",
    ]
    assert "100 punches (pending 100), integrity ok" in lines[0]
    assert " MB, " in lines[0]
    assert lines[3].strip().endswith("removed 1 older")
    assert mode(backups) == 0o700
    for name in names:
        assert mode(backups / name) == 0o600
        with Store.open(backups / name, read_only=True) as copy:
            assert copy.integrity_check() == "ok"
            assert len(copy.punches()) == 100
    # A single file, not a WAL database: restoring is copying one file back.
    assert not [p for p in backups.iterdir() if p.name.endswith(("-wal", "-shm", "-journal"))]


def test_backup_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "zk.db"
    config = config_for(tmp_path, store)
    assert main(["backup", "-c", str(config), str(tmp_path / "b.db")]) == 1
    assert "no store yet" in capsys.readouterr().err
    filled_store(store, 3)
    (tmp_path / "taken.db").write_text("x")
    for args, message in [
        ([str(tmp_path / "taken.db")], "the file exists"),
        ([str(tmp_path), "--keep", "0"], "--keep 0: keep at least 1 copy"),
        ([str(tmp_path / "nowhere" / "b.db")], "no directory"),
    ]:
        assert main(["backup", "-c", str(config), *args]) == 1
        err = capsys.readouterr().err
        assert message in err
        assert len(err.strip().splitlines()) == 1


def test_a_full_disk_gives_one_line_and_leaves_no_partial_file(tmp_path: Path) -> None:
    store = tmp_path / "zk.db"
    filled_store(store, 3000)
    assert store.stat().st_size > 400_000
    config = config_for(tmp_path, store)
    backups = tmp_path / "backups"
    backups.mkdir()
    done = subprocess.run(
        [
            "prlimit",
            "--fsize=200000",
            sys.executable,
            "-m",
            "zkdingsync",
            "backup",
            "-c",
            str(config),
            str(backups),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"zkdingsync: backup failed: disk full at {backups} (nothing was left there)"
    ]
    assert list(backups.iterdir()) == []


USERS = {"1001": "alice", "1002": "bob", "1003": "carol"}


def stored(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with Store.open(path, read_only=True) as store:
            return sum(store.delivery_counts().values())
    except Exception:  # noqa: BLE001 - the daemon may still be creating it
        return 0


def test_backup_while_the_daemon_stores_and_delivers_holds_every_punch_stored_before(
    tmp_path: Path, terminals: Callable[..., FakeTerminal]
) -> None:
    lobby = terminals(
        serial="BKP00001", record_size=40, users=3, records=2000, first_punch=history_start(2000)
    )
    store = tmp_path / "zk.db"
    with FakeDingTalk(users=USERS.values(), app_key="dingbk", app_secret="bk-secret-value-1234") as dingtalk:
        config = write_config(
            tmp_path / "config.yaml",
            store=store,
            api_base=dingtalk.url,
            devices=[("lobby", lobby.port)],
            users=USERS,
            app_key="dingbk",
            app_secret="bk-secret-value-1234",
            poll_interval_seconds=1,
        )
        daemon = DaemonProcess(config, tmp_path)
        stop = threading.Event()

        def punch_on() -> None:  # employees keep punching while the backup runs
            while not stop.wait(0.02):
                lobby.add_punch("1001")

        try:
            wait_for(lambda: stored(store) >= 2000, timeout=30, interval=0.05)
            puncher = threading.Thread(target=punch_on)
            puncher.start()
            wait_for(lambda: dingtalk.uploads, timeout=30, interval=0.05)  # delivering now
            with Store.open(store, read_only=True) as live:
                before = {(p.punch.serial, p.punch.enroll_number, p.punch.local_time) for p in live.punches()}
            uploads_before = len(dingtalk.uploads)
            done = run_cli(["backup", "-c", str(config), str(tmp_path / "backups"), "--keep", "8"])
            stop.set()
            puncher.join()
            wait_for(lambda: len(dingtalk.uploads) > uploads_before, timeout=30, interval=0.05)
        finally:
            stop.set()
            code = daemon.terminate(timeout=10)
    assert code == 0, daemon.stderr()[-2000:]
    assert done.returncode == 0, done.stderr
    assert "integrity ok" in done.stdout
    (copy_path,) = (tmp_path / "backups").iterdir()
    with Store.open(copy_path, read_only=True) as copy:
        assert copy.integrity_check() == "ok"
        copied = {(p.punch.serial, p.punch.enroll_number, p.punch.local_time) for p in copy.punches()}
    assert len(before) >= 2000
    assert before <= copied
    assert "Traceback" not in daemon.stderr()
