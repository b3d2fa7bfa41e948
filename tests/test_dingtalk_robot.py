"""Robot alerts: signed, paced, bounded, never blocking; against the fake DingTalk's robot endpoint."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from fixtures_simulator import wait_for

from zkdingsync.dingtalk.client import DingTalkClient
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.dingtalk.robot import PREFIX, RobotNotifier
from zkdingsync.model import Outcome, OutcomeKind
from zkdingsync.store import Store

TOKEN = "robot-token-123"
SECRET = "SEC0123456789abcdef"


class Pace:
    """A monotonic clock whose waits advance it and are recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


@pytest.fixture
def fake() -> Iterator[FakeDingTalk]:
    with FakeDingTalk(robot_token=TOKEN, robot_secret=SECRET) as server:
        yield server


@pytest.fixture
def client(fake: FakeDingTalk, tmp_path: Path) -> Iterator[DingTalkClient]:
    with Store.open(tmp_path / "zkdingsync.db") as store:
        yield DingTalkClient("fake-app-key", "fake-app-secret", fake.url, 2.0, store=store)


def contents(fake: FakeDingTalk) -> list[str]:
    return [message["text"]["content"] for message in fake.robot_messages]


def test_alerts_are_sent_signed_from_a_background_thread(fake: FakeDingTalk, client: DingTalkClient) -> None:
    with RobotNotifier(client, TOKEN, SECRET, min_interval_seconds=0.01) as notifier:
        started = time.monotonic()
        notifier.notify("terminal lobby is down")
        assert time.monotonic() - started < 0.05  # notify never waits for the network
        wait_for(lambda: fake.robot_messages, timeout=5)
    assert contents(fake) == [f"{PREFIX} terminal lobby is down"]


def test_sends_are_paced_to_the_robot_limit(fake: FakeDingTalk, client: DingTalkClient) -> None:
    pace = Pace()
    notifier = RobotNotifier(
        client, TOKEN, SECRET, min_interval_seconds=1.0, monotonic=pace.monotonic, wait=pace.wait
    )
    for number in range(4):
        notifier.notify(f"alert {number}")
    while notifier.send_next():
        pass
    assert pace.waits == [3.0, 3.0, 3.0]  # never faster than 20 a minute, whatever was configured
    assert len(fake.robot_messages) == 4


def test_overflow_drops_the_oldest_and_says_how_many(fake: FakeDingTalk, client: DingTalkClient) -> None:
    pace = Pace()
    notifier = RobotNotifier(client, TOKEN, SECRET, max_queue=3, monotonic=pace.monotonic, wait=pace.wait)
    for number in range(5):
        notifier.notify(f"alert {number}")
    while notifier.send_next():
        pass
    assert contents(fake) == [
        f"{PREFIX} alert 2\n(2 earlier alerts were dropped)",
        f"{PREFIX} alert 3",
        f"{PREFIX} alert 4",
    ]


def test_a_misconfigured_robot_is_logged_once_and_never_retried(
    fake: FakeDingTalk, client: DingTalkClient
) -> None:
    pace = Pace()
    notifier = RobotNotifier(client, TOKEN, "SEC-wrong", monotonic=pace.monotonic, wait=pace.wait)
    with structlog.testing.capture_logs() as events:
        for number in range(3):
            notifier.notify(f"alert {number}")
        while notifier.send_next():
            pass
    failures = [event for event in events if event["event"] == "robot.send_failed"]
    assert [event["code"] for event in failures] == ["310000"]
    assert fake.calls["robot"] == 3
    assert fake.robot_messages == []


class Flaky:
    """A sender that answers the given outcomes in turn, then DELIVERED."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.sent: list[Mapping[str, Any]] = []

    def send_robot(self, access_token: str, secret: str | None, message: Mapping[str, Any]) -> Outcome:
        self.sent.append(message)
        return self.outcomes.pop(0) if self.outcomes else Outcome(OutcomeKind.DELIVERED, "ok")


def test_too_fast_and_transient_failures_are_retried_a_little() -> None:
    pace = Pace()
    sender = Flaky(
        Outcome(OutcomeKind.PERMANENT, "send too fast", code="130101"),
        Outcome(OutcomeKind.TRANSIENT, "connection refused", code="not-sent"),
    )
    notifier = RobotNotifier(sender, TOKEN, None, monotonic=pace.monotonic, wait=pace.wait)
    notifier.notify("quota at 80 %")
    while notifier.send_next():
        pass
    assert len(sender.sent) == 3
    assert pace.waits[0] == 60.0  # "too fast": a minute's pause
    gave_up = Flaky(*[Outcome(OutcomeKind.TRANSIENT, "down", code="not-sent")] * 5)
    notifier = RobotNotifier(gave_up, TOKEN, None, monotonic=pace.monotonic, wait=pace.wait)
    notifier.notify("x")
    while notifier.send_next():
        pass
    assert len(gave_up.sent) == 3  # bounded


def test_close_interrupts_pacing_and_drops_the_rest() -> None:
    sender = Flaky()
    notifier = RobotNotifier(sender, TOKEN, None, min_interval_seconds=30).start()
    for number in range(3):
        notifier.notify(f"alert {number}")
    wait_for(lambda: sender.sent, timeout=5)
    started = time.monotonic()
    notifier.close()
    assert time.monotonic() - started < 2
    assert len(sender.sent) == 1
    assert notifier.pending() == 0
    assert "robot-token" not in repr(notifier)


def test_terminal_text_in_a_robot_message_is_escaped_and_its_lines_kept() -> None:
    sender = Flaky()
    notifier = RobotNotifier(sender, TOKEN, None, monotonic=Pace().monotonic, wait=Pace().wait)
    notifier.notify("3 punches parked (most: enroll number \x1b[31m1234 has no DingTalk user)\nrun retry")
    assert notifier.send_next()
    content = sender.sent[0]["text"]["content"]
    assert "\x1b" not in content and "\\x1b[31m1234" in content
    assert content.endswith("\nrun retry")
