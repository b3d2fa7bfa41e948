"""Every module's imports against the "may import" column of docs/design.md (read with `ast`)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "zkdingsync"
DESIGN = ROOT / "docs" / "design.md"
# Allowed everywhere (docs/design.md says so above the table).
SHARED_MODULES = {"model.py", "errors.py", "__init__.py"}
SHARED_THIRD_PARTY = {"structlog"}
_ROW = re.compile(r"^\| `(?P<module>[^`]+)` \|.*\| (?P<imports>[^|]+) \|\s*$")


def design_rows() -> dict[str, set[str] | None]:
    """Module (as in the table's first column) -> what it may import (None: everything)."""
    rows: dict[str, set[str] | None] = {}
    for line in DESIGN.read_text(encoding="utf-8").splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        imports = match["imports"].strip()
        if imports == "everything":
            rows[match["module"]] = None
        elif imports == "nothing else":
            rows[match["module"]] = set()
        else:
            rows[match["module"]] = {item.strip().strip("`") for item in imports.split(",")}
    return rows


def row_of(relative: str, rows: dict[str, set[str] | None]) -> str | None:
    """The table row that governs a module: its own, else its package's (`devices/`)."""
    if relative in rows:
        return relative
    parts = relative.split("/")
    for depth in range(len(parts) - 1, 0, -1):
        package = "/".join(parts[:depth]) + "/"
        if package in rows:
            return package
    return None


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every absolute import in a file, type-checking ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            if node.module.split(".")[0] == "zkdingsync" and all(map(module_file, submodules)):
                # `from zkdingsync.devices import records` imports the module `devices/records.py` only.
                found.extend((node.lineno, name) for name in submodules)
            else:
                found.append((node.lineno, node.module))
    return found


def module_file(dotted: str) -> str | None:
    """`zkdingsync.store.queue` -> "store/queue.py"; a package -> "store/__init__.py"; None: not a module."""
    parts = dotted.split(".")[1:]
    if not parts:
        return "__init__.py"
    if parts[-1] == "*":
        return None
    path = PACKAGE.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return "/".join(parts) + ".py"
    if (path / "__init__.py").is_file():
        return "/".join(parts) + "/__init__.py"
    return None  # a name inside a module (`from zkdingsync.config import Config`)


def allowed(target: str, own: str, may: set[str]) -> bool:
    """May the module `own` (a relative path) import our module `target`?"""
    if target in SHARED_MODULES or (target.rsplit("/", 1)[-1] == "__init__.py" and "/" not in target):
        return True
    if "/" in own and target.startswith(own.rsplit("/", 1)[0] + "/"):
        return True  # its own package
    return any(target == entry or (entry.endswith("/") and target.startswith(entry)) for entry in may)


def violations() -> list[str]:
    rows = design_rows()
    problems: list[str] = []
    stdlib = set(sys.stdlib_module_names)
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        row = row_of(relative, rows)
        if row is None:
            if path.name == "__init__.py":
                continue
            problems.append(
                f"zkdingsync/{relative} has no row in docs/design.md: add "
                f"| `{relative}` | <what it owns> | <what it may import> | to the module table"
            )
            continue
        may = rows[row]
        if may is None:
            continue
        for line, dotted in imports_of(path):
            top = dotted.split(".")[0]
            if top == "zkdingsync":
                target = module_file(dotted)
                if target is None or allowed(target, relative, may):
                    continue
                entry = (
                    target.removesuffix("/__init__.py") + "/" if target.endswith("__init__.py") else target
                )
                problems.append(
                    f"zkdingsync/{relative}:{line} imports {dotted}, which its row `{row}` in docs/design.md "
                    f'does not allow: add `{entry}` to that row\'s "may import" column if this is intended'
                )
            elif (
                top not in stdlib and top != "__future__" and top not in SHARED_THIRD_PARTY and top not in may
            ):
                problems.append(
                    f"zkdingsync/{relative}:{line} imports {top}, which its row `{row}` in docs/design.md "
                    f'does not allow: add {top} to that row\'s "may import" column if this is intended'
                )
    return problems


def test_every_import_is_allowed_by_the_design_table() -> None:
    problems = violations()
    assert not problems, "\n".join(problems)


def test_the_table_names_only_modules_that_exist() -> None:
    missing = [
        module
        for module in design_rows()
        if not (PACKAGE / module).is_dir() and not (PACKAGE / module).is_file()
    ]
    assert not missing, f"docs/design.md names modules that do not exist (remove their rows): {missing}"


@pytest.mark.parametrize(
    ("module", "third_party"), [("devices/zk.py", "zk"), ("store/", "sqlite_utils"), ("config/", "yaml")]
)
def test_the_only_importers_are_the_named_ones(module: str, third_party: str) -> None:
    rows = design_rows()
    others = [name for name, may in rows.items() if name != module and may is not None and third_party in may]
    # The terminal adapter is a package: its session and socket guard speak pyzk for it.
    others = [name for name in others if not (third_party == "zk" and name.startswith("devices/"))]
    # The simulator reads YAML too (its own command-line config), nothing else does.
    assert others == ([] if third_party != "yaml" else ["simulator/"])


def test_a_forbidden_import_is_reported_with_the_row_to_fix(tmp_path: Path) -> None:
    rows = design_rows()
    assert row_of("delivery/dispatch.py", rows) == "delivery/"
    assert not allowed("store/queue.py", "delivery/dispatch.py", rows["delivery/"] or set())
    assert allowed("delivery/ports.py", "delivery/dispatch.py", set())
    assert allowed("store/queue.py", "poller.py", rows["poller.py"] or set())
