"""The real daemon against a terminal that claims 2,000,000,000 records and streams bytes for as long as
its log is read: the count is refused at once with one clear line naming the terminal, memory stays
small, the other terminal is polled as usual, and SIGTERM still ends the daemon with 0 within 10 s."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401
from harness import DaemonProcess, write_config

from zkdingsync.dingtalk.fake import FakeDingTalk
from zkdingsync.simulator import FakeTerminal, Fault, history_start
from zkdingsync.simulator import protocol as p

APP_KEY = "dingcount"
APP_SECRET = "count-secret-value-1234"
RSS_LIMIT_KIB = 150 * 1024  # the daemon itself is about 60 MiB; a download sized by the count would be GBs


@pytest.fixture
def dingtalk() -> Iterator[FakeDingTalk]:
    with FakeDingTalk(users=["alice"], app_key=APP_KEY, app_secret=APP_SECRET) as fake:
        yield fake


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def events(daemon: DaemonProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in daemon.stderr().splitlines() if line.startswith("{")]


def test_an_absurd_record_count_is_refused_with_one_line_and_bounded_memory(
    tmp_path: Path, terminals: Callable[..., FakeTerminal], dingtalk: FakeDingTalk
) -> None:
    hostile = terminals(serial="HOSTILE01", records=10)
    hostile.set_fault(Fault.claim_records(2_000_000_000))
    healthy = terminals(serial="HEALTHY01", records=10, first_punch=history_start(10))
    config = write_config(
        tmp_path / "config.yaml",
        store=tmp_path / "zk.db",
        api_base=dingtalk.url,
        devices=[("hostile", hostile.port), ("healthy", healthy.port)],
        users={"1001": "alice"},
        app_key=APP_KEY,
        app_secret=APP_SECRET,
    )
    daemon = DaemonProcess(config, tmp_path)
    try:
        wait_for(lambda: any(e.get("event") == "terminal.down" for e in events(daemon)), timeout=30)
        polled = healthy.connections
        wait_for(lambda: healthy.connections >= polled + 3, timeout=30)  # the other terminal goes on
        peak = peak_rss_kib(daemon.pid)
    finally:
        code = daemon.terminate(timeout=10)
    assert code == 0, daemon.stderr()[-3000:]
    assert peak < RSS_LIMIT_KIB, f"peak RSS {peak} KiB"
    lines = [e for e in events(daemon) if e.get("device") == "hostile" and e.get("level") != "debug"]
    assert [e["event"] for e in lines] == ["terminal.down"], lines
    assert "2,000,000,000 records" in str(lines[0]["reason"])
    assert hostile.command_count(p.CMD_PREPARE_BUFFER) == 0
    assert "Traceback" not in daemon.stderr() + daemon.stdout()
