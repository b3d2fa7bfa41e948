"""Which host strings may reach network code (config validation and the terminal adapter): stdlib only."""

from __future__ import annotations

import ipaddress
import re

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_host(host: str) -> str | None:
    """Given a host string, return None when it is an IP address or an RFC 1123 host name, else why not.

    Nothing else passes (no spaces, shell characters, URLs or ports): the value reaches network code.
    """
    if not host:
        return "must not be empty"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253:
        return "is too long for a host name (more than 253 characters)"
    labels = name.split(".")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return "is neither an IP address nor a valid host name (letters, digits, '-' and '.' only)"
    if labels[-1].isdigit():
        # A name ending in a number is a mistyped IPv4 address (192.168.1.300), never a real host name.
        return "is not a valid IP address"
    return None
