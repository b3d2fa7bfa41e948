"""A fake ZKTeco-protocol terminal for tests, `zkdingsync simulate` and the demo.

`Simulator` runs any number of `FakeTerminal`s (each its own port, TCP and UDP) on one background event
loop; `TerminalSpec` describes one, `Fault` makes it misbehave.
See `terminal.py` and its parts for the behaviour.
"""

from zkdingsync.simulator.faults import Fault, FaultKind
from zkdingsync.simulator.server import Simulator
from zkdingsync.simulator.spec import TerminalSpec, history_start, make_users
from zkdingsync.simulator.terminal import FakeTerminal

__all__ = ["FakeTerminal", "Fault", "FaultKind", "Simulator", "TerminalSpec", "history_start", "make_users"]
