"""Guards on what upstream servers a user may add (the deployment guide's security rails).

* stdio servers run arbitrary commands on this host: refused unless
  ``DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS`` is set;
* HTTP servers must be ``https``, named by a host name (not an IP literal), and the name must
  not resolve to loopback, link-local, private or otherwise non-public addresses — unless
  ``DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS`` is set. A name that does not resolve at all is
  accepted (it may be an internal name that only resolves where it will be reached; the
  connection itself re-checks the addresses it actually connects to).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from twisted.internet import threads

from director.accounts.validation import ValidationFailed
from director.config import Settings
from director.playbooks.model import Server

STDIO_FLAG = "DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS"
INSECURE_FLAG = "DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS"


class RailViolation(ValidationFailed):
    """A server the configuration forbids; the message names the rule and the flag."""


def address_is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int) -> list[str]:
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port,
                                                                 type=socket.SOCK_STREAM)})
    except (OSError, UnicodeError):
        return []


async def check_server(settings: Settings, server: Server, path: str = "") -> None:
    """The rails, in a worker thread: resolving the host name blocks."""
    await threads.deferToThread(check_server_sync, settings, server, path)


def check_server_sync(settings: Settings, server: Server, path: str = "") -> None:
    """The rails for the CLI (no reactor) and for ``check_server``."""
    if server.type == "stdio":
        if not settings.allow_arbitrary_stdio_servers:
            raise RailViolation({f"{path}type": (
                f"stdio servers run commands on the gateway host and are disabled; an operator "
                f"can allow them with {STDIO_FLAG}=true (never in production)")})
        return
    if settings.allow_insecure_http_servers:
        return
    assert server.url is not None
    parts = urlsplit(server.url)
    host = parts.hostname or ""
    if parts.scheme != "https":
        raise RailViolation({f"{path}url": (
            f"must use https (credentials would cross the network in clear); {INSECURE_FLAG}"
            "=true allows http")})
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        raise RailViolation({f"{path}url": (
            f"must name a host, not an IP address; {INSECURE_FLAG}=true allows addresses")})
    addresses = _resolve(host, parts.port or 443)
    private = [a for a in addresses if not address_is_public(a)]
    if private:
        raise RailViolation({f"{path}url": (
            f"{host} resolves to a non-public address ({private[0]}): loopback, link-local and "
            f"private networks are refused; {INSECURE_FLAG}=true allows them")})
