"""Guards on which upstream servers may be added and run (the deployment guide's security rails).

One definition of the rules (``refusal``), enforced at two moments against the settings in
force at that moment:

* when a server is written (REST API, YAML import, ``director playbooks import``):
  ``check_server`` / ``check_server_sync`` refuse it with a 400 naming the field and the flag;
* whenever an upstream would start or connect (``director.mcp.upstreams``): a server stored
  while a flag was on does not run once the flag is off. Its status says so
  (``server_status``), and ``director doctor`` lists every such server.

The rules:

* stdio servers run arbitrary commands on this host: refused unless
  ``DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS`` is set;
* HTTP servers must be ``https`` and named by a host name that is neither an IP literal nor a
  name of this host (``localhost``, ``*.localhost``, …) — unless
  ``DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS`` is set.

``refusal`` needs no DNS, so it can run on every start. At write time the name is also
resolved, and one that resolves to loopback, link-local, private or otherwise non-public
addresses is refused; a name that does not resolve at all is accepted (it may be an internal
name that only resolves where it will be reached). The HTTP connection layer checks the
addresses it actually connects to.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import threads

from director.accounts.validation import ValidationFailed
from director.config import Settings, names_this_host
from director.playbooks.model import Server

STDIO_FLAG = "DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS"
INSECURE_FLAG = "DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS"


class RailViolation(ValidationFailed):
    """A server the configuration forbids; the message names the rule and the flag."""


@attrs.frozen
class Refusal:
    """Why the configuration refuses a server."""

    #: The variable that would allow it.
    flag: str
    #: The server's field that breaks the rule ("type" or "url").
    field: str
    #: What is refused, in the plural ("stdio servers").
    what: str
    #: The write path's message: why, and how an operator may allow it.
    explanation: str

    @property
    def reason(self) -> str:
        """The status and log wording, the same on every instance."""
        return f"refused by configuration: {self.what} need {self.flag}=true"


def is_ip_literal(host: str) -> bool:
    """True for an address in any form a resolver reads as one (``10.0.0.1``, ``::1``, and
    inet_aton's ``127.1``, ``0x7f000001``, ``2130706433``), with or without a trailing dot."""
    bare = host.rstrip(".")
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        try:
            socket.inet_aton(bare)
        except (OSError, ValueError):
            return False
    return True


def refusal(settings: Settings, server: Server) -> Refusal | None:
    """The rule ``server`` breaks under ``settings``, or None; no DNS, no I/O."""
    if server.type == "stdio":
        if settings.allow_arbitrary_stdio_servers:
            return None
        return Refusal(STDIO_FLAG, "type", "stdio servers", (
            f"stdio servers run commands on the gateway host and are disabled; an operator "
            f"can allow them with {STDIO_FLAG}=true (never in production)"))
    if settings.allow_insecure_http_servers:
        return None
    assert server.url is not None
    parts = urlsplit(server.url)
    host = parts.hostname or ""
    if parts.scheme != "https":
        return Refusal(INSECURE_FLAG, "url", "plain-http servers", (
            f"must use https (credentials would cross the network in clear); {INSECURE_FLAG}"
            "=true allows http"))
    if is_ip_literal(host):
        return Refusal(INSECURE_FLAG, "url", "servers named by an IP address", (
            f"must name a host, not an IP address; {INSECURE_FLAG}=true allows addresses"))
    if names_this_host(host):
        return Refusal(INSECURE_FLAG, "url", "servers on this host (localhost)", (
            f"{host} names this host (loopback): servers on this host are refused; "
            f"{INSECURE_FLAG}=true allows them"))
    return None


def server_status(settings: Settings, server: Server) -> dict[str, Any]:
    """The API's read-only ``status`` of a server under the current configuration."""
    refused = refusal(settings, server)
    if refused is None:
        return {"state": "allowed"}
    return {"state": "refused", "reason": refused.reason}


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
    refused = refusal(settings, server)
    if refused is not None:
        raise RailViolation({f"{path}{refused.field}": refused.explanation})
    if server.type == "stdio" or settings.allow_insecure_http_servers:
        return
    assert server.url is not None
    parts = urlsplit(server.url)
    host = parts.hostname or ""
    addresses = _resolve(host, parts.port or 443)
    private = [a for a in addresses if not address_is_public(a)]
    if private:
        raise RailViolation({f"{path}url": (
            f"{host} resolves to a non-public address ({private[0]}): loopback, link-local and "
            f"private networks are refused; {INSECURE_FLAG}=true allows them")})
