"""The only module that talks HTTP to DingTalk: token, attendance upload, read-back, contacts, robot.

Every answer, including the absence of one, is classified into an `Outcome` so the forwarder never sees a
`requests` or SDK exception:

- DELIVERED: DingTalk said errcode 0.
- TRANSIENT (with the wait the answer calls for): the request certainly did not take effect, try again
  later: connection refused, connect timeout, 5xx, an HTML page or the IP-ban JSON (circuit-break at least
  5 minutes), errcode -1, the 900xx throttles.
- UNKNOWN: the request may have reached DingTalk and no usable answer came back (read timeout after
  sending, connection reset after sending, a 504 from a gateway, an unreadable 200). The forwarder settles
  these by reading DingTalk back before it sends again.
- NEEDS_HUMAN: credentials, permission, monthly quota, or a token DingTalk keeps rejecting.
- PERMANENT (for that punch): unknown user, or any other non-zero errcode on a well-formed request.

The calls go through dingtalk-sdk's `AppKeyClient` (URL joining, JSON body, the shared `requests` session
machinery), with its traps disarmed in `_SdkClient` below.

Monthly quota: every upload and read-back call that may have reached DingTalk is counted in the store under
its month in the organisation's timezone (`quota.call_month`: "2026-11"; token and contacts calls are free,
QPS-rejected calls are not counted by DingTalk either), the month `status` and the forwarder read. Counts
reach the store in small groups (`flush_call_counts`; the forwarder flushes before every budget check).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import requests
import structlog
from dingtalk import AppKeyClient
from dingtalk.core.exceptions import DingTalkClientException
from requests.adapters import HTTPAdapter

from zkdingsync.errors import StoreError, ZkdingsyncError
from zkdingsync.model import Directory, Outcome, OutcomeKind, Upload, utc_now
from zkdingsync.quota import call_month
from zkdingsync.redaction import redact_text

log = structlog.get_logger(__name__)

DEFAULT_API_BASE = "https://oapi.dingtalk.com"
UPLOAD_PATH = "topapi/attendance/record/upload"
LIST_RECORD_PATH = "attendance/listRecord"
LIST_SUB_DEPARTMENTS_PATH = "topapi/v2/department/listsubid"
LIST_USERS_PATH = "topapi/v2/user/list"
ROBOT_PATH = "robot/send"
TOKEN_PATH = "gettoken"  # noqa: S105 - a URL path, not a password; relative: the SDK's "/gettoken" would drop a path prefix of api_base

# DingTalk's documented limits for a read-back call.
MAX_READ_BACK_USERS = 50
MAX_READ_BACK_SPAN = timedelta(days=7)
# How far back DingTalk accepts an upload or a read-back.
DINGTALK_WINDOW = timedelta(days=180)
MAX_EVIDENCE_ID = 128  # characters of a request or record id kept; longer is not an id
MAX_NAME = 64  # characters of a directory name kept

TOKEN_REFRESH_MARGIN = timedelta(minutes=5)
# Call counts are written to the store in groups (see DingTalkClient._count_call).
COUNT_FLUSH_CALLS = 50
COUNT_FLUSH_SECONDS = 5.0
ROOT_DEPARTMENT = 1
USER_PAGE_SIZE = 100
# A department walk that goes on longer than this is a loop or a misunderstanding, not an organisation.
MAX_DEPARTMENTS = 20_000

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

_TOKEN_CODES = frozenset({"40014", "40000", "42001", "40001", "33001"})
_NEEDS_HUMAN = {
    "40096": ("DingTalk rejected app_key/app_secret", WAIT_CREDENTIALS_SECONDS),
    "40035": (
        "DingTalk says a required parameter (app_key/app_secret?) is missing",
        WAIT_CREDENTIALS_SECONDS,
    ),
    "60011": ("the DingTalk app lacks a permission (Pro.AttendanceRecord.Write?)", WAIT_CREDENTIALS_SECONDS),
    "90020": ("the organisation's monthly DingTalk API quota is exhausted", WAIT_QUOTA_SECONDS),
}
_PERMANENT_KNOWN = {
    "60121": "DingTalk does not know this user",
    "40003": "DingTalk says the userid is invalid",
}
_THROTTLE_WAITS = {
    "90002": WAIT_GLOBAL_THROTTLE_SECONDS,
    "90018": WAIT_THROTTLE_SECONDS,
    "90005": WAIT_MINUTE_THROTTLE_SECONDS,
    "90006": WAIT_MINUTE_THROTTLE_SECONDS,
}
_MAX_MESSAGE = 200


class ClientStore(Protocol):
    """What the client needs from the store: the token cache and the call counter."""

    def cached_token(self, app_key: str, *, now: datetime) -> str | None: ...

    def cache_token(self, app_key: str, token: str, *, refresh_at: datetime) -> None: ...

    def forget_token(self, app_key: str) -> None: ...

    def count_calls(self, month: str, n: int = 1) -> int: ...


class DingTalkSettings(Protocol):
    """The part of `config.dingtalk` the client reads."""

    @property
    def app_key(self) -> str: ...

    @property
    def app_secret(self) -> str: ...

    @property
    def api_base(self) -> str: ...

    @property
    def timeout_seconds(self) -> float: ...


class DingTalkError(ZkdingsyncError):
    """A read call (read-back, contacts) failed; `outcome` says how (never DELIVERED)."""

    def __init__(self, what: str, outcome: Outcome) -> None:
        self.what = what
        self.outcome = outcome
        super().__init__(f"DingTalk {what}: {outcome.reason}")


def _short(text: object) -> str:
    # Answers are shown in logs and `status`: keep them one printable line.
    value = "".join(ch if ch.isprintable() else "?" for ch in str(text))
    return value if len(value) <= _MAX_MESSAGE else value[:_MAX_MESSAGE] + "…"


def answer_code(answer: Mapping[str, Any]) -> str | None:
    """Given a decoded DingTalk answer, return its effective error code as text ("0" on success).

    topapi endpoints wrap errors as errcode 88 with the real reason in `sub_code`; older endpoints put the
    reason at the top level. Return None when the answer carries no errcode at all.
    """
    sub_code = answer.get("sub_code")
    if sub_code not in (None, "", 0, "0"):
        return str(sub_code).strip()
    if "errcode" not in answer:
        return None
    return str(answer["errcode"]).strip()


def is_token_error(answer: Mapping[str, Any]) -> bool:
    """Return True if DingTalk rejected the access token (bad, blank or expired)."""
    return answer_code(answer) in _TOKEN_CODES


def is_ip_ban(answer: Mapping[str, Any]) -> bool:
    """Return True for the gateway's IP rate-limit answer `{"status":1111,"wait":5,"punish":"deny"}`."""
    return "punish" in answer or str(answer.get("status", "")) == "1111"


