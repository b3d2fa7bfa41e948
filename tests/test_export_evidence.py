"""What DingTalk confirmed reaches HR's export: the request id of each accepted upload, and the listRecord
record id of a punch settled by reading DingTalk back. Real forwarder, real HTTP to the fake DingTalk, real
SQLite; waits through a fake clock."""

from __future__ import annotations

import csv
import io
import time
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from harness import SteppingClock, drain_to_fake

from zkdingsync.cli import main
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.model import Delivery, Punch
from zkdingsync.store import Store

SERIAL = "ZK-EVID01"
SHANGHAI = ZoneInfo("Asia/Shanghai")
CONFIG = """\
dingtalk:
  app_key: fake-app-key
  app_secret: fake-app-secret
store:
  path: {store}
users:
  map:
    "1001": u1
    "1002": u2
devices:
  - name: lobby
    host: 127.0.0.1
    timezone: Asia/Shanghai
"""


def punches(count: int) -> list[Punch]:
    first = (int(time.time()) - 7200) // 60 * 60
    found = []
    for n in range(count):
        seconds = first + n * 60
        local = datetime.fromtimestamp(seconds, SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")
        found.append(Punch("lobby", SERIAL, ("1001", "1002")[n % 2], local, 0, 1, seconds * 1000))
    return found


def test_export_shows_the_request_ids_dingtalk_answered_and_the_record_id_of_a_read_back(
    tmp_path: Path,
) -> None:
    store_path = tmp_path / "zk.db"
    stored = punches(5)
    clock = SteppingClock(datetime.now(timezone.utc))
    with Store.open(store_path) as store, FakeDingTalk({"u1", "u2"}, hang_seconds=5) as fake:
        store.save_poll(
            "lobby", serial=SERIAL, record_count=5, record_size=40, punches=stored, polled_at=clock()
        )
        fake.hang_next()  # the first upload is taken, its answer never comes: settled by reading back
        drain_to_fake(store, fake.url, {"1001": "u1", "1002": "u2"}, clock)
        assert store.delivery_counts()[Delivery.DELIVERED] == 5
        uploads = list(fake.uploads)
    assert len(uploads) == 5  # the read-back found the first one: nothing was sent twice
    answered = {(u["userid"], u["user_check_time"]): u for u in uploads}
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(store=store_path), encoding="utf-8")
    day = stored[0].local_time[:10]
    last = stored[-1].local_time[:10]
    out = tmp_path / "out.csv"
    assert main(["export", "-c", str(config), "--from", day, "--to", last, "-o", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_bytes().decode("utf-8-sig"), newline="")))
    assert len(rows) == 5
    by_request = [r for r in rows if r["request_id"]]
    by_record = [r for r in rows if r["record_id"]]
    assert len(by_request) == 4 and len(by_record) == 1
    for row in rows:
        ms = next(p.check_time_ms for p in stored if p.local_time == row["local_time"])
        upload = answered[(row["userid"], ms)]
        assert row["delivery"] == "delivered 已送达"
        if row["request_id"]:
            assert row["request_id"] == upload["request_id"]  # what the fake answered to that upload
            assert row["record_id"] == ""
        else:
            assert row["record_id"] == str(upload["record_id"])  # the listRecord id of that record
            assert upload["request_id"] is not None  # it was accepted; only its answer was lost
            assert row["outcome_unknown"] == "yes 是"
