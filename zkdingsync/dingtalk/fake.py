"""A fake DingTalk open API on 127.0.0.1, for tests, the demo and the benchmark.

It speaks just enough of DingTalk: gettoken, the attendance upload (JSON or form body, every field
validated), listRecord, the department/user walk, and the group robot (signature checked). It records
every upload it accepted, thread-safely, and can be told to misbehave: error codes for the next N calls
(or for one user), HTTP errors, HTML pages, the IP-ban JSON, slow answers, accepting an upload and then
never answering (the "outcome unknown" case), resetting the connection, expired or rejected tokens,
refusing connections (an outage), a per-call latency, and the 20-QPS limit answered with 90018.

In a test:

    with FakeDingTalk(users={"manager4220": "1001"}) as fake:
        client = DingTalkClient("fake-app-key", "fake-app-secret", fake.url, 2.0, store=store)
        fake.fail_next(90018, n=2)
        ...
        assert fake.uploads[0]["userid"] == "manager4220"

From another process: `python -m zkdingsync.dingtalk.fake --port 8089 --users-file users.json`; it prints
its URL on the first line of stdout. `GET /_fake/uploads` returns what it accepted; `POST /_fake/control`
with `{"action": "fail_next", "errcode": 90018, "n": 3}` (any method below, with its keyword arguments)
injects a fault.

Responses go out in one write with TCP_NODELAY set: `http.server` writes headers and body separately,
and with Nagle plus the client's delayed ACK that costs ~40 ms per keep-alive request.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

DEFAULT_APP_KEY = "fake-app-key"
DEFAULT_APP_SECRET = "fake-app-secret"  # noqa: S105 - a test credential of a fake server
WINDOW_MS = 180 * 24 * 3600 * 1000
SEVEN_DAYS_MS = 7 * 24 * 3600 * 1000
ROBOT_PER_MINUTE = 20

# Endpoint names used to scope faults.
GETTOKEN = "gettoken"
UPLOAD = "upload"
LIST_RECORD = "list_record"
LIST_SUB_DEPARTMENTS = "listsubid"
LIST_USERS = "user_list"
ROBOT = "robot"
ANY = "*"

_ROUTES = {
    "/gettoken": GETTOKEN,
    "/topapi/attendance/record/upload": UPLOAD,
    "/attendance/listRecord": LIST_RECORD,
    "/topapi/v2/department/listsubid": LIST_SUB_DEPARTMENTS,
    "/topapi/v2/user/list": LIST_USERS,
    "/robot/send": ROBOT,
}
_TOPAPI = frozenset({UPLOAD, LIST_SUB_DEPARTMENTS, LIST_USERS})

_HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>访问受限</title></head>"
    "<body><h1>您的访问过于频繁，请稍后再试</h1></body></html>"
)


@dataclass
class Fault:
    """One way to misbehave, for the next `remaining` matching calls (None: until cleared)."""

    kind: str  # errcode | http | html | ban | hang | reset | slow | garbage
    endpoint: str = UPLOAD
    remaining: int | None = 1
    userid: str | None = None
    errcode: int = 0
    sub_code: str | None = None
    errmsg: str = ""
    status: int = 200
    delay_seconds: float = 0.0
    accept: bool = True  # hang/reset on an upload: record it first (DingTalk took it, the answer is lost)

    def matches(self, endpoint: str, userid: str | None) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.endpoint not in (ANY, endpoint):
            return False
        return self.userid is None or self.userid == userid


@dataclass
class _Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json;charset=UTF-8"
    hang: bool = False
    reset: bool = False


@dataclass
class _State:
    users: dict[str, str | None]
    departments: dict[int, list[int]]
    user_departments: dict[str, list[int]]
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (fake clock, epoch s)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    robot_messages: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    upload_arrivals: deque[float] = field(default_factory=deque)
    robot_sends: deque[float] = field(default_factory=deque)
    reject_tokens: bool = False
    record_id: int = 43_047_156_750


class FakeDingTalk:
    """The fake server; a context manager. Every public method is thread-safe."""

    def __init__(
        self,
        users: Mapping[str, str | None] | Iterable[str] = (),
        *,
        app_key: str = DEFAULT_APP_KEY,
        app_secret: str = DEFAULT_APP_SECRET,
        port: int = 0,
        latency_seconds: float = 0.0,
        qps_limit: float | None = 20.0,
        token_ttl_seconds: int = 7200,
        departments: Mapping[int, Sequence[int]] | None = None,
        user_departments: Mapping[str, Sequence[int]] | None = None,
        robot_token: str | None = None,
        robot_secret: str | None = None,
        org_timezone: str = "Asia/Shanghai",
        future_tolerance_seconds: float = 0.0,
        hang_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Given the known users (userid -> job number, or just userids), build a stopped fake server.

        `qps_limit` upload calls within any second are answered; more get errcode 90018 (None: no limit).
        `clock` (epoch seconds) decides token expiry and the upload time window.
        """
        user_map = dict(users) if isinstance(users, Mapping) else dict.fromkeys(users)
        self.app_key = app_key
        self.app_secret = app_secret
        self.latency_seconds = latency_seconds
        self.qps_limit = qps_limit
        self.token_ttl_seconds = token_ttl_seconds
        self.robot_token = robot_token
        self.robot_secret = robot_secret
        self.future_tolerance_seconds = future_tolerance_seconds
        self.hang_seconds = hang_seconds
        self._zone = ZoneInfo(org_timezone)
        self._clock = clock
        self._port = port
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._state = _State(
            users=user_map,
            departments={int(k): [int(c) for c in v] for k, v in (departments or {1: []}).items()},
            user_departments={k: list(v) for k, v in (user_departments or {}).items()},
        )

    # ------------------------------------------------------------------ life cycle

    def start(self) -> FakeDingTalk:
        """Start listening (on the same port again after `go_down`)."""
        with self._lock:
            if self._server is not None:
                return self
            self._closing.clear()
            server = _Server(("127.0.0.1", self._port), _Handler, self)
            self._port = server.server_address[1]
            self._server = server
            # A short poll interval: `stop` (and an outage) waits for the accept loop to notice.
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-dingtalk", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (held ones included)."""
        self._closing.set()
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.drop_connections()
        if thread is not None:
            thread.join(timeout=5)

    go_down = stop  # an outage: connections are refused until `come_up`
    come_up = start

    def __enter__(self) -> FakeDingTalk:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port (known once started)."""
        return self._port

    @property
    def url(self) -> str:
        """The api_base to point a client at."""
        return f"http://127.0.0.1:{self._port}"

    # ------------------------------------------------------------------ what it saw

    @property
    def uploads(self) -> list[dict[str, Any]]:
        """Every upload accepted so far (userid, device_id, device_name, user_check_time, ...), in order."""
        with self._lock:
            return [dict(upload) for upload in self._state.uploads]

    @property
    def robot_messages(self) -> list[dict[str, Any]]:
        """Every robot message accepted so far."""
        with self._lock:
            return [dict(message) for message in self._state.robot_messages]

    @property
    def calls(self) -> Counter[str]:
        """How many requests each endpoint received (faulted and throttled ones included)."""
        with self._lock:
            return Counter(self._state.calls)

    @property
    def throttled(self) -> int:
        """How many upload calls were answered 90018 because they exceeded `qps_limit`."""
        with self._lock:
            return self._state.throttled

    def wait_for_uploads(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least `count` uploads were accepted; return False at the deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._state.uploads) >= count:
                    return True
            self._closing.wait(0.01)
        return False

    # ------------------------------------------------------------------ directory

    def set_users(self, users: Mapping[str, str | None] | Iterable[str]) -> None:
        """Replace the known users."""
        with self._lock:
            self._state.users = dict(users) if isinstance(users, Mapping) else dict.fromkeys(users)

    def add_upload(self, userid: str, user_check_time_ms: int, device_id: str, device_name: str = "") -> None:
        """Record a punch as if it had been uploaded earlier (for read-back tests)."""
        with self._lock:
            self._accept(
                {"userid": userid, "device_id": device_id, "device_name": device_name or device_id},
                user_check_time_ms,
                "seeded",
            )

    # ------------------------------------------------------------------ faults

    def add_fault(self, fault: Fault) -> None:
        """Queue a fault; the first matching fault in queue order applies to a call."""
        with self._lock:
            self._state.faults.append(fault)

    def clear_faults(self) -> None:
        """Forget every queued fault (and stop rejecting tokens)."""
        with self._lock:
            self._state.faults.clear()
            self._state.reject_tokens = False

    def fail_next(
        self,
        errcode: int,
        n: int | None = 1,
        *,
        sub_code: str | None = None,
        errmsg: str = "",
        endpoint: str = UPLOAD,
        userid: str | None = None,
    ) -> None:
        """Answer the next `n` matching calls (None: every one) with this errcode, HTTP 200."""
        self.add_fault(
            Fault("errcode", endpoint, n, userid, errcode, sub_code, errmsg or f"fake error {errcode}")
        )

    def http_error_next(self, status: int = 502, n: int | None = 1, *, endpoint: str = UPLOAD) -> None:
        """Answer the next `n` calls with an HTTP error status and a short HTML body."""
        self.add_fault(Fault("http", endpoint, n, status=status))

    def html_next(self, n: int | None = 1, *, status: int = 200, endpoint: str = UPLOAD) -> None:
        """Answer the next `n` calls with an HTML page (DingTalk's IP rate limit page)."""
        self.add_fault(Fault("html", endpoint, n, status=status))

    def ban_next(self, n: int | None = 1, *, status: int = 200, endpoint: str = UPLOAD) -> None:
        """Answer the next `n` calls with the IP-ban JSON `{"status":1111,"wait":5,"punish":"deny"}`."""
        self.add_fault(Fault("ban", endpoint, n, status=status))

    def garbage_next(self, n: int | None = 1, *, endpoint: str = UPLOAD) -> None:
        """Answer the next `n` calls with HTTP 200 and a body that is not JSON."""
        self.add_fault(Fault("garbage", endpoint, n))

    def hang_next(self, n: int | None = 1, *, accept: bool = True, endpoint: str = UPLOAD) -> None:
        """Record the next `n` uploads (if `accept`), then hold the connection without ever answering."""
        self.add_fault(Fault("hang", endpoint, n, accept=accept))

    def reset_next(self, n: int | None = 1, *, accept: bool = True, endpoint: str = UPLOAD) -> None:
        """Record the next `n` uploads (if `accept`), then reset the connection instead of answering."""
        self.add_fault(Fault("reset", endpoint, n, accept=accept))

    def slow_next(self, seconds: float, n: int | None = 1, *, endpoint: str = UPLOAD) -> None:
        """Answer the next `n` calls normally, but only after `seconds`."""
        self.add_fault(Fault("slow", endpoint, n, delay_seconds=seconds))

    def invalidate_tokens(self) -> None:
        """Expire every issued access token: calls with them get errcode 88 / sub_code 40014."""
        with self._lock:
            self._state.tokens.clear()

    def reject_all_tokens(self, reject: bool = True) -> None:
        """Reject every access token, even fresh ones (a persistently bad token)."""
        with self._lock:
            self._state.reject_tokens = reject

    # ------------------------------------------------------------------ request handling

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> _Reply:
        """Answer one request (called by the handler threads)."""
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if parts.path.startswith("/_fake/"):
            return self._control(method, parts.path, body)
        endpoint = _ROUTES.get(parts.path)
        if endpoint is None:
            return _Reply(404, b"<html><body>404 Not Found</body></html>", "text/html")
        payload = _parse_body(headers.get("Content-Type", ""), body)
        userid = (
            str(payload.get("userid")) if endpoint == UPLOAD and payload.get("userid") is not None else None
        )
        with self._lock:
            self._state.calls[endpoint] += 1
            fault = self._take_fault(endpoint, userid)
        if fault is not None and fault.kind not in ("slow", "hang", "reset"):
            return _fault_reply(fault)
        if fault is not None and fault.kind == "slow":
            self._closing.wait(fault.delay_seconds)
        if fault is not None and fault.kind in ("hang", "reset") and not fault.accept:
            return _Reply(hang=fault.kind == "hang", reset=fault.kind == "reset")
        if endpoint == GETTOKEN:
            reply = self._gettoken(query)
        elif endpoint == ROBOT:
            reply = self._robot(query, payload)
        else:
            reply = self._authenticated(endpoint, query, payload)
        if fault is not None and fault.kind in ("hang", "reset"):
            return _Reply(hang=fault.kind == "hang", reset=fault.kind == "reset")
        if self.latency_seconds:
            self._closing.wait(self.latency_seconds)
        return reply

    def _take_fault(self, endpoint: str, userid: str | None) -> Fault | None:
        for fault in self._state.faults:
            if fault.matches(endpoint, userid):
                if fault.remaining is not None:
                    fault.remaining -= 1
                return fault
        return None

    def _gettoken(self, query: Mapping[str, str]) -> _Reply:
        appkey, appsecret = query.get("appkey", ""), query.get("appsecret", "")
        if not appkey or not appsecret:
            return _json({"errcode": 40035, "errmsg": "缺少参数 appkey/appsecret"})
        if appkey != self.app_key or appsecret != self.app_secret:
            return _json({"errcode": 40096, "errmsg": "不合法的appKey或appSecret"})
        now = self._clock()
        with self._lock:
            tokens = self._state.tokens
            for token, expires in list(tokens.items()):
                if expires <= now:
                    del tokens[token]
            if tokens:  # asking again while valid returns the same token
                token, expires = next(iter(tokens.items()))
            else:
                token, expires = uuid.uuid4().hex, now + self.token_ttl_seconds
                tokens[token] = expires
        return _json({"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": int(expires - now)})

    def _token_problem(self, endpoint: str, token: str) -> _Reply | None:
        now = self._clock()
        with self._lock:
            valid = not self._state.reject_tokens and self._state.tokens.get(token, 0.0) > now
        if valid:
            return None
        sub_code, sub_msg = ("40000", "access_token为空") if not token else ("40014", "不合法的access_token")
        if endpoint in _TOPAPI:
            return _json(
                {
                    "errcode": 88,
                    "sub_code": sub_code,
                    "sub_msg": sub_msg,
                    "errmsg": f"ding talk error[subcode={sub_code},submsg={sub_msg}]",
                    "request_id": _request_id(),
                }
            )
        return _json({"errcode": int(sub_code) if token else 40014, "errmsg": sub_msg})

    def _authenticated(self, endpoint: str, query: Mapping[str, str], payload: Mapping[str, Any]) -> _Reply:
        problem = self._token_problem(endpoint, query.get("access_token", ""))
        if problem is not None:
            return problem
        if endpoint == UPLOAD:
            return self._upload(payload)
        if endpoint == LIST_RECORD:
            return self._list_record(payload)
        if endpoint == LIST_SUB_DEPARTMENTS:
            return self._list_sub_departments(payload)
        return self._list_users(payload)

    def _upload(self, payload: Mapping[str, Any]) -> _Reply:
        if self.qps_limit is not None:
            now = time.monotonic()
            with self._lock:
                arrivals = self._state.upload_arrivals
                while arrivals and arrivals[0] <= now - 1.0:
                    arrivals.popleft()
                if len(arrivals) >= self.qps_limit:
                    self._state.throttled += 1
                    return _json(
                        {
                            "errcode": 90018,
                            "errmsg": "您的服务器调用钉钉开放平台当前接口的所有请求都被暂时禁用了",
                        }
                    )
                arrivals.append(now)
        userid = payload.get("userid")
        with self._lock:
            known = isinstance(userid, str) and userid in self._state.users
        if not known:
            return _json({"errcode": 60121, "errmsg": "找不到该用户", "request_id": _request_id()})
        for name in ("device_id", "device_name"):
            value = payload.get(name)
            if not isinstance(value, str) or not value.strip():
                return _invalid(f"{name} is required")
        check_time = _as_int(payload.get("user_check_time"))
        if check_time is None:
            return _invalid("user_check_time must be an integer of epoch milliseconds")
        now_ms = int(self._clock() * 1000)
        if check_time > now_ms + int(self.future_tolerance_seconds * 1000):
            return _invalid("user_check_time is in the future")
        if check_time < now_ms - WINDOW_MS:
            return _invalid("user_check_time is older than 180 days")
        request_id = _request_id()
        with self._lock:
            self._accept(payload, check_time, "upload", request_id)
        return _json({"errcode": 0, "errmsg": "ok", "success": True, "request_id": request_id})

    def _accept(
        self, payload: Mapping[str, Any], check_time: int, how: str, request_id: str | None = None
    ) -> None:
        """Record an accepted upload (with the request_id its answer carried); the caller holds the lock."""
        self._state.record_id += 1
        self._state.uploads.append(
            {
                "userid": payload["userid"],
                "device_id": payload["device_id"],
                "device_name": payload["device_name"],
                "user_check_time": check_time,
                "record_id": self._state.record_id,
                "request_id": request_id,
                "how": how,
            }
        )

    def _list_record(self, payload: Mapping[str, Any]) -> _Reply:
        userids = payload.get("userIds")
        if not isinstance(userids, list) or not userids or len(userids) > 50:
            return _invalid("userIds must list 1 to 50 users")
        try:
            start = self._org_ms(str(payload.get("checkDateFrom")))
            end = self._org_ms(str(payload.get("checkDateTo")))
        except ValueError:
            return _invalid("checkDateFrom/checkDateTo must be yyyy-MM-dd HH:mm:ss")
        if end < start or end - start > SEVEN_DAYS_MS:
            return _invalid("the window must be at most 7 days")
        if start < int(self._clock() * 1000) - WINDOW_MS - 24 * 3600 * 1000:
            return _invalid("the window must be within the last 180 days")
        wanted = {str(u) for u in userids}
        with self._lock:
            found = [
                u
                for u in self._state.uploads
                if u["userid"] in wanted and start <= u["user_check_time"] <= end
            ]
        records = [
            {
                "userId": u["userid"],
                "userCheckTime": u["user_check_time"],
                "sourceType": "ATM",
                "userAddress": u["device_name"],
                "deviceId": u["device_id"],
                "checkType": "OnDuty",
                "timeResult": "Normal",
                "locationResult": "Normal",
                "isLegal": "Y",
                "id": u["record_id"],
                "corpId": "dingfake",
            }
            for u in found
        ]
        return _json({"errcode": 0, "errmsg": "ok", "recordresult": records})

    def _org_ms(self, text: str) -> int:
        local = datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=self._zone)
        return int(local.timestamp()) * 1000

    def _list_sub_departments(self, payload: Mapping[str, Any]) -> _Reply:
        dept = _as_int(payload.get("dept_id"))
        with self._lock:
            children = None if dept is None else self._state.departments.get(dept)
        if children is None:
            return _json({"errcode": 60003, "errmsg": "部门不存在", "request_id": _request_id()})
        return _json({"errcode": 0, "errmsg": "ok", "result": {"dept_id_list": list(children)}})

    def _list_users(self, payload: Mapping[str, Any]) -> _Reply:
        dept = _as_int(payload.get("dept_id"))
        cursor = _as_int(payload.get("cursor")) or 0
        size = _as_int(payload.get("size")) or 0
        if not 1 <= size <= 100:
            return _invalid("size must be 1 to 100")
        with self._lock:
            if dept is None or dept not in self._state.departments:
                return _json({"errcode": 60003, "errmsg": "部门不存在"})
            members = sorted(
                userid
                for userid in self._state.users
                if dept in self._state.user_departments.get(userid, [1])
            )
            page = members[cursor : cursor + size]
            people = [
                {
                    "userid": userid,
                    "name": f"user {userid}",
                    "job_number": self._state.users[userid] or "",
                    "active": True,
                }
                for userid in page
            ]
        has_more = cursor + size < len(members)
        result: dict[str, Any] = {"has_more": has_more, "list": people}
        if has_more:
            result["next_cursor"] = cursor + size
        return _json({"errcode": 0, "errmsg": "ok", "result": result})

    def _robot(self, query: Mapping[str, str], payload: Mapping[str, Any]) -> _Reply:
        if self.robot_token is not None and query.get("access_token") != self.robot_token:
            return _json({"errcode": 300005, "errmsg": "token is not exist"})
        if self.robot_secret is not None:
            timestamp = _as_int(query.get("timestamp"))
            now_ms = int(self._clock() * 1000)
            if timestamp is None or abs(now_ms - timestamp) > 3600 * 1000:
                return _json({"errcode": 310000, "errmsg": "invalid timestamp"})
            digest = hmac.new(
                self.robot_secret.encode(), f"{timestamp}\n{self.robot_secret}".encode(), hashlib.sha256
            ).digest()
            if not hmac.compare_digest(base64.b64encode(digest).decode(), query.get("sign", "")):
                return _json({"errcode": 310000, "errmsg": "sign not match"})
        if payload.get("msgtype") not in ("text", "markdown"):
            return _json({"errcode": 40035, "errmsg": "缺少参数 msgtype"})
        now = time.monotonic()
        with self._lock:
            sends = self._state.robot_sends
            while sends and sends[0] <= now - 60.0:
                sends.popleft()
            if len(sends) >= ROBOT_PER_MINUTE:
                return _json({"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"})
            sends.append(now)
            self._state.robot_messages.append(dict(payload))
        return _json({"errcode": 0, "errmsg": "ok"})

    def _control(self, method: str, path: str, body: bytes) -> _Reply:
        """The control API for other processes: GET /_fake/uploads, POST /_fake/control."""
        if method == "GET" and path == "/_fake/uploads":
            return _json({"uploads": self.uploads, "calls": dict(self.calls), "throttled": self.throttled})
        if method == "POST" and path == "/_fake/control":
            try:
                command = json.loads(body or b"{}")
                action = command.pop("action")
            except (ValueError, KeyError, AttributeError):
                return _json({"ok": False, "error": 'expected {"action": ..., ...}'}, 400)
            allowed = {
                "fail_next",
                "http_error_next",
                "html_next",
                "ban_next",
                "garbage_next",
                "hang_next",
                "reset_next",
                "slow_next",
                "invalidate_tokens",
                "reject_all_tokens",
                "clear_faults",
            }
            if action not in allowed:
                return _json({"ok": False, "error": f"unknown action {action!r}"}, 400)
            try:
                getattr(self, action)(**command)
            except TypeError as error:
                return _json({"ok": False, "error": str(error)}, 400)
            return _json({"ok": True})
        return _json({"ok": False, "error": "unknown control path"}, 404)