def classify_errcode(code: str, errmsg: str = "") -> Outcome:
    """Given a non-zero effective errcode (and its message), return the Outcome it calls for.

    Token errors are not handled here (the caller refreshes and retries once); if one reaches this
    function it is treated as a credentials problem.
    """
    message = _short(errmsg)
    if code in _NEEDS_HUMAN:
        what, wait = _NEEDS_HUMAN[code]
        return Outcome(OutcomeKind.NEEDS_HUMAN, f"{what} (errcode {code}: {message})", wait, code)
    if code in _TOKEN_CODES:
        reason = f"DingTalk keeps rejecting the access token (errcode {code}: {message})"
        return Outcome(OutcomeKind.NEEDS_HUMAN, reason, WAIT_CREDENTIALS_SECONDS, code)
    if code in _PERMANENT_KNOWN:
        return Outcome(
            OutcomeKind.PERMANENT, f"{_PERMANENT_KNOWN[code]} (errcode {code}: {message})", 0.0, code
        )
    if code in _THROTTLE_WAITS:
        reason = f"DingTalk throttled the call (errcode {code}: {message})"
        return Outcome(OutcomeKind.TRANSIENT, reason, _THROTTLE_WAITS[code], code)
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
        except (TypeError, ValueError):
            wait = WAIT_IP_BAN_SECONDS
        return Outcome(OutcomeKind.TRANSIENT, "DingTalk banned this IP address for a while", wait, "ip-ban")
    code = answer_code(answer)
    if code is None:
        return Outcome(OutcomeKind.UNKNOWN, f"DingTalk answered without an errcode: {_short(answer)}")
    if code == "0":
        return Outcome(
            OutcomeKind.DELIVERED, "ok", 0.0, "0", request_id=evidence_id(answer.get("request_id"))
        )
    errmsg = answer.get("sub_msg") or answer.get("errmsg") or ""
    return classify_errcode(code, str(errmsg))


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
    reason = f"DingTalk answered HTTP {status}: {_short(body)}"
    return Outcome(OutcomeKind.TRANSIENT, reason, WAIT_MINUTE_THROTTLE_SECONDS, str(status))


