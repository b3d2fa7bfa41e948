"""Secret redaction, one policy for the journal (`logs`), the DingTalk client's library log lines and
`status` output: values of secret-named keys, registered secret values and credentials in URL queries
become `***`."""

from __future__ import annotations

import re
import threading
from collections.abc import Collection

REDACTED = "***"

# Key names that hold secrets: any key containing one of these words...
_SECRET_SUBSTRINGS = ("secret", "token", "password", "passwd", "appsecret")
# ...or having one of these as a whole word ("sign" alone, so that "signal" or "design" stay readable).
_SECRET_WORDS = frozenset({"sign", "signature", "comm_key", "commkey", "authorization", "credential"})
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")

# Secrets shorter than this are not searched for inside strings: replacing every "0" or "ab" in every
# message would make logs unreadable and would itself hint at the secret.
MIN_SECRET_LENGTH = 4

# Credentials in URL queries (DingTalk's run-time access token, a robot's token and signature, the app
# secret of /gettoken): redacted wherever a URL lands in a message, registered or not.
_SECRET_QUERY = re.compile(
    r"([?&](?:access_token|appsecret|app_secret|sign|secret)=)[^&\s\"'<>)]+", re.IGNORECASE
)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_secret_pattern: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Remember a secret value so that it is replaced by `***` wherever it appears in redacted text.

    Config loading calls this for every secret it reads. Empty and very short values are ignored.
    """
    global _secret_pattern
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        if value in _secrets:
            return
        _secrets.add(value)
        _secret_pattern = _pattern(_secrets)


def forget_secrets() -> None:
    """Forget every registered secret (for tests)."""
    global _secret_pattern
    with _secrets_lock:
        _secrets.clear()
        _secret_pattern = None


def is_secret_key(key: str) -> bool:
    """Given a log key (or config key) name, return True when its value must never be shown."""
    lowered = key.lower()
    if any(part in lowered for part in _SECRET_SUBSTRINGS):
        return True
    if lowered in _SECRET_WORDS:
        return True
    return any(word in _SECRET_WORDS for word in _WORD_SPLIT.split(lowered))


def redact_text(text: str, secrets: Collection[str] = ()) -> str:
    """Given a string (and secrets known to the caller besides the registered ones), return it with every
    such secret value, and every credential in a URL query (`access_token=`, `appsecret=`, `sign=`, ...),
    replaced by `***`."""
    if "=" in text:
        text = _SECRET_QUERY.sub(rf"\1{REDACTED}", text)
    extra = [secret for secret in secrets if len(secret) >= MIN_SECRET_LENGTH]
    if extra:
        text = _pattern(extra).sub(REDACTED, text)
    pattern = _secret_pattern
    if pattern is None:
        return text
    return pattern.sub(REDACTED, text)


def _pattern(secrets: Collection[str]) -> re.Pattern[str]:
    # Longest first so that a secret containing another one is replaced whole.
    ordered = sorted(secrets, key=len, reverse=True)
    return re.compile("|".join(re.escape(secret) for secret in ordered))
