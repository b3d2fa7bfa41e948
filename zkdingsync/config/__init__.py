"""The configuration: one schema (`schema.py`), a loader that checks everything (`load.py`), and the
frozen objects the rest of the program reads (`objects.py`).

    config = load_config(Path("/etc/zkdingsync/config.yaml"))   # raises ConfigError with every problem
"""

from zkdingsync.config.load import load_config, store_problem
from zkdingsync.config.objects import (
    Config,
    DeliveryConfig,
    DeviceConfig,
    DingTalkConfig,
    LogConfig,
    PollConfig,
    RobotConfig,
    StoreConfig,
    UsersConfig,
)
from zkdingsync.hosts import check_host

DEFAULT_CONFIG_PATH = "/etc/zkdingsync/config.yaml"
CONFIG_ENV_VAR = "ZKDINGSYNC_CONFIG"

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "Config",
    "DeliveryConfig",
    "DeviceConfig",
    "DingTalkConfig",
    "LogConfig",
    "PollConfig",
    "RobotConfig",
    "StoreConfig",
    "UsersConfig",
    "check_host",
    "load_config",
    "store_problem",
]
