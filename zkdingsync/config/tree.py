"""The configuration file as a tree of values that remember their lines, and the problems found in it.

`compose` parses YAML into `Node`s (duplicate keys, recursive aliases and alias bombs are problems, not
crashes); `Problems` collects every problem with its file, line and key path, so that the admin fixes
the file in one pass. `describe`, `did_you_mean` and `path_text` say how values are shown in a problem.
Internal to `zkdingsync.config`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zkdingsync.printable import ECHO_LIMIT, printable, quoted

_MAX_NODES = 200_000  # a config has hundreds of nodes; this stops alias bombs ("billion laughs")
_MAX_SUGGESTION_INPUT = 100
_PATH_ECHO_LIMIT = 120
INT_TAG = "tag:yaml.org,2002:int"


class Invalid:
    """Marker for a value that failed validation (its problem is already recorded)."""


INVALID: Any = Invalid()


@dataclass
class Node:
    """A YAML value with the line it starts on (1-based) and, for scalars, its source text."""

    value: Any  # dict[Any, Entry] for mappings, list[Node] for sequences, the Python value for scalars
    line: int
    kind: str  # "mapping", "sequence" or "scalar"
    text: str | None = None  # a scalar's source text
    tag: str = ""
    expanded: bool = False  # a scalar whose ${VAR} references were replaced


@dataclass
class Entry:
    """One key: value pair of a mapping."""

    key: Node
    value: Node


@dataclass
class Problems:
    """The problems found so far, each kept with its line for sorting."""

    filename: str
    found: list[tuple[int, int, str]] = field(default_factory=list)

    def add(self, line: int | None, path: str, message: str) -> None:
        where = f"{self.filename}:{line}" if line else self.filename
        text = f"{where}: {path}: {message}" if path else f"{where}: {message}"
        self.found.append((line or 0, len(self.found), text))

    def lines(self) -> list[str]:
        return [text for _, _, text in sorted(self.found)]

    def mark(self) -> int:
        """Return a mark for `drop_since`: how many problems there are now."""
        return len(self.found)

    def drop_since(self, mark: int) -> None:
        """Forget the problems recorded after `mark` (a check whose failure is not a problem here)."""
        del self.found[mark:]


# --- YAML -> Node tree, keeping line numbers -------------------------------------------------------


def compose(text: str, problems: Problems) -> Node | None:
    """Parse YAML text into a Node tree; record a problem and return None on a syntax error."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # rejects control characters already
        node = loader.get_single_node()
        if node is None:
            return Node(None, 1, "scalar")
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

    def __init__(self, loader: yaml.SafeLoader, problems: Problems) -> None:
        self.loader = loader
        self.problems = problems
        self.active: set[int] = set()
        self.count = 0
        self.failed = False

    def convert(self, node: yaml.Node) -> Node:
        line = node.start_mark.line + 1
        self.count += 1
        if self.count > _MAX_NODES:
            if not self.failed:
                self.problems.add(line, "", "too many values (aliases expanding without end?)")
            self.failed = True
            return Node(None, line, "scalar")
        if id(node) in self.active:
            self.problems.add(line, "", "an alias refers to itself")
            self.failed = True
            return Node(None, line, "scalar")
        if isinstance(node, yaml.ScalarNode):
            return Node(self._construct(node), line, "scalar", text=node.value, tag=node.tag)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return Node([self.convert(item) for item in node.value], line, "sequence")
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

    def _mapping(self, node: yaml.MappingNode, line: int) -> Node:
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
        entries: dict[Any, Entry] = {}
        for key_node, value_node in node.value:
            key = self.convert(key_node)
            if key.kind != "scalar":
                self.problems.add(key.line, "", "a key must be a plain value, not a list or mapping")
                self.failed = True
                continue
            entries[key.value] = Entry(key, self.convert(value_node))
        return Node(entries, line, "mapping")


def describe(value: Any) -> str:
    """Given a parsed value, return how a problem shows it ("70000 (an integer)", "a list")."""
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


def did_you_mean(word: str, candidates: list[str] | tuple[str, ...]) -> str:
    """Given a mistyped word, return "; did you mean 'x'?" for the closest candidate, or ""."""
    if len(word) > _MAX_SUGGESTION_INPUT:
        return ""  # nobody mistyped a name that long, and difflib's time grows with it
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {quoted(close[0])}?" if close else ""


def path_text(path: Path) -> str:
    """A path echoed in a message: escaped, and cut if absurdly long."""
    return printable(str(path), _PATH_ECHO_LIMIT)


def join(path: str, name: str) -> str:
    """Given a key path and a key name, return the child's path (`dingtalk` + `app_key`)."""
    return f"{path}.{name}" if path else name


def plain(node: Node) -> Any:
    """Given a node, return its value for `describe` (an empty dict or list for collections)."""
    if node.kind == "mapping":
        return {}
    if node.kind == "sequence":
        return []
    return node.value


def has_invalid(values: Any) -> bool:
    """Given checked values, return True when INVALID is anywhere in them."""
    if values is INVALID:
        return True
    if isinstance(values, dict):
        return any(has_invalid(value) for value in values.values())
    if isinstance(values, list):
        return any(has_invalid(value) for value in values)
    return False
