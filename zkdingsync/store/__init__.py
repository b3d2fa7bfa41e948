"""The SQLite store: every punch, its delivery state, per-terminal checkpoints, and small bits of state.

One file, WAL journal, `synchronous=FULL` so that a committed "delivered" survives power loss. A punch and
its delivery state share one row, so a poll's new punches and their queue entries commit together, and the
checkpoint moves in the same transaction: it can never run ahead of durable storage.

`Store` is composed of one class per concern, each over the same connection (`connection.Connection`):

- `terminals.Terminals`: checkpoints, a poll's punches stored with its checkpoint, the uid memo.
- `queue.PunchQueue`: the delivery queue (claim, delivered, pending, unknown, parked, requeue).
- `counts.PunchCounts`: counts and lists for `status` and the tools.
- `state.SmallState`: typed key-values (token, health, refresh request, probe), call counts, job numbers.
"""

from __future__ import annotations

from zkdingsync.model import StoredPunch
from zkdingsync.store.connection import BUSY_TIMEOUT_MS
from zkdingsync.store.counts import PunchCounts
from zkdingsync.store.queue import PunchQueue
from zkdingsync.store.state import SmallState
from zkdingsync.store.terminals import Checkpoint, Terminals
from zkdingsync.store.uid_names import UidNames

__all__ = ["BUSY_TIMEOUT_MS", "Checkpoint", "Store", "StoredPunch", "UidNames"]


class Store(Terminals, PunchQueue, PunchCounts, SmallState):
    """The SQLite store. Open it with `Store.open(path)`; thread-safe; a context manager."""
