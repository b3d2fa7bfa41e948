"""HTTP to DingTalk for one client: every request sent, every failure to get an answer made an `Outcome`.

The calls go through dingtalk-sdk's `AppKeyClient` (URL joining, JSON body, the `requests` session
machinery), with its traps disarmed in `_SdkClient` below. Two limits hold whatever answers:

- An answer's body is read at most `limit` bytes far (DingTalk's answers are a few hundred bytes; a list
  page a few hundred kilobytes): a proxy or a broken gateway sending 50 MiB costs no more than that.
- `abort()` ends the calls in flight at once (their sockets are shut down: an upload cut off this way is
  UNKNOWN, settled by reading back at the next start) and refuses every later one without sending it.
  The daemon calls it when it stops, before it waits for its threads and closes the store.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import requests
from dingtalk import AppKeyClient
from dingtalk.core.exceptions import DingTalkClientException
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3 import poolmanager as urllib3_poolmanager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import NewConnectionError

from zkdingsync.dingtalk.answers import (
    WAIT_CREDENTIALS_SECONDS,
    WAIT_IP_BAN_SECONDS,
    WAIT_NETWORK_SECONDS,
    classify_http_status,
    is_ip_ban,
    short,
)
from zkdingsync.model import Outcome, OutcomeKind
from zkdingsync.redaction import redact_text

# Answers larger than this are not DingTalk's: its answers are small JSON objects.
MAX_ANSWER_BYTES = 64 * 1024
# listRecord of 50 users over 7 days, a page of 100 users: the only answers that carry lists.
MAX_LIST_ANSWER_BYTES = 2 * 1024 * 1024
_CHUNK_BYTES = 16 * 1024
NOT_SENT = "not-sent"


class AnswerTooLarge(requests.exceptions.RequestException):
    """The answer's body went past the size limit (raised by the response hook, caught by `send`)."""


class _SdkDropFilter(logging.Filter):
    """Drop the SDK's own log records.

    dingtalk-sdk logs every failed call at ERROR with the full URL (access_token in its query) and, for
    gettoken, the parameters (appsecret in clear). This client logs its own classified line instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return False


class _QueryRedactionFilter(logging.Filter):
    """Redact credentials from URLs in urllib3's debug lines ("GET /gettoken?appkey=..&appsecret=..")."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def guard_library_logging() -> None:
    """Install the filters above once per process (idempotent: every client calls it)."""
    for name, kind in (
        ("dingtalk.client.base", _SdkDropFilter),
        ("urllib3.connectionpool", _QueryRedactionFilter),
    ):
        library_logger = logging.getLogger(name)
        if not any(isinstance(existing, kind) for existing in library_logger.filters):
            library_logger.addFilter(kind())


class _Connections:
    """The open connections of one client, so that `abort` can cut the calls in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[HTTPConnection] = set()
        self.aborted = False

    def opened(self, connection: HTTPConnection) -> None:
        with self._lock:
            refused = self.aborted
            if not refused:
                self._open.add(connection)
        if refused:  # connected while the client was being closed: send nothing over it
            connection.close()
            raise NewConnectionError(connection, "the DingTalk client is closed")

    def closed(self, connection: HTTPConnection) -> None:
        with self._lock:
            self._open.discard(connection)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            connections = list(self._open)
        for connection in connections:
            sock = connection.sock
            if sock is not None:
                with suppress(OSError):  # already closed by its peer
                    sock.shutdown(socket.SHUT_RDWR)

    def pool_classes(self) -> dict[str, type[HTTPConnectionPool]]:
        """urllib3 pool classes whose connections report to this registry."""
        registry = self

        class _Tracking:
            def connect(self) -> None:
                super().connect()  # type: ignore[misc]
                registry.opened(self)  # type: ignore[arg-type]

            def close(self) -> None:
                registry.closed(self)  # type: ignore[arg-type]
                super().close()  # type: ignore[misc]

        class _HTTP(_Tracking, HTTPConnection):
            pass

        class _HTTPS(_Tracking, HTTPSConnection):
            pass

        class _HTTPPool(HTTPConnectionPool):
            ConnectionCls = _HTTP

        class _HTTPSPool(HTTPSConnectionPool):
            ConnectionCls = _HTTPS

        return {"http": _HTTPPool, "https": _HTTPSPool}


class _TrackingAdapter(HTTPAdapter):
    """requests' adapter, its pools built from `_Connections.pool_classes` (plain and HTTP proxies)."""

    def __init__(self, registry: _Connections, **kwargs: Any) -> None:
        self._pool_classes = registry.pool_classes()
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        # SOCKS proxies bring pool classes of their own; those stay (and are not cut by abort).
        if manager.pool_classes_by_scheme is urllib3_poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = self._pool_classes
        return manager


