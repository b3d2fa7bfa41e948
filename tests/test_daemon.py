"""The real `zkdingsync run` process, with fake terminals and a fake DingTalk on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401
from harness import DaemonProcess, run_cli, write_config, write_fleet_config

from zkdingsync.cli import EXIT_CONFIG
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.simulator import FakeTerminal, Fault, history_start, protocol

USERS = {"1001": "alice", "1002": "bob", "1003": "carol"}
SHANGHAI = ZoneInfo("Asia/Shanghai")


APP_KEY = "dinge2e"
APP_SECRET = "e2e-secret-value-1234"


def configure(path: Path, dingtalk: FakeDingTalk, fleet: dict[str, FakeTerminal]) -> Path:
    """Write the daemon's config for these fakes (store beside it) and return its path."""
    return write_fleet_config(
        path, dingtalk=dingtalk, fleet=fleet, users=USERS, app_key=APP_KEY, app_secret=APP_SECRET
    )


def expected_uploads(fleet: dict[str, FakeTerminal]) -> list[tuple[str, str, str]]:
    """Every mapped punch the terminals recorded, as (userid, local time, serial)."""
    return sorted(
        (USERS[record.enroll_number], record.local_time, terminal.serial)
        for terminal in fleet.values()
        for record in terminal.records
        if record.enroll_number in USERS
    )


def received(dingtalk: FakeDingTalk) -> list[tuple[str, str, str]]:
    """What DingTalk accepted, as (userid, Shanghai wall-clock time, device_id)."""
    return sorted(
        (
            str(upload["userid"]),
            datetime.fromtimestamp(int(upload["user_check_time"]) / 1000, SHANGHAI).strftime(
                "%Y-%m-%d %H:%M:%S"
            ),
            str(upload["device_id"]),
        )
        for upload in dingtalk.uploads
    )


@pytest.fixture
def dingtalk() -> Iterator[FakeDingTalk]:
    with FakeDingTalk(users=USERS.values(), app_key=APP_KEY, app_secret=APP_SECRET) as fake:
        yield fake


def test_every_punch_is_delivered_exactly_once_while_punches_keep_coming(
    tmp_path: Path, terminals: Callable[..., FakeTerminal], dingtalk: FakeDingTalk
) -> None:
    fleet = {
        "lobby": terminals(
            serial="E2E00001", record_size=40, users=3, records=30, first_punch=history_start(30)
        ),
        "warehouse": terminals(
            serial="E2E00002",
            record_size=16,
            user_table_size=28,
            users=3,
            records=30,
            first_punch=history_start(30),
        ),
        "office": terminals(
            serial="E2E00003", record_size=49, users=3, records=30, first_punch=history_start(30)
        ),
    }
    config = configure(tmp_path / "config.yaml", dingtalk, fleet)
    daemon = DaemonProcess(config, tmp_path)
    try:
        wait_for(lambda: len(dingtalk.uploads) >= 60, timeout=30, interval=0.05)
        # Punches made while the daemon runs.
        for terminal in fleet.values():
            for enroll in ("1001", "1002", "1003"):
                terminal.add_punch(enroll, punch_state=1)
        expected = expected_uploads(fleet)
        wait_for(lambda: len(dingtalk.uploads) >= len(expected), timeout=30, interval=0.05)
    finally:
        code = daemon.terminate(timeout=10)
    assert code == 0, daemon.stderr()[-3000:]
    assert received(dingtalk) == expected
    assert not [key for key, n in Counter(received(dingtalk)).items() if n > 1]
    assert all(terminal.enabled for terminal in fleet.values())
    # Every upload names the terminal as configured and its serial as the device id.
    names = {terminal.serial: name for name, terminal in fleet.items()}
    assert all(names[u["device_id"]] == u["device_name"] for u in dingtalk.uploads)
    assert "Traceback" not in daemon.stderr()


