"""Shared pytest fixtures and helpers for tests that need fake terminals.

Use from a test module:

    from fixtures_simulator import simulator_fixture, terminals_fixture, wait_for  # noqa: F401

    def test_poll(terminals):
        gate = terminals(serial="GATE0001", record_size=40, users=5, records=100)
        ...   # gate.port on 127.0.0.1, TCP and UDP

The fixtures are named `simulator` and `terminals` (the `_fixture` function names keep linters from
seeing test parameters as redefinitions). `simulator` is one `Simulator` for the whole session;
`terminals(**spec_fields)` adds terminals that are removed again when the test ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from zkdingsync.simulator import FakeTerminal, Simulator, TerminalSpec


@pytest.fixture(scope="session", name="simulator")
def simulator_fixture() -> Iterator[Simulator]:
    """One simulator (event loop thread) shared by every test of the session."""
    with Simulator() as sim:
        yield sim


@pytest.fixture(name="terminals")
def terminals_fixture(simulator: Simulator) -> Iterator[Callable[..., FakeTerminal]]:
    """A factory: `terminals(**TerminalSpec fields)` starts a terminal; all are stopped after the test."""
    started: list[FakeTerminal] = []

    def start(spec: TerminalSpec | None = None, **changes: Any) -> FakeTerminal:
        terminal = simulator.add_terminal(spec, **changes)
        started.append(terminal)
        return terminal

    yield start
    for terminal in started:
        simulator.remove_terminal(terminal)


def wait_for(condition: Callable[[], Any], timeout: float = 5.0, interval: float = 0.005) -> Any:
    """Poll `condition` until it returns something truthy (returned) or `timeout` seconds pass
    (AssertionError). For conditions changed by another thread, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
