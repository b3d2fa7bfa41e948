"""The value of one key: its `${VAR}` references expanded, then checked against its kind and limits.

`Values.scalar` knows every kind of the schema (numbers with their ranges, names, hosts, time zones,
URLs, paths relative to the config file, times of day); `Values.user_map` checks `users.map`. Problems go
to the shared `Problems`; a value that fails is `INVALID`. Internal to `zkdingsync.config`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from zkdingsync.config.schema import Key
from zkdingsync.config.tree import INT_TAG, INVALID, Node, Problems, describe, did_you_mean, plain
from zkdingsync.devices.records import unreportable_id
from zkdingsync.history import parse_day
from zkdingsync.hosts import check_host
from zkdingsync.printable import ECHO_LIMIT, printable, quoted

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# fullmatch, not match with "$": "$" also matches before a trailing newline.
_TIME_OF_DAY = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
_MAX_NAME_LENGTH = 64


class Values:
    """Checks single values for the schema walk; records every problem in `problems`."""

    def __init__(self, problems: Problems, environ: Mapping[str, str], base_dir: Path) -> None:
        self.problems = problems
        self.environ = environ
        self.base_dir = base_dir
        self._zones: set[str] | None = None

    def expand(self, node: Node, path: str) -> Any:
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
            return INVALID
        node.expanded = True
        return expanded

    def scalar(self, key: Key, value: Any, node: Node, path: str) -> Any:
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
            return self._number(key, value, line, path)
        if kind == "date":
            return self._date(value, line, path)
        return self._text(key, value, line, path)

    def _number(self, key: Key, value: Any, line: int, path: str) -> Any:
        kind = key.kind
        if isinstance(value, bool) or not isinstance(value, int | float):
            return self._wrong(key, value, line, path)
        if kind == "integer" and not isinstance(value, int):
            if not (math.isfinite(value) and value.is_integer()):
                return self._wrong(key, value, line, path)
            value = int(value)
        if not math.isfinite(value):
            self.problems.add(line, path, f"must be a finite number, got {value}")
            return INVALID
        if not self._in_range(key, value, line, path):
            return INVALID
        return float(value) if kind == "number" else value

    def _text(self, key: Key, value: Any, line: int, path: str) -> Any:
        # Every kind but boolean, integer, number and date is text.
        kind = key.kind
        if kind == "time_of_day" and isinstance(value, int) and not isinstance(value, bool):
            self.problems.add(
                line, path, f'must be quoted, like "08:30" (YAML reads 8:30 as the number {value})'
            )
            return INVALID
        if not isinstance(value, str):
            quote = " (quote it)" if isinstance(value, int | float) and kind in {"string", "name"} else ""
            self.problems.add(line, path, f"must be {kind_text(key)}, got {describe(value)}{quote}")
            return INVALID
        if kind == "choice":
            if value not in key.choices:
                options = ", ".join(key.choices)
                hint = did_you_mean(value, key.choices)
                self.problems.add(line, path, f"{quoted(value)} is not one of {options}{hint}")
                return INVALID
            return value
        if not value.strip():
            self.problems.add(line, path, "must not be empty")
            return INVALID
        if kind == "name":
            return self._name(value, line, path)
        if kind == "host":
            reason = check_host(value)
            if reason:
                self.problems.add(line, path, f"{quoted(value)} {reason}")
                return INVALID
            return value
        if kind == "timezone":
            return self._timezone(value, line, path)
        if kind == "time_of_day":
            if not _TIME_OF_DAY.fullmatch(value):
                self.problems.add(line, path, f'{value!r} is not a 24-hour time of day like "08:30"')
                return INVALID
            return value
        if kind == "url":
            return self._url(value, line, path)
        if kind == "path":
            return self.path_value(Path(value))
        return value

    def _date(self, value: Any, line: int, path: str) -> Any:
        """A calendar day: YAML reads an unquoted 2026-11-01 as a date already; quoted, it is text."""
        if isinstance(value, date) and not isinstance(value, datetime):
            return value
        if isinstance(value, str):
            try:
                return parse_day(value.strip())
            except ValueError:
                pass
        self.problems.add(line, path, f"must be a date YYYY-MM-DD, got {describe(value)}")
        return INVALID

    def _wrong(self, key: Key, value: Any, line: int, path: str) -> Any:
        self.problems.add(line, path, f"must be {kind_text(key)}, got {describe(value)}")
        return INVALID

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
            return INVALID
        if len(value) > _MAX_NAME_LENGTH:
            self.problems.add(line, path, f"{quoted(value)} is longer than {_MAX_NAME_LENGTH} characters")
            return INVALID
        if not value.isprintable():
            self.problems.add(line, path, f"{quoted(value)} contains control characters")
            return INVALID
        return value

    def _timezone(self, value: str, line: int, path: str) -> Any:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            if self._zones is None:
                self._zones = available_timezones()
            hint = did_you_mean(value, sorted(self._zones))
            self.problems.add(
                line, path, f"{quoted(value)} is not a known IANA time zone (like Asia/Shanghai){hint}"
            )
            return INVALID
        return value

    def _url(self, value: str, line: int, path: str) -> Any:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as error:
            self.problems.add(
                line, path, f"{quoted(value)} is not a valid URL ({printable(str(error), ECHO_LIMIT)})"
            )
            return INVALID
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            self.problems.add(line, path, f"{quoted(value)} must be an http:// or https:// URL with a host")
            return INVALID
        if parts.query or parts.fragment:
            self.problems.add(line, path, f"{quoted(value)} must not carry a query or fragment")
            return INVALID
        return value.rstrip("/")

    def path_value(self, value: Path) -> Path:
        """A path relative to the config file's directory, made absolute (symlinks left alone)."""
        return value if value.is_absolute() else Path(os.path.normpath(self.base_dir / value))

    def user_map(self, node: Node, path: str) -> Any:
        """Validate users.map: an enroll number a terminal can report -> non-empty DingTalk userid."""
        if node.kind == "scalar" and node.value is None:
            return {}
        if node.kind != "mapping":
            self.problems.add(
                node.line,
                path,
                f"must be a mapping of enroll number to userid, got {describe(plain(node))}",
            )
            return INVALID
        result: dict[str, str] = {}
        first_line: dict[str, int] = {}
        valid = True
        for entry in node.value.values():
            key = entry.key
            # Unquoted numbers are accepted as written (the source text, so 0012 keeps its zeros).
            text = key.text if key.tag == INT_TAG and key.text is not None else key.value
            shown = printable(key.text if key.text is not None else str(text), ECHO_LIMIT)
            entry_path = f"{path}.{shown}"
            problem = self._enroll_number_problem(text)
            if problem is not None:
                self.problems.add(key.line, entry_path, f"{quoted(shown)} is not an enroll number: {problem}")
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
            if userid is INVALID:
                valid = False
                continue
            result[text] = userid
        return result if valid else INVALID

    @staticmethod
    def _enroll_number_problem(text: object) -> str | None:
        """Why a users.map key is no enroll number a terminal could report, or None. The key is the text
        the daemon stores for a punch: digits, text such as "A-17", or "hex:" and the bytes of an id that
        is not text. The mapper compares ids without spaces at either end, so a key has none."""
        if not isinstance(text, str):
            return f"it is {describe(text)}, not text: write it in quotes"
        if text and text != text.strip():
            return "it has spaces at an end: write it without them (they are not compared)"
        return unreportable_id(text)

    def _userid(self, node: Node, path: str) -> Any:
        if node.kind != "scalar":
            self.problems.add(node.line, path, f"must be a DingTalk userid, got {describe(plain(node))}")
            return INVALID
        if node.tag == INT_TAG and node.text is not None and node.text.isdigit():
            return node.text
        value = self.expand(node, path)
        if value is INVALID:
            return INVALID
        if not isinstance(value, str):
            self.problems.add(node.line, path, f"must be a DingTalk userid (text), got {describe(value)}")
            return INVALID
        if not value.strip() or value != value.strip():
            self.problems.add(
                node.line, path, f"{quoted(value)} is not a DingTalk userid (empty or padded with spaces)"
            )
            return INVALID
        return value


def kind_text(key: Key) -> str:
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
        "date": "a date YYYY-MM-DD",
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


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
