"""Host header values: the host name one gives, and whether that name is this host only.

Shared by the edge's Host check (``web.edge``) and the metrics listener's (``metrics``), which
accept loopback names without configuration.
"""

from __future__ import annotations

import ipaddress

_LOOPBACK_NAMES = ("localhost", "localhost.")


def host_name(host_header: str) -> str:
    """The name of a Host header, lowercased, without its port (an IPv6 literal keeps its
    brackets)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback_name(host: str) -> bool:
    """``localhost``, a ``*.localhost`` name, or a loopback address (``host_name``'s output)."""
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
