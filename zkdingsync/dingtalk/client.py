"""The only module that talks HTTP to DingTalk: token, attendance upload, read-back, contacts, robot.

Every answer, including the absence of one, is classified into an `Outcome` (`answers.py`) so the
forwarder never sees a `requests` or SDK exception. The parts:

- `transport.py`: one HTTP session per client, answers read with a size cap, `abort()` at shutdown;
- `answers.py`: what each answer means (errcodes, HTTP statuses, non-numeric codes);
- `tokens.py`: the access token, cached in memory and in the store;
- `call_counts.py`: the monthly call count, written to the store in groups.

Monthly quota: every upload and read-back call that may have reached DingTalk is counted under its month in
the organisation's timezone (`quota.call_month`: "2026-11"), the month `status` and the forwarder read, and
under its day there (`quota.call_day`), for `status`'s forecast.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import structlog

from zkdingsync.dingtalk.answers import (
    THROTTLE_WAITS,
    WAIT_SERVER_ERROR_SECONDS,
    answer_code,
    classify_answer,
    classify_errcode,
    is_token_error,
)
from zkdingsync.dingtalk.call_counts import CallCounter, CallCountStore
from zkdingsync.dingtalk.tokens import AccessTokens, TokenCache
from zkdingsync.dingtalk.transport import MAX_ANSWER_BYTES, MAX_LIST_ANSWER_BYTES, NOT_SENT, Transport
from zkdingsync.errors import ZkdingsyncError
from zkdingsync.model import Directory, Outcome, OutcomeKind, Upload, utc_now
from zkdingsync.quota import call_day, call_month

log = structlog.get_logger(__name__)

DEFAULT_API_BASE = "https://oapi.dingtalk.com"
UPLOAD_PATH = "topapi/attendance/record/upload"
LIST_RECORD_PATH = "attendance/listRecord"
LIST_SUB_DEPARTMENTS_PATH = "topapi/v2/department/listsubid"
LIST_USERS_PATH = "topapi/v2/user/list"
ROBOT_PATH = "robot/send"

# DingTalk's documented limits for a read-back call.
MAX_READ_BACK_USERS = 50
MAX_READ_BACK_SPAN = timedelta(days=7)
# How far back DingTalk accepts an upload or a read-back.
DINGTALK_WINDOW = timedelta(days=180)

ROOT_DEPARTMENT = 1
USER_PAGE_SIZE = 100
# A department walk that goes on longer than this is a loop or a misunderstanding, not an organisation.
MAX_DEPARTMENTS = 20_000
MAX_USER_PAGES = 100_000
MAX_NAME = 64  # characters of a directory name kept


class ClientStore(TokenCache, CallCountStore, Protocol):
    """What the client needs from the store: the token cache and the call counter."""


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


def robot_signature(secret: str, timestamp_ms: int) -> str:
    """Given a robot's `SEC...` secret and a timestamp in epoch ms, return the Base64 signature.

    HMAC-SHA256 keyed with the whole secret over "TS\\nsecret"; the caller URL-encodes it once (requests
    does when it is passed in `params`).
    """
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


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
        self.app_key = app_key
        self.api_base = api_base.rstrip("/")
        self.timeout_seconds = float(timeout_seconds)
        self._org_zone = ZoneInfo(org_timezone)
        self._clock = clock
        self._transport = Transport(app_key, app_secret, self.api_base, self.timeout_seconds, pool_size)
        self._tokens = AccessTokens(app_key, app_secret, transport=self._transport, cache=store, clock=clock)
        self._counter = CallCounter(
            store, month_of=self.month_of, clock=clock, day_of=lambda at: call_day(at, self._org_zone)
        )

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

    def abort(self) -> None:
        """End the calls in flight at once and refuse every later call (the daemon is stopping).

        A cut-off upload comes back UNKNOWN (settled by reading back at the next start); a later call comes
        back TRANSIENT, not sent. Nothing is written to the store here: call `close` before it closes.
        """
        self._transport.abort()

    def close(self) -> None:
        """Write the outstanding call counts and close the HTTP connections."""
        self.flush_call_counts()
        self._transport.close()

    # ------------------------------------------------------------------ public calls

    def month_of(self, at: datetime) -> str:
        """Return the month ("2026-11", in the organisation's timezone) that calls made at `at` count in."""
        return call_month(at, self._org_zone)

    def flush_call_counts(self) -> None:
        """Write the calls counted since the last flush to the store (a failure keeps them for later)."""
        self._counter.flush()

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
        answer = self._call(
            "POST", LIST_RECORD_PATH, body=body, counted=True, idempotent=True, limit=MAX_LIST_ANSWER_BYTES
        )
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
        when a call fails. Contacts calls do not count against the monthly quota. Parts of an answer that
        have the wrong shape are skipped; a walk ends after MAX_DEPARTMENTS departments and MAX_USER_PAGES
        pages whatever the answers say.
        """
        walk = _Walk()
        queue = [ROOT_DEPARTMENT]
        while queue:
            dept = queue.pop()
            if dept in walk.seen:
                continue
            walk.seen.add(dept)
            if len(walk.seen) > MAX_DEPARTMENTS:
                raise DingTalkError(
                    "list departments", Outcome(OutcomeKind.PERMANENT, "too many departments")
                )
            answer = self._call(
                "POST",
                LIST_SUB_DEPARTMENTS_PATH,
                body={"dept_id": dept},
                idempotent=True,
                limit=MAX_LIST_ANSWER_BYTES,
            )
            result = _mapping(self._checked("list departments", answer).get("result"))
            children = _sequence(result.get("dept_id_list"))
            queue.extend(int(child) for child in children if str(child).isdigit() and len(str(child)) < 20)
            self._read_members(dept, walk)
        mapping: dict[str, str] = {}
        for job_number, userids in walk.users.items():
            if len(userids) == 1:
                mapping[job_number] = next(iter(userids))
            else:
                log.warning("dingtalk.job_number_ambiguous", job_number=job_number, userids=sorted(userids))
        return Directory(mapping, walk.names)

    def _read_members(self, dept: int, walk: _Walk) -> None:
        """Page through one department's users into `walk`."""
        cursor: int | None = 0
        while cursor is not None and walk.pages < MAX_USER_PAGES:
            walk.pages += 1
            body = {"dept_id": dept, "cursor": cursor, "size": USER_PAGE_SIZE}
            answer = self._call(
                "POST", LIST_USERS_PATH, body=body, idempotent=True, limit=MAX_LIST_ANSWER_BYTES
            )
            page = _mapping(self._checked("list users", answer).get("result"))
            for user in map(_mapping, _sequence(page.get("list"))):
                job_number = str(user.get("job_number") or "").strip()
                userid = str(user.get("userid") or "").strip()
                if job_number and userid:
                    walk.users.setdefault(job_number, set()).add(userid)
                name = user.get("name")
                if userid and isinstance(name, str) and name.strip():
                    walk.names[userid] = name.strip()[:MAX_NAME]
            after = page.get("next_cursor")
            # Only a cursor that moves on: a page that points back at itself would never end.
            moves_on = isinstance(after, int) and not isinstance(after, bool) and after > cursor
            cursor = after if page.get("has_more") and moves_on else None

    def check_credentials(self) -> Outcome:
        """Fetch (or reuse) an access token; DELIVERED when DingTalk accepts the app's credentials."""
        token = self._tokens.get(stale=None)
        return token if isinstance(token, Outcome) else Outcome(OutcomeKind.DELIVERED, "ok")

    def send_robot(self, access_token: str, secret: str | None, message: Mapping[str, Any]) -> Outcome:
        """Post one message to a group robot (signed when a secret is given); return the Outcome."""
        params: dict[str, Any] = {"access_token": access_token}
        if secret:
            timestamp = int(self._clock().timestamp() * 1000)
            params["timestamp"] = timestamp
            params["sign"] = robot_signature(secret, timestamp)
        answer = self._transport.send("POST", ROBOT_PATH, body=dict(message), params=params)
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
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any],
        idempotent: bool,
        counted: bool = False,
        limit: int = MAX_ANSWER_BYTES,
    ) -> dict[str, Any] | Outcome:
        """Make one authenticated call: at most two sends, the second only after DingTalk rejected the
        token of the first (which therefore did not take effect). Never recursion, never a loop."""
        stale: str | None = None
        rejection: dict[str, Any] = {}
        for attempt in (1, 2):
            token = self._tokens.get(stale=stale)
            if isinstance(token, Outcome):
                return token
            answer = self._transport.send(method, path, body=body, token=token, limit=limit)
            if isinstance(answer, Outcome):
                if counted and answer.code != NOT_SENT:
                    self._counter.count()
                if idempotent and answer.kind is OutcomeKind.UNKNOWN:
                    return Outcome(
                        OutcomeKind.TRANSIENT, answer.reason, WAIT_SERVER_ERROR_SECONDS, answer.code
                    )
                return answer
            if counted and answer_code(answer) not in THROTTLE_WAITS:
                # Calls rejected by the QPS limits are not counted by DingTalk either.
                self._counter.count()
            if not is_token_error(answer):
                return answer
            log.info("dingtalk.token_rejected", attempt=attempt, code=answer_code(answer))
            stale, rejection = token, answer
        errmsg = str(rejection.get("sub_msg") or rejection.get("errmsg") or "")
        return classify_errcode(answer_code(rejection) or "", errmsg)


def _upload_problem(upload: Upload) -> str | None:
    for name in ("userid", "device_name", "device_id"):
        value = getattr(upload, name)
        if not isinstance(value, str) or not value.strip():
            return f"the upload has no {name}"
    if not isinstance(upload.user_check_time_ms, int) or isinstance(upload.user_check_time_ms, bool):
        return "the upload's user_check_time is not an integer of milliseconds"
    return None


@dataclass
class _Walk:
    """What a walk of the directory has found so far."""

    users: dict[str, set[str]] = field(default_factory=dict)  # job number -> userids
    names: dict[str, str] = field(default_factory=dict)  # userid -> name
    seen: set[int] = field(default_factory=set)  # departments
    pages: int = 0


def _mapping(value: object) -> dict[str, Any]:
    """A part of an answer that should be an object: itself, or empty when it is anything else."""
    return value if isinstance(value, dict) else {}


def _sequence(value: object) -> list[Any]:
    """A part of an answer that should be a list: itself, or empty when it is anything else."""
    return value if isinstance(value, list) else []
