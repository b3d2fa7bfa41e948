"""The faults a test scripts into the fake DingTalk (`FakeDingTalk` inherits them): error codes for the
next calls (or one user), HTTP errors, HTML pages, the IP-ban JSON, mangled or huge answers, slow answers,
hanging or reset connections, expired or rejected tokens. Also reachable over `POST /_fake/control`."""

from __future__ import annotations

import threading
from typing import Any

from zkdingsync.dingtalk.fake_api import UPLOAD, FakeState, Fault


class FaultScript:
    """Queues faults on the fake's state; the first matching fault in queue order applies to a call."""

    _lock: threading.Lock
    _state: FakeState

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

    def answer_next(
        self,
        payload: Any,
        n: int | None = 1,
        *,
        accept: bool = False,
        endpoint: str = UPLOAD,
        userid: str | None = None,
    ) -> None:
        """Answer the next `n` matching calls with this JSON value, HTTP 200, as a proxy or a captive portal
        might (`{"errcode": "abc"}`); with `accept` an upload is recorded first (passed on, then mangled)."""
        self.add_fault(Fault("json", endpoint, n, userid, accept=accept, payload=payload))

    def huge_next(
        self,
        size_bytes: int,
        n: int | None = 1,
        *,
        accept: bool = False,
        endpoint: str = UPLOAD,
        userid: str | None = None,
    ) -> None:
        """Answer the next `n` matching calls with a well-formed JSON object of `size_bytes` bytes (errcode
        0 and a huge errmsg), streamed; with `accept` an upload is recorded first."""
        self.add_fault(Fault("huge", endpoint, n, userid, accept=accept, size_bytes=size_bytes))

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
