"""The validated configuration: frozen dataclasses handed to every other module.

Field names match the YAML keys one to one (see `schema.py`, the single description of every key).
Secrets are kept out of `repr()` so that a logged or printed Config never shows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import MappingProxyType
from zoneinfo import ZoneInfo

DEFAULT_TIMEZONE = "Asia/Shanghai"
DEFAULT_STORE_PATH = Path("/var/lib/zkdingsync/zkdingsync.db")
DEFAULT_API_BASE = "https://oapi.dingtalk.com"


@dataclass(frozen=True)
class RobotConfig:
    """An optional DingTalk group robot that receives alerts (terminal down, quota, parked punches)."""

    access_token: str = field(repr=False)
    secret: str | None = field(default=None, repr=False)
    min_interval_seconds: float = 3.0
    terminal_down_minutes: float = 10.0
    daily_report_at: str | None = None  # "HH:MM" in the configured timezone: the daily report's time


@dataclass(frozen=True)
class DingTalkConfig:
    """How to reach DingTalk and how hard to push it."""

    app_key: str
    app_secret: str = field(repr=False)
    api_base: str = DEFAULT_API_BASE
    timeout_seconds: float = 10.0
    rate_per_second: float = 10.0
    concurrency: int = 4
    monthly_call_quota: int = 5000
    readback_delay_seconds: float = 30.0
    robot: RobotConfig | None = None


@dataclass(frozen=True)
class StoreConfig:
    """Where the SQLite store lives (an absolute path once loaded)."""

    path: Path = DEFAULT_STORE_PATH


@dataclass(frozen=True)
class PollConfig:
    """How terminals are polled."""

    interval_seconds: float = 60.0
    timeout_seconds: float = 10.0
    max_concurrency: int = 32
    max_full_reads: int = 2
    backoff_max_seconds: float = 600.0
    future_tolerance_seconds: float = 600.0
    drift_threshold_seconds: float = 60.0


def _empty_map() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class UsersConfig:
    """Who is who: terminal enroll number -> DingTalk userid (read-only mapping)."""

    map: Mapping[str, str] = field(default_factory=_empty_map)
    match_job_number: bool = False


@dataclass(frozen=True)
class DeliveryConfig:
    """Which punches are delivered: those recorded from `since` on (None: from each terminal's first poll)."""

    since: date | None = None


@dataclass(frozen=True)
class DeviceConfig:
    """One terminal."""

    name: str
    host: str
    port: int = 4370
    comm_key: int = field(default=0, repr=False)
    timezone: str = DEFAULT_TIMEZONE
    protocol: str = "tcp"
    sync_clock: bool = False

    @property
    def zone(self) -> ZoneInfo:
        """The terminal's clock zone as a ZoneInfo (validated at load time, so this cannot fail then)."""
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class LogConfig:
    """Log level and output format."""

    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration, as `load_config` returns it."""

    dingtalk: DingTalkConfig
    devices: tuple[DeviceConfig, ...]
    store: StoreConfig = field(default_factory=StoreConfig)
    poll: PollConfig = field(default_factory=PollConfig)
    users: UsersConfig = field(default_factory=UsersConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    timezone: str = DEFAULT_TIMEZONE
    source: Path | None = None  # the file it was loaded from

    def device(self, name: str) -> DeviceConfig:
        """Given a configured terminal name, return its DeviceConfig. Raise KeyError if there is none."""
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(name)
