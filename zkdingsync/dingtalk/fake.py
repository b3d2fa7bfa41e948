"""A fake DingTalk open API on 127.0.0.1, for tests, the demo and the benchmark.

It speaks just enough of DingTalk: gettoken, the attendance upload (JSON or form body, every field
validated), listRecord, the department/user walk, and the group robot (signature checked). It records
every upload it accepted, thread-safely, and can be told to misbehave: error codes for the next N calls
(or for one user), HTTP errors, HTML pages, the IP-ban JSON, slow answers, accepting an upload and then
never answering (the "outcome unknown" case), resetting the connection, expired or rejected tokens,
refusing connections (an outage), a per-call latency, the 20-QPS limit answered with 90018, and what a
proxy or captive portal in front of DingTalk might say: any JSON (`answer_next({"errcode": "abc"})`) or an
answer of many megabytes (`huge_next`), each after the upload was recorded or instead of it.

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
import contextlib
import json
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

from zkdingsync.dingtalk.fake_api import (
    ANY,
    DEFAULT_APP_KEY,
    DEFAULT_APP_SECRET,
    GETTOKEN,
    LIST_RECORD,
    LIST_SUB_DEPARTMENTS,
    LIST_USERS,
    ROBOT,
    ROUTES,
    UPLOAD,
    FakeApi,
    FakeSettings,
    FakeState,
    Fault,
    Reply,
    fault_reply,
    json_reply,
    parse_body,
    take_fault,
)
from zkdingsync.dingtalk.fake_faults import FaultScript

__all__ = [
    "ANY",
    "DEFAULT_APP_KEY",
    "DEFAULT_APP_SECRET",
    "GETTOKEN",
    "LIST_RECORD",
    "LIST_SUB_DEPARTMENTS",
    "LIST_USERS",
    "ROBOT",
    "UPLOAD",
    "FakeDingTalk",
    "Fault",
    "main",
    "serve_forever",
]


# Faults that let the call be handled first (an upload recorded) when `accept` is set.
_AFTER_HANDLING = frozenset({"slow", "hang", "reset", "json", "huge"})

# What `POST /_fake/control` may call (the fault and token methods of FakeDingTalk).
_CONTROL_ACTIONS = frozenset(
    {
        "fail_next",
        "http_error_next",
        "html_next",
        "ban_next",
        "garbage_next",
        "hang_next",
        "reset_next",
        "slow_next",
        "answer_next",
        "huge_next",
        "invalidate_tokens",
        "reject_all_tokens",
        "clear_faults",
    }
)


class FakeDingTalk(FaultScript):
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
        self.settings = FakeSettings(
            app_key,
            app_secret,
            qps_limit,
            token_ttl_seconds,
            robot_token,
            robot_secret,
            ZoneInfo(org_timezone),
            future_tolerance_seconds,
            clock,
        )
        self.latency_seconds = latency_seconds
        self.hang_seconds = hang_seconds
        self._port = port
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._state = FakeState(
            users=user_map,
            departments={int(k): [int(c) for c in v] for k, v in (departments or {1: []}).items()},
            user_departments={k: list(v) for k, v in (user_departments or {}).items()},
        )
        self._api = FakeApi(self.settings, self._state, self._lock)

    @property
    def app_key(self) -> str:
        """The app key gettoken accepts."""
        return self.settings.app_key

    @property
    def app_secret(self) -> str:
        """The app secret gettoken accepts."""
        return self.settings.app_secret

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
            self._api.accept(
                {"userid": userid, "device_id": device_id, "device_name": device_name or device_id},
                user_check_time_ms,
                "seeded",
            )

    # ------------------------------------------------------------------ request handling

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """Answer one request (called by the handler threads)."""
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if parts.path.startswith("/_fake/"):
            return self._control(method, parts.path, body)
        endpoint = ROUTES.get(parts.path)
        if endpoint is None:
            return Reply(404, b"<html><body>404 Not Found</body></html>", "text/html")
        payload = parse_body(headers.get("Content-Type", ""), body)
        userid = (
            str(payload.get("userid")) if endpoint == UPLOAD and payload.get("userid") is not None else None
        )
        with self._lock:
            self._state.calls[endpoint] += 1
            fault = take_fault(self._state.faults, endpoint, userid)
        if fault is not None and fault.kind not in _AFTER_HANDLING:
            return fault_reply(fault)
        if fault is not None and fault.kind == "slow":
            self._closing.wait(fault.delay_seconds)
        if fault is not None and fault.kind != "slow" and not fault.accept:
            return fault_reply(fault)
        reply = self._api.answer(endpoint, query, payload)
        if fault is not None and fault.kind != "slow":
            return fault_reply(fault)  # the call took effect; what comes back is the fault
        if self.latency_seconds:
            self._closing.wait(self.latency_seconds)
        return reply

    def _control(self, method: str, path: str, body: bytes) -> Reply:
        """The control API for other processes: GET /_fake/uploads, POST /_fake/control."""
        if method == "GET" and path == "/_fake/uploads":
            return json_reply(
                {"uploads": self.uploads, "calls": dict(self.calls), "throttled": self.throttled}
            )
        if method == "POST" and path == "/_fake/control":
            try:
                command = json.loads(body or b"{}")
                action = command.pop("action")
            except (ValueError, KeyError, AttributeError):
                return json_reply({"ok": False, "error": 'expected {"action": ..., ...}'}, 400)
            if action not in _CONTROL_ACTIONS:
                return json_reply({"ok": False, "error": f"unknown action {action!r}"}, 400)
            try:
                getattr(self, action)(**command)
            except TypeError as error:
                return json_reply({"ok": False, "error": str(error)}, 400)
            return json_reply({"ok": True})
        return json_reply({"ok": False, "error": "unknown control path"}, 404)


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

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:
            self.close_connection = True  # the client hung up during a long answer (it read all it wanted)

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
        self.send_header("Content-Length", str(reply.length if reply.chunks is not None else len(reply.body)))
        self.end_headers()
        if reply.chunks is None:
            self.wfile.write(reply.body)
            return
        for chunk in reply.chunks:
            self.wfile.write(chunk)


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
