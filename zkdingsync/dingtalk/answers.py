"""What an answer from DingTalk means: every answer, including the absence of one, becomes an `Outcome`.

- DELIVERED: DingTalk said errcode 0.
- TRANSIENT (with the wait the answer calls for): the request certainly did not take effect, try again
  later: connection refused, connect timeout, 5xx, an HTML page or the IP-ban JSON (circuit-break at least
  5 minutes), errcode -1, the 900xx throttles.
- UNKNOWN: the request may have reached DingTalk and no usable answer came back (read timeout after
  sending, connection reset after sending, a 504 from a gateway, an unreadable or oversized 200, an errcode
  that is not a number: a proxy or a captive portal speaking, not DingTalk). The forwarder settles these
  by reading DingTalk back before it sends again.
- NEEDS_HUMAN: credentials, permission, monthly quota, or a token DingTalk keeps rejecting.
- PERMANENT (for that punch): unknown user, or any other numeric non-zero errcode on a well-formed request.

Messages quote at most `MAX_MESSAGE` characters of an answer, built from a bounded prefix of it.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping
from typing import Any

from zkdingsync.model import Outcome, OutcomeKind
from zkdingsync.printable import printable, quoted
from zkdingsync.quota import QUOTA_EXHAUSTED_CODE

# Waits, in seconds, for each kind of "try again later".
WAIT_THROTTLE_SECONDS = 2.0  # 90018: per-second app limit
WAIT_GLOBAL_THROTTLE_SECONDS = 1.0  # 90002
WAIT_MINUTE_THROTTLE_SECONDS = 60.0  # 90005 / 90006 and other 900xx
WAIT_BUSY_SECONDS = 2.0  # -1
WAIT_SERVER_ERROR_SECONDS = 5.0  # 5xx
WAIT_IP_BAN_SECONDS = 300.0  # HTML page or {"status":1111,"punish":"deny"}: at least 5 minutes
WAIT_NETWORK_SECONDS = 5.0  # connection refused, connect timeout
WAIT_CREDENTIALS_SECONDS = 300.0  # recheck a NEEDS_HUMAN after this long
WAIT_QUOTA_SECONDS = 3600.0  # 90020: the month will not get younger quickly

MAX_MESSAGE = 200
MAX_EVIDENCE_ID = 128  # characters of a request or record id kept; longer is not an id

TOKEN_CODES = frozenset({"40014", "40000", "42001", "40001", "33001"})
THROTTLE_WAITS = {
    "90002": WAIT_GLOBAL_THROTTLE_SECONDS,
    "90018": WAIT_THROTTLE_SECONDS,
    "90005": WAIT_MINUTE_THROTTLE_SECONDS,
    "90006": WAIT_MINUTE_THROTTLE_SECONDS,
}
_NEEDS_HUMAN = {
    "40096": ("DingTalk rejected app_key/app_secret", WAIT_CREDENTIALS_SECONDS),
    "40035": (
        "DingTalk says a required parameter (app_key/app_secret?) is missing",
        WAIT_CREDENTIALS_SECONDS,
    ),
    "60011": ("the DingTalk app lacks a permission (Pro.AttendanceRecord.Write?)", WAIT_CREDENTIALS_SECONDS),
    QUOTA_EXHAUSTED_CODE: ("the organisation's monthly DingTalk API quota is exhausted", WAIT_QUOTA_SECONDS),
}
_PERMANENT_KNOWN = {
    "60121": "DingTalk does not know this user",
    "40003": "DingTalk says the userid is invalid",
}
# DingTalk's codes are short integers; anything else ("abc", "", "0x1", 1.5) did not come from DingTalk.
_INTEGER = re.compile(r"[+-]?[0-9]{1,9}")
BAD_ERRCODE = "bad-errcode"

# Answers are shown in logs and `status`: a bounded rendering of whatever shape they have.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 8
_REPR.maxstring = _REPR.maxother = MAX_MESSAGE


def short(value: object) -> str:
    """Given an answer or a part of one, return one printable line of at most MAX_MESSAGE characters,
    without ever rendering more of it than that."""
    text = value if isinstance(value, str) else _REPR.repr(value)
    return printable(text, MAX_MESSAGE)


def answer_code(answer: Mapping[str, Any]) -> str | None:
    """Given a decoded DingTalk answer, return its effective error code as text ("0" on success).

    topapi endpoints wrap errors as errcode 88 with the real reason in `sub_code`; older endpoints put the
    reason at the top level. Integers are normalised ("00" and 0 are "0"); any other value comes back as
    given (see `is_number`). Return None when the answer carries no errcode at all.
    """
    sub_code = answer.get("sub_code")
    if sub_code not in (None, "", 0, "0"):
        raw: object = sub_code
    elif "errcode" in answer:
        raw = answer["errcode"]
    else:
        return None
    if isinstance(raw, str):
        text = raw.strip()
    elif isinstance(raw, int) and not isinstance(raw, bool):
        text = str(raw)
    else:
        text = short(raw)  # true, 1.5, a list: not a number either
    return str(int(text)) if _INTEGER.fullmatch(text) else text


def is_number(code: str) -> bool:
    """Return True if an errcode (as `answer_code` gives it) is an integer, as DingTalk's always are."""
    return _INTEGER.fullmatch(code) is not None


