"""The command line: help for every command, option placement, exit codes, errors without tracebacks."""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zkdingsync import __version__, cli
from zkdingsync.cli import build_parser, main
from zkdingsync.errors import UserError

COMMANDS = ["run", "validate", "status", "probe", "retry", "simulate", "demo"]


def _subcommands() -> list[str]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    raise AssertionError("no subcommands")


def test_the_contract_commands_exist() -> None:
    assert set(COMMANDS) <= set(_subcommands())


@pytest.mark.parametrize("command", _subcommands())
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: zkdingsync {command}" in out
    assert "--config" in out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"zkdingsync {__version__}\n"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    assert main([]) == 2
    assert main(["simulate", "--record-size", "12"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    # A value argparse accepts but the simulator cannot use: one clear line, exit 1.
    assert main(["simulate", "--base-port", "70000"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "zkdingsync: --base-port 70000 with 1 terminals goes beyond port 65535"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "-c", "{path}"],
        ["-c", "{path}", "validate"],
        ["validate", "--config", "{path}", "-q"],
        ["-v", "validate", "--config={path}"],
    ],
)
def test_config_option_before_or_after_the_command(
    argv: list[str], config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([part.format(path=config_file) for part in argv]) == 0
    assert capsys.readouterr().out.startswith("1 terminal, 1 mapped employee, store ")


def test_option_before_the_command_is_not_overwritten_by_the_subcommand_default() -> None:
    args = build_parser().parse_args(["-c", "/x.yaml", "--log-format", "json", "-q", "status"])
    assert (args.config, args.log_format, args.quiet) == ("/x.yaml", "json", 1)


def test_config_from_the_environment(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZKDINGSYNC_CONFIG", str(config_file))
    assert main(["validate"]) == 0
    assert "1 terminal" in capsys.readouterr().out


def test_default_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZKDINGSYNC_CONFIG", raising=False)
    args = build_parser().parse_args(["status"])
    assert cli.config_path(args) == Path("/etc/zkdingsync/config.yaml")


def test_missing_config_file_is_one_line_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["validate", "-c", str(missing)]) == 78
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"{missing}: cannot read the configuration: No such file or directory",
        "zkdingsync: invalid configuration (1 problem)",
    ]
    assert captured.out == ""


def test_user_error_is_one_line_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing(args: argparse.Namespace) -> int:
        raise UserError("the store is locked by process 1234")

    monkeypatch.setattr(cli, "cmd_status", failing)
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err == "zkdingsync: the store is locked by process 1234\n"


def test_unexpected_error_logs_the_traceback_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_probe", broken)
    assert main(["probe", "--log-format", "keyvalue"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err
    assert "ZeroDivisionError: a bug" in err
    assert "Traceback" in err


def test_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_simulate", interrupted)
    assert main(["simulate"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_verbosity_flags_choose_the_level() -> None:
    parser = build_parser()
    levels = {
        (): None,
        ("-v",): "debug",
        ("-q",): "warning",
        ("-qq",): "error",
        ("-q", "-v"): None,
    }
    for flags, level in levels.items():
        assert cli._cli_level(parser.parse_args([*flags, "status"])) == level, flags


def test_command_options_are_parsed() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "simulate",
            "--terminals",
            "3",
            "--base-port",
            "14370",
            "--users",
            "5",
            "--records",
            "1000",
            "--record-size",
            "16",
            "--spec",
            "faults.yaml",
            "--punch-interval",
            "0.5",
        ]
    )
    assert (args.terminals, args.base_port, args.users, args.records, args.record_size) == (
        3,
        14370,
        5,
        1000,
        16,
    )
    # --host defaults to None: the simulator binds loopback unless a host is given explicitly.
    assert (args.host, str(args.spec), args.punch_interval) == (None, "faults.yaml", 0.5)
    args = parser.parse_args(["retry", "--reason", "unmapped", "--device", "lobby"])
    assert (args.reason, args.device) == ("unmapped", "lobby")
    assert parser.parse_args(["probe", "lobby", "gate"]).names == ["lobby", "gate"]
    assert parser.parse_args(["status", "--json"]).json is True
    assert parser.parse_args(["demo", "--seconds", "5"]).seconds == 5.0


def test_python_dash_m_runs_the_cli(config_file: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zkdingsync", "validate", "-c", str(config_file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1 terminal, 1 mapped employee")
    # The test config keeps the example's app_key and map: warnings only, no log noise, no traceback.
    assert all(line.startswith("zkdingsync: warning: ") for line in done.stderr.splitlines())


def test_a_store_that_cannot_be_opened_at_start_is_not_a_config_error(tmp_path: Path) -> None:
    """A state directory that cannot be written (read-only after a disk error, full, wrong owner) is not
    the config file's fault: `validate` names it (exit 78), but `run` exits 1 so that systemd keeps
    restarting it (RestartPreventExitStatus=78 would stop it for good) and it recovers by itself once the
    directory is usable again; `status` and `retry` report the store themselves."""
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be\n", encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(
        "dingtalk: {app_key: k, app_secret: s3cret-value}\n"
        "devices: [{name: a, host: 127.0.0.1}]\n"
        f"store: {{path: {blocker / 'zk.db'}}}\n",
        encoding="utf-8",
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "zkdingsync", *args, "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    validate = run("validate")
    assert validate.returncode == 78
    assert ":3: store.path" in validate.stderr
    result = run("run")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot open the store" in lines[0], result.stderr
    status = run("status")
    assert status.returncode == 1
    assert status.stderr.startswith("zkdingsync status: no store yet"), status.stderr
    for output in (validate, result, status):
        assert "Traceback" not in output.stderr + output.stdout


def test_validate_warns_when_nobody_is_mapped(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = config_file.read_text(encoding="utf-8")
    assert main(["validate", "-c", str(config_file)]) == 0
    assert "users.map is empty" not in capsys.readouterr().err
    unmapped = re.sub(r"users:\n  map:\n(    .*\n)+", "", text)
    assert unmapped != text
    config_file.write_text(unmapped, encoding="utf-8")
    assert main(["validate", "-c", str(config_file)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("1 terminal, 0 mapped employees")
    assert "warning: users.map is empty and users.match_job_number is off" in captured.err


def test_validate_warns_about_values_left_from_the_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = Path(__file__).resolve().parent.parent / "config.example.yaml"
    config = tmp_path / "config.yaml"
    text = example.read_text(encoding="utf-8").replace("/var/lib/zkdingsync/", f"{tmp_path}/")
    config.write_text(text, encoding="utf-8")
    monkeypatch.setenv("ZKDINGSYNC_APP_SECRET", "s3cret-value")
    assert main(["validate", "-c", str(config)]) == 0  # valid, but probably not meant
    err = capsys.readouterr().err
    assert "warning: dingtalk.app_key is still the example's 'dingabc123'" in err
    assert "warning: terminal lobby still has the example's host 192.168.1.201" in err
    assert "warning: users.map is still the example's" in err


def _without_root_read_override() -> None:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set (run in the child before
    exec): root then reads only what the file modes allow, like the service user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_unreadable_credentials_directory_is_one_problem_line(tmp_path: Path) -> None:
    """systemd gives an ExecReload= process a /run/credentials/<unit> directory it cannot read (when the
    unit has a mount namespace): `validate` names the file, exit 78, and never crashes on it. The same for
    a store path that cannot be looked at."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "app_secret").write_text("credential-secret\n", encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(
        "dingtalk:\n  app_key: k\ndevices: [{name: a, host: 127.0.0.1}]\n"
        f"store: {{path: {credentials / 'state' / 'zk.db'}}}\n",
        encoding="utf-8",
    )
    as_root = os.geteuid() == 0
    if as_root:
        os.chown(credentials, 65534, 65534)  # someone else's, read by a root without its override
    credentials.chmod(0o700 if as_root else 0o000)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "zkdingsync", "validate", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)},
            preexec_fn=_without_root_read_override if as_root else None,
        )
    finally:
        credentials.chmod(0o700)
    assert done.returncode == 78, done.stderr
    assert done.stderr.splitlines() == [
        f"{config}:1: dingtalk.app_secret: cannot read {credentials / 'app_secret'}: Permission denied",
        f"{config}:4: store.path: cannot check {credentials / 'state' / 'zk.db'}: Permission denied",
        "zkdingsync: invalid configuration (2 problems)",
    ]


def test_why_run_stops_shows_at_error_priority_in_the_journal(tmp_path: Path) -> None:
    """Under systemd stderr is the journal: the problems behind an exit 78 carry priority 3 (error), so
    that `journalctl -p warning` shows them, not only systemd's "Failed to start"."""
    config = tmp_path / "config.yaml"
    config.write_text("dingtalk: {app_key: k, app_secret: s3cret-value}\ndevices: []\n", encoding="utf-8")
    journal = tmp_path / "journal"
    with journal.open("w", encoding="utf-8") as stream:
        status = os.fstat(stream.fileno())
        done = subprocess.run(
            [sys.executable, "-m", "zkdingsync", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stream,
            timeout=30,
            check=False,
            env={**os.environ, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"},
        )
    assert done.returncode == 78
    assert journal.read_text(encoding="utf-8").splitlines() == [
        f"<3>{config}:2: devices: must list at least 1 entry",
        "<3>zkdingsync: invalid configuration (1 problem)",
    ]
