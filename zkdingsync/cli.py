"""The command line: parse the arguments, call the library, turn user errors into one line each.

Exit codes: 0 success, 1 user error or internal error (the traceback is logged), 2 usage error,
78 invalid configuration (EX_CONFIG), 130 interrupted.

Every command has a handler `cmd_<name>(args) -> int`. Options common to all commands (`-c`, `-v`,
`-q`, `--log-format`) are accepted before and after the command name.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import structlog

from zkdingsync import __version__
from zkdingsync.config import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH, Config, load_config
from zkdingsync.config.schema import iter_keys
from zkdingsync.errors import ConfigError, UserError
from zkdingsync.history import parse_day
from zkdingsync.logs import FORMATS, configure_logging, journal_prefix
from zkdingsync.simulator.command import add_arguments as add_simulate_arguments

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h; systemd's RestartPreventExitStatus can name it
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]


# --- command handlers --------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT."""
    from zkdingsync.service import run_daemon

    # A store that cannot be opened now (read-only or full disk, directory not there yet) is not a config
    # error: exit 1 and let systemd restart the daemon until the disk is usable again, never 78.
    return run_daemon(config_path(args), load_settings(args, check_store=False))


def cmd_validate(args: argparse.Namespace) -> int:
    """Check the configuration; print a one-line summary on stdout. ConfigError (exit 78) otherwise."""
    config = load_settings(args)
    print(summarize(config))
    for warning in advise(config):
        _complain(f"zkdingsync: warning: {warning}", "warning")
    return EXIT_OK


def advise(config: Config) -> list[str]:
    """Given a valid Config, return what is allowed but probably not meant (printed by `validate`)."""
    warnings = []
    examples = {path: key.example for path, key in iter_keys()}
    if config.dingtalk.app_key == examples["dingtalk.app_key"]:
        warnings.append(f"dingtalk.app_key is still the example's {config.dingtalk.app_key!r}")
    sample_host = examples["devices[].host"]
    for device in config.devices:
        if device.host == sample_host:
            warnings.append(f"terminal {device.name} still has the example's host {sample_host}")
    if dict(config.users.map) == examples["users.map"]:
        warnings.append("users.map is still the example's")
    if not config.users.map and not config.users.match_job_number:
        warnings.append(
            "users.map is empty and users.match_job_number is off: every punch will be parked until "
            "employees are mapped to DingTalk users"
        )
    return warnings


