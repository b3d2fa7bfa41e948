"""Generate `config.example.yaml` and the README's configuration section from the schema.

    python -m zkdingsync.config.docs            # rewrite both (what `make docs` runs)
    python -m zkdingsync.config.docs --check    # exit 1 when either differs from the schema

The README section lies between the markers `<!-- config:start -->` and `<!-- config:end -->`.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from zkdingsync.config.schema import SCHEMA, Key, iter_keys

README_START = "<!-- config:start -->"
README_END = "<!-- config:end -->"
EXAMPLE_NAME = "config.example.yaml"
README_NAME = "README.md"
_WIDTH = 100
_INDENT = "  "

_HEADER = """\
# zkdingsync configuration: copy to /etc/zkdingsync/config.yaml and edit.
# Generated from the schema (zkdingsync/config/schema.py) by `make docs`; do not edit this sample by hand.
#
# ${VAR} is replaced by the environment variable VAR. A secret can instead be read from <key>_file
# (a file not readable by every user) or from the systemd credential named in its description.
# Keys written as comments show their default; remove the "# " to change one.
# Check the result with: zkdingsync validate -c /etc/zkdingsync/config.yaml
"""


def _scalar(value: Any) -> str:
    """Render one value as YAML text, quoting strings only when YAML would read them otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        plain_is_safe = (
            value
            and value.strip() == value
            and not any(mark in value for mark in (": ", " #", "\n"))
            and value[0] not in "!&*?|>'\"%@`{[,-#"
        )
        if plain_is_safe and yaml.safe_load(value) == value:
            return value
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"cannot render {value!r} as a YAML scalar")


def _example_value(key: Key) -> Any:
    return key.default if key.example is None else key.example


def _default_text(key: Key) -> str | None:
    if key.default_text:
        return key.default_text
    if key.required or key.default is None or key.kind in {"section", "list"}:
        return None
    if key.kind == "user_map":
        return "{}" if not key.default else None
    return _scalar(key.default)


def _comment(text: str, prefix: str) -> list[str]:
    return textwrap.wrap(
        text, width=_WIDTH - len(prefix) - 2, initial_indent=f"{prefix}# ", subsequent_indent=f"{prefix}# "
    )


def _description(key: Key) -> str:
    text = key.description
    default = _default_text(key)
    if default is not None and key.kind != "secret":
        text += f" Default: {default}."
    if key.kind == "secret" and key.credential:
        text += f" Or {key.name}_file, or the systemd credential '{key.credential}'."
        if not key.required:
            text += " Optional."
    return text


def _render_key(
    key: Key, indent: str, first_prefix: str | None = None, inside_off: bool = False
) -> list[str]:
    """Lines for one key and its description.

    Keys neither required nor marked `in_example` are written commented out, a section as one block whose
    lines all become valid YAML again when their first "# " is removed. `first_prefix` replaces the
    indentation of the key line itself (the "- " of a list item).
    """
    live = inside_off or key.in_example or key.required
    key_indent = indent if first_prefix is None else first_prefix
    body: list[str] = []
    if key.kind in {"section", "list"}:
        body.append(f"{key_indent}{key.name}:")
        child_indent = indent + _INDENT * (2 if key.kind == "list" else 1)
        for position, child in enumerate(key.children):
            prefix = indent + _INDENT + "- " if key.kind == "list" and position == 0 else None
            body += _render_key(child, child_indent, prefix, inside_off=inside_off or not live)
    elif key.kind == "user_map":
        body.append(f"{key_indent}{key.name}:")
        mapping = _example_value(key) if live else key.default
        body += [f"{indent}{_INDENT}{_scalar(str(k))}: {_scalar(v)}" for k, v in dict(mapping).items()]
    else:
        value = _example_value(key) if live else key.default
        if value is None:
            value = key.example
        body.append(f"{key_indent}{key.name}:" + ("" if value is None else f" {_scalar(value)}"))
    if not live and not inside_off:
        body = [f"{indent}# {line[len(indent) :]}" for line in body]
    return _comment(_description(key), indent) + body


