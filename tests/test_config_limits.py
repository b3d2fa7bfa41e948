"""Absurd configurations: a huge file, huge values, control characters, a store path that is no file.

Each gives one short problem line (exit 78 from the real CLI), never the value itself in full.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from harness import run_cli

from zkdingsync.cli import EXIT_CONFIG, main
from zkdingsync.config import load_config
from zkdingsync.config.load import MAX_CONFIG_BYTES
from zkdingsync.errors import ConfigError

# A problem line: "file:line: key: message"; echoed values are cut to a few dozen characters.
LONGEST_PROBLEM = 300


def write(path: Path, template: str, store: Path, **changes: str) -> Path:
    text = template.format(store=store)
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path, **kwargs: bool) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={}, **kwargs)
    return raised.value.problems


def test_a_20_mib_file_is_refused_unread_in_one_line(tmp_path: Path, config_template: str) -> None:
    config = tmp_path / "config.yaml"
    text = config_template.format(store=tmp_path / "zk.db")
    # A valid start, then one enormous value: the shape that used to be parsed and echoed whole.
    config.write_text(text + "log:\n  level: " + "x" * (20 * 1024 * 1024) + "\n", encoding="utf-8")
    result = run_cli(["validate", "-c", str(config)])
    assert result.returncode == EXIT_CONFIG
    problems = result.stderr.splitlines()[:-1]  # the last line counts them
    assert problems == [f"{config}: larger than 1024 KiB: not a zkdingsync configuration file"]
    assert len(result.stderr) < LONGEST_PROBLEM


def test_a_file_at_the_limit_is_still_read(tmp_path: Path, config_template: str) -> None:
    config = tmp_path / "config.yaml"
    text = config_template.format(store=tmp_path / "zk.db")
    padding = MAX_CONFIG_BYTES - len(text.encode()) - 2
    config.write_text(text + "#" + "x" * padding + "\n", encoding="utf-8")
    assert config.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(config, environ={}).devices[0].name == "lobby"


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("host: 127.0.0.1", "host: " + "a" * 200_000, "devices[0].host"),
        ("timezone: Asia/Shanghai", "timezone: " + "Asia/" * 40_000, "devices[0].timezone"),
        ("name: lobby", "name: " + "n" * 200_000, "devices[0].name"),
        # An explicit key ("? key"): plain keys longer than 1024 characters are a YAML syntax error already.
        ("interval_seconds: 60", "interval_seconds: 60\n  ? " + "k" * 200_000 + "\n  : 1", "poll.kkkk"),
        ('"1001": manager4220', '? "' + "9" * 200_000 + '"\n    : manager4220', "users.map.9999"),
    ],
)
def test_echoed_values_are_cut_to_a_few_dozen_characters(
    tmp_path: Path, config_template: str, old: str, new: str, where: str
) -> None:
    config = write(tmp_path / "config.yaml", config_template, tmp_path / "zk.db", **{old: new})
    problems = problems_of(config)
    assert len(problems) == 1, problems
    assert where in problems[0]
    assert len(problems[0]) < LONGEST_PROBLEM, problems[0][:LONGEST_PROBLEM]
    assert "…" in problems[0]


def test_control_characters_in_an_echoed_value_are_escaped(tmp_path: Path, config_template: str) -> None:
    config = write(
        tmp_path / "config.yaml", config_template, tmp_path / "zk.db", **{"name: lobby": r'name: "\e[31mred"'}
    )
    (problem,) = problems_of(config)
    assert "\x1b" not in problem
    assert r"'\x1b[31mred' contains control characters" in problem


@pytest.mark.parametrize("kind", ["device", "directory", "socket"])
@pytest.mark.parametrize("check_store", [True, False])
def test_a_store_path_that_is_not_a_regular_file_is_a_config_error(
    tmp_path: Path, config_template: str, kind: str, check_store: bool
) -> None:
    if kind == "device":
        store, what = Path("/dev/null"), "is a character device, not a database file"
    elif kind == "directory":
        store, what = tmp_path / "state", "is a directory, not a database file"
        store.mkdir()
    else:
        store, what = tmp_path / "zk.sock", "is a socket, not a database file"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(store))
        listener.close()
    config = write(tmp_path / "config.yaml", config_template, store)
    # check_store=False is how the daemon loads it: a device is a config error there too.
    (problem,) = problems_of(config, check_store=check_store)
    assert problem == f"{config}:5: store.path: {store} {what}"


def test_run_with_the_store_on_dev_null_exits_78_and_creates_nothing(
    tmp_path: Path, config_template: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "config.yaml", config_template, Path("/dev/null"))
    before = set(Path("/dev").iterdir())
    assert main(["run", "-c", str(config)]) == EXIT_CONFIG
    assert "store.path: /dev/null is a character device" in capsys.readouterr().err
    assert set(Path("/dev").iterdir()) == before  # no /dev/null-wal, no lock file beside it


def test_validate_of_dev_null_store_in_the_real_process(tmp_path: Path, config_template: str) -> None:
    config = write(tmp_path / "config.yaml", config_template, Path("/dev/null"))
    result = run_cli(["validate", "-c", str(config)])
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "Traceback" not in result.stderr


def test_an_id_that_is_not_text_is_mapped_by_its_hex_key(tmp_path: Path, config_template: str) -> None:
    config = write(
        tmp_path / "config.yaml",
        config_template,
        tmp_path / "zk.db",
        **{'"1001": manager4220': '"1001": manager4220\n    "hex:c4e3bac3": dave'},
    )
    assert load_config(config, environ={}).users.map["hex:c4e3bac3"] == "dave"


@pytest.mark.parametrize(
    "key",
    ["A-17", "E0012", "hex:C4E3", "hex:zz", "hex:", "张三", "a b", "x" * 24, "工号工号工号工号", "🙂" * 6],
)
def test_any_text_a_terminal_can_report_is_a_key(tmp_path: Path, config_template: str, key: str) -> None:
    # Up to 24 bytes of UTF-8: the text field of the 40/49-byte records and the 72-byte user table. Text
    # that merely looks like a hex key is text a terminal may store, too.
    config = write(tmp_path / "config.yaml", config_template, tmp_path / "zk.db", **{'"1001"': f'"{key}"'})
    assert dict(load_config(config, environ={}).users.map) == {key: "manager4220"}


@pytest.mark.parametrize(
    ("key", "shown", "why"),
    [
        ('""', "''", "it is empty"),
        ('"   "', "'   '", "it has spaces at an end"),
        ('" A-17"', "' A-17'", "it has spaces at an end: write it without them"),
        ('"' + "x" * 25 + '"', "'" + "x" * 25 + "'", "longer than the 24 bytes (UTF-8)"),
        ('"工号工号工号工号工"', "'工号工号工号工号工'", "longer than the 24 bytes"),  # 27 bytes
        ('"hex:' + "c4" * 25 + '"', "'" + ("hex:" + "c4" * 25)[:40] + "…'", "longer than the 24 bytes"),
        ('"A\\x07B"', "'A\\x07B'", "it holds a control character"),
        ("1.5", "'1.5'", "it is 1.5 (a number), not text: write it in quotes"),
        ("true", "'true'", "not text: write it in quotes"),
    ],
)
def test_a_key_no_terminal_could_report_is_one_line_with_its_line(
    tmp_path: Path, config_template: str, key: str, shown: str, why: str
) -> None:
    config = write(tmp_path / "config.yaml", config_template, tmp_path / "zk.db", **{'"1001"': key})
    line = config.read_text(encoding="utf-8").splitlines().index(f"    {key}: manager4220") + 1
    (problem,) = problems_of(config)
    assert f":{line}: users.map." in problem
    assert f"{shown} is not an enroll number: " in problem
    assert why in problem
    assert "\n" not in problem and len(problem) <= LONGEST_PROBLEM