def _connection_never_opened(error: requests.exceptions.ConnectionError) -> bool:
    """Return True if the request certainly never left this host (refused, DNS, connect timeout)."""
    if isinstance(error, requests.exceptions.ConnectTimeout | requests.exceptions.ProxyError):
        return True
    if isinstance(error, requests.exceptions.SSLError):
        return True  # a TLS failure is a handshake failure in practice: nothing was sent yet
    text = repr(error)
    # urllib3 wraps a failure to connect in NewConnectionError / NameResolutionError; a reset or a close
    # after the request was written shows up as ProtocolError ("Connection aborted.").
    return "NewConnectionError" in text or "NameResolutionError" in text or "Failed to establish" in text


def robot_signature(secret: str, timestamp_ms: int) -> str:
    """Given a robot's `SEC...` secret and a timestamp in epoch ms, return the Base64 signature.

    HMAC-SHA256 keyed with the whole secret over "TS\\nsecret"; the caller URL-encodes it once (requests
    does when it is passed in `params`).
    """
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class _SdkDropFilter(logging.Filter):
    """Drop the SDK's own log records.

    dingtalk-sdk logs every failed call at ERROR with the full URL (access_token in its query) and, for
    gettoken, the parameters (appsecret in clear). This client logs its own classified line instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return False


class _QueryRedactionFilter(logging.Filter):
    """Redact credentials from URLs in urllib3's debug lines ("GET /gettoken?appkey=..&appsecret=..")."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def _guard_library_logging() -> None:
    """Install the filters above once per process (idempotent: every client calls it)."""
    for name, kind in (
        ("dingtalk.client.base", _SdkDropFilter),
        ("urllib3.connectionpool", _QueryRedactionFilter),
    ):
        library_logger = logging.getLogger(name)
        if not any(isinstance(existing, kind) for existing in library_logger.filters):
            library_logger.addFilter(kind())


class _SdkClient(AppKeyClient):  # type: ignore[misc]  # the SDK is untyped
    """dingtalk-sdk's AppKeyClient with its traps disarmed.

    - `API_BASE_URL` and the HTTP session are per instance: the SDK keeps both on the class, shared by
      every client in the process (and its session by every thread, with a pool sized for one).
    - No token handling: the SDK's cache deletes and refetches tokens on its own and, with auto_retry,
      recurses on a persistently bad token. The caller passes the token of each call explicitly.
    - No raising on non-zero errcodes: the caller classifies the decoded answer itself (the SDK's
      exception loses `sub_code`, which is where topapi endpoints put the reason).
    """

    def __init__(
        self, app_key: str, app_secret: str, api_base: str, timeout_seconds: float, pool_size: int
    ) -> None:
        super().__init__("", app_key, app_secret, storage=None, timeout=timeout_seconds, auto_retry=False)
        self.API_BASE_URL = api_base.rstrip("/") + "/"
        session = requests.Session()
        # Read the environment (proxies, CA bundle) once, here: with trust_env requests rescans os.environ
        # on every call, which costs about as much as the call itself on a fast network.
        session.trust_env = False
        session.proxies.update(requests.utils.get_environ_proxies(self.API_BASE_URL))
        ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if ca_bundle:
            session.verify = ca_bundle
        # max_retries=0: urllib3 must never resend a POST on its own; a resend is the forwarder's decision.
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=max(2, pool_size), max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._http = session

    def _handle_pre_request(
        self, method: str, uri: str, kwargs: dict[str, Any]
    ) -> tuple[str, str, dict[str, Any]]:
        token = kwargs.pop("zk_access_token", None)
        if token is not None:
            params = dict(kwargs.get("params") or {})
            params["access_token"] = token
            kwargs["params"] = params
        return method, uri, kwargs

    def _handle_result(self, res: Any, *args: Any, **kwargs: Any) -> Any:
        return self._decode_result(res)

    def _handle_request_except(self, e: Exception, func: Any, *args: Any, **kwargs: Any) -> Any:
        raise e

    def close(self) -> None:
        self._http.close()


