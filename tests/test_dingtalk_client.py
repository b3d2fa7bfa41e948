"""The DingTalk client against the fake DingTalk: real HTTP on 127.0.0.1, a real SQLite store."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import requests
import structlog
from dingtalk import AppKeyClient
from fixtures_simulator import wait_for

from zkdingsync.dingtalk.answers import classify_answer, classify_http_status
from zkdingsync.dingtalk.call_counts import COUNT_FLUSH_CALLS
from zkdingsync.dingtalk.client import DingTalkClient, DingTalkError, robot_signature
from zkdingsync.dingtalk.fake import LIST_RECORD, FakeDingTalk
from zkdingsync.dingtalk.transport import _connection_never_opened, _decoded
from zkdingsync.model import Outcome, OutcomeKind, Upload
from zkdingsync.quota import call_month
from zkdingsync.store import Store

APP_KEY = "fake-app-key"
APP_SECRET = "fake-app-secret-0123456789"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "zkdingsync.db") as opened:
        yield opened


@pytest.fixture
def fake() -> Iterator[FakeDingTalk]:
    with FakeDingTalk(
        users={"manager4220": "1001", "u2": "1002"}, app_secret=APP_SECRET, hang_seconds=5
    ) as server:
        yield server


def make_client(fake: FakeDingTalk, store: Store, **kwargs: object) -> DingTalkClient:
    return DingTalkClient(APP_KEY, APP_SECRET, fake.url, 0.5, store=store, **kwargs)  # type: ignore[arg-type]


def an_upload(userid: str = "manager4220", minutes_ago: int = 60) -> Upload:
    ms = (int(time.time()) - minutes_ago * 60) * 1000
    return Upload(userid=userid, device_name="lobby", device_id="ZK-SN123", user_check_time_ms=ms)


def calls_counted(store: Store, client: DingTalkClient) -> int:
    client.flush_call_counts()
    return store.calls_in_month(client.month_of(datetime.now(timezone.utc)))


def test_upload_is_delivered_with_every_field_and_counted(fake: FakeDingTalk, store: Store) -> None:
    upload = an_upload()
    client = make_client(fake, store)
    outcome = client.upload(upload)
    assert outcome.kind is OutcomeKind.DELIVERED
    [accepted] = fake.uploads
    assert accepted["userid"] == "manager4220"
    assert accepted["device_id"] == "ZK-SN123"
    assert accepted["device_name"] == "lobby"
    assert accepted["user_check_time"] == upload.user_check_time_ms
    assert calls_counted(store, client) == 1


def test_token_is_cached_in_the_store_across_clients(fake: FakeDingTalk, store: Store) -> None:
    make_client(fake, store).upload(an_upload())
    make_client(fake, store).upload(an_upload(minutes_ago=61))
    assert fake.calls["gettoken"] == 1
    assert len(fake.uploads) == 2


def test_token_is_refreshed_five_minutes_before_expiry(fake: FakeDingTalk, store: Store) -> None:
    now = [datetime.now(timezone.utc)]
    client = make_client(fake, store, clock=lambda: now[0])
    client.upload(an_upload())
    now[0] += timedelta(seconds=7200 - 310)
    client.upload(an_upload(minutes_ago=61))
    assert fake.calls["gettoken"] == 1
    now[0] += timedelta(seconds=20)  # now 290 s before expiry
    client.upload(an_upload(minutes_ago=62))
    assert fake.calls["gettoken"] == 2


def test_expired_token_is_refreshed_once_and_the_call_retried_once(fake: FakeDingTalk, store: Store) -> None:
    client = make_client(fake, store)
    client.upload(an_upload())
    fake.invalidate_tokens()
    outcome = client.upload(an_upload(minutes_ago=61))
    assert outcome.kind is OutcomeKind.DELIVERED
    assert fake.calls["upload"] == 3  # ok, rejected, retried
    assert fake.calls["gettoken"] == 2
    assert len(fake.uploads) == 2


def test_a_persistently_bad_token_is_bounded_and_needs_a_human(fake: FakeDingTalk, store: Store) -> None:
    fake.reject_all_tokens()
    outcome = make_client(fake, store).upload(an_upload())
    assert outcome.kind is OutcomeKind.NEEDS_HUMAN
    assert outcome.code == "40014"
    assert fake.calls["upload"] == 2
    assert fake.calls["gettoken"] == 2
    assert fake.uploads == []


def test_bad_credentials_need_a_human_and_nothing_is_uploaded(fake: FakeDingTalk, store: Store) -> None:
    client = DingTalkClient(APP_KEY, "wrong-secret", fake.url, 0.5, store=store)
    outcome = client.upload(an_upload())
    assert outcome.kind is OutcomeKind.NEEDS_HUMAN
    assert outcome.code == "40096"
    assert fake.calls["upload"] == 0
    assert client.check_credentials().kind is OutcomeKind.NEEDS_HUMAN
    assert make_client(fake, store).check_credentials().kind is OutcomeKind.DELIVERED


@pytest.mark.parametrize(
    ("errcode", "sub_code", "kind", "wait"),
    [
        (90018, None, OutcomeKind.TRANSIENT, 2.0),
        (90002, None, OutcomeKind.TRANSIENT, 1.0),
        (90005, None, OutcomeKind.TRANSIENT, 60.0),
        (90006, None, OutcomeKind.TRANSIENT, 60.0),
        (88, "90018", OutcomeKind.TRANSIENT, 2.0),
        (-1, None, OutcomeKind.TRANSIENT, 2.0),
        (90020, None, OutcomeKind.NEEDS_HUMAN, 3600.0),
        (60011, None, OutcomeKind.NEEDS_HUMAN, 300.0),
        (40035, None, OutcomeKind.NEEDS_HUMAN, 300.0),
        (40096, None, OutcomeKind.NEEDS_HUMAN, 300.0),
        (60121, None, OutcomeKind.PERMANENT, 0.0),
        (40003, None, OutcomeKind.PERMANENT, 0.0),
        (88, "60121", OutcomeKind.PERMANENT, 0.0),
        (123456, None, OutcomeKind.PERMANENT, 0.0),
    ],
)
def test_errcodes_are_classified(
    fake: FakeDingTalk, store: Store, errcode: int, sub_code: str | None, kind: OutcomeKind, wait: float
) -> None:
    fake.fail_next(errcode, sub_code=sub_code)
    outcome = make_client(fake, store).upload(an_upload())
    assert outcome.kind is kind
    assert outcome.wait_seconds == wait
    assert outcome.code == (sub_code or str(errcode))
    assert fake.uploads == []


def test_throttled_calls_are_not_counted_against_the_quota(fake: FakeDingTalk, store: Store) -> None:
    fake.fail_next(90018)
    client = make_client(fake, store)
    client.upload(an_upload())
    assert calls_counted(store, client) == 0


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, OutcomeKind.TRANSIENT),
        (502, OutcomeKind.TRANSIENT),
        (503, OutcomeKind.TRANSIENT),
        (504, OutcomeKind.UNKNOWN),
    ],
)
def test_server_errors(fake: FakeDingTalk, store: Store, status: int, kind: OutcomeKind) -> None:
    fake.http_error_next(status)
    outcome = make_client(fake, store).upload(an_upload())
    assert outcome.kind is kind
    assert outcome.code == str(status)


def test_html_page_and_ip_ban_circuit_break_for_five_minutes(fake: FakeDingTalk, store: Store) -> None:
    client = make_client(fake, store)
    fake.html_next()
    html = client.upload(an_upload())
    fake.html_next(status=403)
    html_403 = client.upload(an_upload())
    fake.ban_next()
    ban = client.upload(an_upload())
    fake.ban_next(status=503)  # the ban JSON behind a 5xx status is still a ban, not a 5 s server error
    ban_503 = client.upload(an_upload())
    for outcome in (html, html_403, ban, ban_503):
        assert outcome.kind is OutcomeKind.TRANSIENT
        assert outcome.wait_seconds >= 300
    assert ban.code == ban_503.code == "ip-ban"
    assert fake.uploads == []


def test_garbage_answer_is_unknown(fake: FakeDingTalk, store: Store) -> None:
    fake.garbage_next()
    outcome = make_client(fake, store).upload(an_upload())
    assert outcome.kind is OutcomeKind.UNKNOWN
    assert "\x00" not in outcome.reason


def test_accepted_then_never_answered_is_unknown(fake: FakeDingTalk, store: Store) -> None:
    fake.hang_next()
    started = time.monotonic()
    client = make_client(fake, store)
    outcome = client.upload(an_upload())
    assert outcome.kind is OutcomeKind.UNKNOWN
    assert outcome.code == "read-timeout"
    assert time.monotonic() - started < 3
    assert len(fake.uploads) == 1  # DingTalk has it, we could not know
    assert calls_counted(store, client) == 1


def test_connection_reset_after_sending_is_unknown(fake: FakeDingTalk, store: Store) -> None:
    client = make_client(fake, store)
    client.check_credentials()
    fake.reset_next()
    outcome = client.upload(an_upload())
    assert outcome.kind is OutcomeKind.UNKNOWN
    assert len(fake.uploads) == 1


def test_connection_refused_is_transient_and_not_counted(fake: FakeDingTalk, store: Store) -> None:
    client = make_client(fake, store)
    assert client.upload(an_upload()).kind is OutcomeKind.DELIVERED
    fake.go_down()
    outcome = client.upload(an_upload(minutes_ago=61))
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.code == "not-sent"
    assert calls_counted(store, client) == 1
    fake.come_up()
    assert client.upload(an_upload(minutes_ago=61)).kind is OutcomeKind.DELIVERED
    assert len(fake.uploads) == 2


def test_call_counts_reach_the_store_in_groups(store: Store) -> None:
    month = call_month(datetime.now(timezone.utc), ZoneInfo("Asia/Shanghai"))  # the client's default zone
    with FakeDingTalk({"manager4220"}, app_secret=APP_SECRET, qps_limit=None) as fake:
        client = make_client(fake, store)
        for minutes in range(60, 60 + COUNT_FLUSH_CALLS):
            assert client.upload(an_upload(minutes_ago=minutes)).kind is OutcomeKind.DELIVERED
        assert store.calls_in_month(month) == COUNT_FLUSH_CALLS
        client.upload(an_upload(minutes_ago=59))
        assert store.calls_in_month(month) == COUNT_FLUSH_CALLS
        client.close()  # flushes the rest
    assert store.calls_in_month(month) == COUNT_FLUSH_CALLS + 1


def test_connect_timeout_counts_as_never_sent() -> None:
    assert _connection_never_opened(requests.exceptions.ConnectTimeout("connect timed out"))
    lost = requests.exceptions.ConnectionError("('Connection aborted.', RemoteDisconnected('closed'))")
    assert not _connection_never_opened(lost)


def test_unknown_user_and_invalid_uploads_are_permanent(fake: FakeDingTalk, store: Store) -> None:
    client = make_client(fake, store)
    assert client.upload(an_upload(userid="nobody")).code == "60121"
    future = Upload("manager4220", "lobby", "ZK-SN123", int(time.time() * 1000) + 3_600_000)
    assert client.upload(future).kind is OutcomeKind.PERMANENT
    blank = Upload("manager4220", "lobby", "", int(time.time() * 1000))
    assert client.upload(blank).kind is OutcomeKind.PERMANENT
    assert fake.calls["upload"] == 2  # the blank device_id never left


def test_list_records_reads_back_in_the_org_timezone(fake: FakeDingTalk, store: Store) -> None:
    client = make_client(fake, store)
    upload = an_upload()
    client.upload(upload)
    client.upload(an_upload(userid="u2"))
    moment = datetime.fromtimestamp(upload.user_check_time_ms / 1000, tz=timezone.utc)
    records = client.list_records(["manager4220"], moment, moment)
    assert [(r["userId"], r["userCheckTime"], r["deviceId"]) for r in records] == [
        ("manager4220", upload.user_check_time_ms, "ZK-SN123")
    ]
    assert (
        client.list_records(["manager4220"], moment + timedelta(seconds=1), moment + timedelta(days=1)) == []
    )
    assert calls_counted(store, client) == 4  # read-backs count against the quota too


def test_list_records_enforces_dingtalk_limits(fake: FakeDingTalk, store: Store) -> None:
    client = make_client(fake, store)
    now = datetime.now(timezone.utc)
    with pytest.raises(ValueError, match="50"):
        client.list_records([f"u{i}" for i in range(51)], now, now)
    with pytest.raises(ValueError, match="7 days"):
        client.list_records(["u2"], now - timedelta(days=7, seconds=1), now)


def test_list_records_failure_is_a_domain_error(fake: FakeDingTalk, store: Store) -> None:
    fake.http_error_next(502, endpoint=LIST_RECORD)
    now = datetime.now(timezone.utc)
    with pytest.raises(DingTalkError) as raised:
        make_client(fake, store).list_records(["u2"], now - timedelta(hours=1), now)
    assert raised.value.outcome.kind is OutcomeKind.TRANSIENT


def test_job_numbers_walk_departments_and_pages(store: Store) -> None:
    users: dict[str, str | None] = {f"user{i:03d}": str(2000 + i) for i in range(130)}
    users["twin-a"] = "9999"
    users["twin-b"] = "9999"
    users["nojob"] = None
    placement = {userid: [3] for userid in users}
    placement["user000"] = [1, 3]  # in two departments: listed twice, counted once
    with FakeDingTalk(
        users, app_secret=APP_SECRET, departments={1: [2], 2: [3], 3: []}, user_departments=placement
    ) as fake:
        client = make_client(fake, store)
        mapping = client.list_job_numbers()
        assert fake.calls["user_list"] >= 3  # 133 users in department 3: two pages, plus department 1
    assert len(mapping) == 130
    assert mapping["2000"] == "user000"
    assert mapping["2129"] == "user129"
    assert "9999" not in mapping
    assert calls_counted(store, client) == 0  # contacts calls are free


def test_robot_signature_matches_the_reference_vector() -> None:
    expected = "TSZbRFUuvaSQaRKUpF970OPCb2/LcQAP3wOvwZIzBZk="
    assert robot_signature("SEC0123456789abcdef", 1700000000000) == expected


def test_robot_message_is_signed(store: Store) -> None:
    with FakeDingTalk(robot_token="robot-token", robot_secret="SEC0123456789abcdef") as fake:
        client = make_client(fake, store)
        message = {"msgtype": "text", "text": {"content": "terminal lobby is down"}}
        assert client.send_robot("robot-token", "SEC0123456789abcdef", message).kind is OutcomeKind.DELIVERED
        rejected = client.send_robot("robot-token", "SEC-wrong", message)
        assert rejected.kind is OutcomeKind.PERMANENT
        assert rejected.code == "310000"
        assert fake.robot_messages == [message]


def test_sdk_class_state_is_left_alone(fake: FakeDingTalk, store: Store) -> None:
    make_client(fake, store)
    other = DingTalkClient(APP_KEY, APP_SECRET, "http://127.0.0.1:9", 0.5, store=store)
    assert AppKeyClient.API_BASE_URL == "https://oapi.dingtalk.com/"
    assert other._transport._sdk.API_BASE_URL == "http://127.0.0.1:9/"
    assert make_client(fake, store)._transport._sdk._http is not other._transport._sdk._http


def test_no_timeout_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="timeout"):
        DingTalkClient(APP_KEY, APP_SECRET, "http://127.0.0.1:9", 0, store=store)


def test_secrets_and_tokens_never_reach_the_logs(
    fake: FakeDingTalk, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        client = make_client(fake, store)
        client.upload(an_upload())
        fake.invalidate_tokens()
        client.upload(an_upload(minutes_ago=61))
        DingTalkClient(APP_KEY, "wrong-secret-abcdef", fake.url, 0.5, store=store).check_credentials()
        fake.reject_all_tokens()
        client.upload(an_upload(minutes_ago=62))
    token = store.cached_token(APP_KEY, now=datetime.now(timezone.utc))
    assert token
    everything = repr(events) + caplog.text
    for secret in (APP_SECRET, "wrong-secret-abcdef", token):
        assert secret not in everything
    assert any(event["event"] == "dingtalk.token_rejected" for event in events)


def test_classifiers_on_shapes_without_a_server() -> None:
    assert classify_answer({"status": 1111, "wait": 600, "punish": "deny"}).wait_seconds == 600
    assert classify_answer({"errcode": "0", "errmsg": "ok"}).kind is OutcomeKind.DELIVERED
    assert classify_answer({"success": True}).kind is OutcomeKind.UNKNOWN
    assert classify_http_status(429, "").kind is OutcomeKind.TRANSIENT
    assert classify_http_status(404, "<html>").wait_seconds >= 300


@pytest.mark.parametrize("errcode", ["abc", "", "0x1", " ", "1.5", True, [1], {"a": 1}, 1.5, None])
def test_an_errcode_that_is_not_a_number_is_unknown_never_permanent(
    fake: FakeDingTalk, store: Store, errcode: object
) -> None:
    # A proxy or a captive portal, not DingTalk: the upload may or may not have gone through.
    fake.answer_next({"errcode": errcode, "errmsg": "portal"})
    outcome = make_client(fake, store).upload(an_upload())
    assert outcome.kind is OutcomeKind.UNKNOWN, outcome
    assert len(outcome.reason) < 200


def test_numeric_errcodes_as_text_are_still_read_as_numbers() -> None:
    assert classify_answer({"errcode": " 60121 "}).kind is OutcomeKind.PERMANENT
    assert classify_answer({"errcode": "00"}).kind is OutcomeKind.DELIVERED
    assert classify_answer({"errcode": "90018"}).kind is OutcomeKind.TRANSIENT


def test_a_huge_answer_is_read_only_up_to_the_cap(fake: FakeDingTalk, store: Store) -> None:
    client = make_client(fake, store)
    assert client.upload(an_upload()).kind is OutcomeKind.DELIVERED  # the token is fetched
    fake.huge_next(50 * 1024 * 1024, accept=True)
    started = time.monotonic()
    outcome = client.upload(an_upload(minutes_ago=61))
    assert time.monotonic() - started < 2
    assert outcome.kind is OutcomeKind.UNKNOWN and outcome.code == "too-large"
    assert "larger than 64 KiB" in outcome.reason
    # The connection it came over is dropped, the next call works.
    assert client.upload(an_upload(minutes_ago=62)).kind is OutcomeKind.DELIVERED
    # A read is simply tried again later.
    fake.huge_next(3 * 1024 * 1024, endpoint=LIST_RECORD)
    now = datetime.now(timezone.utc)
    with pytest.raises(DingTalkError) as raised:
        client.list_records(["manager4220"], now - timedelta(hours=3), now)
    assert raised.value.outcome.kind is OutcomeKind.TRANSIENT


def test_deeply_nested_json_is_not_json() -> None:
    response = requests.Response()
    response._content = b"[" * 100_000
    assert _decoded(response) is response  # not a RecursionError


def test_abort_cuts_a_call_in_flight_and_refuses_later_ones(fake: FakeDingTalk, store: Store) -> None:
    client = DingTalkClient(APP_KEY, APP_SECRET, fake.url, 30, store=store)
    assert client.upload(an_upload()).kind is OutcomeKind.DELIVERED
    fake.hang_next()
    results: list[object] = []
    worker = threading.Thread(target=lambda: results.append(client.upload(an_upload(minutes_ago=61))))
    worker.start()
    wait_for(lambda: fake.calls["upload"] == 2)
    started = time.monotonic()
    client.abort()
    worker.join(5)
    assert not worker.is_alive() and time.monotonic() - started < 2
    [cut] = results
    assert isinstance(cut, Outcome) and cut.kind is OutcomeKind.UNKNOWN  # it was sent: read back later
    tokens_before, uploads_before = fake.calls["gettoken"], fake.calls["upload"]
    later = client.upload(an_upload(minutes_ago=62))
    assert later.kind is OutcomeKind.TRANSIENT and later.code == "not-sent"
    assert (fake.calls["gettoken"], fake.calls["upload"]) == (tokens_before, uploads_before)
