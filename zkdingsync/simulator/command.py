"""`zkdingsync simulate`: run fake terminals until interrupted.

Terminal i listens on base port + i (TCP and UDP) and one line per terminal is printed on stdout:
`NAME port=PORT serial=SERIAL ...`. Terminals bind 127.0.0.1 unless `--host` names another address.
A `--spec` YAML file (a list of terminals, or a mapping with a `terminals` list) describes terminals
one by one; each entry takes the TerminalSpec fields plus `punch_interval` (the log's size is
`capacity`; `overwrite_when_full: true` makes a full log rotate; `offset_reads` mimics firmware that
cannot read a buffer from an offset).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

from zkdingsync.devices.records import RECORD_SIZES, USER_TABLE_SIZES
from zkdingsync.errors import UserError
from zkdingsync.simulator.server import Simulator
from zkdingsync.simulator.spec import (
    FULL_LOG_REFUSE,
    FULL_LOG_ROTATE,
    OFFSET_HONOURED,
    OFFSET_READS,
    TerminalSpec,
    history_start,
)

LOOPBACK = "127.0.0.1"
_SPEC_FIELDS = {f.name for f in fields(TerminalSpec)}
_EXTRA_FIELDS = {"punch_interval"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `simulate` options to `parser`."""
    parser.add_argument(
        "--terminals", type=int, default=1, metavar="N", help="number of terminals (default 1)"
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=4370,
        metavar="P",
        help="terminal i listens on P+i (default 4370; 0: any free ports)",
    )
    parser.add_argument("--users", type=int, default=10, metavar="U", help="users per terminal (default 10)")
    parser.add_argument(
        "--records",
        type=int,
        default=100,
        metavar="R",
        help="punches each terminal starts with (default 100)",
    )
    parser.add_argument(
        "--record-size",
        type=int,
        choices=RECORD_SIZES,
        default=40,
        help="attendance record layout (default 40)",
    )
    parser.add_argument(
        "--user-table-size",
        type=int,
        choices=USER_TABLE_SIZES,
        default=None,
        help="user table layout (default 28 for record sizes 8 and 16, else 72)",
    )
    _add_log_arguments(parser)
    parser.add_argument("--comm-key", type=int, default=0, help="comm key (default 0: none)")
    parser.add_argument(
        "--timezone", default="Asia/Shanghai", help="the terminals' clock zone (default Asia/Shanghai)"
    )
    parser.add_argument(
        "--host",
        default=None,
        help=f"address to bind (default {LOOPBACK}; anything else only when given here explicitly)",
    )
    parser.add_argument("--spec", type=Path, default=None, metavar="FILE", help="YAML list of terminals")
    parser.add_argument(
        "--punch-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="each terminal records a punch this often (default 0: never)",
    )


def _add_log_arguments(parser: argparse.ArgumentParser) -> None:
    """The options about each terminal's log: capacity, what a full log does, offset reads."""
    parser.add_argument("--capacity", type=int, default=100_000, help="record capacity (default 100000)")
    parser.add_argument(
        "--full-log",
        choices=(FULL_LOG_REFUSE, FULL_LOG_ROTATE),
        default=FULL_LOG_REFUSE,
        help="what a full log does with a new punch: refuse it, or rotate (drop the oldest) (default refuse)",
    )
    parser.add_argument(
        "--offset-reads",
        choices=OFFSET_READS,
        default=OFFSET_HONOURED,
        help="how buffered reads treat a start offset: honour it, ignore it (read from 0), send the whole "
        "buffer, or answer an error (firmware without tail reads) (default honour)",
    )