def is_token_error(answer: Mapping[str, Any]) -> bool:
    """Return True if DingTalk rejected the access token (bad, blank or expired)."""
    return answer_code(answer) in TOKEN_CODES


def is_ip_ban(answer: Mapping[str, Any]) -> bool:
    """Return True for the gateway's IP rate-limit answer `{"status":1111,"wait":5,"punish":"deny"}`."""
    return "punish" in answer or str(answer.get("status", "")) == "1111"


def classify_errcode(code: str, errmsg: str = "") -> Outcome:
    """Given a non-zero effective errcode (and its message), return the Outcome it calls for.

    Token errors are not handled here (the caller refreshes and retries once); if one reaches this
    function it is treated as a credentials problem. A code that is not a number is UNKNOWN: whatever
    answered was not DingTalk, so whether the call took effect is not known.
    """
    message = short(errmsg)
    if not is_number(code):
        reason = f"the answer's errcode {quoted(code)} is not a number: not DingTalk's (a proxy or portal?)"
        return Outcome(OutcomeKind.UNKNOWN, reason, WAIT_SERVER_ERROR_SECONDS, BAD_ERRCODE)
    if code in _NEEDS_HUMAN:
        what, wait = _NEEDS_HUMAN[code]
        return Outcome(OutcomeKind.NEEDS_HUMAN, f"{what} (errcode {code}: {message})", wait, code)
    if code in TOKEN_CODES:
        reason = f"DingTalk keeps rejecting the access token (errcode {code}: {message})"
        return Outcome(OutcomeKind.NEEDS_HUMAN, reason, WAIT_CREDENTIALS_SECONDS, code)
    if code in _PERMANENT_KNOWN:
        return Outcome(
            OutcomeKind.PERMANENT, f"{_PERMANENT_KNOWN[code]} (errcode {code}: {message})", 0.0, code
        )
    if code in THROTTLE_WAITS:
        reason = f"DingTalk throttled the call (errcode {code}: {message})"
        return Outcome(OutcomeKind.TRANSIENT, reason, THROTTLE_WAITS[code], code)
    if code.startswith("900") and len(code) == 5:
        reason = f"DingTalk throttled the call (errcode {code}: {message})"
        return Outcome(OutcomeKind.TRANSIENT, reason, WAIT_MINUTE_THROTTLE_SECONDS, code)
    if code == "-1":
        return Outcome(
            OutcomeKind.TRANSIENT, f"DingTalk is busy (errcode -1: {message})", WAIT_BUSY_SECONDS, code
        )
    return Outcome(OutcomeKind.PERMANENT, f"DingTalk refused it (errcode {code}: {message})", 0.0, code)


def evidence_id(value: object) -> str | None:
    """Given an id DingTalk sent (a `request_id`, a listRecord record `id`), return it as text to keep, or
    None when it is missing, not a string or number, or implausibly long."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    return text if 0 < len(text) <= MAX_EVIDENCE_ID else None


def classify_answer(answer: Mapping[str, Any]) -> Outcome:
    """Given a decoded JSON answer of a call that was well formed, return its Outcome.

    A JSON answer without an errcode (other than the IP-ban shape) is UNKNOWN: something answered, but
    not in a way that says whether the call took effect.
    """
    if is_ip_ban(answer):
        try:
            wait = max(WAIT_IP_BAN_SECONDS, float(answer.get("wait", 0)))
        except (TypeError, ValueError, OverflowError):
            wait = WAIT_IP_BAN_SECONDS
        return Outcome(OutcomeKind.TRANSIENT, "DingTalk banned this IP address for a while", wait, "ip-ban")
    code = answer_code(answer)
    if code is None:
        return Outcome(OutcomeKind.UNKNOWN, f"DingTalk answered without an errcode: {short(answer)}")
    if code == "0":
        return Outcome(
            OutcomeKind.DELIVERED, "ok", 0.0, "0", request_id=evidence_id(answer.get("request_id"))
        )
    errmsg = answer.get("sub_msg") or answer.get("errmsg") or ""
    return classify_errcode(code, errmsg if isinstance(errmsg, str) else short(errmsg))


def classify_http_status(status: int, body: str) -> Outcome:
    """Given a non-2xx HTTP status (and the body text), return its Outcome."""
    html = body.lstrip()[:1] == "<"
    if status == 504:
        # A gateway gave up waiting for DingTalk, which may still have done the work.
        return Outcome(
            OutcomeKind.UNKNOWN, "DingTalk's gateway timed out (HTTP 504)", WAIT_SERVER_ERROR_SECONDS, "504"
        )
    if status >= 500:
        reason = f"DingTalk answered HTTP {status}"
        return Outcome(OutcomeKind.TRANSIENT, reason, WAIT_SERVER_ERROR_SECONDS, str(status))
    if status == 429:
        reason = "DingTalk answered HTTP 429 (too many requests)"
        return Outcome(OutcomeKind.TRANSIENT, reason, WAIT_MINUTE_THROTTLE_SECONDS, "429")
    if html:
        reason = f"DingTalk answered an HTML page (HTTP {status}): IP rate limit?"
        return Outcome(OutcomeKind.TRANSIENT, reason, WAIT_IP_BAN_SECONDS, f"html-{status}")
    reason = f"DingTalk answered HTTP {status}: {short(body)}"
    return Outcome(OutcomeKind.TRANSIENT, reason, WAIT_MINUTE_THROTTLE_SECONDS, str(status))
