"""Alerts to a DingTalk group robot, without ever slowing delivery down.

`RobotNotifier.notify(text)` only appends to a bounded queue and returns at once; a background thread
sends the messages (signed by the client when the robot has a secret), at most one every
`min_interval_seconds` (DingTalk accepts 20 a minute per robot), each call with the client's timeout.
Alerts are best effort: a failed send is retried a couple of times, then dropped with a log line; when
the queue overflows, the oldest alerts are dropped and the next message says how many.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import structlog

from zkdingsync.model import Outcome, OutcomeKind
from zkdingsync.printable import printable

log = structlog.get_logger(__name__)

MAX_QUEUE = 50
MAX_ATTEMPTS = 3
MAX_CONTENT = 2000  # characters: a text robot message is meant to be read on a phone
TOO_FAST = "130101"  # "send too fast, exceed 20 times per minute"
TOO_FAST_WAIT_SECONDS = 60.0
PREFIX = "[zkdingsync]"  # also the keyword for robots whose security setting is "custom keywords"


class RobotSender(Protocol):
    """The DingTalk client as the notifier uses it."""

    def send_robot(self, access_token: str, secret: str | None, message: Mapping[str, Any]) -> Outcome: ...


@dataclass
class _Alert:
    text: str
    attempts: int = 0


class RobotNotifier:
    """Queues alerts and sends them from a background thread; a context manager."""

    def __init__(
        self,
        sender: RobotSender,
        access_token: str,
        secret: str | None = None,
        *,
        min_interval_seconds: float = 3.0,
        max_queue: int = MAX_QUEUE,
        monotonic: Callable[[], float] = time.monotonic,
        wait: Callable[[float], Any] | None = None,
    ) -> None:
        """Given the client (anything with `send_robot`) and the robot's token and optional secret, build
        a stopped notifier. `wait(seconds)` paces the sends (default: the stop event's wait)."""
        self._sender = sender
        self._access_token = access_token
        self._secret = secret
        self._interval = max(min_interval_seconds, 60.0 / 20)
        self._queue: deque[_Alert] = deque()
        self._max_queue = max_queue
        self._dropped = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._monotonic = monotonic
        self._wait: Callable[[float], Any] = wait or (lambda seconds: self._stop.wait(seconds))
        self._next_send = float("-inf")
        self._thread: threading.Thread | None = None
        self._reported_codes: set[str | None] = set()

    def __repr__(self) -> str:
        return "RobotNotifier(access_token=***)"

    def start(self) -> RobotNotifier:
        """Start the sending thread (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="robot", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; alerts still queued are dropped (logged)."""
        self._stop.set()
        self._ready.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            left = len(self._queue)
            self._queue.clear()
        if left:
            log.info("robot.unsent", alerts=left)

    def __enter__(self) -> RobotNotifier:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def notify(self, text: str) -> None:
        """Queue an alert and return at once (never blocks, never raises for a full queue)."""
        with self._lock:
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self._dropped += 1
            self._queue.append(_Alert(text))
        self._ready.set()

    def pending(self) -> int:
        """How many alerts wait to be sent."""
        with self._lock:
            return len(self._queue)

    def send_next(self) -> bool:
        """Send the next alert if one is queued, pacing first; return True if one was taken.

        The background thread calls this in a loop; tests call it directly.
        """
        with self._lock:
            if not self._queue:
                return False
            alert = self._queue.popleft()
            dropped, self._dropped = self._dropped, 0
        delay = self._next_send - self._monotonic()
        if delay > 0:
            self._wait(delay)
            if self._stop.is_set():  # closing interrupted the pause: the alert stays unsent
                with self._lock:
                    self._queue.appendleft(alert)
                return False
        self._next_send = self._monotonic() + self._interval
        text = alert.text if not dropped else f"{alert.text}\n({dropped} earlier alerts were dropped)"
        # Enroll numbers and terminal errors come from the terminals: escaped, but the lines kept.
        content = printable(f"{PREFIX} {text}", MAX_CONTENT, keep_newlines=True)
        outcome = self._sender.send_robot(
            self._access_token, self._secret, {"msgtype": "text", "text": {"content": content}}
        )
        self._settle(alert, outcome)
        return True

    def _settle(self, alert: _Alert, outcome: Outcome) -> None:
        if outcome.kind is OutcomeKind.DELIVERED:
            return
        alert.attempts += 1
        retry = outcome.code == TOO_FAST or outcome.kind in (OutcomeKind.TRANSIENT, OutcomeKind.UNKNOWN)
        if outcome.code == TOO_FAST:
            self._next_send = self._monotonic() + TOO_FAST_WAIT_SECONDS
        if retry and alert.attempts < MAX_ATTEMPTS:
            with self._lock:
                self._queue.appendleft(alert)
            return
        # Logged once per kind of failure: a misconfigured robot would otherwise log every alert.
        if outcome.code not in self._reported_codes:
            self._reported_codes.add(outcome.code)
            log.warning("robot.send_failed", reason=outcome.reason, code=outcome.code)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.send_next():
                self._ready.wait(1.0)
                self._ready.clear()
