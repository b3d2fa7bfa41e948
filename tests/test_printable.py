"""The one escaping of outside text shown to people (logs, status, robot messages, export, config echoes)."""

from __future__ import annotations

from zkdingsync.printable import printable, quoted


def test_control_characters_are_escaped_the_way_python_writes_them() -> None:
    assert printable("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert printable("a\nb\tc\r\x00\x7f\x9b") == "a\\nb\\tc\\r\\x00\\x7f\\x9b"
    # Bidi overrides and line separators reorder or split what is read.
    assert printable("abc\u202edef\u2028") == "abc\\u202edef\\u2028"


def test_ordinary_text_is_left_alone() -> None:
    for text in ("1001", "张三", "lobby gate-1", "C:\\path", "émile", ""):
        assert printable(text) == text


def test_newlines_may_be_kept_for_multi_line_messages() -> None:
    assert printable("line 1\nline\t2\x1b", keep_newlines=True) == "line 1\nline\t2\\x1b"


def test_a_limit_cuts_before_escaping_and_marks_the_cut() -> None:
    assert printable("x" * 10, 4) == "xxxx…"
    assert printable("xxxx", 4) == "xxxx"
    assert printable("\x1b" * 10_000_000, 2) == "\\x1b\\x1b…"


def test_quoted_values_are_short() -> None:
    assert quoted("abc") == "'abc'"
    assert quoted("a" * 1000) == "'" + "a" * 40 + "…'"
    assert quoted(12) == "'12'"
