"""Every new connection to an upstream HTTP server: the SSRF rail on the addresses connected to.

``CheckedEndpoints`` is the ``IAgentEndpointFactory`` of every ``Agent`` that talks to upstream
MCP servers (``http.new_pool`` hands it to the sessions), so each connection the pool opens —
the first POST, the GET stream, a legacy server's POST endpoint, a reconnection, a modern-era
request — goes through it. For each one it:

1. refuses, without resolving, the names ``rails.name_refusal`` refuses (IP literals in any
   spelling, ``localhost.``, ``*.localhost``, ...);
2. resolves the name once, through the reactor's resolver (or the one given);
3. refuses the name if any address is not public (``rails.addresses_refusal``);
4. connects to those very addresses, and to no others: the ``HostnameEndpoint`` it hands the
   connection to (Twisted's happy eyeballs over several addresses) sees the reactor through
   ``_Pinned``, whose resolver answers what was checked, so there is no second lookup for a
   rebinding DNS server to answer differently. TLS is wrapped around
   it with the URL's host name (SNI and certificate verification by the HTTPS policy, the
   Agent's default browser-like one unless given).

With ``DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS`` on, steps 1 and 3 are skipped. A refusal fails
the connection with ``Refused``, whose text the session turns into ``[server] URL: <text>``.
Redirects are never followed (``http_session.py`` reports a 3xx as an error), so no other connection
exists to check. Resolving costs what it did before (one lookup per new connection; pooled
connections are reused without one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from director.playbooks import rails

#: (zope interfaces are not types for mypy: these name what is meant.)
Address = IPv4Address | IPv6Address
Protocol = Any  # IProtocol
ProtocolFactory = Any  # IProtocolFactory
Resolver = Any  # IHostnameResolver

#: Seconds each connection attempt (one per resolved address) may take.
CONNECT_TIMEOUT = 10.0


class Refused(Exception):
    """A connection the rails forbid; the text names the host, the address and the flag."""


@implementer(IAgentEndpointFactory)
class CheckedEndpoints:
    """Endpoints that connect only to addresses the rails allow (module docstring)."""

    def __init__(self, reactor: Any, *, allow_insecure: bool = False,
                 resolver: Resolver | None = None, tls: Any = None,
                 timeout: float = CONNECT_TIMEOUT) -> None:
        self.reactor = reactor
        self.allow_insecure = allow_insecure
        #: None: the reactor's own, looked up at each connection (as HostnameEndpoint does).
        self.resolver = resolver
        #: The IPolicyForHTTPS: certificates verified for the URL's host name.
        self.tls: Any = tls if tls is not None else BrowserLikePolicyForHTTPS()
        self.timeout = timeout

    def endpointForURI(self, uri: URI) -> _CheckedEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        return _CheckedEndpoint(self, uri.scheme == b"https", uri.host.decode("ascii"),
                                uri.port)

    async def connect(self, factory: ProtocolFactory, tls: bool, host: str,
                      port: int) -> Protocol:
        if not self.allow_insecure:
            refusal = rails.name_refusal(host)
            if refusal is not None:
                raise Refused(refusal)
        addresses = await self._resolve(host, port)
        if not addresses:
            raise error.DNSLookupError(host)
        if not self.allow_insecure:
            refusal = rails.addresses_refusal(host, [address.host for address in addresses])
            if refusal is not None:
                raise Refused(refusal)
        endpoint: Any = HostnameEndpoint(
            _Pinned(self.reactor, addresses), host, port, timeout=self.timeout)
        if tls:
            endpoint = wrapClientTLS(self.tls.creatorForNetloc(host.encode("ascii"), port),
                                     endpoint)
        return await endpoint.connect(factory)

    def _resolve(self, host: str, port: int) -> defer.Deferred[list[Address]]:
        try:  # a literal is its own answer: no resolver, no thread
            literal = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            address = (IPv4Address("TCP", host, port) if literal.version == 4
                       else IPv6Address("TCP", host, port))
            return defer.succeed([address])
        receiver = _Collected()
        resolver: Any = self.resolver if self.resolver is not None else self.reactor.nameResolver
        resolver.resolveHostName(receiver, host, portNumber=port)
        return receiver.done


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    def __init__(self, checked: CheckedEndpoints, tls: bool, host: str, port: int) -> None:
        self._checked, self._tls, self._host, self._port = checked, tls, host, port

    def connect(self, protocolFactory: ProtocolFactory) -> defer.Deferred[Protocol]:
        return defer.Deferred.fromCoroutine(
            self._checked.connect(protocolFactory, self._tls, self._host, self._port))


@implementer(IResolutionReceiver)
class _Collected:
    """The addresses one resolution produced, in ``done``."""

    def __init__(self) -> None:
        self.done: defer.Deferred[list[Address]] = defer.Deferred()
        self._addresses: list[Address] = []

    def resolutionBegan(self, resolutionInProgress: object) -> None:
        pass

    def addressResolved(self, address: Address) -> None:
        self._addresses.append(address)

    def resolutionComplete(self) -> None:
        if not self.done.called:  # (the connection may have been cancelled meanwhile)
            self.done.callback(self._addresses)


@implementer(IHostnameResolver)
class _Resolved:
    """A resolver that answers, for any name, the addresses already resolved and checked."""

    def __init__(self, addresses: Sequence[Address]) -> None:
        self._addresses = addresses

    def resolveHostName(self, resolutionReceiver: Any, hostName: str, portNumber: int = 0,
                        addressTypes: object = None, transportSemantics: str = "TCP") -> object:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in self._addresses:
            resolutionReceiver.addressResolved(address)
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass  # (already complete)


@implementer(IReactorPluggableNameResolver)
class _Pinned:
    """The reactor as one ``HostnameEndpoint`` sees it: its name resolver is ``_Resolved``
    (Twisted's happy-eyeballs connection to several addresses, without a second lookup);
    connecting, timers and the rest are the reactor's."""

    def __init__(self, reactor: Any, addresses: Sequence[Address]) -> None:
        self._reactor = reactor
        self.nameResolver = _Resolved(addresses)

    def installNameResolver(self, resolver: Resolver) -> Resolver:
        raise NotImplementedError("a pinned resolution cannot be replaced")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