def test_status_while_running_shows_parked_unmapped_employee(
    tmp_path: Path, terminals: Callable[..., FakeTerminal], dingtalk: FakeDingTalk
) -> None:
    lobby = terminals(
        serial="E2E00011", record_size=40, users=4, records=8, first_punch=history_start(8)
    )  # user 1004 is not mapped
    config = configure(tmp_path / "config.yaml", dingtalk, {"lobby": lobby})
    daemon = DaemonProcess(config, tmp_path)
    try:
        wait_for(lambda: len(dingtalk.uploads) >= 6, timeout=30, interval=0.05)

        def parked() -> dict[str, object] | None:
            result = run_cli(["status", "--json", "-c", str(config)])
            document = json.loads(result.stdout)
            return document if document["delivery"]["parked"] == 2 else None

        document = wait_for(parked, timeout=20, interval=0.2)
        reasons = document["delivery"]["parked_reasons"]
        assert "enroll number 1004 has no DingTalk user" in reasons[0]["reason"]
        assert "e2e-secret-value-1234" not in json.dumps(document)
        # A retry re-queues them while the daemon runs; they park again since 1004 is still unmapped.
        result = run_cli(["retry", "-c", str(config)])
        assert result.returncode == 0, result.stderr
        assert "2" in result.stdout
    finally:
        assert daemon.terminate(timeout=10) == 0
    # The unmapped enroll number is logged once, not once per punch.
    assert len([line for line in daemon.stderr().splitlines() if "1004" in line and "unmapped" in line]) <= 2


def test_reload_applies_a_new_terminal_and_keeps_the_old_config_when_the_new_one_is_broken(
    tmp_path: Path, terminals: Callable[..., FakeTerminal], dingtalk: FakeDingTalk
) -> None:
    """`zkdingsync reload` (the unit's ExecReload=) signals the daemon and exits with its verdict: 0 once
    the new file is applied, 78 with the problems when the daemon rejected it and kept the old one."""
    lobby = terminals(serial="E2E00021", record_size=40, users=3, records=3, first_punch=history_start(3))
    gate = terminals(
        serial="E2E00022",
        record_size=16,
        user_table_size=28,
        users=3,
        records=3,
        first_punch=history_start(3),
    )
    config = configure(tmp_path / "config.yaml", dingtalk, {"lobby": lobby})
    runtime = {"RUNTIME_DIRECTORY": str(tmp_path)}
    daemon = DaemonProcess(config, tmp_path, environ=runtime)

    def reload() -> subprocess.CompletedProcess[str]:
        return run_cli(["reload", "--pid", str(daemon.pid), "--timeout", "20"], environ=runtime)

    try:
        wait_for(lambda: len(dingtalk.uploads) >= 3, timeout=30, interval=0.05)
        configure(config, dingtalk, {"lobby": lobby, "gate": gate})
        applied = reload()
        assert (applied.returncode, applied.stdout) == (0, "configuration reloaded\n"), applied.stderr
        assert daemon.events("config.reloaded")  # logged before the answer: applied when reload returns
        wait_for(lambda: len(dingtalk.uploads) >= 6, timeout=30, interval=0.05)
        assert {u["device_id"] for u in dingtalk.uploads} == {"E2E00021", "E2E00022"}

        config.write_text(config.read_text(encoding="utf-8").replace("port:", "prot:", 1), encoding="utf-8")
        rejected = reload()
        assert rejected.returncode == EXIT_CONFIG, rejected.stderr
        assert "unknown key; did you mean 'port'?" in rejected.stderr
        assert "Traceback" not in rejected.stderr
        assert daemon.events("config.reload_rejected")
        gate.add_punch("1002")  # still polled: the old config stays in force
        wait_for(lambda: len(dingtalk.uploads) >= 7, timeout=30, interval=0.05)
        assert daemon.running()
    finally:
        assert daemon.terminate(timeout=10) == 0
    assert "prot" in str(daemon.events("config.reload_rejected")[0]["problems"])


