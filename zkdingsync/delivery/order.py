"""Which due punches a batch takes: live first, and the backlog never starved.

A punch the daemon has just read (stored within `LIVE_WINDOW` and never tried) goes ahead of any backlog:
a backfill of history, the queue left by an outage, retries. Newest first among them, so that a burst of
them cannot hold the latest back either. But every batch of more than one keeps at least a quarter of its
places for the oldest due punches, so a steady stream of new punches can never starve the backlog: at
10 uploads a second with batches of 20, the backlog still gets at least 5 of every 20 calls.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from zkdingsync.delivery.ports import DeliveryStore
from zkdingsync.model import StoredPunch

# Stored this recently and never tried: a punch the daemon has just read. Longer than a batch takes to
# send (2 s at the default rate), shorter than any outage worth the name.
LIVE_WINDOW = timedelta(seconds=60)
# At least one place in BACKLOG_SHARE of every batch goes to the oldest due punches.
BACKLOG_SHARE = 4


def claim_batch(store: DeliveryStore, now: datetime, limit: int) -> list[StoredPunch]:
    """Given the store, the time and the batch size, claim the batch: live punches first, newest first,
    in all but the backlog's share of the places; the oldest due punches in the rest."""
    backlog_places = max(1, limit // BACKLOG_SHARE) if limit > 1 else 0
    return list(
        store.claim_due(now, limit, fresh_since=now - LIVE_WINDOW, fresh_limit=limit - backlog_places)
    )
