"""`zkdingsync simulate` (the simulator's command module): options, spec file, lines printed, stop."""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_simulator import wait_for
from zk import ZK, const

from zkdingsync.devices.records import parse_attendance_buffer
from zkdingsync.errors import UserError
from zkdingsync.simulator import command


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


def free_base_port(count: int) -> int:
    """A base port with `count` consecutive ports free for TCP and UDP on loopback (checked now)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    sockets.append(s)
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise AssertionError("no free port range")


class Running:
    """`command.run` in a thread, with its output and a stop event."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.out = io.StringIO()
        self.stop = threading.Event()
        self.result: list[int] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(args,), daemon=True)
        self.thread.start()

    def _run(self, args: argparse.Namespace) -> None:
        try:
            self.result.append(command.run(args, self.stop, self.out))
        except BaseException as error:  # noqa: BLE001 - re-raised in the test thread by lines()/finish()
            self.errors.append(error)

    def lines(self, count: int) -> list[str]:
        wait_for(lambda: self.errors or self.out.getvalue().count("\n") >= count)
        if self.errors:
            raise self.errors[0]
        return self.out.getvalue().splitlines()

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        if self.errors:
            raise self.errors[0]
        return self.result[0]


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for item in started:
        item.stop.set()
        item.thread.join(timeout=10)


def test_terminals_on_consecutive_ports(running: list[Running]) -> None:
    base = free_base_port(3)
    args = parse(
        "--terminals",
        "3",
        "--base-port",
        str(base),
        "--users",
        "4",
        "--records",
        "250",
        "--record-size",
        "16",
    )
    sim = Running(args)
    running.append(sim)
    lines = sim.lines(3)
    assert [line.split()[:3] for line in lines] == [
        [f"sim-{i + 1}", f"port={base + i}", f"serial=SIM{base + i:05d}"] for i in range(3)
    ]
    for i, udp in ((0, False), (2, True)):
        conn = ZK("127.0.0.1", port=base + i, timeout=2, force_udp=udp, ommit_ping=True).connect()
        assert conn.get_serialnumber() == f"SIM{base + i:05d}"
        conn.read_sizes()
        assert (conn.users, conn.records) == (4, 250)
        buffer, _ = conn.read_with_buffer(const.CMD_ATTLOG_RRQ)
        assert parse_attendance_buffer(buffer, 250)[0] == 16
        conn.disconnect()
    assert sim.finish() == 0
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", base)) != 0  # stopped


def test_spec_file(tmp_path: Path, running: list[Running]) -> None:
    spec = tmp_path / "terminals.yaml"
    spec.write_text(
        "terminals:\n"
        "  - {name: lobby, serial: LOBBY001, port: 0, record_size: 49, users: 2, records: 5, comm_key: 99}\n"
        "  - {name: dock, port: 0, record_size: 8, punch_interval: 0.02}\n",
        encoding="utf-8",
    )
    sim = Running(parse("--spec", str(spec), "--records", "0"))
    running.append(sim)
    lobby, dock = sim.lines(2)
    assert lobby.startswith("lobby ") and "serial=LOBBY001" in lobby and "record_size=49" in lobby
    lobby_port = int(lobby.split()[1].removeprefix("port="))
    conn = ZK("127.0.0.1", port=lobby_port, timeout=2, password=99, ommit_ping=True).connect()
    conn.read_sizes()
    assert conn.records == 5
    conn.disconnect()
    dock_port = int(dock.split()[1].removeprefix("port="))

    def dock_records() -> int:
        c = ZK("127.0.0.1", port=dock_port, timeout=2, ommit_ping=True).connect()
        c.read_sizes()
        c.disconnect()
        return int(c.records)

    wait_for(lambda: dock_records() >= 2)  # punch_interval makes punches appear
    assert sim.finish() == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- {host: 0.0.0.0}\n", "--host only"),
        ("- {record_size: 12}\n", "record_size"),
        ("- {colour: red}\n", "unknown key"),
        ("just text\n", "non-empty list"),
        ("- [1, 2]\n", "mapping"),
        ("- {punch_interval: -1}\n", "punch_interval"),
        ("{unclosed\n", "not valid YAML"),
    ],
)
def test_bad_spec_files_are_user_errors(tmp_path: Path, content: str, message: str) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        command.run(parse("--spec", str(spec), "--base-port", "0"), threading.Event(), io.StringIO())


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        command.run(parse("--spec", str(tmp_path / "nope.yaml")), threading.Event(), io.StringIO())


def test_port_in_use_is_a_user_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            command.run(parse("--base-port", str(port)), threading.Event(), io.StringIO())


def test_bad_counts() -> None:
    with pytest.raises(UserError, match="--terminals"):
        command.run(parse("--terminals", "0"), threading.Event(), io.StringIO())
    with pytest.raises(UserError, match="65535"):
        command.run(parse("--terminals", "5", "--base-port", "65534"), threading.Event(), io.StringIO())


def test_default_host_is_loopback(running: list[Running]) -> None:
    sim = Running(parse("--base-port", "0", "--records", "0"))
    running.append(sim)
    (line,) = sim.lines(1)
    assert line.endswith("host=127.0.0.1")
    assert sim.finish() == 0


def test_sigterm_stops_it_in_the_main_thread() -> None:
    out = io.StringIO()
    previous = signal.getsignal(signal.SIGTERM)

    def send_sigterm() -> None:
        wait_for(lambda: "\n" in out.getvalue())  # the handler is installed before the line is printed
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_sigterm, daemon=True)
    sender.start()
    assert command.run(parse("--base-port", "0", "--records", "0"), None, out) == 0
    sender.join(timeout=5)
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored


def test_log_options_reach_the_terminal_spec() -> None:
    args = parse("--records", "10", "--capacity", "50", "--full-log", "rotate", "--offset-reads", "error")
    spec, _ = command._build_spec({}, 0, args)
    assert (spec.records, spec.capacity, spec.overwrite_when_full, spec.offset_reads) == (
        10,
        50,
        True,
        "error",
    )
    spec, _ = command._build_spec({"overwrite_when_full": False, "offset_reads": "ignore"}, 0, args)
    assert (spec.overwrite_when_full, spec.offset_reads) == (False, "ignore")  # a spec file entry wins
    defaults, _ = command._build_spec({}, 0, parse())
    assert (defaults.overwrite_when_full, defaults.offset_reads) == (False, "honour")
    with pytest.raises(UserError, match="offset_reads must be one of"):
        command._build_spec({"offset_reads": "sometimes"}, 0, args)