def test_run_with_a_bad_config_exits_78_without_traceback(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "dingtalk: {app_key: k, app_secret: s}\ndevices:\n  - name: a\n    host: '1.2.3.4; rm -rf /'\n",
        encoding="utf-8",
    )
    result = run_cli(["run", "-c", str(config)])
    assert result.returncode == EXIT_CONFIG == 78
    assert "devices[0].host" in result.stderr and ":4:" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_demo_runs_the_whole_product_and_reports_what_dingtalk_received() -> None:
    result = run_cli(["demo", "--seconds", "3", "--log-format", "json"], timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "daemon stopped with exit code 0" in result.stdout
    assert "0 duplicates" in result.stdout
    assert "enroll number 1004 has no DingTalk user" in result.stdout
    assert "Traceback" not in result.stderr


class NotifyListener:
    """systemd's side of sd_notify: a datagram socket that keeps every message the daemon sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.heard: list[str] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.1)

    def hear(self, wanted: Callable[[str], bool]) -> bool:
        """Read what arrived; return True when some message so far satisfies `wanted`."""
        try:
            while True:
                self.heard.append(self._socket.recv(4096).decode())
        except TimeoutError:
            pass
        return any(wanted(message) for message in self.heard)

    def close(self) -> None:
        self._socket.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    notify = NotifyListener(tmp_path / "notify.sock")
    try:
        yield notify
    finally:
        notify.close()


def test_systemd_hears_ready_status_watchdog_reloading_and_stopping(
    tmp_path: Path, terminals: Callable[..., FakeTerminal], dingtalk: FakeDingTalk, listener: NotifyListener
) -> None:
    lobby = terminals(serial="E2E00031", record_size=40, users=3, records=3, first_punch=history_start(3))
    config = configure(tmp_path / "config.yaml", dingtalk, {"lobby": lobby})
    environ = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "2000000"}
    daemon = DaemonProcess(config, tmp_path, environ=environ)
    try:
        wait_for(lambda: listener.hear(lambda m: m == "READY=1"), timeout=20)
        wait_for(lambda: listener.hear(lambda m: m == "WATCHDOG=1"), timeout=10)
        wait_for(lambda: listener.hear(lambda m: m.startswith("STATUS=")), timeout=10)
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: listener.hear(lambda m: m == "RELOADING=1"), timeout=10)
    finally:
        assert daemon.terminate(timeout=10) == 0
    wait_for(lambda: listener.hear(lambda m: m == "STOPPING=1"), timeout=5)
    heard = listener.heard
    assert heard.index("READY=1") < heard.index("RELOADING=1") < heard.index("STOPPING=1")
    assert heard.count("READY=1") == 2  # started, and reloaded
    status = next(message for message in heard if message.startswith("STATUS="))
    assert re.fullmatch(r"STATUS=[01]/1 terminals ok, \d+ pending, \d+ parked", status)


def test_status_names_the_worst_condition_first(
    tmp_path: Path, terminals: Callable[..., FakeTerminal], dingtalk: FakeDingTalk, listener: NotifyListener
) -> None:
    """Rejected credentials pause delivery, a terminal is down: `systemctl status` says so before the
    counts (and at once, not at the next periodic line)."""
    lobby = terminals(serial="E2E00032", record_size=40, users=3, records=3, first_punch=history_start(3))
    gate = terminals(serial="E2E00033", record_size=40, users=3, records=0)
    gate.power_off()
    config = write_config(
        tmp_path / "config.yaml",
        store=tmp_path / "zk.db",
        api_base=dingtalk.url,
        devices=[("lobby", lobby.port), ("gate", gate.port)],
        users=USERS,
        app_key=APP_KEY,
        app_secret="not-the-app-secret",
    )
    daemon = DaemonProcess(config, tmp_path, environ={"NOTIFY_SOCKET": str(listener.path)})
    expected = re.compile(
        r"STATUS=delivery paused: DingTalk rejected app_key/app_secret \(errcode 40096: .*\); "
        r"1 terminal down: gate; 1/2 terminals ok, 3 pending, 0 parked"
    )
    try:
        wait_for(lambda: listener.hear(expected.fullmatch), timeout=20)
    finally:
        assert daemon.terminate(timeout=10) == 0
    assert "not-the-app-secret" not in "".join(listener.heard)


def test_retry_after_hr_fills_in_a_job_number_delivers_the_parked_punches(
    tmp_path: Path, terminals: Callable[..., FakeTerminal]
) -> None:
    lobby = terminals(serial="E2E00041", record_size=40, users=3, records=6, first_punch=history_start(6))
    # DingTalk knows alice and bob by job number; carol's job number is not filled in yet.
    with FakeDingTalk(
        users={"alice": "1001", "bob": "1002", "carol": None}, app_key=APP_KEY, app_secret=APP_SECRET
    ) as fake:
        config = write_config(
            tmp_path / "config.yaml",
            store=tmp_path / "zk.db",
            api_base=fake.url,
            devices=[("lobby", lobby.port)],
            users={},
            app_key=APP_KEY,
            app_secret=APP_SECRET,
        )
        config.write_text(
            config.read_text(encoding="utf-8").replace(
                "users:\n  map: {}", "users:\n  match_job_number: true"
            ),
            encoding="utf-8",
        )
        daemon = DaemonProcess(config, tmp_path)
        try:
            wait_for(lambda: len(fake.uploads) == 4, timeout=30, interval=0.05)

            def parked() -> bool:
                document = json.loads(run_cli(["status", "--json", "-c", str(config)]).stdout)
                return bool(document["delivery"]["parked"] == 2)

            wait_for(parked, timeout=20, interval=0.2)
            fake.set_users({"alice": "1001", "bob": "1002", "carol": "1003"})
            result = run_cli(["retry", "-c", str(config)])
            assert result.returncode == 0, result.stderr
            wait_for(lambda: len(fake.uploads) == 6, timeout=30, interval=0.05)
        finally:
            assert daemon.terminate(timeout=10) == 0
    assert sorted(u["userid"] for u in fake.uploads) == ["alice", "alice", "bob", "bob", "carol", "carol"]


def test_sigterm_during_a_slow_download_exits_0_quickly_and_leaves_the_terminal_enabled(
    tmp_path: Path, terminals: Callable[..., FakeTerminal], dingtalk: FakeDingTalk
) -> None:
    lobby = terminals(serial="E2E00051", record_size=40, users=3, records=3, first_punch=history_start(3))
    # The buffered read answers after 2.5 s (within the 3 s poll timeout): the terminal is disabled meanwhile.
    lobby.set_fault(Fault.delay(2.5, command=protocol.CMD_READ_BUFFER))
    config = configure(tmp_path / "config.yaml", dingtalk, {"lobby": lobby})
    daemon = DaemonProcess(config, tmp_path)
    try:
        wait_for(lambda: not lobby.enabled, timeout=20, interval=0.01)  # the download is under way
        started = time.monotonic()
        code = daemon.terminate(timeout=10)
        stopped_in = time.monotonic() - started
    finally:
        daemon.ensure_dead()
    assert code == 0, daemon.stderr()[-3000:]
    assert stopped_in < 10
    wait_for(lambda: lobby.enabled, timeout=5)
    assert "Traceback" not in daemon.stderr()


def test_run_on_a_store_that_is_not_a_database_says_so_in_one_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        store=tmp_path / "zk.db",
        api_base="http://127.0.0.1:9",
        devices=[("lobby", 4370)],
        users={},
        app_key=APP_KEY,
        app_secret=APP_SECRET,
    )
    (tmp_path / "zk.db").write_bytes(
        b"this is not an SQLite database, but something an admin copied here" * 100
    )
    result = run_cli(["run", "-c", str(config)])
    assert result.returncode == 1
    assert result.stderr.startswith("zkdingsync: cannot open the store")
    assert "not a database" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
