"""systemd's STATUS= line: the worst condition first, and sent as soon as the conditions change."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from zkdingsync.model import Delivery
from zkdingsync.status_line import StatusLine

NOW = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Seen:
    device: str
    down_since: datetime | None = None


class World:
    """The store's checkpoints and counts, the forwarder's pause and hold, a monotonic clock."""

    def __init__(self) -> None:
        self.checkpoints_now: list[Seen] = []
        self.paused: str | None = None
        self.hold_until: datetime | None = None
        self.names = ["a", "b", "c", "d", "e"]
        self.ticks = 0.0

    def checkpoints(self) -> list[Seen]:
        return self.checkpoints_now

    def delivery_counts(self) -> dict[Delivery, int]:
        counts = dict.fromkeys(Delivery, 0)
        counts[Delivery.PENDING], counts[Delivery.IN_FLIGHT], counts[Delivery.PARKED] = 5, 2, 1
        return counts


def line(world: World) -> StatusLine:
    return StatusLine(
        world, world, lambda: world.names, clock=lambda: NOW, every_seconds=10, monotonic=lambda: world.ticks
    )


def test_conditions_worst_first_then_the_counts() -> None:
    world = World()
    world.checkpoints_now = [Seen("a"), *(Seen(name, NOW) for name in "bcde"), Seen("removed", NOW)]
    status = line(world)
    assert status.text().endswith("; 1/5 terminals ok, 7 pending, 1 parked")
    world.hold_until = NOW + timedelta(seconds=30)
    world.paused = "DingTalk rejected app_key/app_secret (errcode 40096: bad)"
    assert status.conditions() == (
        "delivery paused: DingTalk rejected app_key/app_secret (errcode 40096: bad)",
        "delivery held: DingTalk failing, retrying",
        "4 terminals down: b, c, d and 1 more",
    )
    world.hold_until = NOW  # over
    world.paused = None
    assert status.text() == "4 terminals down: b, c, d and 1 more; 1/5 terminals ok, 7 pending, 1 parked"


def test_a_changed_condition_is_sent_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = World()
    world.checkpoints_now = [Seen(name) for name in world.names]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd_side:
        systemd_side.bind(str(tmp_path / "notify"))
        systemd_side.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        status = line(world)
        status.tick()
        assert systemd_side.recv(4096) == b"STATUS=5/5 terminals ok, 7 pending, 1 parked"
        systemd_side.settimeout(0.05)
        world.ticks = 5.0
        status.tick()  # nothing changed, not due: nothing sent
        with pytest.raises(TimeoutError):
            systemd_side.recv(4096)
        world.checkpoints_now[1] = Seen("b", NOW)
        status.tick()
        assert systemd_side.recv(4096) == b"STATUS=1 terminal down: b; 4/5 terminals ok, 7 pending, 1 parked"
        world.ticks = 15.0
        status.tick()  # due again
        assert systemd_side.recv(4096).startswith(b"STATUS=1 terminal down: b;")