def _capped_reader(limit: int) -> Callable[..., requests.Response]:
    """A `requests` response hook that reads the (streamed) body, at most `limit` bytes of it."""

    def read(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(_CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise AnswerTooLarge(f"the answer is larger than {limit // 1024} KiB")
                chunks.append(chunk)
        except BaseException:
            response.close()  # a body read only in part leaves its connection unusable
            raise
        response._content = b"".join(chunks)
        return response

    return read


class _SdkClient(AppKeyClient):  # type: ignore[misc]  # the SDK is untyped
    """dingtalk-sdk's AppKeyClient with its traps disarmed.

    - `API_BASE_URL` and the HTTP session are per instance: the SDK keeps both on the class, shared by
      every client in the process (and its session by every thread, with a pool sized for one).
    - No token handling: the SDK's cache deletes and refetches tokens on its own and, with auto_retry,
      recurses on a persistently bad token. The caller passes the token of each call explicitly.
    - No raising on non-zero errcodes: the caller classifies the decoded answer itself (the SDK's
      exception loses `sub_code`, which is where topapi endpoints put the reason; its int() of errcode
      raises on a proxy's "abc").
    """

    def __init__(
        self,
        app_key: str,
        app_secret: str,
        api_base: str,
        timeout_seconds: float,
        pool_size: int,
        registry: _Connections,
    ) -> None:
        super().__init__("", app_key, app_secret, storage=None, timeout=timeout_seconds, auto_retry=False)
        self.API_BASE_URL = api_base.rstrip("/") + "/"
        session = requests.Session()
        # Read the environment (proxies, CA bundle) once, here: with trust_env requests rescans os.environ
        # on every call, which costs about as much as the call itself on a fast network.
        session.trust_env = False
        session.proxies.update(requests.utils.get_environ_proxies(self.API_BASE_URL))
        ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if ca_bundle:
            session.verify = ca_bundle
        # max_retries=0: urllib3 must never resend a POST on its own; a resend is the forwarder's decision.
        adapter = _TrackingAdapter(
            registry, pool_connections=2, pool_maxsize=max(2, pool_size), max_retries=0
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._http = session

    def _handle_pre_request(
        self, method: str, uri: str, kwargs: dict[str, Any]
    ) -> tuple[str, str, dict[str, Any]]:
        token = kwargs.pop("zk_access_token", None)
        if token is not None:
            params = dict(kwargs.get("params") or {})
            params["access_token"] = token
            kwargs["params"] = params
        return method, uri, kwargs

    def _handle_result(self, res: Any, *args: Any, **kwargs: Any) -> Any:
        return _decoded(res)

    def _handle_request_except(self, e: Exception, func: Any, *args: Any, **kwargs: Any) -> Any:
        raise e

    def close(self) -> None:
        self._http.close()


class Transport:
    """Sends one client's requests; `send` never raises for anything the network or the peer does."""

    def __init__(
        self, app_key: str, app_secret: str, api_base: str, timeout_seconds: float, pool_size: int
    ) -> None:
        """Given the app, where DingTalk is, the timeout of every call and the connection pool's size."""
        guard_library_logging()
        self.api_base = api_base.rstrip("/")
        self.timeout_seconds = timeout_seconds
        self._connections = _Connections()
        self._sdk = _SdkClient(
            app_key, app_secret, self.api_base, timeout_seconds, pool_size, self._connections
        )

    def abort(self) -> None:
        """End the calls in flight now and refuse every later one (they come back as not sent)."""
        self._connections.abort()
        self._sdk.close()

    def close(self) -> None:
        """Close the idle connections (calls in flight finish on their own)."""
        self._sdk.close()

    def send(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        token: str | None = None,
        limit: int = MAX_ANSWER_BYTES,
    ) -> dict[str, Any] | Outcome:
        """Send one request; return the decoded JSON object or the Outcome of a failure to get one.

        Failures that certainly did not reach DingTalk carry code "not-sent". The answer is read at most
        `limit` bytes far.
        """
        if self._connections.aborted:
            return Outcome(OutcomeKind.TRANSIENT, "not sent: the client is closing", 0.0, NOT_SENT)
        kwargs: dict[str, Any] = {
            "timeout": self.timeout_seconds,
            "stream": True,
            "hooks": {"response": _capped_reader(limit)},
        }
        if body is not None:
            kwargs["data"] = body
        if params is not None:
            kwargs["params"] = params
        if token is not None:
            kwargs["zk_access_token"] = token
        try:
            result = self._sdk.request(method, path, **kwargs)
        except DingTalkClientException as error:
            # The SDK raises this (errcode None) for a non-2xx status, with the response attached.
            return _http_error(error.response)
        except requests.exceptions.RequestException as error:
            return self._failure(error)
        if isinstance(result, dict):
            return result
        if isinstance(result, requests.Response):
            text = _text(result)
            if text.lstrip()[:1] == "<":
                reason = "DingTalk answered an HTML page instead of JSON: IP rate limit?"
                return Outcome(OutcomeKind.TRANSIENT, reason, WAIT_IP_BAN_SECONDS, "html")
            return Outcome(
                OutcomeKind.UNKNOWN, f"DingTalk answered something that is not JSON: {short(text)}"
            )
        return Outcome(OutcomeKind.UNKNOWN, f"DingTalk answered JSON that is not an object: {short(result)}")

    def _failure(self, error: requests.exceptions.RequestException) -> Outcome:
        """The Outcome of a request that raised before an answer could be decoded."""
        if isinstance(error, AnswerTooLarge):
            reason = f"{error}: not DingTalk's (a proxy or portal in between?)"
            return Outcome(OutcomeKind.UNKNOWN, reason, WAIT_NETWORK_SECONDS, "too-large")
        if isinstance(error, requests.exceptions.ConnectionError):
            if _connection_never_opened(error):
                reason = f"cannot connect to DingTalk at {self.api_base}: {_network_reason(error)}"
                return Outcome(OutcomeKind.TRANSIENT, reason, WAIT_NETWORK_SECONDS, NOT_SENT)
            if self._connections.aborted:
                return Outcome(OutcomeKind.UNKNOWN, "the call was cut off: the client closed", 0.0, "aborted")
            reason = f"the connection to DingTalk broke after the request was sent: {_network_reason(error)}"
            return Outcome(OutcomeKind.UNKNOWN, reason, 0.0, "connection-lost")
        if isinstance(error, requests.exceptions.Timeout):
            # A ConnectTimeout is a ConnectionError (handled above): this is a read timeout, after sending.
            reason = f"no answer from DingTalk within {self.timeout_seconds:g} s after sending"
            return Outcome(OutcomeKind.UNKNOWN, reason, 0.0, "read-timeout")
        if isinstance(
            error,
            requests.exceptions.InvalidURL
            | requests.exceptions.MissingSchema
            | requests.exceptions.InvalidSchema,
        ):
            reason = f"dingtalk.api_base {self.api_base!r} is not a usable URL"
            return Outcome(OutcomeKind.NEEDS_HUMAN, reason, WAIT_CREDENTIALS_SECONDS, NOT_SENT)
        # Chunked/content decoding errors and the like: an answer started but could not be read.
        reason = f"DingTalk's answer could not be read: {type(error).__name__}"
        return Outcome(OutcomeKind.UNKNOWN, reason, 0.0, "unreadable")


def _http_error(response: requests.Response | None) -> dict[str, Any] | Outcome:
    """The decoded JSON or the Outcome of a non-2xx answer."""
    if response is None:
        return Outcome(OutcomeKind.UNKNOWN, "DingTalk failed without an HTTP answer", 0.0, "unreadable")
    decoded = _decoded(response)
    if isinstance(decoded, dict) and (
        is_ip_ban(decoded) or ("errcode" in decoded and response.status_code < 500)
    ):
        return decoded  # the IP-ban JSON means a ban whatever the status it comes with
    return classify_http_status(response.status_code, _text(response))


def _decoded(response: requests.Response) -> Any:
    """The answer's JSON value, or the response itself when its body is not JSON."""
    try:
        return json.loads(response.content.decode("utf-8", "ignore"), strict=False)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than Python recurses
        return response


def _text(response: requests.Response) -> str:
    try:
        return response.content[:MAX_ANSWER_BYTES].decode("utf-8", "replace")
    except (requests.exceptions.RequestException, OSError):
        return ""


def _connection_never_opened(error: requests.exceptions.ConnectionError) -> bool:
    """Return True if the request certainly never left this host (refused, DNS, connect timeout)."""
    if isinstance(error, requests.exceptions.ConnectTimeout | requests.exceptions.ProxyError):
        return True
    if isinstance(error, requests.exceptions.SSLError):
        return True  # a TLS failure is a handshake failure in practice: nothing was sent yet
    text = repr(error)
    # urllib3 wraps a failure to connect in NewConnectionError / NameResolutionError; a reset or a close
    # after the request was written shows up as ProtocolError ("Connection aborted.").
    return "NewConnectionError" in text or "NameResolutionError" in text or "Failed to establish" in text


def _network_reason(error: Exception) -> str:
    """A short, secret-free description of a network error (the URL, with its token, is left out)."""
    text = str(error)
    for marker in (
        "Connection refused",
        "timed out",
        "Connection reset",
        "Remote end closed",
        "Name or service",
    ):
        if marker in text:
            return marker.lower()
    return type(error).__name__
