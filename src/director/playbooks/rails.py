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
  ``DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS`` is set — except a server installed from the
  registry as a package, which runs when the trust setting allows its name
  (``director.registry.trust``). Its command is not the user's: it is derived, at every load,
  from the provenance only the registry code writes (``model.RegistrySource``,
  ``director.registry.install``), so a user cannot pass an arbitrary command off as one;
* HTTP servers must be ``https`` and named by a host name — unless
  ``DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS`` is set. The name rules (``name_refusal``) refuse,
  whatever they resolve to, IP addresses in any spelling (``127.1``, ``0x7f.1``,
  ``2130706433``, ``[::ffff:127.0.0.1]``) and the names that can only mean this machine or its
  local network (``localhost`` and ``*.localhost``, ``*.local``, ``*.internal``,
  ``*.home.arpa``, with or without a trailing dot). A name whose addresses include any that
  is not public (``address_kind``: loopback, private, link-local, multicast, ... also in
  IPv4-mapped, 6to4 and NAT64 form) is refused (``addresses_refusal``).

``refusal`` (stdio, https, the name rules) needs no DNS, so it runs on every start. The address
rules run when a server is written (a name that does not resolve then is accepted: it may be an
internal name that only resolves where it will be reached) and on every new connection to it
(``director.mcp.upstream.connect``), on the addresses actually connected to — a name that
resolves to loopback only later is refused then.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import threads

from director.accounts.validation import ValidationFailed
from director.config import Settings
from director.playbooks.model import Server
from director.registry import trust

STDIO_FLAG = "DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS"
INSECURE_FLAG = "DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS"


class RailViolation(ValidationFailed):
    """A server the configuration forbids; the message names the rule and the flag."""


#: Special-use domains whose names designate this machine or a local network, never a public
#: server (RFC 6761 localhost, RFC 6762 multicast DNS, RFC 8375 home.arpa, ICANN's .internal),
#: and what to say about them.
LOCAL_DOMAINS = {
    "localhost": "names this machine",
    "local": "is a multicast DNS name of the local network",
    "internal": "is in .internal, reserved for private networks",
    "home.arpa": "is in .home.arpa, reserved for home networks",
}
_LABELS = re.compile(r"[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*")
#: The last label of a name that getaddrinfo (inet_aton) or a browser (WHATWG URL: "ends in a
#: number") reads as an IPv4 address: ``127.1``, ``0x7f.1``, ``2130706433``.
_NUMBER = re.compile(r"[0-9]+|0x[0-9a-f]*")
#: The networks "private" is said of; any other non-public address is "reserved".
_PRIVATE = [ipaddress.ip_network(net) for net in
            ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")]
#: Not globally reachable for IANA, though Python 3.11's ``is_global`` says they are: IETF
#: protocol assignments, local-use NAT64 (RFC 8215), deprecated site-local IPv6.
_NOT_GLOBAL = [ipaddress.ip_network(net) for net in
               ("192.0.0.0/24", "64:ff9b:1::/48", "fec0::/10")]
#: NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address reached.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_BROADCAST = ipaddress.ip_address("255.255.255.255")


def name_refusal(host: str) -> str | None:
    """Why ``host`` (an upstream URL's host) is refused whatever it resolves to, or None.

    Used when a server is written and before every connection; neither resolves the name
    first. IP addresses are refused in every spelling that some resolver or browser accepts.
    """
    refused = f"; {INSECURE_FLAG}=true allows it"
    if ":" in host:  # only an IPv6 literal holds a colon (the port is never part of the host)
        return f"must name a host, not an IP address ({host}){refused}"
    try:  # what the resolver would look up: IDNA folds fullwidth letters and digits to ASCII
        name = host.encode("idna").decode("ascii").lower().removesuffix(".")
    except UnicodeError:
        name = ""
    if _NUMBER.fullmatch(name.rsplit(".", 1)[-1]) or _inet_aton_accepts(name):
        return f"must name a host, not an IP address ({host}){refused}"
    if not _LABELS.fullmatch(name):
        return f"{host!r} is not a valid host name{refused}"
    for domain, why in LOCAL_DOMAINS.items():
        if name == domain or name.endswith("." + domain):
            return f"{host} {why}{refused}"
    return None


def _inet_aton_accepts(name: str) -> bool:
    try:
        socket.inet_aton(name)
    except (OSError, ValueError):
        return False
    return True


def address_kind(address: str) -> str | None:
    """What makes ``address`` not public ("a loopback address", ...), or None when it is.

    An IPv6 address that carries an IPv4 one (IPv4-mapped, 6to4, NAT64) is judged by the IPv4
    address it reaches; a zone (``fe80::1%eth0``) is ignored.
    """
    ip = _reached(ipaddress.ip_address(address.split("%")[0]))
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip == _BROADCAST:
        return "the broadcast address"
    if any(ip in network for network in _PRIVATE):
        return "a private address"
    if not ip.is_global or ip.is_reserved or any(ip in network for network in _NOT_GLOBAL):
        return "a reserved address"
    return None


def _reached(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
             ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


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
    #: What the operator would set (default: the flag, true).
    remedy: str = ""

    @property
    def reason(self) -> str:
        """The status and log wording, the same on every instance."""
        return f"refused by configuration: {self.what} need {self.remedy or self.flag + '=true'}"


def refusal(settings: Settings, server: Server) -> Refusal | None:
    """The rule ``server`` breaks under ``settings``, or None; no DNS, no I/O."""
    if server.type == "stdio":
        if settings.allow_arbitrary_stdio_servers:
            return None
        if server.registry is not None:  # its command is derived from the provenance
            refused = trust.package_refusal(settings, server.registry)
            if refused is None:
                return None
            what, remedy, explanation = refused
            return Refusal("REGISTRY_TRUST", "registry", what, explanation, remedy)
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
    named = name_refusal(host)
    if named is not None:
        return Refusal(INSECURE_FLAG, "url",
                       "servers named by an IP address or a name of a local network", named)
    return None


def server_status(settings: Settings, server: Server) -> dict[str, Any]:
    """The API's read-only ``status`` of a server under the current configuration."""
    refused = refusal(settings, server)
    if refused is None:
        return {"state": "allowed"}
    return {"state": "refused", "reason": refused.reason}


def addresses_refusal(host: str, addresses: Iterable[str]) -> str | None:
    """Why the addresses ``host`` resolved to are refused, or None when all are public.

    One non-public address refuses the whole name, even beside public ones: connecting to the
    public ones only would let whoever controls the name's DNS mix an internal address into
    the answers and have it used whenever the others fail; such a name is a mistake or an
    attack either way.
    """
    for address in addresses:
        kind = address_kind(address)
        if kind is not None:
            return f"{host} resolves to {address}, {kind}; {INSECURE_FLAG}=true allows it"
    return None


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
    problem = addresses_refusal(host, _resolve(host, parts.port or 443))
    if problem is not None:
        raise RailViolation({f"{path}url": problem})
