"""sd_notify over a real AF_UNIX datagram socket, and the systemd unit file."""

from __future__ import annotations

import configparser
import importlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from zkdingsync import systemd

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "zkdingsync.service"


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a short filesystem path (AF_UNIX paths are limited to ~107 bytes)."""
    directory = tempfile.mkdtemp(prefix="zkn")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory)


def test_not_under_systemd_is_a_quiet_no_op() -> None:
    assert systemd.notify("READY=1", environ={}) is False
    assert systemd.ready(environ={"NOTIFY_SOCKET": ""}) is False
    assert systemd.watchdog_interval(environ={}) is None


def test_messages_arrive_on_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    env = {"NOTIFY_SOCKET": path}
    assert systemd.ready(environ=env)
    assert systemd.status("polling 3 terminals,\n12 pending", environ=env)
    assert systemd.watchdog(environ=env)
    assert systemd.reloading(environ=env)
    assert systemd.stopping(environ=env)
    received = [sock.recv(4096) for _ in range(5)]
    assert received == [
        b"READY=1",
        b"STATUS=polling 3 terminals, 12 pending",
        b"WATCHDOG=1",
        b"RELOADING=1",
        b"STOPPING=1",
    ]


def test_abstract_namespace_socket() -> None:
    name = f"zkdingsync-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert systemd.notify("READY=1\nSTATUS=up", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_the_real_environment_is_used_by_default(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_a_dead_socket_never_raises(tmp_path: Path) -> None:
    assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_watchdog_interval() -> None:
    me = str(os.getpid())
    assert systemd.watchdog_interval(environ={"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": me}) == 60.0
    assert systemd.watchdog_interval(environ={"WATCHDOG_USEC": "30000000"}) == 30.0
    # Inherited from a parent: not ours.
    assert systemd.watchdog_interval(environ={"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval(environ={"WATCHDOG_USEC": "garbage"}) is None
    assert systemd.watchdog_interval(environ={"WATCHDOG_USEC": "0"}) is None


# ---------------------------------------------------------------------------------------- the unit file


def read_unit() -> configparser.ConfigParser:
    # strict=False: a unit may repeat a key (ExecReload= twice); interpolation off for $MAINPID and %.
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def config_exit_code() -> int:
    cli = importlib.import_module("zkdingsync.cli")
    # The CLI owner defines EXIT_CONFIG; until then the contract's value (EX_CONFIG from sysexits.h).
    return int(getattr(cli, "EXIT_CONFIG", 78))


def test_unit_stops_restarting_on_a_config_error() -> None:
    service = read_unit()["Service"]
    # "always", not "on-failure": a daemon that stops itself with exit 0 (a crashed worker thread ends the
    # main loop the same way as SIGTERM) must come back; `systemctl stop` is never followed by a restart,
    # and RestartPreventExitStatus holds whatever Restart= says.
    assert service["Restart"] == "always"
    # 243 (CREDENTIALS): systemd could not read /etc/zkdingsync/app_secret; that waits for the admin too.
    assert service["RestartPreventExitStatus"].split() == [str(config_exit_code()), "243"]
    # A failing ExecStartPre would not be covered by RestartPreventExitStatus (main process only).
    assert "ExecStartPre" not in service
    assert service["ExecStart"].split()[1:] == ["run", "-c", "/etc/zkdingsync/config.yaml"]


def test_unit_has_the_required_directives() -> None:
    unit = read_unit()
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "60",
        "RestartSec": "5",
        "TimeoutStopSec": "20",
        "StateDirectory": "zkdingsync",
        "StateDirectoryMode": "0750",
        "ConfigurationDirectory": "zkdingsync",
        "LoadCredential": "app_secret:/etc/zkdingsync/app_secret",
        "User": "zkdingsync",
        "Group": "zkdingsync",
        "UMask": "0027",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service",
        "SystemCallArchitectures": "native",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "Environment": "ZKDINGSYNC_CONFIG=/etc/zkdingsync/config.yaml",
        "SyslogIdentifier": "zkdingsync",
    }
    assert {key: service.get(key) for key in expected} == expected
    text = UNIT.read_text()
    assert "Environment=PYTHONUNBUFFERED=1\n" in text
    # The daemon validates and answers; the command waits, so that `systemctl reload` fails on a bad file.
    assert "ExecReload=/opt/zkdingsync/bin/zkdingsync reload --pid $MAINPID\n" in text
    assert service["RuntimeDirectory"] == "zkdingsync"  # where the daemon answers it
    assert "DynamicUser" not in service
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists; the real one lives in /opt only once installed, so
    # check a copy that points at an existing executable and is otherwise identical.
    text = UNIT.read_text()
    assert text.count("=/opt/zkdingsync/bin/zkdingsync ") == 2
    copy = tmp_path / "zkdingsync.service"
    copy.write_text(text.replace("=/opt/zkdingsync/bin/zkdingsync ", "=/bin/true "))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    complaints = [line for line in result.stderr.splitlines() if "zkdingsync" in line]
    assert result.returncode == 0, result.stderr
    assert complaints == []


def _commands(lines: list[str]) -> list[str]:
    """The shell commands among `lines`, without comments and indentation."""
    commands = [line.split("  #")[0].strip() for line in lines]
    return [command for command in commands if command and not command.startswith("#")]


def test_the_units_install_steps_are_the_readmes() -> None:
    readme = (UNIT.parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Install on a real box", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    wanted = [line for line in _commands(block.splitlines()) if not line.startswith(("cd ", "journalctl"))]
    wanted = [line for line in wanted if line != "zkdingsync status"]
    unit = UNIT.read_text(encoding="utf-8").split("# Install (once)", 1)[1].split("\n#\n", 1)[0]
    steps = [line.removeprefix("#").strip() for line in unit.splitlines()[1:]]
    # The unit's comment covers the README's steps up to the service itself (the backup units follow).
    assert len(steps) >= 12
    assert steps == wanted[: len(steps)]
    assert steps[-1] == "systemctl enable --now zkdingsync"
