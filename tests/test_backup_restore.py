"""A restored backup sends nothing twice: punches pending in the copy may have been delivered after it was
taken, so the daemon reads DingTalk back before sending them. Real store files, real HTTP to the fake
DingTalk, the real forwarder on a fake clock."""

from __future__ import annotations

import io
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from harness import SteppingClock, drain_to_fake, duplicates, write_config

from zkdingsync.backup import backup_command
from zkdingsync.config import load_config
from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.model import Delivery, Punch
from zkdingsync.store import Store

SERIAL = "ZK-RESTORE"
SHANGHAI = ZoneInfo("Asia/Shanghai")


def punch(n: int) -> Punch:
    seconds = (int(time.time()) - 7200) // 60 * 60 + n * 60
    local = datetime.fromtimestamp(seconds, SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")
    return Punch("lobby", SERIAL, "1001", local, 0, 1, seconds * 1000)


def test_a_restored_backup_reads_dingtalk_back_and_sends_only_what_is_missing(tmp_path: Path) -> None:
    live = tmp_path / "zk.db"
    clock = SteppingClock(datetime.now(timezone.utc))
    with Store.open(live) as store:
        store.save_poll(
            "lobby",
            serial=SERIAL,
            record_count=4,
            record_size=40,
            punches=[punch(n) for n in range(4)],
            polled_at=clock(),
        )
    config = load_config(
        write_config(
            tmp_path / "config.yaml",
            store=live,
            api_base="http://127.0.0.1:9",
            devices=[("lobby", 4370)],
            users={"1001": "u1"},
            app_key="k",
            app_secret="s",
        ),
        require_secrets=False,
        check_store=False,
    )
    assert backup_command(config, str(tmp_path / "backups"), keep=8, out=io.StringIO(), now=clock()) == 0
    (copy,) = (tmp_path / "backups").iterdir()
    with FakeDingTalk({"u1"}) as fake:
        for n in (0, 2):  # delivered by the live daemon after the backup was taken
            fake.add_upload("u1", punch(n).check_time_ms or 0, SERIAL, "lobby")
        with Store.open(live) as store:
            assert store.adopt_restored_backup(clock()) is None  # the live store is no restored copy
        restored = tmp_path / "restored.db"
        shutil.copy(copy, restored)  # the README's restore: the copy put in place of the store
        with Store.open(restored) as store:
            adopted = store.adopt_restored_backup(clock())
            assert adopted is not None and adopted[1] == 4
            assert store.adopt_restored_backup(clock()) is None  # once
            assert store.delivery_counts()[Delivery.IN_FLIGHT] == 4
            clock.advance(60)
            drain_to_fake(store, fake.url, {"1001": "u1"}, clock)
            delivered = store.punches(delivery=Delivery.DELIVERED)
        uploads = list(fake.uploads)
    assert len(delivered) == 4
    assert len(uploads) == 4  # 2 found by the read-back, 2 sent now
    assert duplicates(uploads) == {}
    assert sorted(u["how"] for u in uploads) == ["seeded", "seeded", "upload", "upload"]
