"""Enroll number -> DingTalk userid: the explicit map, and job numbers from the fake DingTalk's contacts."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import structlog

from zkdingsync.devices.records import parse_attendance_buffer, with_length_prefix
from zkdingsync.dingtalk.client import DingTalkClient
from zkdingsync.dingtalk.fake import LIST_USERS, FakeDingTalk
from zkdingsync.mapping import UserMapper, enroll_key, unmapped_reason
from zkdingsync.model import Directory
from zkdingsync.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zkdingsync.db") as opened:
        yield opened


@pytest.fixture
def fake() -> Iterator[FakeDingTalk]:
    users: dict[str, str | None] = {"manager4220": "1001", "clerk7": "0042", "boss": None}
    with FakeDingTalk(users) as server:
        yield server


def job_mapper(fake: FakeDingTalk, store: Store, clock: Clock, **kwargs: object) -> UserMapper:
    client = DingTalkClient("fake-app-key", "fake-app-secret", fake.url, 2.0, store=store)
    return UserMapper(
        {"7": "explicit-user"},
        match_job_number=True,
        source=client,
        cache=store,
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )


def test_explicit_map_only() -> None:
    mapper = UserMapper({"1001": "manager4220", " 1002 ": "u2"})
    assert mapper.resolve("1001") == "manager4220"
    assert mapper.resolve("1002") == "u2"
    assert mapper.resolve("1023") is None
    assert not mapper.refresh_due()
    assert not mapper.maybe_refresh()


def test_text_enroll_numbers_map_as_the_terminal_reports_them() -> None:
    # A 40-byte record's id field: NUL padding is cut by the decoder, space padding by the comparison.
    nul_padded = struct.pack("<H24sB4sB8s", 1, b"A-17".ljust(24, b"\0"), 1, b"\0" * 4, 0, b"\0" * 8)
    space_padded = struct.pack("<H24sB4sB8s", 2, b"E0012   ".ljust(24, b"\0"), 1, b"\0" * 4, 0, b"\0" * 8)
    _, records = parse_attendance_buffer(with_length_prefix(nul_padded + space_padded), 2)
    assert [record.enroll_number for record in records] == ["A-17", "E0012   "]
    mapper = UserMapper({"A-17": "lee", "E0012": "wang"})
    assert [mapper.resolve(record.enroll_number) for record in records] == ["lee", "wang"]
    assert enroll_key("E0012   ") == "E0012"
    assert mapper.resolve("a-17") is None  # compared exactly otherwise: case and inner spaces count
    assert mapper.resolve("A 17") is None


def test_unmapped_number_is_logged_once_per_number() -> None:
    mapper = UserMapper({})
    with structlog.testing.capture_logs() as events:
        reasons = [mapper.report_unmapped("1023") for _ in range(50)] + [mapper.report_unmapped("1024")]
    assert reasons[0] == "enroll number 1023 has no DingTalk user" == unmapped_reason("1023")
    warnings = [event for event in events if event["event"] == "mapping.unmapped"]
    assert [event["enroll_number"] for event in warnings] == ["1023", "1024"]


def test_job_numbers_are_fetched_cached_and_survive_an_outage(
    fake: FakeDingTalk, store: Store, tmp_path: Path
) -> None:
    clock = Clock()
    mapper = job_mapper(fake, store, clock)
    assert mapper.resolve("1001") is None  # nothing fetched in the constructor
    assert mapper.maybe_refresh()
    assert mapper.resolve("1001") == "manager4220"
    assert mapper.resolve("42") == "clerk7"  # "0042" on DingTalk, "42" on the terminal
    assert mapper.resolve("7") == "explicit-user"  # the explicit map wins
    assert store.job_numbers() == {"1001": "manager4220", "0042": "clerk7"}
    fake.go_down()
    restarted = job_mapper(fake, store, clock)
    assert restarted.resolve("1001") == "manager4220"
    assert not restarted.refresh_due()


def test_refreshed_daily_not_before(fake: FakeDingTalk, store: Store) -> None:
    clock = Clock()
    mapper = job_mapper(fake, store, clock)
    mapper.maybe_refresh()
    calls = fake.calls[LIST_USERS]
    clock.now += timedelta(hours=23)
    assert not mapper.maybe_refresh()
    fake.set_users({"manager4220": "1001", "newcomer": "1050"})
    clock.now += timedelta(hours=1)
    assert mapper.maybe_refresh()
    assert fake.calls[LIST_USERS] > calls
    assert mapper.resolve("1050") == "newcomer"
    assert mapper.resolve("42") is None


def test_an_unknown_number_asks_for_an_early_refresh_rate_limited(fake: FakeDingTalk, store: Store) -> None:
    clock = Clock()
    mapper = job_mapper(fake, store, clock, retry_after=timedelta(minutes=10))
    mapper.maybe_refresh()
    fake.set_users({"newcomer": "1050"})
    mapper.report_unmapped("1050")
    assert not mapper.maybe_refresh()  # a fetch just happened: not again within 10 minutes
    clock.now += timedelta(minutes=10)
    assert mapper.maybe_refresh()
    assert mapper.resolve("1050") == "newcomer"


def test_on_demand_refresh(fake: FakeDingTalk, store: Store) -> None:
    clock = Clock()
    mapper = job_mapper(fake, store, clock)
    mapper.maybe_refresh()
    fake.set_users({"newcomer": "1050"})
    mapper.request_refresh()
    assert mapper.maybe_refresh()
    assert mapper.resolve("1050") == "newcomer"


def test_a_failed_refresh_keeps_the_cache_and_logs_once(fake: FakeDingTalk, store: Store) -> None:
    clock = Clock()
    mapper = job_mapper(fake, store, clock, retry_after=timedelta(minutes=10))
    mapper.maybe_refresh()
    fake.go_down()
    with structlog.testing.capture_logs() as events:
        for _ in range(3):
            clock.now += timedelta(days=1)
            assert not mapper.maybe_refresh()
    assert [event["event"] for event in events].count("mapping.refresh_failed") == 1
    assert mapper.resolve("1001") == "manager4220"
    fake.come_up()
    clock.now += timedelta(minutes=10)
    assert mapper.maybe_refresh()


def test_ambiguous_leading_zero_numbers_need_an_exact_match() -> None:
    class Source:
        def list_directory(self) -> Directory:
            return Directory({"007": "agent-a", "7": "agent-b", "0100": "c"}, {})

    class Cache:
        def replace_job_numbers(self, mapping: object, *, at: datetime) -> None:
            self.saved = mapping

        def save_directory_names(self, names: object) -> None:
            self.names = names

        def job_numbers(self) -> dict[str, str]:
            return {}

        def job_numbers_updated_at(self) -> datetime | None:
            return None

    mapper = UserMapper({}, match_job_number=True, source=Source(), cache=Cache())
    mapper.refresh()
    assert mapper.resolve("007") == "agent-a"
    assert mapper.resolve("7") == "agent-b"
    assert mapper.resolve("07") is None
    assert mapper.resolve("100") == "c"


def test_job_number_matching_needs_its_parts() -> None:
    with pytest.raises(ValueError, match="match_job_number"):
        UserMapper({}, match_job_number=True)


def test_reload_updates_the_map_and_forgets_fixed_numbers(fake: FakeDingTalk, store: Store) -> None:
    client = DingTalkClient("fake-app-key", "fake-app-secret", fake.url, 2.0, store=store)
    mapper = UserMapper({}, source=client, cache=store)
    with structlog.testing.capture_logs() as events:
        mapper.report_unmapped("1023")
        mapper.update({"1023": "newcomer"}, match_job_number=False)
        assert mapper.resolve("1023") == "newcomer"
        mapper.update({}, match_job_number=True)
        assert mapper.refresh_due()
        assert mapper.maybe_refresh()
        assert mapper.resolve("1001") == "manager4220"
        mapper.report_unmapped("1023")  # unmapped again after being mapped: worth a new warning
        mapper.report_unmapped("1023")
        mapper.update({}, match_job_number=True)
        mapper.report_unmapped("1023")  # still unmapped after a reload: said again, once
    assert [e["event"] for e in events].count("mapping.unmapped") == 3
    with pytest.raises(ValueError, match="match_job_number"):
        UserMapper({}).update({}, match_job_number=True)


def test_a_refresh_keeps_the_directory_names_for_the_export(fake: FakeDingTalk, store: Store) -> None:
    mapper = job_mapper(fake, store, Clock())
    assert mapper.refresh() == 2
    terminal_names, directory_names = store.employee_names()
    assert terminal_names == {}
    assert directory_names == {
        "manager4220": "user manager4220",
        "clerk7": "user clerk7",
        "boss": "user boss",
    }
