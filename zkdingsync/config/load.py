"""Read, expand and validate the YAML configuration into a frozen `Config`.

Every problem is collected (with the file name, the line and the key path) before one `ConfigError`
is raised, so the admin fixes the file in one pass:

    config.yaml:14: devices[2].port: 70000 is greater than 65535

Values may name environment variables as `${VAR}`. A secret (`dingtalk.app_secret`,
`dingtalk.robot.access_token`, `dingtalk.robot.secret`) may instead be read from `<key>_file` (a file
not readable by every user) or, when neither is given, from systemd's `$CREDENTIALS_DIRECTORY/<name>`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from zkdingsync.config.objects import Config
from zkdingsync.config.schema import SCHEMA, Key
from zkdingsync.config.secrets import Secrets
from zkdingsync.config.store_path import store_path_problem, store_problem
from zkdingsync.config.tree import (
    INVALID,
    Entry,
    Node,
    Problems,
    compose,
    describe,
    did_you_mean,
    has_invalid,
    join,
    plain,
)
from zkdingsync.config.values import Values, kind_text
from zkdingsync.errors import ConfigError
from zkdingsync.printable import ECHO_LIMIT, printable, quoted

# A configuration of 200 terminals and 20,000 employees is about 600 KB; a bigger file is a mistake (a log
# or a database given as the config), and reading it would take seconds and echo megabytes.
MAX_CONFIG_BYTES = 1024 * 1024

__all__ = ["MAX_CONFIG_BYTES", "load_config", "store_problem"]


def load_config(
    path: Path | str,
    environ: Mapping[str, str] | None = None,
    *,
    require_secrets: bool = True,
    check_store: bool = True,
) -> Config:
    """Given the path of a YAML config file, return the validated Config.

    `environ` (default `os.environ`) supplies `${VAR}` values and `$CREDENTIALS_DIRECTORY`.
    With `require_secrets=False` (commands that never call DingTalk: status, retry, probe) a secret
    that cannot be read is not a problem and comes back as "" (None when optional).
    With `check_store=False` a store path that cannot be written now is not a problem: the state of a
    disk is not the config file's fault, and the daemon must not exit 78 (which stops systemd's restarts)
    over a directory that is read-only or missing only for a while; it fails to open the store instead.
    A store path naming something that is not a regular file (a device, a directory, a socket) is a
    problem either way. A file larger than MAX_CONFIG_BYTES is refused unread, and every value echoed in
    a problem is escaped and cut to a few dozen characters.
    Raise ConfigError listing every problem found, one line each with file, line and key path.
    Nothing is created or changed on disk.
    """
    env = os.environ if environ is None else environ
    filename = str(path)
    source = Path(path)
    problems = Problems(filename)
    text = _read_text(source, filename)

    tree = compose(text, problems)
    if tree is None:
        raise ConfigError(problems.lines())
    if tree.kind == "scalar" and tree.value is None:
        problems.add(1, "", "the file is empty; expected a mapping with at least dingtalk and devices")
        raise ConfigError(problems.lines())
    base_dir = source.absolute().parent
    checker = _Checker(problems, env, base_dir, require_secrets=require_secrets, check_store=check_store)
    values = checker.section(SCHEMA, tree, "", 1)
    if values is not INVALID:
        checker.cross_check(values, tree)
    if problems.found or has_invalid(values):
        raise ConfigError(problems.lines())
    return _build(values, source.absolute())


def _read_text(source: Path, filename: str) -> str:
    """Read the config file as UTF-8 text, at most MAX_CONFIG_BYTES of it; raise ConfigError otherwise."""
    try:
        with source.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError([f"{filename}: cannot read the configuration: {error.strerror or error}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [f"{filename}: larger than {MAX_CONFIG_BYTES // 1024} KiB: not a zkdingsync configuration file"]
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError([f"{filename}: not UTF-8 text ({error.reason} at byte {error.start})"]) from None


class _Checker:
    """Walk the Node tree along the schema (sections, lists, defaults, checks across keys); single values
    go to `Values`, secrets to `Secrets`. Return plain values, record every problem."""

    def __init__(
        self,
        problems: Problems,
        environ: Mapping[str, str],
        base_dir: Path,
        *,
        require_secrets: bool = True,
        check_store: bool = True,
    ) -> None:
        self.problems = problems
        self.check_store = check_store
        self.values = Values(problems, environ, base_dir)
        self.secrets = Secrets(problems, environ, self.values, require_secrets=require_secrets)

    # sections and lists

    def section(self, key: Key, node: Node | None, path: str, line: int) -> Any:
        """Validate a mapping described by `key`; return {name: value} or INVALID."""
        if node is None or (node.kind == "scalar" and node.value is None):
            entries: dict[Any, Entry] = {}
        elif node.kind != "mapping":
            self.problems.add(node.line, path, f"must be a mapping of keys, got {describe(node.value)}")
            return INVALID
        else:
            entries = node.value
        known = [child.name for child in key.children]
        known += [f"{child.name}_file" for child in key.children if child.kind == "secret"]
        suggested: set[str] = set()
        for name, entry in entries.items():
            if name in known:
                continue
            shown = printable(str(name), ECHO_LIMIT)
            hint = did_you_mean(shown, known)
            if hint:
                suggested.add(hint.split("'")[1])
            self.problems.add(entry.key.line, join(path, shown), f"unknown key{hint}")
        values: dict[str, Any] = {}
        for child in key.children:
            child_path = join(path, child.name)
            if child.kind == "secret":
                value = self.secrets.secret_or_blank(
                    child, entries, child_path, line, child.name in suggested
                )
            else:
                found = entries.get(child.name)
                if found is None:
                    if child.required:
                        if child.name not in suggested:
                            self.problems.add(line, child_path, "is required but missing")
                        value = INVALID
                    else:
                        value = self.absent(child, child_path, line)
                else:
                    value = self.value(child, found.value, child_path, found.key.line)
            values[child.name] = value
        # Invalid children stay in as INVALID so that checks across keys still see the valid ones.
        return values

    def absent(self, key: Key, path: str, line: int) -> Any:
        """The value of a key left out: its default (sections: all their defaults)."""
        if key.kind == "section":
            return None if key.absent_is_none else self.section(key, None, path, line)
        if key.kind == "path" and key.default is not None:
            return self.values.path_value(Path(key.default))
        return key.default

    def items(self, key: Key, node: Node, path: str) -> Any:
        """Validate a list of sections; return a list of {name: value} or INVALID."""
        if node.kind == "scalar" and node.value is None:
            self.problems.add(node.line, path, f"must list at least {key.min_items} entry")
            return INVALID
        if node.kind != "sequence":
            self.problems.add(node.line, path, f"must be a list, got {describe(plain(node))}")
            return INVALID
        if len(node.value) < key.min_items:
            self.problems.add(node.line, path, f"must list at least {key.min_items} entry")
            return INVALID
        return [
            self.section(key, item, f"{path}[{index}]", item.line) for index, item in enumerate(node.value)
        ]

    def value(self, key: Key, node: Node, path: str, key_line: int) -> Any:
        """Validate the value of one key (any kind but secret)."""
        if key.kind == "section":
            if key.absent_is_none and node.kind == "scalar" and node.value is None:
                return self.section(key, None, path, key_line)
            return self.section(key, node, path, key_line)
        if key.kind == "list":
            return self.items(key, node, path)
        if key.kind == "user_map":
            return self.values.user_map(node, path)
        if node.kind != "scalar":
            self.problems.add(node.line, path, f"must be {kind_text(key)}, got {describe(plain(node))}")
            return INVALID
        if node.value is None and not key.required:
            # `key:` with nothing after it means "the default", as if the key were left out.
            return self.absent(key, path, node.line)
        value = self.values.expand(node, path)
        if value is INVALID:
            return INVALID
        return self.values.scalar(key, value, node, path)

    # checks across keys

    def cross_check(self, values: dict[str, Any], tree: Node) -> None:
        """Checks that involve more than one key: unique devices, the store file. Skips invalid parts."""
        devices = values.get("devices")
        if isinstance(devices, list):
            self._unique_devices(devices, tree.value["devices"].value.value)
        store = values.get("store")
        if isinstance(store, dict) and isinstance(store.get("path"), Path):
            store_line = 1
            store_entry = tree.value.get("store")
            if store_entry is not None:
                store_line = store_entry.key.line
                if store_entry.value.kind == "mapping" and "path" in store_entry.value.value:
                    store_line = store_entry.value.value["path"].value.line
            check = store_problem if self.check_store else store_path_problem
            reason = check(store["path"])
            if reason:
                self.problems.add(store_line, "store.path", reason)

    def _unique_devices(self, devices: list[Any], nodes: list[Node]) -> None:
        names: dict[str, int] = {}
        endpoints: dict[tuple[str, int], int] = {}
        for index, device in enumerate(devices):
            if not isinstance(device, dict):
                continue
            entries = nodes[index].value
            name, host, port = device.get("name"), device.get("host"), device.get("port")
            if isinstance(name, str):
                if name in names:
                    self.problems.add(
                        entries["name"].value.line,
                        f"devices[{index}].name",
                        f"{quoted(name)} is already used by devices[{names[name]}]",
                    )
                else:
                    names[name] = index
            if isinstance(host, str) and isinstance(port, int):
                endpoint = (host.lower().rstrip("."), port)
                if endpoint in endpoints:
                    self.problems.add(
                        entries["host"].value.line,
                        f"devices[{index}].host",
                        f"{host}:{port} is already used by devices[{endpoints[endpoint]}]",
                    )
                else:
                    endpoints[endpoint] = index


def _build(values: dict[str, Any], source: Path) -> Config:
    """Turn validated plain values into the frozen dataclasses."""
    result = _construct(SCHEMA, values)
    devices = tuple(
        device if device.timezone else _replace_timezone(device, values["timezone"])
        for device in result.devices
    )
    users = result.users
    frozen_users = type(users)(map=MappingProxyType(dict(users.map)), match_job_number=users.match_job_number)
    return Config(
        dingtalk=result.dingtalk,
        devices=devices,
        store=result.store,
        poll=result.poll,
        users=frozen_users,
        delivery=result.delivery,
        log=result.log,
        timezone=result.timezone,
        source=source,
    )


def _replace_timezone(device: Any, zone: str) -> Any:
    return replace(device, timezone=zone)


def _construct(key: Key, values: Any) -> Any:
    if values is None:
        return None
    assert key.dataclass is not None  # noqa: S101 - every section in SCHEMA names its dataclass
    arguments: dict[str, Any] = {}
    for child in key.children:
        value = values[child.name]
        if child.kind == "section":
            value = _construct(child, value)
        elif child.kind == "list":
            value = tuple(_construct(child, item) for item in value)
        arguments[child.name] = value
    return key.dataclass(**arguments)
