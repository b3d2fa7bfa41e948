"""The only place that touches pyzk's private names (pyzk 0.9, `zk.base.ZK`).

The adapter's session needs: the socket (closed, and replaced by a guarded one), the socket factory
(pyzk's own ignores connect errors), the raw command sender (commands pyzk has no method for), the last
reply's payload and code, and the chunk reader of prepared buffers; and it disarms the helper's probe
connection. `tests/test_pyzk_private.py` fails loudly
when a pyzk release renames or reshapes any of them: then only this module needs changing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Checked against pyzk by the test: methods (name -> their parameters after self)...
PRIVATE_METHODS = {
    "_ZK__create_socket": (),  # makes the socket at connect()
    "_ZK__send_command": ("command", "command_string", "response_size"),  # -> {"status", "code"}
    "_ZK__read_chunk": ("start", "size"),  # one chunk of a prepared buffer -> bytes | None
}
# ...and attributes (set in __init__ or by every reply).
PRIVATE_ATTRIBUTES = {
    "_ZK__sock": "the socket",
    "_ZK__data": "the last reply's payload (bytes)",
    "_ZK__response": "the last reply's command code (int)",
}


def socket_of(zk: Any) -> Any:
    """Return the socket pyzk holds."""
    return zk._ZK__sock


def set_socket(zk: Any, sock: Any) -> None:
    """Make pyzk talk through `sock`."""
    zk._ZK__sock = sock


def set_socket_factory(zk: Any, factory: Callable[[], None]) -> None:
    """Make pyzk's connect() call `factory` (which calls `set_socket`) instead of its own."""
    zk._ZK__create_socket = factory


def skip_size_probe(zk: Any) -> None:
    """Stop connect() from opening a probe connection (hard-coded 10 s timeout) only to guess the user
    record size, which the adapter never uses."""
    zk.helper.test_tcp = lambda: 0


def send_command(zk: Any, command: int, payload: bytes, response_size: int) -> tuple[dict[str, Any], bytes]:
    """Send one command through pyzk's framing; return its status dict and the reply payload."""
    reply: dict[str, Any] = zk._ZK__send_command(command, payload, response_size)
    data: bytes = zk._ZK__data
    return reply, data


def last_response(zk: Any) -> int | None:
    """Return the command code of the last reply (CMD_DATA: the payload is the data itself)."""
    code: int | None = zk._ZK__response
    return code


def read_chunk(zk: Any, start: int, size: int) -> bytes | None:
    """Read `size` bytes of the prepared buffer from `start` (None: the terminal sent nothing usable)."""
    data: bytes | None = zk._ZK__read_chunk(start, size)
    return data
