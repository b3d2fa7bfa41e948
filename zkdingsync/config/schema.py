"""The single description of every configuration key.

Validation (`load.py`), the sample file `config.example.yaml` and the README's configuration section
(`docs.py`) are all driven by `SCHEMA`, so a key documented is a key checked, and the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zkdingsync.config import objects


class _Required:
    """Marker for "no default: the key must be given"."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# Scalar kinds and what they accept (checked in load.py):
#   string    non-empty text            integer   int (not bool)        number  int or float (not bool)
#   boolean   true/false                choice    one of `choices`      secret  text, or <name>_file, or
#   host      IP address or RFC 1123    timezone  IANA zone name                 $CREDENTIALS_DIRECTORY
#   url       http(s)://host[:port]     path      file path (relative = to the config file's directory)
#   name      printable text, no spaces at the ends, at most 64 characters
#   time_of_day  "HH:MM", 24-hour
#   date      a calendar day, YYYY-MM-DD
#   user_map  mapping of enroll number (as a terminal reports it) -> DingTalk userid
# Container kinds: section (mapping of `children`), list (sequence of sections described by `children`).
SCALAR_KINDS = frozenset(
    {
        "string",
        "integer",
        "number",
        "boolean",
        "choice",
        "secret",
        "host",
        "timezone",
        "url",
        "path",
        "name",
        "time_of_day",
        "date",
    }
)


@dataclass(frozen=True)
class Key:
    """One configuration key: its type, default, limits, description and sample value."""

    name: str
    kind: str
    description: str
    default: Any = REQUIRED
    example: Any = None  # value shown in config.example.yaml; None = the default
    in_example: bool = False  # written as a live key in config.example.yaml (else commented out)
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None  # value must be strictly greater
    choices: tuple[str, ...] = ()
    children: tuple[Key, ...] = ()
    credential: str | None = None  # secrets: file name under $CREDENTIALS_DIRECTORY
    default_text: str | None = None  # how the docs show a default that is computed
    dataclass: type | None = None  # sections and lists: what they are built into
    min_items: int = 0  # lists
    absent_is_none: bool = False  # sections: left out means None (feature off), not "all defaults"

    @property
    def required(self) -> bool:
        """True when the key has no default and must be present (secrets may come from elsewhere)."""
        return self.default is REQUIRED

    def child(self, name: str) -> Key:
        """Given a child key's name, return its Key. Raise KeyError if this section has no such key."""
        for key in self.children:
            if key.name == name:
                return key
        raise KeyError(name)


_ROBOT = Key(
    "robot",
    "section",
    "Optional DingTalk group robot (custom robot webhook) that receives zkdingsync's alerts. "
    "Leave the section out to send none.",
    default=None,
    absent_is_none=True,
    dataclass=objects.RobotConfig,
    children=(
        Key(
            "access_token",
            "secret",
            "The robot's access_token (from its webhook URL).",
            credential="robot_access_token",
            example="${ZKDINGSYNC_ROBOT_TOKEN}",
        ),
        Key(
            "secret",
            "secret",
            "The robot's signing secret (SEC...), when its security setting is 'sign'.",
            default=None,
            credential="robot_secret",
            example="${ZKDINGSYNC_ROBOT_SECRET}",
        ),
        Key(
            "min_interval_seconds",
            "number",
            "Least time between two robot messages; DingTalk accepts at most 20 a minute per robot.",
            default=3.0,
            minimum=3,
            maximum=86400,
        ),
        Key(
            "terminal_down_minutes",
            "number",
            "Tell the group when a terminal has been unreachable this long (and again when it is back); "
            "0: at its first failed poll.",
            default=10.0,
            minimum=0,
            maximum=10080,
        ),
        Key(
            "daily_report_at",
            "time_of_day",
            'Also send the group one message a day at this time (24-hour "HH:MM", in the configured '
            "timezone) about the day before: punches per terminal, whether all were delivered or how many "
            "wait, parked punches per enroll number, terminals that were down, and the month's DingTalk "
            "calls against the quota. Leave it out for no daily message.",
            default=None,
            example="08:30",
        ),
    ),
)

