"""Read, expand and validate the YAML configuration into a frozen `Config`.

Every problem is collected (with the file name, the line and the key path) before one `ConfigError`
is raised, so the admin fixes the file in one pass:

    config.yaml:14: devices[2].port: 70000 is greater than 65535

Values may name environment variables as `${VAR}`. A secret (`dingtalk.app_secret`,
`dingtalk.robot.access_token`, `dingtalk.robot.secret`) may instead be read from `<key>_file` (a file
not readable by every user) or, when neither is given, from systemd's `$CREDENTIALS_DIRECTORY/<name>`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import yaml

from zkdingsync.config.objects import Config
from zkdingsync.config.schema import SCHEMA, Key
from zkdingsync.errors import ConfigError
from zkdingsync.hosts import check_host
from zkdingsync.printable import ECHO_LIMIT, printable, quoted
from zkdingsync.redaction import register_secret

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# fullmatch, not match with "$": "$" also matches before a trailing newline.
_ENROLL_NUMBER = re.compile(r"[0-9]{1,24}")
_TIME_OF_DAY = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
_MAX_NODES = 200_000  # a config has hundreds of nodes; this stops alias bombs ("billion laughs")
_MAX_NAME_LENGTH = 64
_MAX_SUGGESTION_INPUT = 100
# A configuration of 200 terminals and 20,000 employees is about 600 KB; a bigger file is a mistake (a log
# or a database given as the config), and reading it would take seconds and echo megabytes.
MAX_CONFIG_BYTES = 1024 * 1024
_PATH_ECHO_LIMIT = 120
_INT_TAG = "tag:yaml.org,2002:int"


class _Invalid:
    """Marker for a value that failed validation (its problem is already recorded)."""


_INVALID: Any = _Invalid()


@dataclass
class _Node:
    """A YAML value with the line it starts on (1-based) and, for scalars, its source text."""

    value: Any  # dict[Any, _Entry] for mappings, list[_Node] for sequences, the Python value for scalars
    line: int
    kind: str  # "mapping", "sequence" or "scalar"
    text: str | None = None  # a scalar's source text
    tag: str = ""
    expanded: bool = False  # a scalar whose ${VAR} references were replaced


@dataclass
class _Entry:
    """One key: value pair of a mapping."""

    key: _Node
    value: _Node


@dataclass
class _Problems:
    """The problems found so far, each kept with its line for sorting."""

    filename: str
    found: list[tuple[int, int, str]] = field(default_factory=list)

    def add(self, line: int | None, path: str, message: str) -> None:
        where = f"{self.filename}:{line}" if line else self.filename
        text = f"{where}: {path}: {message}" if path else f"{where}: {message}"
        self.found.append((line or 0, len(self.found), text))

    def lines(self) -> list[str]:
        return [text for _, _, text in sorted(self.found)]


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
    problems = _Problems(filename)
    text = _read_text(source, filename)

    tree = _compose(text, problems)
    if tree is None:
        raise ConfigError(problems.lines())
    if tree.kind == "scalar" and tree.value is None:
        problems.add(1, "", "the file is empty; expected a mapping with at least dingtalk and devices")
        raise ConfigError(problems.lines())
    base_dir = source.absolute().parent
    checker = _Checker(problems, env, base_dir, require_secrets=require_secrets, check_store=check_store)
    values = checker.section(SCHEMA, tree, "", 1)
    if values is not _INVALID:
        checker.cross_check(values, tree)
    if problems.found or _has_invalid(values):
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


# --- YAML -> _Node tree, keeping line numbers -------------------------------------------------------


def _compose(text: str, problems: _Problems) -> _Node | None:
    """Parse YAML text into a _Node tree; record a problem and return None on a syntax error."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # rejects control characters already
        node = loader.get_single_node()
        if node is None:
            return _Node(None, 1, "scalar")
        converter = _Converter(loader, problems)
        result = converter.convert(node)
        return None if converter.failed else result
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        detail = error.problem or error.context or "invalid YAML"
        column = f" (column {mark.column + 1})" if mark is not None else ""
        problems.add(line, "", f"YAML syntax error: {detail}{column}")
        return None
    except yaml.reader.ReaderError as error:
        line = text[: error.position].count("\n") + 1
        problems.add(line, "", f"YAML syntax error: character {error.character:#x} is not allowed")
        return None
    except yaml.YAMLError as error:
        problems.add(None, "", f"YAML syntax error: {error}")
        return None
    finally:
        if loader is not None:
            loader.dispose()


