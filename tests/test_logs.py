"""Logging: one event per line on the given stream, formats, journald priorities, bound context, secret
redaction, and the standard library's logging routed into the same output."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from zkdingsync.logs import configure_logging, redact_secrets, stream_is_journal
from zkdingsync.redaction import register_secret

log = structlog.get_logger("tests.logs")


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_keyvalue_one_line_per_event_with_bound_context() -> None:
    stream = io.StringIO()
    configure_logging("info", "keyvalue", stream=stream, environ={})
    bound = log.bind(device="lobby")
    bound.info("poll.finished", new=12, duration_ms=340)
    bound.debug("hidden at info")
    bound.warning("terminal.down", reason="timed out\nafter 10 s")
    lines = _lines(stream)
    assert len(lines) == 2
    assert "level=info event=poll.finished" in lines[0]
    assert "device=lobby" in lines[0] and "new=12" in lines[0] and "duration_ms=340" in lines[0]
    assert lines[0].startswith("timestamp=")
    assert "level=warning" in lines[1] and "device=lobby" in lines[1]


def test_json_format() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream, environ={})
    log.debug("punch.stored", device="gate", enroll_number="1001")
    (line,) = _lines(stream)
    event = json.loads(line)
    assert event["event"] == "punch.stored"
    assert event["level"] == "debug"
    assert event["device"] == "gate"


def test_exceptions_stay_on_one_line_in_json() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream, environ={})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    (line,) = _lines(stream)
    assert "RuntimeError: boom" in json.loads(line)["exception"]


@pytest.mark.parametrize(
    ("method", "priority"), [("debug", 7), ("info", 6), ("warning", 4), ("error", 3), ("critical", 2)]
)
def test_journald_priority_prefix(method: str, priority: int) -> None:
    stream = io.StringIO()
    configure_logging("debug", "auto", stream=stream, environ={"JOURNAL_STREAM": "8:12345"})
    getattr(log, method)("something.happened", device="lobby")
    (line,) = _lines(stream)
    assert line.startswith(f"<{priority}>level={method} event=something.happened")
    assert "timestamp=" not in line  # journald keeps its own


def test_journald_traceback_stays_on_one_line() -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream=stream, environ={"JOURNAL_STREAM": "8:12345"})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("poll.crashed")
    (line,) = _lines(stream)
    assert line.startswith("<3>")
    assert "ValueError: bad" in line


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "out").open("w") as stream:
        status = os.fstat(stream.fileno())
        assert stream_is_journal(stream, {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino + 1}"})
        assert not stream_is_journal(stream, {})


def test_no_prefix_without_journal() -> None:
    stream = io.StringIO()
    configure_logging("info", "auto", stream=stream, environ={})
    log.info("hello")
    assert not stream.getvalue().startswith("<")


def test_secret_keys_are_redacted() -> None:
    stream = io.StringIO()
    configure_logging("info", "keyvalue", stream=stream, environ={})
    log.info(
        "call",
        app_secret="value-1",
        access_token="value-2",
        password="value-3",
        sign="value-4",
        AppSecret="value-5",
        comm_key=123456,
        signal="SIGTERM",
        design="kept",
        nested={"appsecret": "hidden-value", "userid": "u1"},
    )
    (line,) = _lines(stream)
    for kept in ("signal=SIGTERM", "design=kept", "userid"):
        assert kept in line
    for hidden in ("value-", "123456", "hidden-value"):
        assert hidden not in line, hidden
    assert "app_secret=***" in line and "access_token=***" in line and "comm_key=***" in line


def test_registered_secret_values_are_redacted_everywhere() -> None:
    register_secret("Sup3rSecretValue")
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream, environ={})
    log.info(
        "calling https://oapi.dingtalk.com/gettoken?appsecret=Sup3rSecretValue", url="x?s=Sup3rSecretValue"
    )
    try:
        raise ConnectionError("refused for Sup3rSecretValue")
    except ConnectionError:
        log.exception("upload.failed", items=["Sup3rSecretValue"])
    output = stream.getvalue()
    assert "Sup3rSecretValue" not in output
    assert output.count("***") >= 4


def test_redaction_processor_with_capture_logs() -> None:
    register_secret("another-secret-1")
    with capture_logs(processors=[redact_secrets]) as captured:
        log.info("token is another-secret-1", robot_secret="x", device="lobby")
    assert captured == [
        {"event": "token is ***", "robot_secret": "***", "device": "lobby", "log_level": "info"}
    ]


def test_short_secrets_are_not_searched_for() -> None:
    # Replacing every "0" in every message would ruin the logs and hint at the value.
    register_secret("0")
    with capture_logs(processors=[redact_secrets]) as captured:
        log.info("polled 10 terminals")
    assert captured[0]["event"] == "polled 10 terminals"


def test_stdlib_logging_is_routed_at_warning_and_above() -> None:
    register_secret("leaky-secret-9")
    stream = io.StringIO()
    configure_logging("debug", "keyvalue", stream=stream, environ={})
    library = logging.getLogger("urllib3.connectionpool")
    library.info("not shown")
    library.warning("Retrying %s", "https://x/?appsecret=leaky-secret-9")
    (line,) = _lines(stream)
    assert "level=warning" in line
    assert "logger=urllib3.connectionpool" in line
    assert "Retrying" in line and "leaky-secret-9" not in line


def test_reconfiguring_does_not_duplicate_stdlib_output() -> None:
    stream = io.StringIO()
    configure_logging("info", "keyvalue", stream=io.StringIO(), environ={})
    configure_logging("info", "keyvalue", stream=stream, environ={})
    logging.getLogger("dingtalk").error("once")
    assert len(_lines(stream)) == 1


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        configure_logging("loud", "json")
    with pytest.raises(ValueError, match="format"):
        configure_logging("info", "xml")


def test_credentials_in_url_queries_are_redacted_even_when_never_registered() -> None:
    """The DingTalk access token is fetched at run time and never registered; an unforeseen exception
    whose message carries the request URL (requests/urllib3 put it there) must not leak it."""
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream, environ={})
    try:
        raise ConnectionError(
            "HTTPSConnectionPool(host='oapi.dingtalk.com', port=443): Max retries exceeded with url: "
            "/topapi/attendance/record/upload?access_token=f00dcafe1234beef5678 (Caused by reset)"
        )
    except ConnectionError:
        log.exception(
            "delivery.upload_crashed", url="https://x/robot/send?access_token=abcd1234&sign=s1gn%2B"
        )
    logging.getLogger("dingtalk.sdk").error("GET /gettoken?appkey=dingk&appsecret=Xy9-secret-value failed")
    output = stream.getvalue()
    for leaked in ("f00dcafe1234beef5678", "abcd1234", "s1gn%2B", "Xy9-secret-value"):
        assert leaked not in output, output
    assert "access_token=***" in output and "appkey=dingk" in output


@pytest.mark.parametrize("fmt", ["keyvalue", "json", "console"])
def test_control_characters_from_terminals_are_escaped(fmt: str) -> None:
    stream = io.StringIO()
    configure_logging("info", fmt, stream=stream, environ={})
    log.warning(
        "delivery.parked",
        enroll_number="\x1b[31m1234\x1b[0m",
        reason="bad\rname \u202egpj.exe",
        extra={"k": "\x07"},
    )
    text = stream.getvalue()
    for raw in ("\x1b", "\r", "\u202e", "\x07"):
        assert raw not in text
    assert "1234" in text and "x1b[31m" in text and "u202e" in text