def cmd_reload(args: argparse.Namespace) -> int:
    """Signal the daemon to re-read its configuration; exit 0 once applied, 78 when it was rejected."""
    from zkdingsync.reload import RUNTIME_ENV_VAR, answer_path, request_reload

    path = answer_path()
    if path is None:
        raise UserError(
            f"${RUNTIME_ENV_VAR} is not set: the daemon answers reloads only under systemd "
            "(use `systemctl reload zkdingsync`)"
        )
    print(request_reload(args.pid, path, timeout_seconds=args.timeout))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Show per-terminal and per-delivery-state figures from the store."""
    from zkdingsync.status import status_command

    return status_command(load_settings(args, require_secrets=False, check_store=False), as_json=args.json)


def cmd_probe(args: argparse.Namespace) -> int:
    """Connect to terminals and report serial, firmware, clock drift, records and capacity."""
    from zkdingsync.probe import probe

    config = load_settings(args, require_secrets=False, check_store=False)
    if args.budget:
        from zkdingsync.probe_budget import probe_budget

        return probe_budget(config, args.names)
    return probe(config, args.names, users=config.users.map if args.users else None)


def cmd_retry(args: argparse.Namespace) -> int:
    """Put parked punches back in the delivery queue."""
    from zkdingsync.retry import retry_command

    return retry_command(
        load_settings(args, require_secrets=False, check_store=False),
        reason=args.reason,
        device=args.device,
        include_quarantined=args.quarantined,
    )


def cmd_export(args: argparse.Namespace) -> int:
    """Write every stored punch of a window of days, with its delivery state, as CSV or XLSX."""
    from zkdingsync.export.command import export_command

    return export_command(
        load_settings(args, require_secrets=False, check_store=False),
        first_day=args.first_day,
        last_day=args.last_day,
        devices=args.device or (),
        enroll_numbers=args.enroll or (),
        fmt=args.format,
        output=Path(args.output) if args.output and args.output != "-" else None,
    )


def cmd_backup(args: argparse.Namespace) -> int:
    """Make a consistent, integrity-checked copy of the store."""
    from zkdingsync.backup import backup_command

    return backup_command(
        load_settings(args, require_secrets=False, check_store=False), args.dest, keep=args.keep
    )


def cmd_backfill(args: argparse.Namespace) -> int:
    """Queue never-delivered history punches of a window of days, within this month's DingTalk calls."""
    from zkdingsync.backfill import BackfillRequest, backfill_command

    request = BackfillRequest(
        since=args.since,
        until=args.until,
        devices=tuple(args.device or ()),
        dry_run=args.dry_run,
        yes=args.yes,
    )
    return backfill_command(load_settings(args, require_secrets=False, check_store=False), request)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run fake terminals on 127.0.0.1 until interrupted."""
    from zkdingsync.simulator.command import run

    configure_logging(level=_cli_level(args) or "info", fmt=args.log_format or "auto")
    return run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run simulated terminals, a fake DingTalk and the daemon on this machine; show the final status."""
    from zkdingsync.demo import run_demo

    configure_logging(level=_cli_level(args) or "info", fmt=args.log_format or "auto")
    return run_demo(seconds=args.seconds, log_format=args.log_format)


# --- helpers for handlers ----------------------------------------------------------------------------


def config_path(args: argparse.Namespace) -> Path:
    """Given parsed arguments, return the config file path: -c, else $ZKDINGSYNC_CONFIG, else the default."""
    if getattr(args, "config", None):
        return Path(args.config)
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def load_settings(
    args: argparse.Namespace, *, require_secrets: bool = True, check_store: bool = True
) -> Config:
    """Given parsed arguments, load the config and re-apply logging with its level and format.

    The -v/-q and --log-format options win over the config's `log` section. Commands that never call
    DingTalk (status, retry, probe) pass `require_secrets=False`, so that an admin can run them without
    the service's secrets at hand. `check_store=False` leaves the store's directory to the command
    (see `load_config`). Raise ConfigError.
    """
    config = load_config(config_path(args), require_secrets=require_secrets, check_store=check_store)
    level = _cli_level(args) or config.log.level
    fmt = args.log_format or config.log.format
    configure_logging(level=level, fmt=fmt)
    return config


def summarize(config: Config) -> str:
    """Given a Config, return the one-line summary `validate` prints."""
    terminals = len(config.devices)
    employees = len(config.users.map)
    return (
        f"{terminals} terminal{'s' if terminals != 1 else ''}, "
        f"{employees} mapped employee{'s' if employees != 1 else ''}, "
        f"store {config.store.path}"
    )


def _complain(line: str, level: str = "error") -> None:
    """Print one line for the user on stderr, at `level` in the journal when stderr is the journal (the
    reasons `run` stops must show in `journalctl -p warning`)."""
    print(f"{journal_prefix(level)}{line}", file=sys.stderr)


def _cli_level(args: argparse.Namespace) -> str | None:
    verbose = getattr(args, "verbose", 0) or 0
    quiet = getattr(args, "quiet", 0) or 0
    if verbose > quiet:
        return "debug"
    if quiet - verbose == 1:
        return "warning"
    if quiet - verbose >= 2:
        return "error"
    return None


# --- the parser ---------------------------------------------------------------------------------------