class _Converter:
    """Turn yaml nodes into _Nodes; report duplicate keys, recursive aliases and alias bombs."""

    def __init__(self, loader: yaml.SafeLoader, problems: _Problems) -> None:
        self.loader = loader
        self.problems = problems
        self.active: set[int] = set()
        self.count = 0
        self.failed = False

    def convert(self, node: yaml.Node) -> _Node:
        line = node.start_mark.line + 1
        self.count += 1
        if self.count > _MAX_NODES:
            if not self.failed:
                self.problems.add(line, "", "too many values (aliases expanding without end?)")
            self.failed = True
            return _Node(None, line, "scalar")
        if id(node) in self.active:
            self.problems.add(line, "", "an alias refers to itself")
            self.failed = True
            return _Node(None, line, "scalar")
        if isinstance(node, yaml.ScalarNode):
            return _Node(self._construct(node), line, "scalar", text=node.value, tag=node.tag)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return _Node([self.convert(item) for item in node.value], line, "sequence")
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, line)
        finally:
            self.active.discard(id(node))
        raise yaml.YAMLError(f"line {line}: unsupported YAML node")  # pragma: no cover - yaml has 3 kinds

    def _construct(self, node: yaml.ScalarNode) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except (ValueError, OverflowError) as error:
            # A timestamp like 2024-13-45 passes the YAML resolver but not datetime().
            self.problems.add(
                node.start_mark.line + 1,
                "",
                f"cannot read the value {quoted(node.value)}: {printable(str(error), ECHO_LIMIT)}",
            )
            self.failed = True
            return None

    def _mapping(self, node: yaml.MappingNode, line: int) -> _Node:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self._construct(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                continue
            key_line = key_node.start_mark.line + 1
            if key in seen:
                self.problems.add(
                    key_line, "", f"duplicate key {quoted(key)} (first given on line {seen[key]})"
                )
                self.failed = True
            else:
                seen[key] = key_line
        # Merge keys (<<: *defaults) are flattened the way PyYAML does: explicit keys win.
        self.loader.flatten_mapping(node)
        entries: dict[Any, _Entry] = {}
        for key_node, value_node in node.value:
            key = self.convert(key_node)
            if key.kind != "scalar":
                self.problems.add(key.line, "", "a key must be a plain value, not a list or mapping")
                self.failed = True
                continue
            entries[key.value] = _Entry(key, self.convert(value_node))
        return _Node(entries, line, "mapping")


# --- validation ------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value} (a number)"
    if isinstance(value, str):
        return f"{quoted(value)} (a string)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{quoted(value)} ({type(value).__name__})"


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _did_you_mean(word: str, candidates: list[str] | tuple[str, ...]) -> str:
    if len(word) > _MAX_SUGGESTION_INPUT:
        return ""  # nobody mistyped a name that long, and difflib's time grows with it
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {quoted(close[0])}?" if close else ""


class _Checker:
    """Walk the _Node tree along the schema; return plain values, record every problem."""

    def __init__(
        self,
        problems: _Problems,
        environ: Mapping[str, str],
        base_dir: Path,
        *,
        require_secrets: bool = True,
        check_store: bool = True,
    ) -> None:
        self.problems = problems
        self.require_secrets = require_secrets
        self.check_store = check_store
        self.environ = environ
        self.base_dir = base_dir
        self._zones: set[str] | None = None

    # sections and lists

    def section(self, key: Key, node: _Node | None, path: str, line: int) -> Any:
        """Validate a mapping described by `key`; return {name: value} or _INVALID."""
        if node is None or (node.kind == "scalar" and node.value is None):
            entries: dict[Any, _Entry] = {}
        elif node.kind != "mapping":
            self.problems.add(node.line, path, f"must be a mapping of keys, got {_describe(node.value)}")
            return _INVALID
        else:
            entries = node.value
        known = [child.name for child in key.children]
        known += [f"{child.name}_file" for child in key.children if child.kind == "secret"]
        suggested: set[str] = set()
        for name, entry in entries.items():
            if name in known:
                continue
            shown = printable(str(name), ECHO_LIMIT)
            hint = _did_you_mean(shown, known)
            if hint:
                suggested.add(hint.split("'")[1])
            self.problems.add(entry.key.line, _join(path, shown), f"unknown key{hint}")
        values: dict[str, Any] = {}
        for child in key.children:
            child_path = _join(path, child.name)
            if child.kind == "secret":
                value = self.secret_or_blank(child, entries, child_path, line, child.name in suggested)
            else:
                found = entries.get(child.name)
                if found is None:
                    if child.required:
                        if child.name not in suggested:
                            self.problems.add(line, child_path, "is required but missing")
                        value = _INVALID
                    else:
                        value = self.absent(child, child_path, line)
                else:
                    value = self.value(child, found.value, child_path, found.key.line)
            values[child.name] = value
        # Invalid children stay in as _INVALID so that checks across keys still see the valid ones.
        return values

    def absent(self, key: Key, path: str, line: int) -> Any:
        """The value of a key left out: its default (sections: all their defaults)."""
        if key.kind == "section":
            return None if key.absent_is_none else self.section(key, None, path, line)
        if key.kind == "path" and key.default is not None:
            return self.path_value(Path(key.default))
        return key.default

    def items(self, key: Key, node: _Node, path: str) -> Any:
        """Validate a list of sections; return a list of {name: value} or _INVALID."""
        if node.kind == "scalar" and node.value is None:
            self.problems.add(node.line, path, f"must list at least {key.min_items} entry")
            return _INVALID
        if node.kind != "sequence":
            self.problems.add(node.line, path, f"must be a list, got {_describe(_plain(node))}")
            return _INVALID
        if len(node.value) < key.min_items:
            self.problems.add(node.line, path, f"must list at least {key.min_items} entry")
            return _INVALID
        return [
            self.section(key, item, f"{path}[{index}]", item.line) for index, item in enumerate(node.value)
        ]

    # scalars

    def value(self, key: Key, node: _Node, path: str, key_line: int) -> Any:
        """Validate the value of one key (any kind but secret)."""
        if key.kind == "section":
            if key.absent_is_none and node.kind == "scalar" and node.value is None:
                return self.section(key, None, path, key_line)
            return self.section(key, node, path, key_line)
        if key.kind == "list":
            return self.items(key, node, path)
        if key.kind == "user_map":
            return self.user_map(node, path)
        if node.kind != "scalar":
            self.problems.add(node.line, path, f"must be {_kind_text(key)}, got {_describe(_plain(node))}")
            return _INVALID
        if node.value is None and not key.required:
            # `key:` with nothing after it means "the default", as if the key were left out.
            return self.absent(key, path, node.line)
        value = self.expand(node, path)
        if value is _INVALID:
            return _INVALID
        return self.scalar(key, value, node, path)

    def expand(self, node: _Node, path: str) -> Any:
        """Replace ${VAR} references in a string scalar by environment values."""
        value = node.value
        if not isinstance(value, str) or "${" not in value:
            return value
        missing: list[str] = []

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.environ:
                missing.append(name)
                return ""
            return self.environ[name]

        expanded = _ENV_REFERENCE.sub(replace, value)
        for name in missing:
            self.problems.add(
                node.line, path, f"environment variable {printable(name, ECHO_LIMIT)} is not set"
            )
        if missing:
            return _INVALID
        node.expanded = True
        return expanded

    def scalar(self, key: Key, value: Any, node: _Node, path: str) -> Any:
        """Check one scalar value against its key's kind and limits; return the clean value."""
        line = node.line
        kind = key.kind
        if node.expanded and isinstance(value, str) and kind in {"integer", "number", "boolean"}:
            value = _from_text(value)
        if kind == "boolean":
            if not isinstance(value, bool):
                return self._wrong(key, value, line, path)
            return value
        if kind in {"integer", "number"}:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return self._wrong(key, value, line, path)
            if kind == "integer" and not isinstance(value, int):
                if not (math.isfinite(value) and value.is_integer()):
                    return self._wrong(key, value, line, path)
                value = int(value)
            if not math.isfinite(value):
                self.problems.add(line, path, f"must be a finite number, got {value}")
                return _INVALID
            if not self._in_range(key, value, line, path):
                return _INVALID
            return float(value) if kind == "number" else value
        # Every other kind is text.
        if kind == "time_of_day" and isinstance(value, int) and not isinstance(value, bool):
            self.problems.add(
                line, path, f'must be quoted, like "08:30" (YAML reads 8:30 as the number {value})'
            )
            return _INVALID
        if not isinstance(value, str):
            quote = " (quote it)" if isinstance(value, int | float) and kind in {"string", "name"} else ""
            self.problems.add(line, path, f"must be {_kind_text(key)}, got {_describe(value)}{quote}")
            return _INVALID
        if kind == "choice":
            if value not in key.choices:
                options = ", ".join(key.choices)
                hint = _did_you_mean(value, key.choices)
                self.problems.add(line, path, f"{quoted(value)} is not one of {options}{hint}")
                return _INVALID
            return value
        if not value.strip():
            self.problems.add(line, path, "must not be empty")
            return _INVALID
        if kind == "name":
            return self._name(value, line, path)
        if kind == "host":
            reason = check_host(value)
            if reason:
                self.problems.add(line, path, f"{quoted(value)} {reason}")
                return _INVALID
            return value
        if kind == "timezone":
            return self._timezone(value, line, path)
        if kind == "time_of_day":
            if not _TIME_OF_DAY.fullmatch(value):
                self.problems.add(line, path, f'{value!r} is not a 24-hour time of day like "08:30"')
                return _INVALID
            return value
        if kind == "url":
            return self._url(value, line, path)
        if kind == "path":
            return self.path_value(Path(value))
        return value

    def _wrong(self, key: Key, value: Any, line: int, path: str) -> Any:
        self.problems.add(line, path, f"must be {_kind_text(key)}, got {_describe(value)}")
        return _INVALID

    def _in_range(self, key: Key, value: float, line: int, path: str) -> bool:
        shown = _number_text(value)
        if key.minimum is not None and value < key.minimum:
            self.problems.add(line, path, f"{shown} is less than {_number_text(key.minimum)}")
            return False
        if key.exclusive_minimum is not None and value <= key.exclusive_minimum:
            self.problems.add(
                line, path, f"{shown} must be greater than {_number_text(key.exclusive_minimum)}"
            )
            return False
        if key.maximum is not None and value > key.maximum:
            self.problems.add(line, path, f"{shown} is greater than {_number_text(key.maximum)}")
            return False
        return True

    def _name(self, value: str, line: int, path: str) -> Any:
        if value != value.strip():
            self.problems.add(line, path, f"{quoted(value)} must not start or end with spaces")
            return _INVALID
        if len(value) > _MAX_NAME_LENGTH:
            self.problems.add(line, path, f"{quoted(value)} is longer than {_MAX_NAME_LENGTH} characters")
            return _INVALID
        if not value.isprintable():
            self.problems.add(line, path, f"{quoted(value)} contains control characters")
            return _INVALID
        return value

    def _timezone(self, value: str, line: int, path: str) -> Any:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            if self._zones is None:
                self._zones = available_timezones()
            hint = _did_you_mean(value, sorted(self._zones))
            self.problems.add(
                line, path, f"{quoted(value)} is not a known IANA time zone (like Asia/Shanghai){hint}"
            )
            return _INVALID
        return value

    def _url(self, value: str, line: int, path: str) -> Any:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as error:
            self.problems.add(
                line, path, f"{quoted(value)} is not a valid URL ({printable(str(error), ECHO_LIMIT)})"
            )
            return _INVALID
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            self.problems.add(line, path, f"{quoted(value)} must be an http:// or https:// URL with a host")
            return _INVALID
        if parts.query or parts.fragment:
            self.problems.add(line, path, f"{quoted(value)} must not carry a query or fragment")
            return _INVALID
        return value.rstrip("/")

    def path_value(self, value: Path) -> Path:
        """A path relative to the config file's directory, made absolute (symlinks left alone)."""
        return value if value.is_absolute() else Path(os.path.normpath(self.base_dir / value))

    def user_map(self, node: _Node, path: str) -> Any:
        """Validate users.map: enroll-number digits -> non-empty DingTalk userid."""
        if node.kind == "scalar" and node.value is None:
            return {}
        if node.kind != "mapping":
            self.problems.add(
                node.line,
                path,
                f"must be a mapping of enroll number to userid, got {_describe(_plain(node))}",
            )
            return _INVALID
        result: dict[str, str] = {}
        first_line: dict[str, int] = {}
        valid = True
        for entry in node.value.values():
            key = entry.key
            # Unquoted numbers are accepted as written (the source text, so 0012 keeps its zeros).
            text = key.text if key.tag == _INT_TAG and key.text is not None else key.value
            shown = printable(key.text if key.text is not None else str(text), ECHO_LIMIT)
            entry_path = f"{path}.{shown}"
            if not isinstance(text, str) or not _ENROLL_NUMBER.fullmatch(text):
                self.problems.add(
                    key.line, entry_path, f"{quoted(shown)} is not an enroll number (digits only)"
                )
                valid = False
                continue
            if text in first_line:
                self.problems.add(
                    key.line, entry_path, f"enroll number given twice (also on line {first_line[text]})"
                )
                valid = False
                continue
            first_line[text] = key.line
            userid = self._userid(entry.value, entry_path)
            if userid is _INVALID:
                valid = False
                continue
            result[text] = userid
        return result if valid else _INVALID

    def _userid(self, node: _Node, path: str) -> Any:
        if node.kind != "scalar":
            self.problems.add(node.line, path, f"must be a DingTalk userid, got {_describe(_plain(node))}")
            return _INVALID
        if node.tag == _INT_TAG and node.text is not None and node.text.isdigit():
            return node.text
        value = self.expand(node, path)
        if value is _INVALID:
            return _INVALID
        if not isinstance(value, str):
            self.problems.add(node.line, path, f"must be a DingTalk userid (text), got {_describe(value)}")
            return _INVALID
        if not value.strip() or value != value.strip():
            self.problems.add(
                node.line, path, f"{quoted(value)} is not a DingTalk userid (empty or padded with spaces)"
            )
            return _INVALID
        return value

    # secrets

    def secret_or_blank(
        self, key: Key, entries: dict[Any, _Entry], path: str, line: int, suggested: bool
    ) -> Any:
        """`secret()`, except that without require_secrets an unreadable secret is blank, not a problem."""
        if self.require_secrets:
            return self.secret(key, entries, path, line, suggested)
        kept = self.problems
        self.problems = _Problems(kept.filename)
        try:
            value = self.secret(key, entries, path, line, suggested)
        finally:
            self.problems = kept
        if value is _INVALID:
            return "" if key.required else None
        return value

    def secret(self, key: Key, entries: dict[Any, _Entry], path: str, line: int, suggested: bool) -> Any:
        """A secret from the value, from `<name>_file`, or from $CREDENTIALS_DIRECTORY/<credential>."""
        inline = entries.get(key.name)
        from_file = entries.get(f"{key.name}_file")
        if inline is not None and from_file is not None:
            self.problems.add(from_file.key.line, path, f"give {key.name} or {key.name}_file, not both")
            return _INVALID
        if inline is not None:
            node = inline.value
            if node.kind != "scalar" or not isinstance(node.value, str):
                self.problems.add(node.line, path, f"must be text, got {_describe(_plain(node))}")
                return _INVALID
            value = self.expand(node, path)
            if value is _INVALID:
                return _INVALID
            if not value.strip():
                self.problems.add(node.line, path, "is empty")
                return _INVALID
            register_secret(value)
            return value
        if from_file is not None:
            return self._secret_file(from_file.value, f"{path}_file")
        directory = self.environ.get("CREDENTIALS_DIRECTORY")
        if key.credential and directory:
            candidate = Path(directory) / key.credential
            present = _file_present(candidate)
            if isinstance(present, str):
                # An unreadable directory is a problem to name, not a missing credential: systemd gives
                # an ExecReload= process one it cannot read when the unit has a mount namespace.
                self.problems.add(line, path, f"cannot read {candidate}: {present}")
                return _INVALID
            if present:
                # systemd hands credentials over as 0400 files; a world-readable one is a source on disk
                # (`CREDENTIALS_DIRECTORY=/etc/zkdingsync zkdingsync validate`) that needs its mode fixed.
                return self._read_secret(candidate, line, path, check_mode=True)
        if not key.required:
            return None
        if not suggested:
            where = ""
            if key.credential:
                where = f", or the systemd credential {key.credential!r}"
                if not directory:
                    where += " ($CREDENTIALS_DIRECTORY is not set here)"
            self.problems.add(
                line, path, f"is required but missing: set {key.name} or {key.name}_file{where}"
            )
        return _INVALID

    def _secret_file(self, node: _Node, path: str) -> Any:
        if node.kind != "scalar" or not isinstance(node.value, str):
            self.problems.add(node.line, path, f"must be a file path, got {_describe(_plain(node))}")
            return _INVALID
        value = self.expand(node, path)
        if value is _INVALID:
            return _INVALID
        if not value.strip():
            self.problems.add(node.line, path, "must not be empty")
            return _INVALID
        return self._read_secret(self.path_value(Path(value)), node.line, path, check_mode=True)

    def _read_secret(self, file: Path, line: int, path: str, check_mode: bool) -> Any:
        shown = _path_text(file)
        try:
            status = file.stat()
        except OSError as error:
            self.problems.add(line, path, f"cannot read {shown}: {error.strerror or error}")
            return _INVALID
        if not stat.S_ISREG(status.st_mode):
            self.problems.add(line, path, f"{shown} is not a regular file")
            return _INVALID
        if check_mode and status.st_mode & 0o004:
            mode = stat.S_IMODE(status.st_mode)
            self.problems.add(
                line, path, f"{shown} is readable by every user (mode {mode:04o}); chmod o-r it"
            )
            return _INVALID
        try:
            value = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            self.problems.add(line, path, f"cannot read {shown}: {getattr(error, 'strerror', None) or error}")
            return _INVALID
        if not value:
            self.problems.add(line, path, f"{shown} is empty")
            return _INVALID
        register_secret(value)
        return value

    # checks across keys

    def cross_check(self, values: dict[str, Any], tree: _Node) -> None:
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

    def _unique_devices(self, devices: list[Any], nodes: list[_Node]) -> None:
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


def _file_present(path: Path) -> bool | str:
    """Given a path, return whether something is there, or why that cannot be known (no permission).

    `Path.exists()` raises PermissionError when a directory on the way cannot be searched.
    """
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as error:
        return error.strerror or str(error)
    return True


def store_path_problem(path: Path) -> str | None:
    """Given the store's database path, return why it can never be a database file, or None.

    Checked even where the disk's state is not (`check_store=False`, the daemon's start): a device, a
    directory or a socket stays one, so the service stops with a config error (exit 78) instead of being
    restarted forever. A path that does not exist yet, or cannot be looked at now, passes here.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        # Missing (created at start), below a file, or not visible to this user: store_problem says more.
        return None
    if stat.S_ISDIR(mode):
        return f"{_path_text(path)} is a directory, not a database file"
    if not stat.S_ISREG(mode):
        return f"{_path_text(path)} is {_file_kind(mode)}, not a database file"
    return None


def _nearest_existing(path: Path) -> Path:
    """The closest ancestor of `path` that exists (the root at worst)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _file_kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    return "not a regular file"


def store_problem(path: Path) -> str | None:
    """Given the store's database path, return None when it can be opened for writing, else why not.

    Nothing is created: a missing directory passes when its nearest existing parent is writable.
    """
    try:
        return _store_problem(path)
    except OSError as error:  # a directory on the way that this user may not search
        return f"cannot check {_path_text(path)}: {error.strerror or error}"


def _store_problem(path: Path) -> str | None:
    problem = store_path_problem(path)
    if problem:
        return problem
    shown = _path_text(path)
    if path.exists():
        if not os.access(path, os.W_OK):
            return f"{shown} is not writable by this user"
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return (
                f"{_path_text(path.parent)} is not writable by this user "
                "(SQLite writes its journal beside the file)"
            )
        return None
    parent = _nearest_existing(path)
    if not parent.is_dir():
        return f"cannot create {shown}: {_path_text(parent)} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {shown}: {_path_text(parent)} is not writable by this user"
    return None


# --- helpers ---------------------------------------------------------------------------------------


def _path_text(path: Path) -> str:
    """A path echoed in a message: escaped, and cut if absurdly long."""
    return printable(str(path), _PATH_ECHO_LIMIT)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _plain(node: _Node) -> Any:
    if node.kind == "mapping":
        return {}
    if node.kind == "sequence":
        return []
    return node.value


def _kind_text(key: Key) -> str:
    return {
        "string": "text",
        "name": "a name (text)",
        "integer": "an integer",
        "number": "a number",
        "boolean": "true or false",
        "choice": f"one of {', '.join(key.choices)}",
        "host": "an IP address or host name",
        "timezone": "an IANA time zone name",
        "url": "a URL",
        "path": "a file path",
        "secret": "text",
        "time_of_day": 'a time of day "HH:MM"',
    }.get(key.kind, key.kind)


def _from_text(text: str) -> Any:
    """The typed value of an expanded ${VAR} (environment values are always text)."""
    lowered = text.strip().lower()
    if lowered in {"true", "yes", "on"}:
        return True
    if lowered in {"false", "no", "off"}:
        return False
    for convert in (int, float):
        try:
            return convert(text.strip())
        except ValueError:
            pass
    return text


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
        log=result.log,
        timezone=result.timezone,
        source=source,
    )


def _replace_timezone(device: Any, zone: str) -> Any:
    return replace(device, timezone=zone)


def _has_invalid(values: Any) -> bool:
    if values is _INVALID:
        return True
    if isinstance(values, dict):
        return any(_has_invalid(value) for value in values.values())
    if isinstance(values, list):
        return any(_has_invalid(value) for value in values)
    return False


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
