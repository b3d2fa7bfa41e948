"""`zkdingsync reload`: ask the running daemon to re-read its configuration and wait for its answer.

This is what the unit's `ExecReload=` runs, so that `systemctl reload` fails when the daemon rejects the
new file. The daemon itself validates (with its credentials: an `ExecReload=` process gets an unreadable
`$CREDENTIALS_DIRECTORY` when the unit has a mount namespace) and keeps its old configuration on a bad
file. systemd 252 has no way for the daemon to report a failed reload (`Type=notify-reload` arrived in
253, and has none either): only the exit status of the `ExecReload=` process counts. So the daemon writes
its answer to `$RUNTIME_DIRECTORY/reload.json` and this command turns it into an exit status.

An answer belongs to a request when it comes from that daemon and its reading began after the signal was
sent (`time.monotonic()` is one clock for every process of the machine).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from zkdingsync.errors import ConfigError, UserError
from zkdingsync.redaction import redact_text

ANSWER_NAME = "reload.json"
RUNTIME_ENV_VAR = "RUNTIME_DIRECTORY"  # systemd sets it from RuntimeDirectory=
DEFAULT_TIMEOUT_SECONDS = 60.0
_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class ReloadAnswer:
    """What the daemon made of one reload: applied, or rejected with the problems of the new file."""

    pid: int
    started: float  # time.monotonic() when the daemon began reading the file
    applied: bool
    problems: tuple[str, ...] = ()


def answer_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """Return where the daemon answers reload requests, or None when no runtime directory is set."""
    env = os.environ if environ is None else environ
    directory = env.get(RUNTIME_ENV_VAR, "").split(":")[0]
    return Path(directory) / ANSWER_NAME if directory else None


def publish(answer: ReloadAnswer, path: Path) -> None:
    """Given the daemon's answer, write it to `path` at once (a reader never sees half a file).

    The problems quote the config file: they are redacted like a log line and the file is owner-only.
    Raise OSError when it cannot be written.
    """
    body = {
        "pid": answer.pid,
        "started": answer.started,
        "applied": answer.applied,
        "problems": [redact_text(problem) for problem in answer.problems],
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        json.dump(body, stream)
    os.replace(temporary, path)


def read_answer(path: Path) -> ReloadAnswer | None:
    """Return the answer at `path`, or None when there is none (yet) or it cannot be read."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        return ReloadAnswer(
            pid=int(body["pid"]),
            started=float(body["started"]),
            applied=bool(body["applied"]),
            problems=tuple(str(problem) for problem in body["problems"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def request_reload(
    pid: int,
    path: Path,
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    send: Callable[[int, int], None] = os.kill,
) -> str:
    """Given the daemon's pid and its answer path, send SIGHUP and wait for the answer to this request.

    Return a one-line summary when the new configuration is applied. Raise ConfigError with the file's
    problems when the daemon rejected it (it keeps the previous one), UserError when there is no such
    process or no answer came within `timeout_seconds`.
    """
    sent_at = clock()
    try:
        send(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise UserError(f"no daemon with process id {pid} to reload") from None
    except PermissionError:
        raise UserError(f"not allowed to signal process {pid} (run as the service user or root)") from None
    deadline = sent_at + timeout_seconds
    while True:
        answer = read_answer(path)
        if answer is not None and answer.pid == pid and answer.started >= sent_at:
            break
        if clock() >= deadline:
            raise UserError(
                f"the daemon (process {pid}) did not answer the reload within {timeout_seconds:g} s "
                f"(no new {path}); see its log"
            )
        sleep(_POLL_SECONDS)
    if not answer.applied:
        raise ConfigError(list(answer.problems))
    return "configuration reloaded"
