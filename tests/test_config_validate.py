"""`zkdingsync validate` on broken configurations: exit 78, every problem with file, line and key path,
never a traceback. Runs the real CLI: `main()` in-process for most cases, the real process for some."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from zkdingsync.cli import main

BASE = [
    "dingtalk:",  # 1
    "  app_key: dingabc123",  # 2
    "  app_secret: ${ZKDINGSYNC_APP_SECRET}",  # 3
    "store:",  # 4
    "  path: {store}",  # 5
    "poll:",  # 6
    "  interval_seconds: 60",  # 7
    "users:",  # 8
    "  map:",  # 9
    '    "1001": manager4220',  # 10
    "devices:",  # 11
    "  - name: lobby",  # 12
    "    host: 192.168.1.201",  # 13
    "    port: 4370",  # 14
    "    comm_key: 0",  # 15
    "    timezone: Asia/Shanghai",  # 16
]
SECOND_DEVICE = ["  - name: gate", "    host: 192.168.1.202"]  # lines 17, 18


@dataclass
class Case:
    """One broken config: lines replaced (1-based), removed or appended, and what must be reported."""

    id: str
    line: int  # the report must start with "file:LINE: path: "
    path: str
    message: str  # and contain this
    replace: dict[int, str] = field(default_factory=dict)
    remove: tuple[int, ...] = ()
    append: tuple[str, ...] = ()
    environ_secret: bool = True
    subprocess: bool = False


CASES = [
    Case(
        "shell injection host",
        13,
        "devices[0].host",
        "neither an IP address nor a valid host name",
        replace={13: '    host: "1.2.3.4; rm -rf /"'},
        subprocess=True,
    ),
    Case(
        "port too large",
        14,
        "devices[0].port",
        "70000 is greater than 65535",
        replace={14: "    port: 70000"},
        subprocess=True,
    ),
    Case(
        "duplicate device name",
        17,
        "devices[1].name",
        "'lobby' is already used by devices[0]",
        append=("  - name: lobby", "    host: 192.168.1.202"),
    ),
    Case(
        "duplicate host and port",
        18,
        "devices[1].host",
        "192.168.1.201:4370 is already used by devices[0]",
        append=("  - name: gate", "    host: 192.168.1.201"),
    ),
    Case(
        "unknown timezone",
        16,
        "devices[0].timezone",
        "'Mars/Olympus' is not a known IANA time zone",
        replace={16: "    timezone: Mars/Olympus"},
    ),
    Case(
        "misspelled key",
        7,
        "poll.interval_secnds",
        "unknown key; did you mean 'interval_seconds'?",
        replace={7: "  interval_secnds: 60"},
        subprocess=True,
    ),
    Case(
        "yaml syntax error",
        14,
        "",
        "YAML syntax error: mapping values are not allowed here",
        replace={14: "    port: 4370: 1"},
    ),
    Case(
        "unset environment variable",
        3,
        "dingtalk.app_secret",
        "environment variable ZKDINGSYNC_APP_SECRET is not set",
        environ_secret=False,
        subprocess=True,
    ),
    Case("missing secret", 1, "dingtalk.app_secret", "is required but missing", remove=(3,)),
    Case(
        "wrong type",
        14,
        "devices[0].port",
        "must be an integer, got 'abc' (a string)",
        replace={14: "    port: abc"},
    ),
    Case(
        "interval zero",
        7,
        "poll.interval_seconds",
        "0 is less than 1",
        replace={7: "  interval_seconds: 0"},
    ),
    Case(
        "user map key longer than any terminal's enroll number",
        10,
        "users.map.A-17-A-17-A-17-A-17-A-17-X",
        "'A-17-A-17-A-17-A-17-A-17-X' is not an enroll number: it is longer than the 24 bytes",
        replace={10: '    "A-17-A-17-A-17-A-17-A-17-X": manager4220'},
    ),
    Case("missing devices", 1, "devices", "is required but missing", remove=(11, 12, 13, 14, 15, 16)),
    Case("missing app_key", 1, "dingtalk.app_key", "is required but missing", remove=(2,)),
    Case(
        "negative comm key",
        15,
        "devices[0].comm_key",
        "-1 is less than 0",
        replace={15: "    comm_key: -1"},
    ),
    Case(
        "protocol typo",
        16,
        "devices[0].protocol",
        "'tcpp' is not one of tcp, udp; did you mean 'tcp'?",
        replace={16: "    protocol: tcpp"},
    ),
    Case(
        "duplicate yaml key",
        15,
        "",
        "duplicate key 'port' (first given on line 14)",
        replace={15: "    port: 4371"},
    ),
    Case(
        "devices not a list",
        11,
        "devices",
        "must be a list, got 'lobby' (a string)",
        replace={11: "devices: lobby"},
        remove=(12, 13, 14, 15, 16),
    ),
    Case(
        "number given as text",
        7,
        "poll.interval_seconds",
        "must be a number, got '60' (a string)",
        replace={7: '  interval_seconds: "60"'},
    ),
    Case(
        "mistyped ip address",
        13,
        "devices[0].host",
        "'192.168.1.300' is not a valid IP address",
        replace={13: "    host: 192.168.1.300"},
    ),
    Case("empty userid", 10, "users.map.1001", "is not a DingTalk userid", replace={10: '    "1001": ""'}),
    Case(
        "rate above DingTalk's limit",
        2,
        "dingtalk.rate_per_second",
        "50 is greater than 20",
        replace={2: "  rate_per_second: 50\n  app_key: dingabc123"},
    ),
    Case(
        "api_base not a url",
        2,
        "dingtalk.api_base",
        "must be an http:// or https:// URL",
        replace={2: "  api_base: oapi.dingtalk.com\n  app_key: dingabc123"},
    ),
    Case("device entry not a mapping", 17, "devices[1]", "must be a mapping of keys", append=("  - gate",)),
    Case(
        "unknown top-level key",
        17,
        "devics",
        "unknown key; did you mean 'devices'?",
        append=("devics: []",),
    ),
]


def _write(case: Case, directory: Path) -> Path:
    lines = list(BASE)
    for number, text in case.replace.items():
        lines[number - 1] = text
    lines = [line for number, line in enumerate(lines, 1) if number not in case.remove]
    lines += case.append
    text = "\n".join(lines).replace("{store}", str(directory / "state" / "zk.db")) + "\n"
    path = directory / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _environ(case: Case) -> dict[str, str]:
    environ = {key: value for key, value in os.environ.items() if key != "ZKDINGSYNC_APP_SECRET"}
    environ.pop("CREDENTIALS_DIRECTORY", None)
    if case.environ_secret:
        environ["ZKDINGSYNC_APP_SECRET"] = "app-secret-for-tests"
    return environ


def _run(
    case: Case, path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    environ = _environ(case)
    if case.subprocess:
        done = subprocess.run(
            [sys.executable, "-m", "zkdingsync", "validate", "-c", str(path)],
            capture_output=True,
            text=True,
            env=environ,
            timeout=30,
            check=False,
        )
        return done.returncode, done.stdout, done.stderr
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    if case.environ_secret:
        monkeypatch.setenv("ZKDINGSYNC_APP_SECRET", "app-secret-for-tests")
    else:
        monkeypatch.delenv("ZKDINGSYNC_APP_SECRET", raising=False)
    code = main(["validate", "-c", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_broken_config_is_reported_with_line_and_key(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(case, tmp_path)
    code, out, err = _run(case, path, monkeypatch, capsys)
    assert code == 78, err
    where = f"{path}:{case.line}: {case.path}: " if case.path else f"{path}:{case.line}: "
    problem_lines = [line for line in err.splitlines() if line.startswith(str(path))]
    assert any(line.startswith(where) and case.message in line for line in problem_lines), err
    assert "Traceback" not in out + err
    assert out == ""


def test_the_valid_base_config_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The table above is only meaningful if the unbroken config is valid.
    path = _write(Case("valid", 0, "", ""), tmp_path)
    code, out, err = _run(Case("valid", 0, "", ""), path, monkeypatch, capsys)
    assert code == 0, err
    assert out == f"1 terminal, 1 mapped employee, store {tmp_path / 'state' / 'zk.db'}\n"


def test_world_readable_secret_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "app_secret"
    secret.write_text("s3cret-value\n", encoding="utf-8")
    secret.chmod(0o644)
    case = Case("world readable", 3, "", "", replace={3: f"  app_secret_file: {secret}"})
    path = _write(case, tmp_path)
    assert main(["validate", "-c", str(path)]) == 78
    err = capsys.readouterr().err
    assert f"{path}:3: dingtalk.app_secret_file: {secret} is readable by every user (mode 0644)" in err
    secret.chmod(0o640)
    assert main(["validate", "-c", str(path)]) == 0


def test_store_under_a_file_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("", encoding="utf-8")
    case = Case("store", 5, "", "", replace={5: f"  path: {blocker}/zk.db", 3: "  app_secret: inline-secret"})
    path = _write(case, tmp_path)
    assert main(["validate", "-c", str(path)]) == 78
    err = capsys.readouterr().err
    assert f"{path}:5: store.path: cannot create {blocker}/zk.db: {blocker} is not a directory" in err
    assert not (tmp_path / "state").exists()  # validate creates nothing


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = "\n".join(
        [
            "dingtalk:",  # 1
            "  app_key: dingabc123",  # 2
            "  app_secret: ${NOT_SET_ANYWHERE}",  # 3
            "  rate_per_second: 50",  # 4
            "poll:",  # 5
            "  interval_seconds: 0",  # 6
            "  timeout: 10",  # 7
            "users:",  # 8
            "  map:",  # 9
            '    "": someone',  # 10
            "devices:",  # 11
            "  - name: lobby",  # 12
            "    host: 1.2.3.4; rm -rf /",  # 13
            "    port: 70000",  # 14
            "  - name: lobby",  # 15
            "    host: gate.office.lan",  # 16
            "    timezone: Asia/Shangai",  # 17
            "timezone: Europe/Nowhere",  # 18
        ]
    )
    path = tmp_path / "config.yaml"
    path.write_text(text + "\n", encoding="utf-8")
    environ = {key: value for key, value in os.environ.items() if key != "NOT_SET_ANYWHERE"}
    done = subprocess.run(
        [sys.executable, "-m", "zkdingsync", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=30,
        check=False,
    )
    assert done.returncode == 78
    expected = [
        "3: dingtalk.app_secret: environment variable NOT_SET_ANYWHERE is not set",
        "4: dingtalk.rate_per_second: 50 is greater than 20",
        "6: poll.interval_seconds: 0 is less than 1",
        "7: poll.timeout: unknown key; did you mean 'timeout_seconds'?",
        "10: users.map.: '' is not an enroll number: it is empty",
        "13: devices[0].host: '1.2.3.4; rm -rf /' is neither",
        "14: devices[0].port: 70000 is greater than 65535",
        "15: devices[1].name: 'lobby' is already used by devices[0]",
        "17: devices[1].timezone: 'Asia/Shangai' is not a known IANA time zone",
        "18: timezone: 'Europe/Nowhere' is not a known IANA time zone",
    ]
    lines = done.stderr.splitlines()
    for fragment in expected:
        assert any(line.startswith(f"{path}:{fragment}") for line in lines), (fragment, done.stderr)
    # In file order, then the count.
    assert lines[-1] == f"zkdingsync: invalid configuration ({len(expected)} problems)"
    assert len(lines) == len(expected) + 1
    assert "Traceback" not in done.stdout + done.stderr
