"""Shared test fixtures. Kept small: each test file builds what it needs from real objects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from zkdingsync.logs import reset_logging
from zkdingsync.redaction import forget_secrets

# A valid configuration; `{store}` is replaced by a path under the test's tmp_path.
VALID_CONFIG = """\
dingtalk:
  app_key: dingabc123
  app_secret: test-app-secret-0123
store:
  path: {store}
poll:
  interval_seconds: 60
users:
  map:
    "1001": manager4220
devices:
  - name: lobby
    host: 127.0.0.1
    port: 4370
    comm_key: 0
    timezone: Asia/Shanghai
"""


@pytest.fixture
def config_template() -> str:
    """The text of a valid config, with `{store}` to fill in (str.format)."""
    return VALID_CONFIG


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A valid config file in tmp_path whose store lives in tmp_path/state/zkdingsync.db."""
    path = tmp_path / "config.yaml"
    path.write_text(VALID_CONFIG.format(store=tmp_path / "state" / "zkdingsync.db"), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    # A test that runs the CLI configures structlog to write to that test's captured stderr; later tests
    # must not write into a closed capture, nor inherit registered secrets.
    yield
    reset_logging()
    forget_secrets()
