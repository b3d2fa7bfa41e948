"""Many fake terminals in one process: one asyncio event loop in a background thread, a sync API on top.

with Simulator() as sim:
    gate = sim.add_terminal(TerminalSpec(serial="GATE0001", record_size=40, users=5, records=100))
    ZK("127.0.0.1", port=gate.port, ommit_ping=True).connect()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import replace
from types import TracebackType
from typing import Any, TypeVar

import structlog

from zkdingsync.simulator.spec import TerminalSpec
from zkdingsync.simulator.terminal import FakeTerminal

log = structlog.get_logger(__name__)

T = TypeVar("T")

CONTROL_TIMEOUT_SECONDS = 30.0


class Simulator:
    """A set of fake terminals served by one event loop thread. Use as a context manager, or call
    `start()` and `close()`. Terminals bind `host` (loopback by default)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._terminals: list[FakeTerminal] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    @property
    def terminals(self) -> list[FakeTerminal]:
        """The terminals added so far, in order."""
        with self._lock:
            return list(self._terminals)

    def start(self) -> Simulator:
        """Start the event loop thread (idempotent); return self."""
        if self._thread is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._loop = loop
            self._thread = threading.Thread(target=run, name="zk-simulator", daemon=True)
            self._thread.start()
            ready.wait()
        return self

    def add_terminal(self, spec: TerminalSpec | None = None, **changes: Any) -> FakeTerminal:
        """Given a spec (and/or TerminalSpec fields as keywords), start a terminal listening on its port
        (TCP and UDP) and return it. Raise OSError if the port cannot be bound."""
        spec = replace(spec or TerminalSpec(), **changes)
        loop = self._require_loop()
        terminal = FakeTerminal(spec, loop, self.host)
        self._run(terminal.start_listening())
        with self._lock:
            self._terminals.append(terminal)
        return terminal

    def remove_terminal(self, terminal: FakeTerminal) -> None:
        """Stop a terminal and forget it."""
        self._run(terminal.close())
        with self._lock:
            if terminal in self._terminals:
                self._terminals.remove(terminal)

    def close(self) -> None:
        """Stop every terminal and the loop thread."""
        if self._loop is None or self._thread is None:
            return
        loop, thread = self._loop, self._thread
        for terminal in self.terminals:
            try:
                self._run(terminal.close())
            except (OSError, TimeoutError, RuntimeError) as error:
                log.warning("simulator.close_failed", serial=terminal.serial, error=str(error))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = None
        self._thread = None
        with self._lock:
            self._terminals.clear()

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        self.start()
        if self._loop is None:
            raise RuntimeError("the simulator's event loop did not start")
        return self._loop

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the loop thread and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._require_loop())
        return future.result(timeout=CONTROL_TIMEOUT_SECONDS)
