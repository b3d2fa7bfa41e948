"""Secrets (`dingtalk.app_secret`, the robot's token and signing secret): from the value itself (usually
`${VAR}`), from `<key>_file` (a file not readable by every user), or, when neither is given, from
systemd's `$CREDENTIALS_DIRECTORY/<credential>`. Every secret read is registered for redaction.
A file or directory that cannot be read is one problem naming it, never a crash. Internal to
`zkdingsync.config`.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zkdingsync.config.schema import Key
from zkdingsync.config.tree import INVALID, Entry, Node, Problems, describe, path_text, plain
from zkdingsync.config.values import Values
from zkdingsync.redaction import register_secret


class Secrets:
    """Reads the secrets of the schema walk; records every problem in `problems`."""

    def __init__(
        self, problems: Problems, environ: Mapping[str, str], values: Values, *, require_secrets: bool
    ) -> None:
        self.problems = problems
        self.environ = environ
        self.values = values
        self.require_secrets = require_secrets

    def secret_or_blank(
        self, key: Key, entries: dict[Any, Entry], path: str, line: int, suggested: bool
    ) -> Any:
        """`secret()`, except that without require_secrets an unreadable secret is blank, not a problem."""
        if self.require_secrets:
            return self.secret(key, entries, path, line, suggested)
        mark = self.problems.mark()
        value = self.secret(key, entries, path, line, suggested)
        self.problems.drop_since(mark)
        if value is INVALID:
            return "" if key.required else None
        return value

    def secret(self, key: Key, entries: dict[Any, Entry], path: str, line: int, suggested: bool) -> Any:
        """A secret from the value, from `<name>_file`, or from $CREDENTIALS_DIRECTORY/<credential>."""
        inline = entries.get(key.name)
        from_file = entries.get(f"{key.name}_file")
        if inline is not None and from_file is not None:
            self.problems.add(from_file.key.line, path, f"give {key.name} or {key.name}_file, not both")
            return INVALID
        if inline is not None:
            node = inline.value
            if node.kind != "scalar" or not isinstance(node.value, str):
                self.problems.add(node.line, path, f"must be text, got {describe(plain(node))}")
                return INVALID
            value = self.values.expand(node, path)
            if value is INVALID:
                return INVALID
            if not value.strip():
                self.problems.add(node.line, path, "is empty")
                return INVALID
            register_secret(value)
            return value
        if from_file is not None:
            return self._secret_file(from_file.value, f"{path}_file")
        directory = self.environ.get("CREDENTIALS_DIRECTORY")
        if key.credential and directory:
            candidate = Path(directory) / key.credential
            present = file_present(candidate)
            if isinstance(present, str):
                # An unreadable directory is a problem to name, not a missing credential: systemd gives
                # an ExecReload= process one it cannot read when the unit has a mount namespace.
                self.problems.add(line, path, f"cannot read {candidate}: {present}")
                return INVALID
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
        return INVALID

    def _secret_file(self, node: Node, path: str) -> Any:
        if node.kind != "scalar" or not isinstance(node.value, str):
            self.problems.add(node.line, path, f"must be a file path, got {describe(plain(node))}")
            return INVALID
        value = self.values.expand(node, path)
        if value is INVALID:
            return INVALID
        if not value.strip():
            self.problems.add(node.line, path, "must not be empty")
            return INVALID
        return self._read_secret(self.values.path_value(Path(value)), node.line, path, check_mode=True)

    def _read_secret(self, file: Path, line: int, path: str, check_mode: bool) -> Any:
        shown = path_text(file)
        try:
            status = file.stat()
        except OSError as error:
            self.problems.add(line, path, f"cannot read {shown}: {error.strerror or error}")
            return INVALID
        if not stat.S_ISREG(status.st_mode):
            self.problems.add(line, path, f"{shown} is not a regular file")
            return INVALID
        if check_mode and status.st_mode & 0o004:
            mode = stat.S_IMODE(status.st_mode)
            self.problems.add(
                line, path, f"{shown} is readable by every user (mode {mode:04o}); chmod o-r it"
            )
            return INVALID
        try:
            value = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            self.problems.add(line, path, f"cannot read {shown}: {getattr(error, 'strerror', None) or error}")
            return INVALID
        if not value:
            self.problems.add(line, path, f"{shown} is empty")
            return INVALID
        register_secret(value)
        return value


def file_present(path: Path) -> bool | str:
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
