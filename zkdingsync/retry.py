"""`zkdingsync retry`: put parked (and, on request, quarantined) punches back in the delivery queue.

It only changes the store, without the instance lock, so it works whether or not the daemon runs: a
running daemon picks the punches up on its next delivery round, a stopped one when it starts.

It also asks the daemon for a job-number refresh (`Store.request_mapping_refresh`): a human usually runs
`retry` after fixing an employee in DingTalk, so the forwarder reloads its job-number cache
(`users.match_job_number`) before delivering again.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from zkdingsync.errors import StoreError
from zkdingsync.model import Delivery
from zkdingsync.store import Store

if TYPE_CHECKING:
    from zkdingsync.config import Config


def retry_command(
    config: Config,
    *,
    reason: str | None = None,
    device: str | None = None,
    include_quarantined: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    now: datetime | None = None,
) -> int:
    """Given a loaded Config, re-queue parked punches (only those whose reason contains `reason`, or of
    one terminal `device`, when given) and print how many; with `include_quarantined`, quarantined punches
    that have a real time too.

    Return 0 on success (also when there was nothing to re-queue, or no store yet), 1 when the store
    cannot be written.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    now = datetime.now(timezone.utc) if now is None else now
    path = Path(config.store.path)
    if device is not None and device not in {configured.name for configured in config.devices}:
        # Not an error: the terminal may have been removed from the config while its punches wait.
        out.write(f"note: no terminal named {device!r} in the config; matching stored punches anyway\n")
    if not path.exists():
        # Creating a store here would leave a root-owned file for the daemon; there is nothing to re-queue.
        out.write(f"no store yet at {path}: nothing to re-queue\n")
        return 0
    try:
        with Store.open(path) as store:
            # The request first: the daemon refreshes the job numbers before it takes the punches again.
            store.request_mapping_refresh(now)
            parked = store.requeue_parked(reason_contains=reason, device=device, now=now)
            quarantined = (
                store.requeue_quarantined(reason_contains=reason, device=device, now=now)
                if include_quarantined
                else 0
            )
            counts = store.delivery_counts()
    except StoreError as error:
        err.write(f"zkdingsync retry: cannot update the store: {error}\n")
        return 1
    out.write(_summary(parked, quarantined, include_quarantined, reason, device, counts))
    out.flush()
    return 0


def _summary(
    parked: int,
    quarantined: int,
    include_quarantined: bool,
    reason: str | None,
    device: str | None,
    counts: dict[Delivery, int],
) -> str:
    filters = []
    if reason:
        filters.append(f"reason containing {reason!r}")
    if device:
        filters.append(f"terminal {device!r}")
    matching = f" matching {' and '.join(filters)}" if filters else ""
    lines = [f"re-queued {parked} parked punch{_es(parked)}{matching}"]
    if include_quarantined:
        lines.append(f"re-queued {quarantined} quarantined punch{_es(quarantined)}{matching}")
    if parked or quarantined:
        lines.append("the daemon delivers them on its next round (or when it next starts)")
    if counts[Delivery.PARKED]:
        lines.append(f"still parked: {counts[Delivery.PARKED]}")
    if counts[Delivery.QUARANTINED]:
        if not include_quarantined:
            hint = " (add --quarantined to re-queue those with a valid time)"
        elif not filters:
            hint = " (their time is impossible; they cannot be uploaded)"
        else:
            hint = ""
        lines.append(f"still quarantined: {counts[Delivery.QUARANTINED]}{hint}")
    return "\n".join(lines) + "\n"


def _es(count: int) -> str:
    return "" if count == 1 else "es"
