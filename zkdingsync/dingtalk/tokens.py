"""The app's access token: fetched from DingTalk, cached in memory and in the store, refreshed in time.

One refresh at a time: a thread that waited for the lock uses the token another one just fetched. Cached
in the store too (so a restart reuses it, and gettoken is not throttled), until 5 minutes before expiry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from zkdingsync.dingtalk.answers import WAIT_CREDENTIALS_SECONDS, WAIT_NETWORK_SECONDS, classify_answer
from zkdingsync.dingtalk.transport import Transport
from zkdingsync.errors import StoreError
from zkdingsync.model import Outcome, OutcomeKind

log = structlog.get_logger(__name__)

TOKEN_PATH = "gettoken"  # noqa: S105 - a URL path, not a password; relative: the SDK's "/gettoken" would drop a path prefix of api_base
TOKEN_REFRESH_MARGIN = timedelta(minutes=5)


class TokenCache(Protocol):
    """The store's token cache."""

    def cached_token(self, app_key: str, *, now: datetime) -> str | None: ...

    def cache_token(self, app_key: str, token: str, *, refresh_at: datetime) -> None: ...

    def forget_token(self, app_key: str) -> None: ...


@dataclass(frozen=True)
class _Token:
    value: str
    refresh_at: datetime


class AccessTokens:
    """Hands out a usable access token for one app. Thread-safe."""

    def __init__(
        self,
        app_key: str,
        app_secret: str,
        *,
        transport: Transport,
        cache: TokenCache,
        clock: Callable[[], datetime],
    ) -> None:
        """Given the app's credentials, the transport to ask DingTalk through, the store and the clock."""
        self._app_key = app_key
        self._app_secret = app_secret
        self._transport = transport
        self._cache = cache
        self._clock = clock
        self._lock = threading.Lock()
        self._token: _Token | None = None

    def get(self, *, stale: str | None) -> str | Outcome:
        """Return a usable access token, fetching one if needed; `stale` is a token DingTalk just rejected.

        Return the Outcome of the failure when no token can be had.
        """
        now = self._clock()
        current = self._token
        if current is not None and current.value != stale and now < current.refresh_at:
            return current.value
        with self._lock:
            now = self._clock()
            current = self._token
            if current is not None and current.value != stale and now < current.refresh_at:
                return current.value
            if stale is None:
                stored = self._stored(now)
                if stored is not None:
                    return stored
            else:
                self._forget_stored()
            return self._fetch(now)

    def _stored(self, now: datetime) -> str | None:
        try:
            value = self._cache.cached_token(self._app_key, now=now)
        except StoreError as error:
            log.warning("dingtalk.token_cache_unreadable", error=str(error))
            return None
        if value is None:
            return None
        # The store only says "not expired"; the exact refresh moment is unknown, so recheck in a while.
        self._token = _Token(value, now + TOKEN_REFRESH_MARGIN)
        return value

    def _forget_stored(self) -> None:
        self._token = None
        try:
            self._cache.forget_token(self._app_key)
        except StoreError as error:
            log.warning("dingtalk.token_cache_unwritable", error=str(error))

    def _fetch(self, now: datetime) -> str | Outcome:
        params = {"appkey": self._app_key, "appsecret": self._app_secret}
        answer = self._transport.send("GET", TOKEN_PATH, params=params)
        if isinstance(answer, Outcome):
            if answer.kind is OutcomeKind.UNKNOWN:  # gettoken is a read: just try again later
                answer = Outcome(OutcomeKind.TRANSIENT, answer.reason, WAIT_NETWORK_SECONDS, answer.code)
            log.warning("dingtalk.token_failed", reason=answer.reason)
            return answer
        outcome = classify_answer(answer)
        token = answer.get("access_token")
        if outcome.kind is not OutcomeKind.DELIVERED or not isinstance(token, str) or not token:
            if outcome.kind is OutcomeKind.DELIVERED:
                outcome = Outcome(
                    OutcomeKind.TRANSIENT, "gettoken answered without a token", WAIT_NETWORK_SECONDS
                )
            elif outcome.kind in (OutcomeKind.PERMANENT, OutcomeKind.UNKNOWN):
                # Nothing about a punch is wrong when the token cannot be had: a human has to look.
                outcome = Outcome(
                    OutcomeKind.NEEDS_HUMAN,
                    f"cannot get an access token: {outcome.reason}",
                    WAIT_CREDENTIALS_SECONDS,
                    outcome.code,
                )
            log.warning("dingtalk.token_failed", reason=outcome.reason, code=outcome.code)
            return outcome
        try:
            lifetime = float(answer.get("expires_in", 7200))
        except (TypeError, ValueError, OverflowError):
            lifetime = 7200.0
        margin = min(TOKEN_REFRESH_MARGIN.total_seconds(), lifetime / 2)
        refresh_at = now + timedelta(seconds=lifetime - margin)
        self._token = _Token(token, refresh_at)
        try:
            self._cache.cache_token(self._app_key, token, refresh_at=refresh_at)
        except StoreError as error:
            log.warning("dingtalk.token_cache_unwritable", error=str(error))
        log.info("dingtalk.token_fetched", expires_in=lifetime)
        return token
