"""Who is who: a terminal's enroll number -> the employee's DingTalk userid.

Two sources, in this order:

1. the explicit table `users.map` of the config;
2. with `users.match_job_number`, DingTalk's contacts: HR sets each employee's job number (工号) to their
   enroll number. The table is fetched by walking the departments, cached in the store (so a restart or
   a DingTalk outage does not lose it), refreshed daily, and again soon after an unknown number shows up
   (rate-limited) or when asked to.

An enroll number that resolves to nobody parks its punches with the reason
`enroll number 1023 has no DingTalk user`, logged once per number, not once per punch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from zkdingsync.errors import StoreError, ZkdingsyncError
from zkdingsync.model import Directory, utc_now

log = structlog.get_logger(__name__)

DEFAULT_REFRESH = timedelta(days=1)
# After a failed fetch, or when an unknown number asks for a fresh table, wait at least this long.
DEFAULT_RETRY = timedelta(minutes=10)


class JobNumberSource(Protocol):
    """Where the job number table (and the directory's names) come from (the DingTalk client)."""

    def list_directory(self) -> Directory: ...


class JobNumberCache(Protocol):
    """Where the job number table and the directory's names are kept (the store)."""

    def replace_job_numbers(self, mapping: Mapping[str, str], *, at: datetime) -> None: ...

    def job_numbers(self) -> dict[str, str]: ...

    def job_numbers_updated_at(self) -> datetime | None: ...

    def save_directory_names(self, names: Mapping[str, str]) -> None: ...


def unmapped_reason(enroll_number: str) -> str:
    """Return the park reason of a punch whose enroll number resolves to no DingTalk user."""
    return f"enroll number {enroll_number} has no DingTalk user"


def enroll_key(enroll_number: str) -> str:
    """Given an enroll number as a terminal reported it, return the text `users.map` and the job numbers
    are compared by: without spaces at either end (firmware that pads its id fields with spaces rather
    than NULs; the record decoder already cut the NUL padding)."""
    return str(enroll_number).strip()


def _without_leading_zeros(number: str) -> str:
    return number.lstrip("0") or "0"


class UserMapper:
    """Resolves enroll numbers to DingTalk userids. Thread-safe; `resolve` never does I/O."""

    def __init__(
        self,
        explicit: Mapping[str, str],
        *,
        match_job_number: bool = False,
        source: JobNumberSource | None = None,
        cache: JobNumberCache | None = None,
        refresh_every: timedelta = DEFAULT_REFRESH,
        retry_after: timedelta = DEFAULT_RETRY,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """Given `users.map` and, for `match_job_number`, the DingTalk client (`source`) and the store
        (`cache`), build a mapper. The cached job number table is loaded at once; nothing is fetched here.
        """
        if match_job_number and (source is None or cache is None):
            raise ValueError("match_job_number needs a job number source and a cache")
        self._explicit = {enroll_key(k): str(v).strip() for k, v in explicit.items()}
        self.match_job_number = match_job_number
        self._source = source
        self._cache = cache
        self._refresh_every = refresh_every
        self._retry_after = retry_after
        self._clock = clock
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._reported: set[str] = set()
        self._jobs: dict[str, str] = {}
        self._jobs_loose: dict[str, str] = {}
        self._updated_at: datetime | None = None
        self._next_attempt: datetime | None = None  # earliest moment for an unscheduled refresh
        self._refresh_wanted = False
        self._failing = False
        if match_job_number and cache is not None:
            try:
                self._install(cache.job_numbers())
                self._updated_at = cache.job_numbers_updated_at()
            except StoreError as error:
                log.warning("mapping.cache_unreadable", error=str(error))

    def update(self, explicit: Mapping[str, str], *, match_job_number: bool) -> None:
        """Apply a reloaded `users` section: a new explicit map, job number matching on or off.

        Turning matching on loads the cached table and asks for a fresh one. Numbers reported unmapped
        are forgotten, so one still unmapped after the reload is logged again, once. Raise ValueError
        when matching is turned on for a mapper built without a source and a cache.
        """
        if match_job_number and (self._source is None or self._cache is None):
            raise ValueError("match_job_number needs a job number source and a cache")
        switched_on = match_job_number and not self.match_job_number
        self._explicit = {enroll_key(k): str(v).strip() for k, v in explicit.items()}
        self.match_job_number = match_job_number
        if switched_on and self._cache is not None:
            try:
                self._install(self._cache.job_numbers())
                self._updated_at = self._cache.job_numbers_updated_at()
            except StoreError as error:
                log.warning("mapping.cache_unreadable", error=str(error))
            self.request_refresh()
        with self._lock:
            self._reported.clear()

    def resolve(self, enroll_number: str) -> str | None:
        """Return the DingTalk userid of an enroll number, or None when nobody has it."""
        number = enroll_key(enroll_number)
        userid = self._explicit.get(number)
        if userid:
            return userid
        if not self.match_job_number:
            return None
        jobs, loose = self._jobs, self._jobs_loose  # swapped whole by a refresh: no lock needed
        return jobs.get(number) or loose.get(_without_leading_zeros(number))

    def report_unmapped(self, enroll_number: str) -> str:
        """Note that a punch of this enroll number cannot be delivered; return the park reason.

        Logged once per number (again only after the number was seen mapped in between). With job
        number matching on, ask for an early refresh: HR may just have filled in the job number.
        """
        number = enroll_key(enroll_number)
        with self._lock:
            first = number not in self._reported
            self._reported.add(number)
            if self.match_job_number:
                self._refresh_wanted = True
        if first:
            how = "users.map or a DingTalk job number" if self.match_job_number else "users.map"
            log.warning("mapping.unmapped", enroll_number=number, hint=f"add it to {how}, then run `retry`")
        return unmapped_reason(number)

    def request_refresh(self) -> None:
        """Ask for the job number table to be fetched again at the next `maybe_refresh`."""
        with self._lock:
            self._refresh_wanted = True
            self._next_attempt = None

    def refresh_due(self) -> bool:
        """Return True when `maybe_refresh` would fetch now."""
        if not self.match_job_number:
            return False
        now = self._clock()
        with self._lock:
            if self._next_attempt is not None and now < self._next_attempt:
                return False
            if self._refresh_wanted:
                return True
        return self._updated_at is None or now - self._updated_at >= self._refresh_every

    def maybe_refresh(self) -> bool:
        """Fetch the job number table if it is due (daily, or asked for); return True if it was replaced.

        A failure keeps the cached table, is logged once per outage, and is retried after a while.
        """
        if not self.refresh_due():
            return False
        try:
            self.refresh()
        except ZkdingsyncError as error:
            with self._lock:
                self._next_attempt = self._clock() + self._retry_after
                first_failure = not self._failing
                self._failing = True
            if first_failure:
                log.warning("mapping.refresh_failed", error=str(error), cached=len(self._jobs))
            return False
        return True

    def refresh(self) -> int:
        """Fetch the job number table now, cache it, and return how many job numbers it holds.

        Raise DingTalkError (a ZkdingsyncError) when DingTalk cannot be read, StoreError when the cache
        cannot be written (the fresh table is used anyway).
        """
        if self._source is None or self._cache is None:
            raise ValueError("job number matching is not configured")
        with self._refresh_lock:
            directory = self._source.list_directory()
            mapping = directory.job_numbers
            now = self._clock()
            with self._lock:
                self._refresh_wanted = False
                self._next_attempt = now + self._retry_after
                recovered = self._failing
                self._failing = False
            self._install(mapping)
            self._updated_at = now
            log.info("mapping.refreshed", job_numbers=len(mapping), recovered=recovered)
            self._cache.replace_job_numbers(mapping, at=now)
            self._cache.save_directory_names(directory.names)  # for HR's export
        return len(mapping)

    def _install(self, mapping: Mapping[str, str]) -> None:
        jobs = {str(k).strip(): str(v) for k, v in mapping.items() if str(k).strip()}
        loose: dict[str, str] = {}
        clashes: set[str] = set()
        for number, userid in jobs.items():
            key = _without_leading_zeros(number)
            if key in loose and loose[key] != userid:
                clashes.add(key)
            loose[key] = userid
        for key in clashes:  # "007" and "7" held by two people: only an exact match may decide
            del loose[key]
        self._jobs, self._jobs_loose = jobs, loose
        with self._lock:
            # A number that resolves now and goes missing again later deserves a new warning.
            self._reported = {number for number in self._reported if self.resolve(number) is None}

    @property
    def job_numbers_updated_at(self) -> datetime | None:
        """When the job number table in use was fetched (None: never, or not matching job numbers)."""
        return self._updated_at
