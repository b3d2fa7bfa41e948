"""The parts of the forwarder that dispatch and the settler both work with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from zkdingsync.delivery.health import Health
from zkdingsync.delivery.ports import DeliveryStore, Resolver, SentUnder, Uploader
from zkdingsync.delivery.ratelimit import RateLimiter


@dataclass(frozen=True)
class SharedParts:
    """One forwarder's store, client, mapper, health, rate limit and in-flight userids, and its clock."""

    store: DeliveryStore
    client: Uploader
    mapper: Resolver
    health: Health
    limiter: RateLimiter
    sent: SentUnder
    refreshing: Callable[[], bool]  # True while the job number table is being fetched
    stopping: Callable[[], bool]  # True once a stop was asked for
    clock: Callable[[], datetime]