def _common_options(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    # On the subcommands the defaults are SUPPRESS, so that an option given before the command name is
    # not overwritten by the subcommand's default.
    def default(value: object) -> object:
        return value if top_level else argparse.SUPPRESS

    parser.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        default=default(None),
        help=f"configuration file (default: ${CONFIG_ENV_VAR}, else {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=default(0), help="log more (debug); overrides log.level"
    )
    parser.add_argument(
        "-q", "--quiet", action="count", default=default(0), help="log less (-q warning, -qq error)"
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=default(None),
        help="log output: auto (console on a terminal, key=value otherwise), console, json, keyvalue",
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def _day(text: str) -> date:
    try:
        return parse_day(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _reload_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--pid", type=int, required=True, help="the daemon's process id ($MAINPID)")
    sub.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the answer (default 60)",
    )


def _status_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def _probe_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("names", nargs="*", metavar="NAME", help="configured terminal names (default: all)")
    sub.add_argument(
        "--users",
        action="store_true",
        help="also list each terminal's enrolled users and the DingTalk userid users.map gives them",
    )
    sub.add_argument(
        "--budget",
        action="store_true",
        help="punches per day per terminal over the last 30 days (from the store, else from the terminals), "
        "the monthly DingTalk calls that implies and the edition that covers it",
    )


def _retry_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--reason", metavar="TEXT", help="only punches parked for a reason containing TEXT")
    sub.add_argument("--device", metavar="NAME", help="only punches from this terminal")
    sub.add_argument(
        "--quarantined",
        action="store_true",
        help="also re-queue quarantined punches (suspect times) that have a valid time",
    )


def _export_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--from", dest="first_day", required=True, metavar="DATE", help="first day, YYYY-MM-DD")
    sub.add_argument("--to", dest="last_day", required=True, metavar="DATE", help="last day, YYYY-MM-DD")
    sub.add_argument("--device", action="append", metavar="NAME", help="only this terminal (repeat for more)")
    sub.add_argument(
        "--enroll", action="append", metavar="NUMBER", help="only this enroll number (repeat for more)"
    )
    sub.add_argument(
        "--format", choices=("csv", "xlsx"), help="csv or xlsx (default: from -o's suffix, else csv)"
    )
    sub.add_argument("-o", "--output", metavar="FILE", help="write to FILE (mode 0600) instead of stdout")


def _backup_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("dest", metavar="DEST", help="the copy's file name, or a directory")
    sub.add_argument(
        "--keep",
        type=int,
        metavar="N",
        help="with a directory: keep only the newest N dated copies there",
    )


def _backfill_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--since", type=_day, required=True, metavar="DATE", help="first day, YYYY-MM-DD")
    sub.add_argument("--until", type=_day, metavar="DATE", help="last day, YYYY-MM-DD (default: no end)")
    sub.add_argument("--device", action="append", metavar="NAME", help="only this terminal (repeat for more)")
    sub.add_argument("--dry-run", action="store_true", help="say what it would queue; change nothing")
    sub.add_argument("--yes", action="store_true", help="queue even beyond the calls left this month")


def _demo_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--seconds",
        type=_positive_float,
        default=20.0,
        help="how long to run before the final status (default 20)",
    )


def _no_arguments(sub: argparse.ArgumentParser) -> None:
    del sub  # the command takes only the common options


@dataclass(frozen=True)
class _Command:
    """One command of the table: its name, help texts and the function adding its arguments.

    The handler is `cmd_<name>`, looked up when the parser is built (so a test may replace it).
    """

    name: str
    summary: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments


# The order here is the order of `zkdingsync --help`.
_COMMANDS: tuple[_Command, ...] = (
    _Command(
        "run",
        "run the daemon in the foreground",
        "Poll every terminal, store every punch, deliver to DingTalk; until SIGTERM or SIGINT (exit 0).",
    ),
    _Command(
        "validate",
        "check the configuration",
        "Check the configuration file. Exit 0 and print a summary when valid; otherwise print every "
        "problem with its line and key on stderr and exit 78.",
    ),
    _Command(
        "reload",
        "make the running daemon re-read its configuration",
        "Send SIGHUP to the daemon and wait for its answer: exit 0 when the new configuration is applied, "
        "78 with its problems when the daemon rejected it and kept the previous one. The unit's ExecReload= "
        "runs it, so that `systemctl reload zkdingsync` reports a broken file.",
        _reload_arguments,
    ),
    _Command(
        "status",
        "show terminals and delivery states",
        "Show each terminal and how many punches are in each delivery state, read from the store "
        "(works while the daemon runs).",
        _status_arguments,
    ),
    _Command(
        "probe",
        "connect to terminals and report what they say",
        "Connect to terminals and report serial number, firmware, clock drift, record count and capacity.",
        _probe_arguments,
    ),
    _Command(
        "retry",
        "put parked punches back in the delivery queue",
        "Put parked punches back in the delivery queue (after fixing a user mapping, say). Works whether "
        "or not the daemon is running.",
        _retry_arguments,
    ),
    _Command(
        "export",
        "write the stored punches of some days as CSV or XLSX",
        "Write every stored punch from --from to --to (terminal-local days, both included), whatever its "
        "delivery state, with when it was stored and delivered and DingTalk's request or record id. "
        "CSV (UTF-8 with BOM) goes to stdout unless -o names a file. Works while the daemon runs.",
        _export_arguments,
    ),
    _Command(
        "backup",
        "make a consistent copy of the store",
        "Copy the store through SQLite's backup API (also while the daemon runs), check the copy with "
        "integrity_check and print its size and punch counts. DEST is a file, or a directory where the "
        "copy is named by the date.",
        _backup_arguments,
    ),
    _Command(
        "backfill",
        "queue history punches of a window of days",
        "Queue never-delivered history punches (recorded before a terminal was first polled, or before "
        "delivery.since) of a window of days, read in each terminal's zone. Prints the uploads that costs "
        "and the DingTalk calls left this month; refuses (exit 1) beyond the calls left unless --yes. "
        "Works whether or not the daemon is running.",
        _backfill_arguments,
    ),
    _Command(
        "simulate",
        "run fake terminals on 127.0.0.1",
        "Run fake terminals on 127.0.0.1 until interrupted; terminal i listens on BASE_PORT+i (TCP and UDP).",
        add_simulate_arguments,
    ),
    _Command(
        "demo",
        "run everything on this machine and show the result",
        "Start simulated terminals, a local fake DingTalk and the daemon; after a while print the status.",
        _demo_arguments,
    ),
)


def _handler(name: str) -> Handler:
    handler: Handler = globals()[f"cmd_{name}"]
    return handler


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every command."""
    parser = argparse.ArgumentParser(
        prog="zkdingsync",
        description="Deliver every punch from ZKTeco-protocol time clocks to DingTalk attendance, "
        "exactly once.",
    )
    parser.add_argument("--version", action="version", version=f"zkdingsync {__version__}")
    _common_options(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for spec in _COMMANDS:
        sub = commands.add_parser(spec.name, help=spec.summary, description=spec.description)
        _common_options(sub, top_level=False)
        sub.set_defaults(handler=_handler(spec.name))
        spec.add_arguments(sub)
    return parser


# --- entry point --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: sys.argv[1:]); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version and usage errors
        code = exit_request.code
        return code if isinstance(code, int) else EXIT_USAGE
    try:
        configure_logging(level=_cli_level(args) or "info", fmt=args.log_format or "auto")
        handler: Handler = args.handler
        return handler(args)
    except ConfigError as error:
        for problem in error.problems:
            _complain(problem)
        count = len(error.problems)
        _complain(f"zkdingsync: invalid configuration ({count} problem{'s' if count != 1 else ''})")
        return EXIT_CONFIG
    except UserError as error:
        for line in str(error).splitlines() or [type(error).__name__]:
            _complain(f"zkdingsync: {line}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("zkdingsync: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # the program's outer edge
        # Anything not foreseen is a bug: log its traceback and exit 1.
        log.exception("internal error: this is a bug in zkdingsync, please report it with this traceback")
        return EXIT_FAILURE
