"""Text from outside (terminals, DingTalk, config values) made safe to show to a person.

A terminal chooses its enroll numbers, user names, serial and firmware strings; DingTalk (or whatever
answers in its place) chooses its error messages. Shown raw, an `ESC[31m` repaints the admin's terminal,
a newline forges a journal line and a bidi override reorders what is read. Every place that shows such
text to a person (the log, plain `status`, robot messages, `export`, messages that echo a config value)
passes it through `printable()`; `quoted()` adds quotes and a short length limit for values echoed inside
a message. The escape is `\\xNN` or `\\uNNNN`, the way Python writes the character.
"""

from __future__ import annotations

import re

# How many characters of a value a message echoes: enough to recognise it, never a whole file.
ECHO_LIMIT = 40
ELLIPSIS = "…"

# C0 and C1 controls, DEL, the line and paragraph separators, and the bidirectional formatting
# characters (they reorder the text shown around them).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_UNSAFE_BUT_NEWLINE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


_SHORT_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    character = match.group()
    short = _SHORT_ESCAPES.get(character)
    if short is not None:
        return short
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, limit: int | None = None, *, keep_newlines: bool = False) -> str:
    """Given text from outside, return it with every control character escaped (`\\x1b`, `\\n`, `\\u202e`).

    With `limit`, only the first `limit` characters are used (the rest is cut and marked with "…"), so a
    huge value costs no more than a short one. `keep_newlines` leaves newlines and tabs alone (multi-line
    messages such as robot alerts and tracebacks).
    """
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    pattern = _UNSAFE_BUT_NEWLINE if keep_newlines else _UNSAFE
    if pattern.search(text):
        text = pattern.sub(_escape, text)
    return text + ELLIPSIS if cut else text


def quoted(value: object, limit: int = ECHO_LIMIT) -> str:
    """Given a value to echo inside a message, return it quoted, escaped and cut to `limit` characters
    ('abc', or 'aaaaaaaa…' for a longer one)."""
    text = value if isinstance(value, str) else str(value)
    return f"'{printable(text, limit)}'"
