"""config.example.yaml and the README's configuration table are generated from the schema: they must not
drift from it, and the example must be a valid configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zkdingsync.cli import main
from zkdingsync.config import load_config, store_problem
from zkdingsync.config.docs import (
    README_END,
    README_START,
    render_example,
    render_readme_section,
    replace_readme_section,
)
from zkdingsync.config.docs import main as docs_main
from zkdingsync.config.schema import iter_keys

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.yaml"
README = ROOT / "README.md"


def test_example_matches_the_schema() -> None:
    assert EXAMPLE.read_text(encoding="utf-8") == render_example(), "run `make docs`"


def test_readme_section_matches_the_schema() -> None:
    readme = README.read_text(encoding="utf-8")
    assert readme == replace_readme_section(readme, render_readme_section()), "run `make docs`"
    assert readme.count(README_START) == 1
    assert readme.count(README_END) == 1


def test_every_key_is_documented() -> None:
    example = render_example()
    section = render_readme_section()
    for path, key in iter_keys():
        # As a live key or commented out ("# key:"), at the start of a line or of a list item.
        assert re.search(rf"^[ #-]*{key.name}:", example, re.MULTILINE), path
        assert f"| `{path}` |" in section, path


def test_docs_check_reports_drift(tmp_path: Path) -> None:
    shutil.copy(README, tmp_path / "README.md")
    shutil.copy(EXAMPLE, tmp_path / "config.example.yaml")
    assert docs_main(["--check", "--root", str(tmp_path)]) == 0
    (tmp_path / "config.example.yaml").write_text("# edited by hand\n", encoding="utf-8")
    assert docs_main(["--check", "--root", str(tmp_path)]) == 1
    assert docs_main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "config.example.yaml").read_text(encoding="utf-8") == render_example()


def test_replace_needs_markers() -> None:
    with pytest.raises(ValueError, match="markers"):
        replace_readme_section("# no markers\n", "x")


def test_example_validates_with_the_secret_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.example.yaml"
    shutil.copy(EXAMPLE, path)
    monkeypatch.setenv("ZKDINGSYNC_APP_SECRET", "example-secret")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    code = main(["validate", "-c", str(path)])
    out, err = capsys.readouterr()
    default_store = Path("/var/lib/zkdingsync/zkdingsync.db")
    if store_problem(default_store) is None:  # root (CI) can create /var/lib/zkdingsync
        assert code == 0, err
        assert out == f"1 terminal, 1 mapped employee, store {default_store}\n"
    else:  # an unprivileged developer: that must be the only complaint
        assert code == 78
        assert [line for line in err.splitlines() if ": " in line and not line.startswith("zkdingsync")] == [
            f"{path}:{_line_of(path, 'path:')}: store.path: {store_problem(default_store)}"
        ]
    assert not default_store.parent.exists() or default_store.parent.is_dir()


def _line_of(path: Path, text: str) -> int:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip().startswith(text):
            return number
    raise AssertionError(text)


def test_example_holds_the_product_example_values(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(render_example().replace("/var/lib/zkdingsync/zkdingsync.db", str(tmp_path / "zk.db")))
    config = load_config(path, environ={"ZKDINGSYNC_APP_SECRET": "x-secret"})
    assert config.dingtalk.app_key == "dingabc123"
    assert config.dingtalk.api_base == "https://oapi.dingtalk.com"
    assert config.poll.interval_seconds == 60
    assert dict(config.users.map) == {"1001": "manager4220"}
    device = config.devices[0]
    assert (device.name, device.host, device.port, device.comm_key, device.timezone) == (
        "lobby",
        "192.168.1.201",
        4370,
        0,
        "Asia/Shanghai",
    )


def test_docs_module_runs_as_a_program(tmp_path: Path) -> None:
    shutil.copy(README, tmp_path / "README.md")
    shutil.copy(EXAMPLE, tmp_path / "config.example.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "zkdingsync.config.docs", "--check", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
