"""One fake ZK terminal: its data (`state.py`), the protocol it speaks (`dispatch.py`) and its port
(`transport.py`, TCP and UDP), put together with the controls tests use.

Protocol facts come from `/work/shared/reference/zk-protocol.md`; the behaviour worth knowing is in the
docstrings of the three parts. Everything about sockets runs on the simulator's event loop; the
public methods here are safe from any thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from zkdingsync.simulator.spec import TerminalSpec
from zkdingsync.simulator.state import TerminalData
from zkdingsync.simulator.transport import Transport


class FakeTerminal(TerminalData):
    """A fake ZK terminal listening on one port (TCP and UDP). Build it with `Simulator.add_terminal()`.

    Public attributes and methods are safe to use from any thread.
    """

    def __init__(self, spec: TerminalSpec, loop: asyncio.AbstractEventLoop, host: str) -> None:
        super().__init__(spec)
        self._transport = Transport(self, loop, host, spec.port)
        self._punch_timer: asyncio.TimerHandle | None = None
        self._punch_cycle = 0

    @property
    def host(self) -> str:
        """The address the terminal listens on."""
        return self._transport.host

    @property
    def port(self) -> int:
        """The port it listens on (TCP and UDP)."""
        return self._transport.port

    @property
    def active_sessions(self) -> int:
        """Sessions currently open (TCP connections after CONNECT, UDP peers not yet gone)."""
        return sum(1 for s in list(self._transport.sessions) if s.connected)

    def announce(self, stored: list[bytes]) -> None:
        """Push a live event for each record just stored to the registered sessions."""
        self._transport.run_in_loop(lambda: self._transport.broadcast(stored))

    def swap(self, serial: str, records: int = 0) -> None:
        """Behave as a replacement unit: new serial, a log of `records` fresh punches (default empty),
        every open session dropped, enabled again. Users are kept."""
        with self._lock:
            self._serial = serial
            self._log.clear()
            self._pending.clear()
            self._enabled = True
        if records:
            self.add_punches(records)
        self._transport.run_in_loop(self._transport.drop_sessions)

    def punch_every(self, seconds: float, enroll_numbers: Sequence[str] | None = None) -> None:
        """Make a punch every `seconds` at the terminal's clock, users (or `enroll_numbers`) in turn,
        until `stop_punching()`."""
        cycle = list(enroll_numbers) if enroll_numbers else [u.enroll_number for u in self.users] or ["1"]
        loop = self._transport.loop

        def tick() -> None:
            enroll = cycle[self._punch_cycle % len(cycle)]
            self._punch_cycle += 1
            self.add_punch(enroll, punch_state=self._punch_cycle % 2)
            self._punch_timer = loop.call_later(seconds, tick)

        def start() -> None:
            if self._punch_timer is not None:
                self._punch_timer.cancel()
            self._punch_timer = loop.call_later(seconds, tick)

        self._transport.run_in_loop(start)

    def stop_punching(self) -> None:
        """Stop the punches started by `punch_every`."""

        def stop() -> None:
            if self._punch_timer is not None:
                self._punch_timer.cancel()
                self._punch_timer = None

        self._transport.run_in_loop(stop)

    def power_off(self) -> None:
        """Stop listening and drop every connection (connecting then fails with "connection refused")."""
        asyncio.run_coroutine_threadsafe(self._transport.stop_listening(), self._transport.loop).result(
            timeout=10
        )

    def power_on(self) -> None:
        """Listen again on the same port."""
        asyncio.run_coroutine_threadsafe(self.start_listening(), self._transport.loop).result(timeout=10)

    async def start_listening(self) -> None:
        """Bind TCP and UDP on the same port (a free one when the spec says 0) and serve (loop thread)."""
        await self._transport.start_listening()

    async def close(self) -> None:
        """Stop listening, drop every connection, cancel timers and tasks (loop thread)."""
        if self._punch_timer is not None:
            self._punch_timer.cancel()
        await self._transport.close()
