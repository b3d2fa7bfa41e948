"""The SQLite store: every punch, its delivery state, per-terminal checkpoints, and small bits of state.

One file, WAL journal, `synchronous=FULL` so that a committed "delivered" survives power loss. A punch and
its delivery state share one row, so a poll's new punches and their queue entries commit together, and the
checkpoint moves in the same transaction: it can never run ahead of durable storage.

`Store` is composed of one class per concern, each over the same connection (`connection.Connection`):

- `terminals.Terminals`: checkpoints, a poll's punches stored with its checkpoint, the uid memo.
- `queue.PunchQueue`: the delivery queue (claim, delivered, pending, unknown, parked, requeue).
- `counts.PunchCounts`: counts and lists for `status` and the tools.
- `history.HistoryPunches`: punches kept as history, queued by window (`backfill`), punches per day.
- `state.SmallState`: typed key-values (token, health, refresh request, probe, daily report), call
  counts, job numbers.
- `evidence.Evidence`: HR's export (a window of punches, one row at a time), employee names, the online
  copy `backup` takes.
- `reports.DayReports`: a day's figures for the daily robot report (punches, parked, outages).
"""

from __future__ import annotations

from zkdingsync.model import StoredPunch
from zkdingsync.store.connection import BUSY_TIMEOUT_MS
from zkdingsync.store.counts import PunchCounts
from zkdingsync.store.evidence import Evidence, ExportedPunch, ExportWindow
from zkdingsync.store.history import HistoryPunches
from zkdingsync.store.queue import PunchQueue
from zkdingsync.store.reports import DayReports
from zkdingsync.store.state import SmallState
from zkdingsync.store.terminals import Checkpoint, LogEnd, Terminals
from zkdingsync.store.uid_names import UidNames

__all__ = [
    "BUSY_TIMEOUT_MS",
    "Checkpoint",
    "ExportWindow",
    "ExportedPunch",
    "LogEnd",
    "Store",
    "StoredPunch",
    "UidNames",
]


class Store(Terminals, PunchQueue, PunchCounts, HistoryPunches, SmallState, Evidence, DayReports):
    """The SQLite store. Open it with `Store.open(path)`; thread-safe; a context manager."""
