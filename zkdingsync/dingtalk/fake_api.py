"""What the fake DingTalk answers: the open API's endpoints over the fake's recorded state (no HTTP here).

`FakeDingTalk` (`fake.py`) parses each request, applies the scripted faults and the latency, and asks
`FakeApi.answer` for the reply of a well-behaved DingTalk: gettoken, the attendance upload (every field
validated, the 20-QPS limit), listRecord, the department/user walk and the group robot (signature checked).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any
from urllib.parse import parse_qs

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

ROUTES = {
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

    kind: str  # errcode | http | html | ban | hang | reset | slow | garbage | json | huge
    endpoint: str = UPLOAD
    remaining: int | None = 1
    userid: str | None = None
    errcode: int = 0
    sub_code: str | None = None
    errmsg: str = ""
    status: int = 200
    delay_seconds: float = 0.0
    accept: bool = True  # hang/reset/json/huge on an upload: record it first (DingTalk took it)
    payload: Any = None  # json: the answer's JSON value
    size_bytes: int = 0  # huge: how long the answer's body is

    def matches(self, endpoint: str, userid: str | None) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.endpoint not in (ANY, endpoint):
            return False
        return self.userid is None or self.userid == userid


def take_fault(faults: list[Fault], endpoint: str, userid: str | None) -> Fault | None:
    """Return the first queued fault matching this call (counting it down), or None."""
    for fault in faults:
        if fault.matches(endpoint, userid):
            if fault.remaining is not None:
                fault.remaining -= 1
            return fault
    return None


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json;charset=UTF-8"
    hang: bool = False
    reset: bool = False
    chunks: Iterable[bytes] | None = None  # a body streamed instead of `body`, `length` bytes long
    length: int = 0


@dataclass
class FakeState:
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


@dataclass(frozen=True)
class FakeSettings:
    """How the fake DingTalk is set up (see `FakeDingTalk`)."""

    app_key: str
    app_secret: str
    qps_limit: float | None
    token_ttl_seconds: int
    robot_token: str | None
    robot_secret: str | None
    zone: tzinfo
    future_tolerance_seconds: float
    clock: Callable[[], float]  # epoch seconds: token expiry and the upload time window


class FakeApi:
    """The endpoints. `state` is shared with `FakeDingTalk` and guarded by its `lock`."""

    def __init__(self, settings: FakeSettings, state: FakeState, lock: threading.Lock) -> None:
        """Given the settings, the recorded state and the lock that guards it, build the endpoints."""
        self._s = settings
        self._state = state
        self._lock = lock

    def answer(self, endpoint: str, query: Mapping[str, str], payload: Mapping[str, Any]) -> Reply:
        """Answer one call of `endpoint` as DingTalk would."""
        if endpoint == GETTOKEN:
            return self._gettoken(query)
        if endpoint == ROBOT:
            return self._robot(query, payload)
        return self._authenticated(endpoint, query, payload)

    def _gettoken(self, query: Mapping[str, str]) -> Reply:
        appkey, appsecret = query.get("appkey", ""), query.get("appsecret", "")
        if not appkey or not appsecret:
            return json_reply({"errcode": 40035, "errmsg": "缺少参数 appkey/appsecret"})
        if appkey != self._s.app_key or appsecret != self._s.app_secret:
            return json_reply({"errcode": 40096, "errmsg": "不合法的appKey或appSecret"})
        now = self._s.clock()
        with self._lock:
            tokens = self._state.tokens
            for token, expires in list(tokens.items()):
                if expires <= now:
                    del tokens[token]
            if tokens:  # asking again while valid returns the same token
                token, expires = next(iter(tokens.items()))
            else:
                token, expires = uuid.uuid4().hex, now + self._s.token_ttl_seconds
                tokens[token] = expires
        return json_reply(
            {"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": int(expires - now)}
        )

    def _token_problem(self, endpoint: str, token: str) -> Reply | None:
        now = self._s.clock()
        with self._lock:
            valid = not self._state.reject_tokens and self._state.tokens.get(token, 0.0) > now
        if valid:
            return None
        sub_code, sub_msg = ("40000", "access_token为空") if not token else ("40014", "不合法的access_token")
        if endpoint in _TOPAPI:
            return json_reply(
                {
                    "errcode": 88,
                    "sub_code": sub_code,
                    "sub_msg": sub_msg,
                    "errmsg": f"ding talk error[subcode={sub_code},submsg={sub_msg}]",
                    "request_id": new_request_id(),
                }
            )
        return json_reply({"errcode": int(sub_code) if token else 40014, "errmsg": sub_msg})

    def _authenticated(self, endpoint: str, query: Mapping[str, str], payload: Mapping[str, Any]) -> Reply:
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

    def _upload(self, payload: Mapping[str, Any]) -> Reply:
        if self._s.qps_limit is not None:
            now = time.monotonic()
            with self._lock:
                arrivals = self._state.upload_arrivals
                while arrivals and arrivals[0] <= now - 1.0:
                    arrivals.popleft()
                if len(arrivals) >= self._s.qps_limit:
                    self._state.throttled += 1
                    return json_reply(
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
            return json_reply({"errcode": 60121, "errmsg": "找不到该用户", "request_id": new_request_id()})
        for name in ("device_id", "device_name"):
            value = payload.get(name)
            if not isinstance(value, str) or not value.strip():
                return invalid(f"{name} is required")
        check_time = as_int(payload.get("user_check_time"))
        if check_time is None:
            return invalid("user_check_time must be an integer of epoch milliseconds")
        now_ms = int(self._s.clock() * 1000)
        if check_time > now_ms + int(self._s.future_tolerance_seconds * 1000):
            return invalid("user_check_time is in the future")
        if check_time < now_ms - WINDOW_MS:
            return invalid("user_check_time is older than 180 days")
        request_id = new_request_id()
        with self._lock:
            self.accept(payload, check_time, "upload", request_id)
        return json_reply({"errcode": 0, "errmsg": "ok", "success": True, "request_id": request_id})

    def accept(
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

    def _list_record(self, payload: Mapping[str, Any]) -> Reply:
        userids = payload.get("userIds")
        if not isinstance(userids, list) or not userids or len(userids) > 50:
            return invalid("userIds must list 1 to 50 users")
        try:
            start = self._org_ms(str(payload.get("checkDateFrom")))
            end = self._org_ms(str(payload.get("checkDateTo")))
        except ValueError:
            return invalid("checkDateFrom/checkDateTo must be yyyy-MM-dd HH:mm:ss")
        if end < start or end - start > SEVEN_DAYS_MS:
            return invalid("the window must be at most 7 days")
        if start < int(self._s.clock() * 1000) - WINDOW_MS - 24 * 3600 * 1000:
            return invalid("the window must be within the last 180 days")
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
        return json_reply({"errcode": 0, "errmsg": "ok", "recordresult": records})

    def _org_ms(self, text: str) -> int:
        local = datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=self._s.zone)
        return int(local.timestamp()) * 1000

    def _list_sub_departments(self, payload: Mapping[str, Any]) -> Reply:
        dept = as_int(payload.get("dept_id"))
        with self._lock:
            children = None if dept is None else self._state.departments.get(dept)
        if children is None:
            return json_reply({"errcode": 60003, "errmsg": "部门不存在", "request_id": new_request_id()})
        return json_reply({"errcode": 0, "errmsg": "ok", "result": {"dept_id_list": list(children)}})

    def _list_users(self, payload: Mapping[str, Any]) -> Reply:
        dept = as_int(payload.get("dept_id"))
        cursor = as_int(payload.get("cursor")) or 0
        size = as_int(payload.get("size")) or 0
        if not 1 <= size <= 100:
            return invalid("size must be 1 to 100")
        with self._lock:
            if dept is None or dept not in self._state.departments:
                return json_reply({"errcode": 60003, "errmsg": "部门不存在"})
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
        return json_reply({"errcode": 0, "errmsg": "ok", "result": result})

    def _robot(self, query: Mapping[str, str], payload: Mapping[str, Any]) -> Reply:
        if self._s.robot_token is not None and query.get("access_token") != self._s.robot_token:
            return json_reply({"errcode": 300005, "errmsg": "token is not exist"})
        if self._s.robot_secret is not None:
            timestamp = as_int(query.get("timestamp"))
            now_ms = int(self._s.clock() * 1000)
            if timestamp is None or abs(now_ms - timestamp) > 3600 * 1000:
                return json_reply({"errcode": 310000, "errmsg": "invalid timestamp"})
            digest = hmac.new(
                self._s.robot_secret.encode(), f"{timestamp}\n{self._s.robot_secret}".encode(), hashlib.sha256
            ).digest()
            if not hmac.compare_digest(base64.b64encode(digest).decode(), query.get("sign", "")):
                return json_reply({"errcode": 310000, "errmsg": "sign not match"})
        if payload.get("msgtype") not in ("text", "markdown"):
            return json_reply({"errcode": 40035, "errmsg": "缺少参数 msgtype"})
        now = time.monotonic()
        with self._lock:
            sends = self._state.robot_sends
            while sends and sends[0] <= now - 60.0:
                sends.popleft()
            if len(sends) >= ROBOT_PER_MINUTE:
                return json_reply({"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"})
            sends.append(now)
            self._state.robot_messages.append(dict(payload))
        return json_reply({"errcode": 0, "errmsg": "ok"})


def parse_body(content_type: str, body: bytes) -> dict[str, Any]:
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


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


def json_reply(payload: Mapping[str, Any], status: int = 200) -> Reply:
    return Reply(status, json.dumps(payload, ensure_ascii=False).encode())


def invalid(message: str) -> Reply:
    return json_reply({"errcode": 400002, "errmsg": f"参数错误: {message}", "request_id": new_request_id()})


def fault_reply(fault: Fault) -> Reply:
    if fault.kind == "errcode":
        payload: dict[str, Any] = {
            "errcode": fault.errcode,
            "errmsg": fault.errmsg,
            "request_id": new_request_id(),
        }
        if fault.sub_code is not None:
            payload["sub_code"] = fault.sub_code
            payload["sub_msg"] = fault.errmsg
        return json_reply(payload)
    if fault.kind == "http":
        page = f"<html><body><h1>{fault.status}</h1></body></html>".encode()
        return Reply(fault.status, page, "text/html")
    if fault.kind == "html":
        return Reply(fault.status, _HTML_PAGE.encode(), "text/html;charset=UTF-8")
    if fault.kind == "ban":
        return json_reply({"status": 1111, "wait": 5, "punish": "deny", "msg": "访问过于频繁"}, fault.status)
    if fault.kind in ("hang", "reset"):
        return Reply(hang=fault.kind == "hang", reset=fault.kind == "reset")
    if fault.kind == "json":
        return Reply(200, json.dumps(fault.payload, ensure_ascii=False).encode())
    if fault.kind == "huge":
        return _huge_reply(fault.size_bytes)
    return Reply(200, b"\x00not json\xff", "application/octet-stream")


def _huge_reply(size_bytes: int) -> Reply:
    """A JSON object of exactly `size_bytes` bytes (at least 40), streamed in 64 KiB pieces."""
    head, tail = b'{"errcode":0,"errmsg":"ok","padding":"', b'"}'
    padding = max(0, size_bytes - len(head) - len(tail))
    piece = b"x" * 65536

    def chunks() -> Iterable[bytes]:
        yield head
        left = padding
        while left > 0:
            yield piece[: min(left, len(piece))]
            left -= len(piece)
        yield tail

    return Reply(200, b"", chunks=chunks(), length=len(head) + padding + len(tail))
