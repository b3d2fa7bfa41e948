"""The names on a terminal's user table reach the store (for HR's export): read after a poll, again only
when the user count changes, never in the way of polling. The real adapter against a fake terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture  # noqa: F401

from zkdingsync.config.objects import DeviceConfig, PollConfig
from zkdingsync.model import TerminalUser
from zkdingsync.poller import Poller
from zkdingsync.simulator import FakeTerminal
from zkdingsync.store import Store

POLL = PollConfig(interval_seconds=60, timeout_seconds=2)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zk.db") as opened:
        yield opened


def test_names_are_read_once_and_again_when_the_user_count_changes(
    terminals: Callable[..., FakeTerminal], store: Store
) -> None:
    lobby = terminals(serial="NAMES0001", record_size=40, users=3, records=5)
    device = DeviceConfig(name="lobby", host="127.0.0.1", port=lobby.port, timezone="Asia/Shanghai")
    poller = Poller([device], store, poll=POLL, jitter=lambda: 0.0)
    now = datetime.now(timezone.utc)
    try:
        [first] = poller.poll_due(now)
        assert first.ok
        assert store.employee_names()[0] == {
            ("NAMES0001", "1001"): "User1",
            ("NAMES0001", "1002"): "User2",
            ("NAMES0001", "1003"): "User3",
        }
        sessions = lobby.connections
        [second] = poller.poll_due(now + timedelta(seconds=61))
        assert second.ok
        assert lobby.connections == sessions + 1  # the poll only: the user count did not change
        lobby.set_users([*lobby.users, TerminalUser(uid=4, enroll_number="1004", name="王五")])
        [third] = poller.poll_due(now + timedelta(seconds=122))
        assert third.ok
        assert lobby.connections == sessions + 3  # the poll, then the user table
    finally:
        poller.close()
    assert store.employee_names()[0][("NAMES0001", "1004")] == "王五"
    assert store.terminal_name_count("NAMES0001") == 4


def test_a_restart_does_not_read_names_it_already_has(
    terminals: Callable[..., FakeTerminal], store: Store
) -> None:
    lobby = terminals(serial="NAMES0002", record_size=40, users=2, records=1)
    device = DeviceConfig(name="lobby", host="127.0.0.1", port=lobby.port, timezone="Asia/Shanghai")
    store.save_terminal_names("NAMES0002", {"1001": "User1", "1002": "User2"})
    poller = Poller([device], store, poll=POLL, jitter=lambda: 0.0)
    try:
        [result] = poller.poll_due(datetime.now(timezone.utc))
    finally:
        poller.close()
    assert result.ok
    assert lobby.connections == 1