# ---------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: FakeDingTalk
    ) -> None:
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def track(self, connection: socket.socket, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def drop_connections(self) -> None:
        """Close every open connection, so keep-alive clients see the outage too."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its peer
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    wbufsize = 64 * 1024  # headers and body leave in one write (see the module docstring)

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the client went away, or the connection was reset on purpose
        finally:
            self.server.track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the tests and the demo have their own output."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        headers = {key: value for key, value in self.headers.items()}
        reply = self.server.fake.handle(method, self.path, headers, body)
        if reply.hang:
            # Never answer: hold the connection past the client's timeout, then drop it.
            self.server.fake._closing.wait(self.server.fake.hang_seconds)
            self.close_connection = True
            return
        if reply.reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)


def _parse_body(content_type: str, body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    text = body.decode("utf-8", "replace")
    if "json" in content_type or text.lstrip().startswith("{"):
        try:
            decoded = json.loads(text)
        except ValueError:
            return {}
        return decoded if isinstance(decoded, dict) else {}
    return {key: values[-1] for key, values in parse_qs(text, keep_blank_values=True).items()}


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _request_id() -> str:
    return uuid.uuid4().hex[:12]


def _json(payload: Mapping[str, Any], status: int = 200) -> _Reply:
    return _Reply(status, json.dumps(payload, ensure_ascii=False).encode())


def _invalid(message: str) -> _Reply:
    return _json({"errcode": 400002, "errmsg": f"参数错误: {message}", "request_id": _request_id()})


def _fault_reply(fault: Fault) -> _Reply:
    if fault.kind == "errcode":
        payload: dict[str, Any] = {
            "errcode": fault.errcode,
            "errmsg": fault.errmsg,
            "request_id": _request_id(),
        }
        if fault.sub_code is not None:
            payload["sub_code"] = fault.sub_code
            payload["sub_msg"] = fault.errmsg
        return _json(payload)
    if fault.kind == "http":
        page = f"<html><body><h1>{fault.status}</h1></body></html>".encode()
        return _Reply(fault.status, page, "text/html")
    if fault.kind == "html":
        return _Reply(fault.status, _HTML_PAGE.encode(), "text/html;charset=UTF-8")
    if fault.kind == "ban":
        return _json({"status": 1111, "wait": 5, "punish": "deny", "msg": "访问过于频繁"}, fault.status)
    return _Reply(200, b"\x00not json\xff", "application/octet-stream")


# ---------------------------------------------------------------------- running it from another process


def serve_forever(fake: FakeDingTalk, stop: threading.Event) -> None:
    """Run `fake` until `stop` is set."""
    with fake:
        stop.wait()


def _load_users(path: Path | None) -> dict[str, str | None]:
    if path is None:
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        return {str(userid): None for userid in data}
    if isinstance(data, dict):
        return {str(userid): None if job is None else str(job) for userid, job in data.items()}
    raise ValueError(f"{path}: expected a JSON object (userid -> job number) or a list of userids")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run a fake DingTalk on 127.0.0.1 until SIGINT/SIGTERM; print its URL first."""
    parser = argparse.ArgumentParser(
        prog="python -m zkdingsync.dingtalk.fake", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--users-file", type=Path, help="JSON: {userid: job number} or [userid, ...]")
    parser.add_argument("--app-key", default=DEFAULT_APP_KEY)
    parser.add_argument("--app-secret", default=DEFAULT_APP_SECRET)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every answer")
    parser.add_argument(
        "--qps-limit", type=float, default=20.0, help="uploads per second before 90018 (0: none)"
    )
    parser.add_argument("--robot-token", default=None)
    parser.add_argument("--robot-secret", default=None)
    args = parser.parse_args(argv)
    fake = FakeDingTalk(
        _load_users(args.users_file),
        app_key=args.app_key,
        app_secret=args.app_secret,
        port=args.port,
        latency_seconds=args.latency_ms / 1000,
        qps_limit=args.qps_limit or None,
        robot_token=args.robot_token,
        robot_secret=args.robot_secret,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fake.start()
    sys.stdout.write(fake.url + "\n")
    sys.stdout.flush()
    try:
        stop.wait()
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