SCHEMA = Key(
    "",
    "section",
    "zkdingsync configuration",
    dataclass=objects.Config,
    children=(
        Key(
            "dingtalk",
            "section",
            "The DingTalk internal app that receives the punches (attendance upload permission needed).",
            dataclass=objects.DingTalkConfig,
            in_example=True,
            children=(
                Key(
                    "app_key",
                    "string",
                    "AppKey of the DingTalk internal app.",
                    example="dingabc123",
                    in_example=True,
                ),
                Key(
                    "app_secret",
                    "secret",
                    "AppSecret of the app. ${ZKDINGSYNC_APP_SECRET} reads it from that environment variable.",
                    credential="app_secret",
                    example="${ZKDINGSYNC_APP_SECRET}",
                    in_example=True,
                ),
                Key(
                    "api_base",
                    "url",
                    "Base URL of the DingTalk open API (tests point it at a fake server).",
                    default=objects.DEFAULT_API_BASE,
                    in_example=True,
                ),
                Key(
                    "timeout_seconds",
                    "number",
                    "Time limit for one DingTalk HTTP call.",
                    default=10.0,
                    exclusive_minimum=0,
                    maximum=300,
                ),
                Key(
                    "rate_per_second",
                    "number",
                    "Most upload calls per second (DingTalk throttles above 20).",
                    default=10.0,
                    exclusive_minimum=0,
                    maximum=20,
                ),
                Key(
                    "concurrency",
                    "integer",
                    "Most DingTalk calls in flight at once.",
                    default=4,
                    minimum=1,
                    maximum=64,
                ),
                Key(
                    "monthly_call_quota",
                    "integer",
                    "Monthly API call quota of your DingTalk edition (standard: 5000). Uploads are counted "
                    "locally against it so that you are warned (at 80 %) before DingTalk refuses.",
                    default=5000,
                    minimum=1,
                ),
                Key(
                    "readback_delay_seconds",
                    "number",
                    "How long an upload whose outcome is unknown (no answer, or a restart in the middle) "
                    "rests before DingTalk is read back to see whether it arrived; only what is not there "
                    "is sent again.",
                    default=30.0,
                    minimum=0,
                    maximum=3600,
                ),
                _ROBOT,
            ),
        ),
        Key(
            "store",
            "section",
            "The local SQLite store: every punch is kept here before it is delivered.",
            dataclass=objects.StoreConfig,
            default=None,
            in_example=True,
            children=(
                Key(
                    "path",
                    "path",
                    "The database file (a regular file, created if missing; not a device, directory or "
                    "socket). Its directory must be writable (or creatable) by the service user. "
                    "A relative path is relative to the config file's directory.",
                    default=objects.DEFAULT_STORE_PATH,
                    in_example=True,
                ),
            ),
        ),
        Key(
            "poll",
            "section",
            "How the terminals are polled.",
            dataclass=objects.PollConfig,
            default=None,
            in_example=True,
            children=(
                Key(
                    "interval_seconds",
                    "number",
                    "Time between two polls of a terminal.",
                    default=60.0,
                    example=60,
                    minimum=1,
                    maximum=86400,
                    in_example=True,
                ),
                Key(
                    "timeout_seconds",
                    "number",
                    "Time limit for one network exchange with a terminal.",
                    default=10.0,
                    exclusive_minimum=0,
                    maximum=300,
                ),
                Key(
                    "max_concurrency",
                    "integer",
                    "Most terminals polled at the same moment.",
                    default=32,
                    minimum=1,
                    maximum=1024,
                ),
                Key(
                    "max_full_reads",
                    "integer",
                    "Most whole-log downloads at the same moment (a first start, a log cleared or rotated "
                    "beyond the tail search, the hourly check); the other terminals' polls go on meanwhile.",
                    default=2,
                    minimum=1,
                    maximum=64,
                ),
                Key(
                    "backoff_max_seconds",
                    "number",
                    "Longest wait between retries of a terminal that does not answer.",
                    default=600.0,
                    minimum=1,
                    maximum=86400,
                ),
                Key(
                    "future_tolerance_seconds",
                    "number",
                    "A punch stamped further than this in the future is quarantined, not uploaded.",
                    default=600.0,
                    minimum=0,
                    maximum=86400 * 7,
                ),
                Key(
                    "drift_threshold_seconds",
                    "number",
                    "A terminal clock further off than this is reported (and corrected when sync_clock).",
                    default=60.0,
                    minimum=1,
                    maximum=86400,
                ),
            ),
        ),
        Key(
            "users",
            "section",
            "How terminal enroll numbers become DingTalk userids.",
            dataclass=objects.UsersConfig,
            default=None,
            in_example=True,
            children=(
                Key(
                    "map",
                    "user_map",
                    "Terminal enroll number -> DingTalk userid. The key is the enroll number as the "
                    'terminal reports it and `probe --users` shows it, in quotes: digits ("0012" keeps its '
                    'leading zeros) or text ("A-17", "E0012"; at most 24 bytes), or, for an id stored as '
                    'bytes that are not text (GBK firmware), "hex:" and its bytes ("hex:c4e3bac3"). '
                    "Punches of unmapped employees are parked until mapped, then `retry`.",
                    default={},
                    example={"1001": "manager4220"},
                    in_example=True,
                ),
                Key(
                    "match_job_number",
                    "boolean",
                    "Also map an enroll number to the DingTalk user whose job number (工号) equals it.",
                    default=False,
                ),
            ),
        ),
        Key(
            "delivery",
            "section",
            "Which punches are delivered to DingTalk.",
            dataclass=objects.DeliveryConfig,
            default=None,
            children=(
                Key(
                    "since",
                    "date",
                    "Deliver punches recorded from this day on (YYYY-MM-DD, in each terminal's zone). "
                    "Older punches found on a terminal are kept as history, shown by `status` and sent "
                    "only by `zkdingsync backfill`: they may already be in DingTalk, and every upload "
                    "is a metered call. Applies to punches as they are first stored.",
                    default=None,
                    default_text="the day each terminal was first polled",
                    example="2026-11-01",
                ),
            ),
        ),
        Key(
            "devices",
            "list",
            "The terminals, one entry each.",
            dataclass=objects.DeviceConfig,
            min_items=1,
            in_example=True,
            children=(
                Key(
                    "name",
                    "name",
                    "Unique name of the terminal (shown in logs, status and to HR as the device name).",
                    example="lobby",
                    in_example=True,
                ),
                Key(
                    "host",
                    "host",
                    "IP address or host name of the terminal.",
                    example="192.168.1.201",
                    in_example=True,
                ),
                Key(
                    "port",
                    "integer",
                    "Port of the terminal.",
                    default=4370,
                    minimum=1,
                    maximum=65535,
                    in_example=True,
                ),
                Key(
                    "comm_key",
                    "integer",
                    "Communication key (password) set on the terminal, 0 for none.",
                    default=0,
                    minimum=0,
                    maximum=999999,
                    in_example=True,
                ),
                Key(
                    "timezone",
                    "timezone",
                    "IANA time zone of the terminal's clock.",
                    default=None,
                    default_text="the top-level timezone",
                    example="Asia/Shanghai",
                    in_example=True,
                ),
                Key(
                    "protocol",
                    "choice",
                    "Transport the terminal speaks.",
                    default="tcp",
                    choices=("tcp", "udp"),
                ),
                Key(
                    "sync_clock",
                    "boolean",
                    "Set the terminal's clock from this machine when it drifts beyond "
                    "poll.drift_threshold_seconds.",
                    default=False,
                ),
            ),
        ),
        Key(
            "log",
            "section",
            "Logging (always to standard error; journald adds its own timestamps).",
            dataclass=objects.LogConfig,
            default=None,
            children=(
                Key(
                    "level",
                    "choice",
                    "Least important level logged (the -v and -q options override it).",
                    default="info",
                    choices=("debug", "info", "warning", "error"),
                ),
                Key(
                    "format",
                    "choice",
                    "auto: console on a terminal, key=value otherwise; or console, json, keyvalue.",
                    default="auto",
                    choices=("auto", "console", "json", "keyvalue"),
                ),
            ),
        ),
        Key(
            "timezone",
            "timezone",
            "Default IANA time zone for devices that set none.",
            default=objects.DEFAULT_TIMEZONE,
        ),
    ),
)


def iter_keys(key: Key = SCHEMA, prefix: str = "") -> list[tuple[str, Key]]:
    """Given a section, return (dotted path, Key) for it and every key below it, in schema order.

    List items are written `devices[].name`.
    """
    found: list[tuple[str, Key]] = []
    for child in key.children:
        path = f"{prefix}{child.name}"
        found.append((path, child))
        if child.kind == "section":
            found.extend(iter_keys(child, path + "."))
        elif child.kind == "list":
            found.extend(iter_keys(child, path + "[]."))
    return found
