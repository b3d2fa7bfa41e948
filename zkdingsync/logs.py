"""Logging set-up: structlog, one event per line, on standard error.

- On a terminal: structlog's console renderer. Otherwise `key=value` (logfmt), or JSON on request.
- Under systemd (stderr is the journal stream named by `$JOURNAL_STREAM`) every line starts with the
  sd-daemon priority prefix `<N>`, so `journalctl -p warning` works, and no timestamp is added (journald
  keeps its own).
- Secrets never reach the output: values of keys named like secrets become `***`, and any registered
  secret value, or credential in a URL query (`access_token=...`), found inside a string becomes `***`.
- Control characters in values are escaped (`printable`): text from terminals and DingTalk cannot send
  escape sequences to whoever reads the log.
- The standard library's `logging` (used by the DingTalk SDK, urllib3) is routed into the same output at
  WARNING and above.

Stdout stays free for command output (`status --json`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from zkdingsync.printable import printable
from zkdingsync.redaction import REDACTED, is_secret_key, redact_text

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("auto", "console", "json", "keyvalue")

# sd-daemon(3) priorities, keyed by structlog's method name.
_PRIORITIES = {
    "debug": 7,
    "info": 6,
    "msg": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray):
        return redact_text(value.decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {k: REDACTED if is_secret_key(str(k)) else _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    # Anything else (exceptions, URLs, paths, dataclasses) is rendered as text by every renderer anyway;
    # turning it into text here lets the secret search see it.
    return redact_text(str(value))


def redact_secrets(_logger: Any, _method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: replace secret-named values and registered secret values by `***`."""
    for key in list(event_dict):
        if is_secret_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact_value(event_dict[key])
    return event_dict


def _printable_value(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value, keep_newlines=True)  # newlines: each renderer escapes them its own way
    if isinstance(value, dict):
        return {printable(str(k)): _printable_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable_value(item) for item in value]
    return value


def escape_control_characters(_logger: Any, _method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor after `redact_secrets`: control characters in every text value escaped.

    Terminals choose enroll numbers and names, DingTalk (or a proxy) its messages: an `ESC[31m` among them
    must not repaint the admin's terminal, nor a carriage return overwrite the line.
    """
    for key in list(event_dict):
        event_dict[key] = _printable_value(event_dict[key])
    return event_dict


def _journald_prefix(_logger: Any, method_name: str, line: Any) -> Any:
    """structlog processor after the renderer: prefix the rendered line with its sd-daemon priority."""
    priority = _PRIORITIES.get(method_name, 6)
    return f"<{priority}>{line}"


def _single_line(_logger: Any, _method_name: str, line: Any) -> Any:
    """structlog processor after the renderer: keep one event on one journal line."""
    if isinstance(line, str) and "\n" in line:
        return line.replace("\n", "\\n")
    return line


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Given an output stream, return True when it is systemd's journal stream.

    systemd sets `$JOURNAL_STREAM` to "device:inode" of the stream it connected. When the stream has
    no file descriptor (tests), the variable being set is taken as the answer.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, AttributeError, ValueError):
        return True
    device, _, inode = value.partition(":")
    try:
        return (int(device), int(inode)) == (status.st_dev, status.st_ino)
    except ValueError:
        return False


def journal_prefix(level: str, stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Given a level (debug, info, warning, error) and the stream a plain line is written to (default:
    stderr), return the sd-daemon priority prefix ("<3>") when that stream is the journal, else "".

    For the lines the command line prints itself (config problems before an exit 78): journald files
    unprefixed lines at info, and `journalctl -p warning` would not show why the daemon stopped.
    """
    out = sys.stderr if stream is None else stream
    if not stream_is_journal(out, environ):
        return ""
    return f"<{_PRIORITIES.get(level, 6)}>"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _StdlibToStructlog(logging.Handler):
    """Forward standard-library log records (DingTalk SDK, urllib3, ...) to structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken third-party format string must not kill logging
            message = str(record.msg)
        logger = structlog.get_logger(record.name)
        fields: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        logger.log(record.levelno, message, **fields)


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Set up structlog (and route stdlib logging into it) writing to `stream` (default: stderr).

    `level` is one of debug, info, warning, error; `fmt` one of auto, console, json, keyvalue.
    Raise ValueError for anything else. Calling it again replaces the previous set-up.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = sys.stderr if stream is None else stream
    journal = stream_is_journal(out, environ)
    if fmt == "auto":
        fmt = "console" if _is_tty(out) and not journal else "keyvalue"

    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if not journal:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    # Exceptions are formatted to text before redaction so that secrets inside them are caught too.
    processors += [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_secrets,
        escape_control_characters,
    ]
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(ensure_ascii=False, default=str))
    elif fmt == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=_is_tty(out) and not journal))
    else:
        processors.append(
            structlog.processors.LogfmtRenderer(
                key_order=["timestamp", "level", "event"], drop_missing=True, bool_as_flag=False
            )
        )
    if journal:
        processors += [_single_line, _journald_prefix]

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        # Not cached: module-level `get_logger()` proxies must follow a later reconfiguration.
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging()


def _route_stdlib_logging() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibToStructlog):
            root.removeHandler(handler)
    handler = _StdlibToStructlog(level=logging.WARNING)
    root.addHandler(handler)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    logging.captureWarnings(True)


def reset_logging() -> None:
    """Undo `configure_logging` (structlog defaults, no stdlib forwarding): for tests and embedders."""
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibToStructlog):
            root.removeHandler(handler)
    logging.captureWarnings(False)
