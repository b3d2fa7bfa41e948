"""load_config on real files: the objects it returns, secrets, environment, credentials, YAML corners."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zkdingsync.config import Config, DeviceConfig, check_host, load_config, store_problem
from zkdingsync.config.schema import SCHEMA, Key, iter_keys
from zkdingsync.errors import ConfigError
from zkdingsync.redaction import redact_text


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={} if environ is None else environ)
    return caught.value.problems


def test_valid_config_gives_frozen_objects(config_file: Path, tmp_path: Path) -> None:
    config = load_config(config_file, environ={})
    assert isinstance(config, Config)
    assert config.dingtalk.app_key == "dingabc123"
    assert config.dingtalk.app_secret == "test-app-secret-0123"
    assert config.dingtalk.api_base == "https://oapi.dingtalk.com"
    assert config.dingtalk.robot is None
    assert config.store.path == tmp_path / "state" / "zkdingsync.db"
    assert config.poll.interval_seconds == 60.0
    assert config.users.map == {"1001": "manager4220"}
    assert config.devices == (DeviceConfig("lobby", "127.0.0.1", 4370, 0, "Asia/Shanghai", "tcp", False),)
    assert config.devices[0].zone.key == "Asia/Shanghai"
    assert config.source == config_file
    assert config.device("lobby") is config.devices[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.poll = config.poll  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.users.map["2"] = "x"  # type: ignore[index]


def test_secrets_stay_out_of_repr_and_are_registered(config_file: Path) -> None:
    config = load_config(config_file, environ={})
    assert "test-app-secret-0123" not in repr(config)
    assert redact_text("url?appsecret=test-app-secret-0123&x=1") == "url?appsecret=***&x=1"


def test_schema_defaults_match_the_dataclass_defaults() -> None:
    # Code that builds a Config by hand (tests, demo) must get what an empty YAML key gets.
    def check(section: Key) -> None:
        assert section.dataclass is not None
        fields = {field.name: field for field in dataclasses.fields(section.dataclass)}
        for key in section.children:
            assert key.name in fields, f"{section.dataclass.__name__} lacks {key.name}"
            field = fields[key.name]
            if key.kind in {"section", "list"}:
                check(key)
                continue
            if key.required or key.default is None:
                continue
            default = (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            )
            assert default == key.default, key.name

    check(SCHEMA)


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, config_template: str) -> None:
    (tmp_path / "etc").mkdir()
    secret = tmp_path / "etc" / "secret.txt"
    secret.write_text("from-a-file-1234\n", encoding="utf-8")
    secret.chmod(0o600)
    text = config_template.format(store="data/zk.db").replace(
        "app_secret: test-app-secret-0123", "app_secret_file: secret.txt"
    )
    config = load_config(_write(tmp_path / "etc", text), environ={})
    assert config.store.path == tmp_path / "etc" / "data" / "zk.db"
    assert config.dingtalk.app_secret == "from-a-file-1234"


def test_environment_values_are_expanded_and_typed(tmp_path: Path, config_template: str) -> None:
    text = config_template.format(store=tmp_path / "zk.db")
    text = text.replace("port: 4370", "port: ${LOBBY_PORT}").replace(
        "app_key: dingabc123", "app_key: ding-${SITE}"
    )
    config = load_config(_write(tmp_path, text), environ={"LOBBY_PORT": "4371", "SITE": "north"})
    assert config.devices[0].port == 4371
    assert config.dingtalk.app_key == "ding-north"


def test_secret_from_systemd_credentials_directory(tmp_path: Path, config_template: str) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "app_secret").write_text("credential-secret\n", encoding="utf-8")
    (credentials / "robot_access_token").write_text("robot-token-abcd", encoding="utf-8")
    for credential in credentials.iterdir():
        credential.chmod(0o400)  # as systemd hands them over
    text = config_template.format(store=tmp_path / "zk.db").replace(
        "  app_secret: test-app-secret-0123\n", ""
    )
    text = text.replace("dingtalk:\n", "dingtalk:\n  robot:\n    min_interval_seconds: 5\n")
    config = load_config(_write(tmp_path, text), environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.dingtalk.app_secret == "credential-secret"
    assert config.dingtalk.robot is not None
    assert config.dingtalk.robot.access_token == "robot-token-abcd"
    assert config.dingtalk.robot.secret is None
    assert config.dingtalk.robot.min_interval_seconds == 5.0
    # Pointed at a source directory on disk, a world-readable secret is refused like an *_file one.
    (credentials / "app_secret").chmod(0o644)
    problems = _problems(tmp_path / "config.yaml", environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert any("dingtalk.app_secret" in p and "readable by every user (mode 0644)" in p for p in problems)
    # Without the directory the same file is missing its secret, and the message says where to put it.
    problems = _problems(tmp_path / "config.yaml")
    assert any("dingtalk.app_secret: is required but missing" in p and "'app_secret'" in p for p in problems)
    assert any("dingtalk.robot.access_token: is required but missing" in p for p in problems)


def test_require_secrets_false_tolerates_missing_secrets(tmp_path: Path, config_template: str) -> None:
    text = config_template.format(store=tmp_path / "zk.db").replace(
        "test-app-secret-0123", "${UNSET_VARIABLE}"
    )
    path = _write(tmp_path, text)
    assert any("UNSET_VARIABLE is not set" in problem for problem in _problems(path))
    config = load_config(path, environ={}, require_secrets=False)
    assert config.dingtalk.app_secret == ""


def test_both_secret_and_secret_file_is_a_problem(tmp_path: Path, config_template: str) -> None:
    text = config_template.format(store=tmp_path / "zk.db").replace(
        "  app_secret: test-app-secret-0123\n", "  app_secret: x\n  app_secret_file: /nonexistent\n"
    )
    assert _problems(_write(tmp_path, text)) == [
        f"{tmp_path / 'config.yaml'}:4: dingtalk.app_secret: give app_secret or app_secret_file, not both"
    ]


def test_missing_secret_file_is_a_problem(tmp_path: Path, config_template: str) -> None:
    text = config_template.format(store=tmp_path / "zk.db").replace(
        "app_secret: test-app-secret-0123", "app_secret_file: /nonexistent/secret"
    )
    (problem,) = _problems(_write(tmp_path, text))
    assert problem.endswith(
        ":3: dingtalk.app_secret_file: cannot read /nonexistent/secret: No such file or directory"
    )


def test_unquoted_enroll_numbers_keep_their_digits(tmp_path: Path, config_template: str) -> None:
    # YAML 1.1 reads 0012 as octal 10; the enroll number is the text as written.
    text = config_template.format(store=tmp_path / "zk.db").replace(
        '    "1001": manager4220\n', '    "1001": manager4220\n    1002: 0123456\n    0012: zhang\n'
    )
    config = load_config(_write(tmp_path, text), environ={})
    assert dict(config.users.map) == {"1001": "manager4220", "1002": "0123456", "0012": "zhang"}


def test_same_enroll_number_quoted_and_unquoted_is_a_duplicate(tmp_path: Path, config_template: str) -> None:
    text = config_template.format(store=tmp_path / "zk.db").replace(
        '    "1001": manager4220\n', '    "1001": manager4220\n    1001: someone\n'
    )
    (problem,) = _problems(_write(tmp_path, text))
    assert ":11: users.map.1001: enroll number given twice (also on line 10)" in problem


def test_device_timezone_defaults_to_the_top_level_timezone(tmp_path: Path, config_template: str) -> None:
    text = config_template.format(store=tmp_path / "zk.db").replace("    timezone: Asia/Shanghai\n", "")
    text += "timezone: Europe/Berlin\n"
    config = load_config(_write(tmp_path, text), environ={})
    assert config.timezone == "Europe/Berlin"
    assert config.devices[0].timezone == "Europe/Berlin"


def test_yaml_merge_keys_work(tmp_path: Path, config_template: str) -> None:
    text = config_template.format(store=tmp_path / "zk.db").replace(
        "  - name: lobby\n",
        "  - &defaults\n    name: lobby\n",
    )
    text += "  - <<: *defaults\n    name: gate\n    host: 127.0.0.2\n"
    config = load_config(_write(tmp_path, text), environ={})
    assert [(d.name, d.host, d.port) for d in config.devices] == [
        ("lobby", "127.0.0.1", 4370),
        ("gate", "127.0.0.2", 4370),
    ]


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    problems = _problems(_write(tmp_path, "\n".join(lines) + "\n"))
    assert any("too many values" in problem for problem in problems)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ":1: the file is empty"),
        ("- just\n- a list\n", ":1: must be a mapping of keys, got a list"),
        ("dingtalk: [\n", "YAML syntax error"),
        ("\tdingtalk: x\n", ":1: YAML syntax error"),
    ],
)
def test_unusable_files(tmp_path: Path, text: str, expected: str) -> None:
    problems = _problems(_write(tmp_path, text))
    assert any(expected in problem for problem in problems), problems


def test_unreadable_file(tmp_path: Path) -> None:
    assert _problems(tmp_path / "missing.yaml") == [
        f"{tmp_path / 'missing.yaml'}: cannot read the configuration: No such file or directory"
    ]
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    (problem,) = _problems(tmp_path / "binary.yaml")
    assert "not UTF-8" in problem


@pytest.mark.parametrize(
    "host",
    [
        "192.168.1.201",
        "10.0.0.1",
        "::1",
        "fe80::1",
        "gate-1",
        "gate-1.office.lan",
        "clock.example.com.",
        "a" * 63,
    ],
)
def test_valid_hosts(host: str) -> None:
    assert check_host(host) is None


@pytest.mark.parametrize(
    "host",
    [
        "1.2.3.4; rm -rf /",
        "$(reboot)",
        "`id`",
        "host name",
        "192.168.1.300",
        "1.2.3",
        "-gate",
        "gate-",
        "gate..lan",
        "http://192.168.1.2",
        "192.168.1.2:4370",
        "a" * 64,
        "x\n",
        "",
        "gate_1",
        "ä.lan",
    ],
)
def test_invalid_hosts(host: str) -> None:
    assert check_host(host) is not None


def test_store_problem(tmp_path: Path) -> None:
    assert store_problem(tmp_path / "zk.db") is None
    assert store_problem(tmp_path / "a" / "b" / "zk.db") is None  # creatable
    assert not (tmp_path / "a").exists()
    assert store_problem(tmp_path) == f"{tmp_path} is a directory, not a database file"
    (tmp_path / "file").write_text("", encoding="utf-8")
    assert (
        store_problem(tmp_path / "file" / "zk.db")
        == f"cannot create {tmp_path / 'file' / 'zk.db'}: {tmp_path / 'file'} is not a directory"
    )


def test_every_schema_key_has_a_description() -> None:
    for path, key in iter_keys():
        assert key.description.strip().endswith((".", ")")), path


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damage_to_a_valid_file_is_a_config_error_or_a_config(
    tmp_path: Path, config_template: str, data: st.DataObject
) -> None:
    # Bad input gets a clear message, never a traceback: cut, duplicate or replace a piece of the text.
    text = config_template.format(store=tmp_path / "zk.db")
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 40)))
    insert = data.draw(
        st.sampled_from(
            ["", ":", "- ", "  ", "\n", "[", "{", "&a", "*a", "!!binary", "~", "'", '"', "0x1F", "1e400"]
        )
        | st.text(max_size=8)
    )
    path = _write(tmp_path, text[:start] + insert + text[end:])
    try:
        config = load_config(path, environ={})
    except ConfigError as error:
        assert error.problems
        assert all(problem.startswith(str(path)) for problem in error.problems)
    else:
        assert isinstance(config, Config)
