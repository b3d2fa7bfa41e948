"""The fake DingTalk itself: validation, limits, the control API, and running it as a separate process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from zkdingsync.dingtalk.fake import FakeDingTalk

APP_KEY = "fake-app-key"
APP_SECRET = "fake-app-secret"


@pytest.fixture
def fake() -> Iterator[FakeDingTalk]:
    with FakeDingTalk(users={"manager4220": "1001"}) as server:
        yield server


def token(session: requests.Session, fake: FakeDingTalk) -> str:
    answer = session.get(
        f"{fake.url}/gettoken", params={"appkey": APP_KEY, "appsecret": APP_SECRET}, timeout=5
    )
    return str(answer.json()["access_token"])


def now_ms() -> int:
    return int(time.time()) * 1000


def test_form_body_uploads_are_accepted(fake: FakeDingTalk) -> None:
    with requests.Session() as session:
        access = token(session, fake)
        body = {
            "userid": "manager4220",
            "device_id": "SN1",
            "device_name": "lobby",
            "user_check_time": now_ms(),
        }
        answer = session.post(
            f"{fake.url}/topapi/attendance/record/upload",
            params={"access_token": access},
            data=body,
            timeout=5,
        ).json()
    assert answer["errcode"] == 0
    assert fake.uploads[0]["user_check_time"] == body["user_check_time"]


@pytest.mark.parametrize(
    ("change", "errcode"),
    [
        ({"userid": "stranger"}, 60121),
        ({"device_id": ""}, 400002),
        ({"device_name": " "}, 400002),
        ({"user_check_time": 1.5e12}, 400002),
        ({"user_check_time": "soon"}, 400002),
        # Offsets from the moment the test runs (parameters are built at collection, minutes earlier).
        ({"user_check_time_offset_ms": 60_000}, 400002),
        ({"user_check_time_offset_ms": -181 * 24 * 3600 * 1000}, 400002),
    ],
)
def test_every_upload_field_is_validated(fake: FakeDingTalk, change: dict[str, object], errcode: int) -> None:
    body: dict[str, object] = {
        "userid": "manager4220",
        "device_id": "SN1",
        "device_name": "lobby",
        "user_check_time": now_ms() - 1000,
    }
    body.update(change)
    offset = body.pop("user_check_time_offset_ms", None)
    if isinstance(offset, int):
        body["user_check_time"] = now_ms() + offset
    with requests.Session() as session:
        access = token(session, fake)
        answer = session.post(
            f"{fake.url}/topapi/attendance/record/upload",
            params={"access_token": access},
            json=body,
            timeout=5,
        ).json()
    assert answer["errcode"] == errcode
    assert fake.uploads == []


def test_blank_and_unknown_tokens_are_rejected_like_topapi(fake: FakeDingTalk) -> None:
    url = f"{fake.url}/topapi/attendance/record/upload"
    with requests.Session() as session:
        blank = session.post(url, json={}, timeout=5).json()
        unknown = session.post(url, params={"access_token": "nope"}, json={}, timeout=5).json()
    assert (blank["errcode"], blank["sub_code"]) == (88, "40000")
    assert (unknown["errcode"], unknown["sub_code"]) == (88, "40014")


def test_the_qps_limit_answers_90018(fake: FakeDingTalk) -> None:
    body = {"userid": "manager4220", "device_id": "SN1", "device_name": "lobby", "user_check_time": now_ms()}
    with requests.Session() as session:
        access = token(session, fake)
        codes = [
            session.post(
                f"{fake.url}/topapi/attendance/record/upload",
                params={"access_token": access},
                json=body,
                timeout=5,
            ).json()["errcode"]
            for _ in range(25)
        ]
    assert codes.count(0) <= 20
    assert 90018 in codes
    assert fake.throttled == codes.count(90018)


def test_keep_alive_answers_are_not_delayed_by_nagle(fake: FakeDingTalk) -> None:
    # With headers and body in separate writes, each keep-alive request would wait ~40 ms for a delayed ACK.
    with requests.Session() as session:
        token(session, fake)
        started = time.monotonic()
        for _ in range(20):
            token(session, fake)
        elapsed = time.monotonic() - started
    assert elapsed < 0.5


def test_latency_is_added_to_every_answer() -> None:
    with FakeDingTalk(latency_seconds=0.05) as fake, requests.Session() as session:
        started = time.monotonic()
        token(session, fake)
        assert time.monotonic() - started >= 0.05


def test_control_api_for_other_processes(fake: FakeDingTalk) -> None:
    with requests.Session() as session:
        ok = session.post(
            f"{fake.url}/_fake/control", json={"action": "fail_next", "errcode": 90020}, timeout=5
        )
        assert ok.json() == {"ok": True}
        bad = session.post(f"{fake.url}/_fake/control", json={"action": "stop"}, timeout=5)
        assert bad.status_code == 400
        access = token(session, fake)
        answer = session.post(
            f"{fake.url}/topapi/attendance/record/upload", params={"access_token": access}, json={}, timeout=5
        ).json()
        assert answer["errcode"] == 90020
        seen = session.get(f"{fake.url}/_fake/uploads", timeout=5).json()
    assert seen["uploads"] == []
    assert seen["calls"]["upload"] == 1


def test_an_outage_refuses_connections_then_recovers(fake: FakeDingTalk) -> None:
    with requests.Session() as session:
        token(session, fake)
        port = fake.port
        fake.go_down()
        with pytest.raises(requests.exceptions.ConnectionError):
            token(session, fake)
        fake.come_up()
        assert fake.port == port
        assert token(session, fake)


def test_runs_as_a_separate_process(tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"manager4220": "1001"}), encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "zkdingsync.dingtalk.fake", "--port", "0", "--users-file", str(users)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        answer = requests.get(
            f"{url}/gettoken", params={"appkey": APP_KEY, "appsecret": APP_SECRET}, timeout=5
        )
        assert answer.json()["errcode"] == 0
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
