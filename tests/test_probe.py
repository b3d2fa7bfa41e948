"""`probe`: concurrent reports per terminal against fake terminals; one failure does not stop the rest."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from fixtures_simulator import simulator_fixture, terminals_fixture  # noqa: F401

from zkdingsync.config.objects import DeviceConfig, PollConfig
from zkdingsync.errors import UserError
from zkdingsync.probe import describe_drift, probe
from zkdingsync.simulator import FakeTerminal

Terminals = Callable[..., FakeTerminal]


@dataclass
class Cfg:
    devices: tuple[DeviceConfig, ...]
    poll: PollConfig = field(
        default_factory=lambda: PollConfig(timeout_seconds=0.5, drift_threshold_seconds=60)
    )


def device_for(name: str, terminal: FakeTerminal, **changes: object) -> DeviceConfig:
    return DeviceConfig(
        name=name, host="127.0.0.1", port=terminal.port, timezone=terminal.spec.timezone, **changes
    )  # type: ignore[arg-type]


def run(config: Cfg, *names: str) -> tuple[int, str]:
    out = io.StringIO()
    code = probe(config, names, out=out)
    return code, out.getvalue()


def test_reports_every_terminal(terminals: Terminals) -> None:
    lobby = terminals(serial="PROBE001", records=1234, capacity=100_000, users=7, firmware="Ver 6.60 X")
    gate = terminals(serial="PROBE002", records=95, capacity=100, clock_offset_seconds=-600)
    code, text = run(Cfg((device_for("lobby", lobby), device_for("gate", gate))))
    assert code == 0
    lobby_part, gate_part = text.split("gate (")
    assert lobby_part.startswith(f"lobby (127.0.0.1:{lobby.port} tcp): ok")
    assert "serial:    PROBE001" in lobby_part and "firmware:  Ver 6.60 X" in lobby_part
    assert "platform:  ZMM220_TFT" in lobby_part
    assert "users:     7 / 10000" in lobby_part
    assert "records:   1234 / 100000 (1 %)" in lobby_part and "WARNING" not in lobby_part
    assert "in step with this host" in lobby_part
    assert "tail reads: yes" in lobby_part
    assert re.search(r"clock:     \d{4}-\d\d-\d\d \d\d:\d\d:\d\d Asia/Shanghai", lobby_part)
    # 95 of 100 records: over 90 % full; 10 minutes behind: beyond the 60 s threshold.
    assert "records:   95 / 100 (95 %)  WARNING: over 90 % full" in gate_part
    assert "(10 min behind this host)  WARNING: beyond the 60 s threshold" in gate_part
    assert text.endswith("2 of 2 terminals answered\n")


def test_one_failing_terminal_does_not_stop_the_rest(terminals: Terminals) -> None:
    good = terminals(serial="PROBE003", records=3)
    locked = terminals(serial="PROBE004", comm_key=77)
    off = terminals(serial="PROBE005")
    off.power_off()
    try:
        config = Cfg(
            (device_for("off", off), device_for("locked", locked, comm_key=1), device_for("good", good))
        )
        code, text = run(config)
    finally:
        off.power_on()
    assert code == 1
    lines = text.splitlines()
    assert lines[0] == f"off (127.0.0.1:{off.port} tcp): FAILED: connection refused at 127.0.0.1:{off.port}"
    assert lines[1] == (
        f"locked (127.0.0.1:{locked.port} tcp): FAILED: "
        "wrong comm key (the terminal rejected it; check comm_key)"
    )
    assert lines[2] == f"good (127.0.0.1:{good.port} tcp): ok"
    assert lines[-1] == "1 of 3 terminals answered"


def test_named_terminals_only_and_unknown_names(terminals: Terminals) -> None:
    one = terminals(serial="PROBE006")
    two = terminals(serial="PROBE007")
    config = Cfg((device_for("one", one), device_for("two", two)))
    code, text = run(config, "two")
    assert code == 0
    assert text.startswith("two (") and "one (" not in text
    assert one.connections == 0
    with pytest.raises(UserError, match="no terminal named 'three'"):
        run(config, "three")


def test_probe_over_udp(terminals: Terminals) -> None:
    terminal = terminals(serial="PROBE008", records=5)
    code, text = run(Cfg((device_for("u", terminal, protocol="udp"),)))
    assert code == 0 and "serial:    PROBE008" in text and " udp): ok" in text


def test_no_terminals() -> None:
    assert run(Cfg(())) == (1, "no terminals configured\n")


def test_describe_drift() -> None:
    assert describe_drift(0.4) == "in step with this host"
    assert describe_drift(90) == "1 min ahead of this host"
    assert describe_drift(-7200) == "2 h behind this host"


def test_users_lists_who_is_enrolled_and_who_is_not_yet_in_the_map(terminals: Terminals) -> None:
    lobby = terminals(serial="PROBE010", users=3, user_table_size=72)
    gate = terminals(serial="PROBE011", users=2, record_size=16, user_table_size=28)
    out = io.StringIO()
    code = probe(
        Cfg((device_for("lobby", lobby), device_for("gate", gate))),
        (),
        out=out,
        users={"1001": "manager4220", "1003": "clerk7"},
    )
    assert code == 0
    lobby_part, gate_part = out.getvalue().split("gate (")
    assert "    1001  User1  -> manager4220" in lobby_part
    assert "    1002  User2  (not in users.map)" in lobby_part
    assert "    1003  User3  -> clerk7" in lobby_part
    assert "  3 enrolled, 1 not in users.map" in lobby_part
    assert "  2 enrolled, 1 not in users.map" in gate_part  # 28-byte user table: numeric enroll numbers


def test_a_terminal_without_offset_reads_is_reported(terminals: Terminals) -> None:
    old = terminals(serial="PROBENOO", records=50, offset_reads="error")
    empty = terminals(serial="PROBEEMT", records=0)
    code, text = run(Cfg((device_for("old", old), device_for("empty", empty))))
    assert code == 0
    old_part, empty_part = text.split("empty (")
    assert "tail reads: no (it refuses buffered reads from an offset" in old_part
    assert "reads the whole log" in old_part
    assert "tail reads: untested (the log is empty)" in empty_part
    assert old.enabled and empty.enabled