def run(args: argparse.Namespace, stop: threading.Event | None = None, out: TextIO | None = None) -> int:
    """Run the terminals described by `args` until SIGINT/SIGTERM (main thread only) or `stop` is set;
    return 0. Raise UserError for bad options, a bad spec file, or a port that cannot be bound."""
    out = out or sys.stdout
    stop = stop or threading.Event()
    host = args.host or LOOPBACK
    entries = _load_spec(args.spec) if args.spec else _entries_from_options(args)
    with Simulator(host) as sim, _stop_on_signals(stop):
        for index, entry in enumerate(entries):
            spec, punch_interval = _build_spec(entry, index, args)
            try:
                terminal = sim.add_terminal(spec)
            except OSError as error:
                raise UserError(f"cannot listen on {host}:{spec.port}: {error.strerror or error}") from error
            if punch_interval > 0:
                terminal.punch_every(punch_interval)
            # The command's own output (other programs read the ports from it), not a log event.
            out.write(
                f"{spec.name} port={terminal.port} serial={terminal.serial} records={terminal.record_count} "
                f"record_size={spec.record_size} users={len(terminal.users)} host={host}\n"
            )
            out.flush()
        stop.wait()
    return 0


def _entries_from_options(args: argparse.Namespace) -> list[dict[str, Any]]:
    if not 1 <= args.terminals <= 10_000:
        raise UserError(f"--terminals must be between 1 and 10000, not {args.terminals}")
    if args.base_port < 0 or args.base_port + args.terminals - 1 > 65535:
        raise UserError(
            f"--base-port {args.base_port} with {args.terminals} terminals goes beyond port 65535"
        )
    return [{} for _ in range(args.terminals)]


def _load_spec(path: Path) -> list[dict[str, Any]]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"{path}: cannot read: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML: {error}") from error
    if isinstance(document, Mapping) and "terminals" in document:
        document = document["terminals"]
    if not isinstance(document, list) or not document:
        raise UserError(f"{path}: expected a non-empty list of terminals")
    entries: list[dict[str, Any]] = []
    for index, entry in enumerate(document):
        if not isinstance(entry, Mapping):
            raise UserError(f"{path}: terminals[{index}]: expected a mapping of terminal settings")
        unknown = set(entry) - _SPEC_FIELDS - _EXTRA_FIELDS
        if unknown:
            hint = " (the address is set with --host only)" if "host" in unknown else ""
            raise UserError(
                f"{path}: terminals[{index}]: unknown key(s) {', '.join(sorted(map(str, unknown)))}{hint}"
            )
        entries.append({**entry, "_where": f"{path}: terminals[{index}]"})
    return entries


def _build_spec(entry: Mapping[str, Any], index: int, args: argparse.Namespace) -> tuple[TerminalSpec, float]:
    """Combine one spec entry with the command-line defaults."""
    where = entry.get("_where", f"terminal {index}")
    record_size = entry.get("record_size", args.record_size)
    default_table = args.user_table_size or (28 if record_size in (8, 16) else 72)
    port = entry.get("port", args.base_port + index if args.base_port else 0)
    values: dict[str, Any] = {
        "name": f"sim-{index + 1}",
        # Serials follow the port, so a restarted simulator shows the same terminals again.
        "serial": f"SIM{port:05d}" if isinstance(port, int) and port else f"SIMX{index + 1:04d}",
        "record_size": record_size,
        "user_table_size": default_table,
        "users": args.users,
        "records": args.records,
        "comm_key": args.comm_key,
        "capacity": max(args.capacity, args.records),
        "overwrite_when_full": args.full_log == FULL_LOG_ROTATE,
        "offset_reads": args.offset_reads,
        "timezone": args.timezone,
        "port": port,
    }
    # Punches that end now rather than in 2024, so that a daemon pointed at the simulator delivers them.
    values["first_punch"] = history_start(
        int(entry.get("records", args.records) or 0), entry.get("timezone", args.timezone)
    )
    values.update({key: value for key, value in entry.items() if key in _SPEC_FIELDS})
    if "capacity" not in entry:
        values["capacity"] = max(values["capacity"], values["records"])
    try:
        spec = TerminalSpec(**values)
    except (TypeError, ValueError, KeyError) as error:
        raise UserError(f"{where}: {error}") from error
    punch_interval = entry.get("punch_interval", args.punch_interval)
    if not isinstance(punch_interval, (int, float)) or punch_interval < 0:
        raise UserError(f"{where}: punch_interval must be a number of seconds >= 0")
    return spec, float(punch_interval)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM set `stop` (only possible in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