@dataclass(frozen=True)
class _Token:
    value: str
    refresh_at: datetime


class DingTalkClient:
    """Calls DingTalk for one internal app. Thread-safe: the forwarder's workers share one instance."""

    def __init__(
        self,
        app_key: str,
        app_secret: str,
        api_base: str = DEFAULT_API_BASE,
        timeout_seconds: float = 10.0,
        *,
        store: ClientStore,
        org_timezone: str = "Asia/Shanghai",
        clock: Callable[[], datetime] = utc_now,
        pool_size: int = 10,
    ) -> None:
        """Given the app's credentials, where DingTalk is, a timeout for every call, and the store (token
        cache and call counter), build a client. `org_timezone` is the zone listRecord reads its dates in.
        """
        if not timeout_seconds or timeout_seconds <= 0:
            raise ValueError("every DingTalk call needs a positive timeout")
        _guard_library_logging()
        self.app_key = app_key
        self._app_secret = app_secret
        self.api_base = api_base.rstrip("/")
        self.timeout_seconds = float(timeout_seconds)
        self._store = store
        self._org_zone = ZoneInfo(org_timezone)
        self._clock = clock
        self._sdk = _SdkClient(app_key, app_secret, self.api_base, self.timeout_seconds, pool_size)
        self._token_lock = threading.Lock()
        self._token: _Token | None = None
        self._count_lock = threading.Lock()
        self._unsaved_counts: Counter[str] = Counter()
        self._unsaved_since: datetime | None = None
        self._count_failing = False

    @classmethod
    def from_settings(
        cls,
        settings: DingTalkSettings,
        *,
        store: ClientStore,
        org_timezone: str = "Asia/Shanghai",
        pool_size: int = 10,
        clock: Callable[[], datetime] = utc_now,
    ) -> DingTalkClient:
        """Given `config.dingtalk` (app_key, app_secret, api_base, timeout_seconds), build a client."""
        return cls(
            settings.app_key,
            settings.app_secret,
            settings.api_base,
            settings.timeout_seconds,
            store=store,
            org_timezone=org_timezone,
            clock=clock,
            pool_size=pool_size,
        )

    def __repr__(self) -> str:
        return f"DingTalkClient(app_key={self.app_key!r}, api_base={self.api_base!r})"

    def close(self) -> None:
        """Write the outstanding call counts and close the HTTP connections."""
        self.flush_call_counts()
        self._sdk.close()

    # ------------------------------------------------------------------ public calls

    def month_of(self, at: datetime) -> str:
        """Return the month ("2026-11", in the organisation's timezone) that calls made at `at` count in."""
        return call_month(at, self._org_zone)

    def upload(self, upload: Upload) -> Outcome:
        """Upload one punch and return how DingTalk answered.

        Never raises for anything DingTalk or the network does. A token DingTalk rejects is refreshed once
        and the call retried once (the rejected call did not take effect); a second rejection is
        NEEDS_HUMAN.
        """
        problem = _upload_problem(upload)
        if problem:
            return Outcome(OutcomeKind.PERMANENT, problem)
        body = {
            "userid": upload.userid,
            "device_name": upload.device_name,
            "device_id": upload.device_id,
            "user_check_time": upload.user_check_time_ms,
        }
        answer = self._call("POST", UPLOAD_PATH, body=body, counted=True, idempotent=False)
        if isinstance(answer, Outcome):
            return answer
        return classify_answer(answer)

    def list_records(self, userids: Sequence[str], start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Return DingTalk's raw punches of up to 50 users between two moments (at most 7 days apart).

        The moments are sent as the organisation's wall-clock time, whole seconds, `start` rounded down
        and `end` up. Raise DingTalkError when the read fails, ValueError when the limits are exceeded.
        """
        if not userids or len(userids) > MAX_READ_BACK_USERS:
            raise ValueError(f"listRecord takes 1 to {MAX_READ_BACK_USERS} users, not {len(userids)}")
        if end < start or end - start > MAX_READ_BACK_SPAN:
            raise ValueError("listRecord takes a window of at most 7 days")
        body = {
            "userIds": list(userids),
            "checkDateFrom": self._org_time(start, round_up=False),
            "checkDateTo": self._org_time(end, round_up=True),
            "isI18n": False,
        }
        answer = self._call("POST", LIST_RECORD_PATH, body=body, counted=True, idempotent=True)
        result = self._checked("read back punches", answer)
        records = result.get("recordresult") or []
        if not isinstance(records, list):
            raise DingTalkError(
                "read back punches", Outcome(OutcomeKind.TRANSIENT, "recordresult is not a list")
            )
        return [record for record in records if isinstance(record, dict)]

    def list_job_numbers(self) -> dict[str, str]:
        """Walk every department and return job number (工号) -> userid (see `list_directory`)."""
        return dict(self.list_directory().job_numbers)

    def list_directory(self) -> Directory:
        """Walk every department and return job number (工号) -> userid for every user who has one, and
        every user's name.

        A job number held by two different users is ambiguous and left out (logged). Raise DingTalkError
        when a call fails. Contacts calls do not count against the monthly quota.
        """
        users: dict[str, set[str]] = {}
        names: dict[str, str] = {}
        seen: set[int] = set()
        queue = [ROOT_DEPARTMENT]
        while queue:
            dept = queue.pop()
            if dept in seen:
                continue
            seen.add(dept)
            if len(seen) > MAX_DEPARTMENTS:
                raise DingTalkError(
                    "list departments", Outcome(OutcomeKind.PERMANENT, "too many departments")
                )
            answer = self._call("POST", LIST_SUB_DEPARTMENTS_PATH, body={"dept_id": dept}, idempotent=True)
            result = self._checked("list departments", answer).get("result") or {}
            queue.extend(int(child) for child in result.get("dept_id_list") or [] if str(child).isdigit())
            cursor: int | None = 0
            while cursor is not None:
                body = {"dept_id": dept, "cursor": cursor, "size": USER_PAGE_SIZE}
                answer = self._call("POST", LIST_USERS_PATH, body=body, idempotent=True)
                page = self._checked("list users", answer).get("result") or {}
                for user in page.get("list") or []:
                    job_number = str(user.get("job_number") or "").strip()
                    userid = str(user.get("userid") or "").strip()
                    if job_number and userid:
                        users.setdefault(job_number, set()).add(userid)
                    name = user.get("name")
                    if userid and isinstance(name, str) and name.strip():
                        names[userid] = name.strip()[:MAX_NAME]
                next_cursor = page.get("next_cursor")
                cursor = int(next_cursor) if page.get("has_more") and next_cursor is not None else None
        mapping: dict[str, str] = {}
        for job_number, userids in users.items():
            if len(userids) == 1:
                mapping[job_number] = next(iter(userids))
            else:
                log.warning("dingtalk.job_number_ambiguous", job_number=job_number, userids=sorted(userids))
        return Directory(mapping, names)

    def check_credentials(self) -> Outcome:
        """Fetch (or reuse) an access token; DELIVERED when DingTalk accepts the app's credentials."""
        token = self._access_token(stale=None)
        return token if isinstance(token, Outcome) else Outcome(OutcomeKind.DELIVERED, "ok")

    def send_robot(self, access_token: str, secret: str | None, message: Mapping[str, Any]) -> Outcome:
        """Post one message to a group robot (signed when a secret is given); return the Outcome."""
        params: dict[str, Any] = {"access_token": access_token}
        if secret:
            timestamp = int(self._clock().timestamp() * 1000)
            params["timestamp"] = timestamp
            params["sign"] = robot_signature(secret, timestamp)
        answer = self._send("POST", ROBOT_PATH, body=dict(message), params=params)
        if isinstance(answer, Outcome):
            return answer
        return classify_answer(answer)

    # ------------------------------------------------------------------ plumbing

    def _org_time(self, moment: datetime, *, round_up: bool) -> str:
        local = moment.astimezone(self._org_zone)
        if round_up and local.microsecond:
            local = local + timedelta(seconds=1)
        return local.strftime("%Y-%m-%d %H:%M:%S")

    def _checked(self, what: str, answer: dict[str, Any] | Outcome) -> dict[str, Any]:
        if isinstance(answer, Outcome):
            raise DingTalkError(what, answer)
        outcome = classify_answer(answer)
        if outcome.kind is not OutcomeKind.DELIVERED:
            if outcome.kind is OutcomeKind.UNKNOWN:  # a read can simply be repeated
                outcome = Outcome(
                    OutcomeKind.TRANSIENT, outcome.reason, WAIT_SERVER_ERROR_SECONDS, outcome.code
                )
            raise DingTalkError(what, outcome)
        return answer

    def _call(
        self, method: str, path: str, *, body: dict[str, Any], idempotent: bool, counted: bool = False
    ) -> dict[str, Any] | Outcome:
        """Make one authenticated call: at most two sends, the second only after DingTalk rejected the
        token of the first (which therefore did not take effect). Never recursion, never a loop."""
        stale: str | None = None
        rejection: dict[str, Any] = {}
        for attempt in (1, 2):
            token = self._access_token(stale=stale)
            if isinstance(token, Outcome):
                return token
            answer = self._send(method, path, body=body, token=token)
            if isinstance(answer, Outcome):
                if counted and answer.code != "not-sent":
                    self._count_call()
                if idempotent and answer.kind is OutcomeKind.UNKNOWN:
                    return Outcome(
                        OutcomeKind.TRANSIENT, answer.reason, WAIT_SERVER_ERROR_SECONDS, answer.code
                    )
                return answer
            if counted and answer_code(answer) not in _THROTTLE_WAITS:
                # Calls rejected by the QPS limits are not counted by DingTalk either.
                self._count_call()
            if not is_token_error(answer):
                return answer
            log.info("dingtalk.token_rejected", attempt=attempt, code=answer_code(answer))
            stale, rejection = token, answer
        errmsg = str(rejection.get("sub_msg") or rejection.get("errmsg") or "")
        return classify_errcode(answer_code(rejection) or "", errmsg)

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> dict[str, Any] | Outcome:
        """Send one request; return the decoded JSON object or the Outcome of a failure to get one.

        Failures that certainly did not reach DingTalk carry code "not-sent".
        """
        kwargs: dict[str, Any] = {"timeout": self.timeout_seconds}
        if body is not None:
            kwargs["data"] = body
        if params is not None:
            kwargs["params"] = params
        if token is not None:
            kwargs["zk_access_token"] = token
        try:
            result = self._sdk.request(method, path, **kwargs)
        except requests.exceptions.ConnectionError as error:
            if _connection_never_opened(error):
                reason = f"cannot connect to DingTalk at {self.api_base}: {_network_reason(error)}"
                return Outcome(OutcomeKind.TRANSIENT, reason, WAIT_NETWORK_SECONDS, "not-sent")
            reason = f"the connection to DingTalk broke after the request was sent: {_network_reason(error)}"
            return Outcome(OutcomeKind.UNKNOWN, reason, 0.0, "connection-lost")
        except requests.exceptions.Timeout:
            # A ConnectTimeout is a ConnectionError (handled above): this is a read timeout, after sending.
            reason = f"no answer from DingTalk within {self.timeout_seconds:g} s after sending"
            return Outcome(OutcomeKind.UNKNOWN, reason, 0.0, "read-timeout")
        except (
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
        ):
            reason = f"dingtalk.api_base {self.api_base!r} is not a usable URL"
            return Outcome(OutcomeKind.NEEDS_HUMAN, reason, WAIT_CREDENTIALS_SECONDS, "not-sent")
        except requests.exceptions.RequestException as error:
            # Chunked/content decoding errors and the like: an answer started but could not be read.
            reason = f"DingTalk's answer could not be read: {type(error).__name__}"
            return Outcome(OutcomeKind.UNKNOWN, reason, 0.0, "unreadable")
        except DingTalkClientException as error:
            # The SDK raises this (errcode None) for a non-2xx status, with the response attached.
            response = error.response
            if response is None:
                return Outcome(
                    OutcomeKind.UNKNOWN, "DingTalk failed without an HTTP answer", 0.0, "unreadable"
                )
            decoded = _json_object(response)
            if decoded is not None and (
                is_ip_ban(decoded) or ("errcode" in decoded and response.status_code < 500)
            ):
                return decoded  # the IP-ban JSON means a ban whatever the status it comes with
            return classify_http_status(response.status_code, _text(response))
        if isinstance(result, dict):
            return result
        if isinstance(result, requests.Response):
            text = _text(result)
            if text.lstrip()[:1] == "<":
                reason = "DingTalk answered an HTML page instead of JSON: IP rate limit?"
                return Outcome(OutcomeKind.TRANSIENT, reason, WAIT_IP_BAN_SECONDS, "html")
            return Outcome(
                OutcomeKind.UNKNOWN, f"DingTalk answered something that is not JSON: {_short(text)}"
            )
        return Outcome(OutcomeKind.UNKNOWN, f"DingTalk answered JSON that is not an object: {_short(result)}")

    def _access_token(self, *, stale: str | None) -> str | Outcome:
        """Return a usable access token, fetching one if needed; `stale` is a token DingTalk just rejected.

        One refresh at a time: a thread that waited for the lock uses the token another one just fetched.
        Cached in memory and in the store (so a restart reuses it), until 5 minutes before it expires.
        """
        now = self._clock()
        current = self._token
        if current is not None and current.value != stale and now < current.refresh_at:
            return current.value
        with self._token_lock:
            now = self._clock()
            current = self._token
            if current is not None and current.value != stale and now < current.refresh_at:
                return current.value
            if stale is None:
                stored = self._stored_token(now)
                if stored is not None:
                    return stored
            else:
                self._forget_stored_token()
            return self._fetch_token(now)

    def _stored_token(self, now: datetime) -> str | None:
        try:
            value = self._store.cached_token(self.app_key, now=now)
        except StoreError as error:
            log.warning("dingtalk.token_cache_unreadable", error=str(error))
            return None
        if value is None:
            return None
        # The store only says "not expired"; the exact refresh moment is unknown, so recheck in a while.
        self._token = _Token(value, now + TOKEN_REFRESH_MARGIN)
        return value

    def _forget_stored_token(self) -> None:
        self._token = None
        try:
            self._store.forget_token(self.app_key)
        except StoreError as error:
            log.warning("dingtalk.token_cache_unwritable", error=str(error))

    def _fetch_token(self, now: datetime) -> str | Outcome:
        params = {"appkey": self.app_key, "appsecret": self._app_secret}
        answer = self._send("GET", TOKEN_PATH, params=params)
        if isinstance(answer, Outcome):
            if answer.kind is OutcomeKind.UNKNOWN:  # gettoken is a read: just try again later
                answer = Outcome(OutcomeKind.TRANSIENT, answer.reason, WAIT_NETWORK_SECONDS, answer.code)
            log.warning("dingtalk.token_failed", reason=answer.reason)
            return answer
        outcome = classify_answer(answer)
        token = answer.get("access_token")
        if outcome.kind is not OutcomeKind.DELIVERED or not isinstance(token, str) or not token:
            if outcome.kind is OutcomeKind.DELIVERED:
                outcome = Outcome(
                    OutcomeKind.TRANSIENT, "gettoken answered without a token", WAIT_NETWORK_SECONDS
                )
            elif outcome.kind in (OutcomeKind.PERMANENT, OutcomeKind.UNKNOWN):
                # Nothing about a punch is wrong when the token cannot be had: a human has to look.
                outcome = Outcome(
                    OutcomeKind.NEEDS_HUMAN,
                    f"cannot get an access token: {outcome.reason}",
                    WAIT_CREDENTIALS_SECONDS,
                    outcome.code,
                )
            log.warning("dingtalk.token_failed", reason=outcome.reason, code=outcome.code)
            return outcome
        try:
            lifetime = float(answer.get("expires_in", 7200))
        except (TypeError, ValueError):
            lifetime = 7200.0
        margin = min(TOKEN_REFRESH_MARGIN.total_seconds(), lifetime / 2)
        refresh_at = now + timedelta(seconds=lifetime - margin)
        self._token = _Token(token, refresh_at)
        try:
            self._store.cache_token(self.app_key, token, refresh_at=refresh_at)
        except StoreError as error:
            log.warning("dingtalk.token_cache_unwritable", error=str(error))
        log.info("dingtalk.token_fetched", expires_in=lifetime)
        return token

    def _count_call(self) -> None:
        """Count one call against its month: in memory, written to the store in small groups.

        One committed (fsynced) transaction per call would cost as much as the call's own bookkeeping;
        the forwarder flushes after every batch, and a group flushes itself at COUNT_FLUSH_CALLS calls or
        COUNT_FLUSH_SECONDS. A crash forgets at most one group.
        """
        now = self._clock()
        with self._count_lock:
            self._unsaved_counts[self.month_of(now)] += 1
            if self._unsaved_since is None:
                self._unsaved_since = now
            due = (
                sum(self._unsaved_counts.values()) >= COUNT_FLUSH_CALLS
                or (now - self._unsaved_since).total_seconds() >= COUNT_FLUSH_SECONDS
            )
        if due:
            self.flush_call_counts()

    def flush_call_counts(self) -> None:
        """Write the calls counted since the last flush to the store (a failure keeps them for later)."""
        with self._count_lock:
            counts, self._unsaved_counts = self._unsaved_counts, Counter()
            self._unsaved_since = None
            try:
                for month, calls in counts.items():
                    self._store.count_calls(month, calls)
                    counts[month] = 0
            except StoreError as error:
                # Losing a count is better than losing the outcome of a call that DingTalk may have taken.
                if not self._count_failing:  # once per outage, not once per call
                    log.warning("dingtalk.call_count_failed", error=str(error))
                self._count_failing = True
                self._unsaved_counts.update(+counts)
                self._unsaved_since = self._clock()
            else:
                self._count_failing = False


def _upload_problem(upload: Upload) -> str | None:
    for name in ("userid", "device_name", "device_id"):
        value = getattr(upload, name)
        if not isinstance(value, str) or not value.strip():
            return f"the upload has no {name}"
    if not isinstance(upload.user_check_time_ms, int) or isinstance(upload.user_check_time_ms, bool):
        return "the upload's user_check_time is not an integer of milliseconds"
    return None


def _json_object(response: requests.Response) -> dict[str, Any] | None:
    try:
        decoded = response.json()
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None


def _text(response: requests.Response) -> str:
    try:
        return response.content.decode("utf-8", "replace")
    except (requests.exceptions.RequestException, OSError):
        return ""


def _network_reason(error: Exception) -> str:
    """A short, secret-free description of a network error (the URL, with its token, is left out)."""
    text = str(error)
    for marker in (
        "Connection refused",
        "timed out",
        "Connection reset",
        "Remote end closed",
        "Name or service",
    ):
        if marker in text:
            return marker.lower()
    return type(error).__name__