def render_example() -> str:
    """Return the text of config.example.yaml, generated from the schema."""
    lines = [_HEADER.rstrip("\n")]
    for key in SCHEMA.children:
        lines.append("")
        lines += _render_key(key, "")
    return "\n".join(lines) + "\n"


def _type_text(key: Key) -> str:
    kinds = {
        "string": "text",
        "name": "text (at most 64 characters)",
        "integer": "integer",
        "number": "number",
        "boolean": "true / false",
        "choice": " \\| ".join(f"`{choice}`" for choice in key.choices),
        "secret": "secret text",
        "host": "IP address or host name",
        "timezone": "IANA time zone",
        "url": "http(s) URL",
        "path": "file path",
        "time_of_day": '`"HH:MM"`',
        "date": "date `YYYY-MM-DD`",
        "user_map": 'mapping `"enroll number": userid`',
        "section": "section",
        "list": "list of sections",
    }
    text = kinds.get(key.kind, key.kind)
    low = high = None
    if key.minimum is not None:
        low = f"≥ {_scalar(float(key.minimum))}"
    if key.exclusive_minimum is not None:
        low = f"> {_scalar(float(key.exclusive_minimum))}"
    if key.maximum is not None:
        high = f"≤ {_scalar(float(key.maximum))}"
    limits = [limit for limit in (low, high) if limit]
    if key.min_items:
        limits.append(f"at least {key.min_items}")
    return ", ".join([text, *limits])


def render_readme_section() -> str:
    """Return the README's configuration reference (the text between the markers), from the schema."""
    lines = [
        "",
        "<!-- Generated from zkdingsync/config/schema.py by `make docs`: edit the schema, not this. -->",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for path, key in iter_keys():
        if key.required:
            default = "**required**"
        elif key.kind == "section":
            default = "(off)" if key.absent_is_none else ""
        else:
            shown = _default_text(key)
            default = "" if shown is None else (shown if key.default_text else f"`{shown}`")
        description = key.description.replace("|", "\\|")
        if key.kind == "secret":
            description += f" Alternatives: `{key.name}_file`, systemd credential `{key.credential}`."
        lines.append(f"| `{path}` | {_type_text(key)} | {default} | {description} |")
    lines += [
        "",
        "Secrets (`dingtalk.app_secret`, `dingtalk.robot.access_token`, `dingtalk.robot.secret`) are read "
        "from the key itself (usually `${VAR}`, an environment variable), from "
        "`<key>_file` (a path; the file must not be readable by every user), or, when neither is given, from "
        "`$CREDENTIALS_DIRECTORY/<credential>` — systemd's `LoadCredential=` puts them there. "
        "A relative `store.path` or `*_file` is relative to the config file's directory.",
        "",
    ]
    return "\n".join(lines)


def replace_readme_section(readme: str, section: str) -> str:
    """Given README text, return it with the text between the config markers replaced by `section`.

    Raise ValueError if the markers are missing.
    """
    start = readme.find(README_START)
    end = readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {README_START} ... {README_END} markers")
    return readme[: start + len(README_START)] + "\n" + section + readme[end:]


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate (or with --check, compare) config.example.yaml and the README section; return 0/1."""
    parser = argparse.ArgumentParser(prog="python -m zkdingsync.config.docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report drift; exit 1 if any")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="project directory (default: here)")
    args = parser.parse_args(argv)
    example_path = args.root / EXAMPLE_NAME
    readme_path = args.root / README_NAME
    wanted = {
        example_path: render_example(),
        readme_path: replace_readme_section(readme_path.read_text(encoding="utf-8"), render_readme_section()),
    }
    stale = [
        path for path, text in wanted.items() if not path.exists() or path.read_text(encoding="utf-8") != text
    ]
    if args.check:
        for path in stale:
            sys.stderr.write(f"{path} differs from the schema: run `make docs`\n")
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path], encoding="utf-8")
        sys.stderr.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
