"""One redaction policy: the journal, the client's library log lines and `status` hide the same things."""

from __future__ import annotations

import logging

from zkdingsync.dingtalk.transport import _QueryRedactionFilter
from zkdingsync.logs import redact_secrets
from zkdingsync.redaction import MIN_SECRET_LENGTH, redact_text, register_secret

TEXT = "GET /gettoken?appkey=dingabc&appsecret=s3cr3t-value HTTP/1.1 for loaded-secret-93b1d0 and 8675"


def test_logs_client_and_status_redact_alike() -> None:
    register_secret("loaded-secret-93b1d0")
    expected = "GET /gettoken?appkey=dingabc&appsecret=*** HTTP/1.1 for *** and 8675"
    assert redact_text(TEXT) == expected
    assert redact_secrets(None, "info", {"event": TEXT})["event"] == expected
    record = logging.LogRecord("urllib3.connectionpool", logging.DEBUG, __file__, 1, TEXT, None, None)
    assert _QueryRedactionFilter().filter(record)
    assert record.getMessage() == expected
    # `status` adds the secrets of the config it read, with the same minimum length.
    assert redact_text(TEXT, ["8675"]).endswith("and ***")
    assert redact_text(TEXT, ["867"]).endswith("and 8675")
    assert MIN_SECRET_LENGTH == 4
