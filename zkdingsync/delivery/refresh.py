"""The job number table, fetched beside delivery rather than in its way."""

from __future__ import annotations

import threading

import structlog

from zkdingsync.delivery.ports import DeliveryStore, Resolver

log = structlog.get_logger(__name__)


class MappingRefresher:
    """Runs the mapper's refresh in a background thread when it is due (daily, or asked for by `retry`).

    A walk of every department takes a call or two per department: in the delivery thread it would hold
    every punch back for that long. The mapper swaps its table whole, so resolving never waits.
    """

    def __init__(self, mapper: Resolver, store: DeliveryStore) -> None:
        """Given the user mapper and the store (where `retry` leaves its request), build it."""
        self._mapper = mapper
        self._store = store
        self._thread: threading.Thread | None = None

    @property
    def refreshing(self) -> bool:
        """True while the job number table is being fetched."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start_if_due(self) -> None:
        """Start a refresh when `retry` asked for one (HR may have filled in job numbers) or it is due."""
        if self._store.take_mapping_refresh_request():
            self._mapper.request_refresh()
        if self.refreshing or not self._mapper.refresh_due():
            return
        thread = threading.Thread(target=self._refresh, name="job-numbers", daemon=True)
        self._thread = thread
        thread.start()

    def _refresh(self) -> None:
        try:
            self._mapper.maybe_refresh()  # logs its own failures
        except Exception:  # the edge of the refresh thread; delivery goes on with the cached table
            log.exception("mapping.refresh_crashed")
