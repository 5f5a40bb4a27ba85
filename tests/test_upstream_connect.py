"""The SSRF rail on the addresses connected to: the name rules, the address kinds, and every
HTTP upstream session refusing before it connects.

The sessions, the Agent, the pool and the servers are real (Twisted servers on loopback, the
SDK's reference servers); the one stand-in is DNS, a third party that cannot run here: a
resolver (Twisted's ``IHostnameResolver``) answering from a dict, handed to the endpoints
exactly where the reactor's own resolver is used otherwise.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor, ssl, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.testing import MemoryReactorClock
from twisted.web import resource, server
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from zope.interface import implementer

from director.config import Settings
from director.mcp.upstream.base import UpstreamError
from director.mcp.upstream.connect import CheckedEndpoints
from director.mcp.upstream.http import HttpUpstream
from director.mcp.upstream.http_plumbing import UpstreamPool, new_pool
from director.mcp.upstream.legacy_sse import LegacySseUpstream
from director.mcp.upstream.modern import ModernFirstHttpUpstream, ModernHttpUpstream
from director.mcp.upstream.streamable import StreamableHttpUpstream
from director.playbooks import rails
from director.playbooks.model import Server
from tests.accounts_helpers import call, sign_up
from tests.harness import Daemon, free_port, local_servers
from tests.test_upstream_http import StatelessJsonServer, self_signed_certificate

FLAG = "DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS=true allows it"
HTTP_REFERENCE = str(Path(__file__).parent / "fixtures" / "http_reference_server.py")


# --- the name rules and the address kinds (pure functions) -----------------------------------

def fullwidth(text: str) -> str:
    """``text`` in fullwidth letters and digits, which IDNA (and so getaddrinfo) folds back."""
    return "".join(chr(ord(char) + 0xFEE0) if char.isalnum() else char for char in text)


REFUSED_NAMES = {
    # IP addresses, in every spelling a resolver (inet_aton) or a browser reads as one
    "127.0.0.1": "not an IP address", "127.1": "not an IP address",
    "0x7f.1": "not an IP address", "0x7F.0.0.1": "not an IP address",
    "2130706433": "not an IP address", "0177.0.0.1": "not an IP address",
    "1.2.3.4.": "not an IP address", "8.8.8.8": "not an IP address",
    "::1": "not an IP address", "::ffff:127.0.0.1": "not an IP address",
    "fe80::1%25eth0": "not an IP address", fullwidth("127.0.0.1"): "not an IP address",
    "example.0x1": "not an IP address", "host.123": "not an IP address",
    # this machine and its local network, whatever they resolve to
    "localhost": "names this machine", "localhost.": "names this machine",
    "LocalHost": "names this machine", fullwidth("localhost"): "names this machine",
    "foo.localhost": "names this machine", "foo.localhost.": "names this machine",
    "printer.local": "multicast DNS", "printer.local.": "multicast DNS",
    "db.internal": ".internal", "nas.home.arpa": ".home.arpa",
    # not names at all (glibc reads "127.0.0.1 x" as 127.0.0.1, hence an address above)
    "": "not a valid host name", "a..b": "not a valid host name",
    "127.0.0.1 x": "not an IP address", "%6c%6focalhost": "not a valid host name",
}
ACCEPTED_NAMES = ["mcp.example.com", "mcp.example.com.", "MCP.Example.COM", "1password.com",
                  "localhost.example.com", "local.example.com", "my-localhost.dev",
                  "xn--bcher-kva.example", "bücher.example", "_srv.example.org", "123.example",
                  "internal.example.com", "x.invalid"]


@pytest.mark.parametrize("host", REFUSED_NAMES)
def test_names_refused_whatever_they_resolve_to(host: str) -> None:
    refusal = rails.name_refusal(host)
    assert refusal is not None and REFUSED_NAMES[host] in refusal and refusal.endswith(FLAG)


@pytest.mark.parametrize("host", ACCEPTED_NAMES)
def test_names_left_to_their_addresses(host: str) -> None:
    assert rails.name_refusal(host) is None


ADDRESS_KINDS = {
    "127.0.0.1": "a loopback address", "127.0.1.1": "a loopback address",
    "::1": "a loopback address", "0.0.0.0": "the unspecified address",  # noqa: S104
    "::": "the unspecified address", "169.254.169.254": "a link-local address",
    "fe80::1%eth0": "a link-local address", "10.1.2.3": "a private address",
    "172.16.0.1": "a private address", "192.168.1.1": "a private address",
    "100.64.0.1": "a private address", "fd00::1": "a private address",
    "224.0.0.1": "a multicast address", "233.252.0.1": "a multicast address",
    "ff0e::1": "a multicast address", "255.255.255.255": "the broadcast address",
    "192.0.2.1": "a reserved address", "198.18.0.1": "a reserved address",
    "240.0.0.1": "a reserved address", "192.0.0.8": "a reserved address",
    "2001:db8::1": "a reserved address", "fec0::1": "a reserved address",
    "::7f00:1": "a reserved address", "2001::1": "a reserved address",
    "64:ff9b:1::1": "a reserved address",
    # IPv6 forms that reach an IPv4 address are judged by that address
    "::ffff:127.0.0.1": "a loopback address", "::ffff:10.0.0.1": "a private address",
    "2002:7f00:1::": "a loopback address", "2002:a9fe:a9fe::1": "a link-local address",
    "64:ff9b::7f00:1": "a loopback address", "64:ff9b::a00:1": "a private address",
}
PUBLIC_ADDRESSES = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111",
                    "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize("address", ADDRESS_KINDS)
def test_non_public_addresses(address: str) -> None:
    assert rails.address_kind(address) == ADDRESS_KINDS[address]


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses(address: str) -> None:
    assert rails.address_kind(address) is None


def test_write_time_check_uses_the_same_rules() -> None:
    settings = Settings()
    for url, fragment in (
        ("https://0x7f.1/mcp", "must name a host, not an IP address (0x7f.1)"),
        ("https://[::ffff:127.0.0.1]:8443/mcp", "not an IP address (::ffff:127.0.0.1)"),
        ("https://2130706433/mcp", "not an IP address (2130706433)"),
        ("https://localhost./mcp", "localhost. names this machine"),
        ("https://api.localhost/mcp", "api.localhost names this machine"),
    ):
        with pytest.raises(rails.RailViolation) as refused:
            rails.check_server_sync(settings, Server("s", "http", url=url))
        message = refused.value.fields["url"]
        assert fragment in message and message.endswith(FLAG), message
        rails.check_server_sync(Settings(allow_insecure_http_servers=True),
                                Server("s", "http", url=url))


# --- a resolver that answers from a dict, and servers that count connections ------------------

@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class DictResolver:
    """DNS as a dict: name -> addresses (a list, or a callable answering each lookup); every
    lookup is recorded. Unknown names do not resolve."""

    def __init__(self, names: dict[str, Any]) -> None:
        self.names = names
        self.lookups: list[str] = []

    def resolveHostName(self, resolutionReceiver: Any, hostName: str, portNumber: int = 0,
                        addressTypes: Any = None, transportSemantics: str = "TCP") -> Any:
        self.lookups.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        answer = self.names.get(hostName, [])
        for address in answer() if callable(answer) else answer:
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class TinyMcp(StatelessJsonServer):
    """test_upstream_http's minimal Streamable HTTP server; with ``redirect``, it answers
    every POST with a 307 to that URL instead."""

    def __init__(self, redirect: str | None = None) -> None:
        super().__init__()
        self.redirect = redirect

    def render_POST(self, request: Any) -> bytes:
        if self.redirect is None:
            return super().render_POST(request)
        request.redirect(self.redirect.encode())
        request.setResponseCode(307)
        return b""


class CountingSite(server.Site):
    """A site that counts the connections it accepted."""

    def __init__(self, root: resource.Resource) -> None:
        super().__init__(root)
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)


@pytest_twisted.async_yield_fixture
async def listen() -> AsyncIterator[Callable[..., tuple[CountingSite, int]]]:
    """``listen(root, interface=..., port=..., certificate=...)``: a counting site, its port."""
    ports: list[Any] = []

    def start(root: resource.Resource | None = None, interface: str = "127.0.0.1",
              port: int = 0, certificate: Any = None) -> tuple[CountingSite, int]:
        site = CountingSite(root or TinyMcp())
        listening = (
            reactor.listenSSL(port, site, certificate.options(), interface=interface)
            if certificate is not None else reactor.listenTCP(port, site, interface=interface))
        ports.append(listening)
        return site, listening.getHost().port

    yield start
    for port in ports:
        await port.stopListening()


class Upstreams:
    """Pools as a daemon makes them (with a resolver of the test's), and sessions over them;
    all closed at the end of the test."""

    def __init__(self) -> None:
        self.pools: list[UpstreamPool] = []
        self.sessions: list[Any] = []

    def pool(self, resolver: DictResolver, allow_insecure: bool = False,
             tls: Any = None) -> UpstreamPool:
        pool = new_pool(reactor, endpoints=CheckedEndpoints(
            reactor, allow_insecure=allow_insecure, resolver=resolver, tls=tls))
        self.pools.append(pool)
        return pool

    def session(self, session_class: Any, name: str, url: str, pool: UpstreamPool) -> Any:
        session = session_class(name, url, {}, reactor, pool)
        self.sessions.append(session)
        return session

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()
        for pool in self.pools:
            await pool.closeCachedConnections()


@pytest_twisted.async_yield_fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    made = Upstreams()
    yield made
    await made.close()


async def refusal(session: Any) -> str:
    with pytest.raises(UpstreamError) as refused:
        await session.start()
    return str(refused.value)


async def tiny_call(session: Any) -> str:
    result = await session.request("tools/call", {"name": "anything", "arguments": {}})
    return str(result["content"][0]["text"])


SESSION_CLASSES = [StreamableHttpUpstream, ModernHttpUpstream, ModernFirstHttpUpstream,
                   LegacySseUpstream, HttpUpstream]


# --- refused before connecting ---------------------------------------------------------------

@pytest.mark.parametrize("session_class", SESSION_CLASSES, ids=lambda cls: cls.__name__)
@pytest_twisted.ensureDeferred
async def test_a_name_resolving_to_loopback_is_refused_before_connecting(
        session_class: Any, listen: Any, upstreams: Upstreams) -> None:
    site, port = listen()
    names = DictResolver({"mcp.example.com": ["127.0.0.1"]})
    url = f"https://mcp.example.com:{port}/mcp"
    session = upstreams.session(session_class, "github", url, upstreams.pool(names))
    assert await refusal(session) == (
        f"[github] {url}: mcp.example.com resolves to 127.0.0.1, a loopback address; {FLAG}")
    assert site.connections == 0 and names.lookups

    # The same server with the flag on: reached (plain http: this test server has no TLS).
    allowed = upstreams.session(session_class, "github", f"http://mcp.example.com:{port}/mcp",
                                upstreams.pool(names, allow_insecure=True))
    if session_class is LegacySseUpstream:  # (TinyMcp speaks Streamable HTTP only)
        assert "HTTP 405" in await refusal(allowed)
    else:
        await allowed.start()
        assert await tiny_call(allowed) == "tiny answer"
    assert site.connections > 0


@pytest_twisted.ensureDeferred
async def test_a_name_that_resolves_only_after_it_was_written_is_refused_at_connect(
        listen: Any, upstreams: Upstreams) -> None:
    site, port = listen()
    url = f"https://later.invalid:{port}/mcp"
    # Written while it does not resolve (the write-time check accepts that)…
    await rails.check_server(Settings(), Server("later", "http", url=url))
    # …and by the time it is connected to, it names loopback.
    names = DictResolver({"later.invalid": ["127.0.0.1"]})
    session = upstreams.session(StreamableHttpUpstream, "later", url, upstreams.pool(names))
    assert await refusal(session) == (
        f"[later] {url}: later.invalid resolves to 127.0.0.1, a loopback address; {FLAG}")
    assert site.connections == 0


@pytest_twisted.ensureDeferred
async def test_one_non_public_address_refuses_the_whole_name(
        listen: Any, upstreams: Upstreams) -> None:
    site, port = listen()
    for answer, named in ((["93.184.216.34", "127.0.0.1"], "127.0.0.1, a loopback address"),
                          (["2606:4700::1", "::ffff:10.0.0.1"],
                           "::ffff:10.0.0.1, a private address")):
        names = DictResolver({"mixed.example.com": answer})
        url = f"https://mixed.example.com:{port}/mcp"
        session = upstreams.session(StreamableHttpUpstream, "mixed", url,
                                    upstreams.pool(names))
        assert await refusal(session) == \
            f"[mixed] {url}: mixed.example.com resolves to {named}; {FLAG}"
    assert site.connections == 0


@pytest.mark.parametrize("host", ["localhost.", "foo.localhost", "LOCALHOST", "printer.local",
                                  "127.1", "0x7f.1", "2130706433", "[::ffff:127.0.0.1]"])
@pytest_twisted.ensureDeferred
async def test_local_names_and_addresses_are_refused_without_resolving(
        host: str, listen: Any, upstreams: Upstreams) -> None:
    site, port = listen()
    names = DictResolver({host.strip("[]"): ["127.0.0.1"]})
    url = f"https://{host}:{port}/mcp"
    session = upstreams.session(StreamableHttpUpstream, "local", url, upstreams.pool(names))
    message = await refusal(session)
    assert message.startswith(f"[local] {url.lower()}: ") and message.endswith(FLAG), message
    assert names.lookups == [] and site.connections == 0


@pytest_twisted.ensureDeferred
async def test_an_unknown_name_still_reads_host_name_not_found(upstreams: Upstreams) -> None:
    session = upstreams.session(StreamableHttpUpstream, "gone", "https://gone.example.com/mcp",
                                upstreams.pool(DictResolver({})))
    assert await refusal(session) == \
        "[gone] failed to connect to https://gone.example.com/mcp: host name not found"


# --- what is connected to is what was checked --------------------------------------------------

def test_the_address_checked_is_the_address_connected_to() -> None:
    """DNS rebinding: a name answering a public address to the check and loopback to any
    later lookup. There is no later lookup: the connection goes to the checked address. (A
    public address cannot be connected to here: Twisted's memory reactor records the attempt.)
    """
    answers = iter([["93.184.216.34"]])
    names = DictResolver({"rebind.example.com": lambda: next(answers, ["127.0.0.1"])})
    memory = MemoryReactorClock()
    endpoints = CheckedEndpoints(memory, resolver=names)
    endpoint = endpoints.endpointForURI(URI.fromBytes(b"https://rebind.example.com:8443/mcp"))
    connecting = endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
    assert [(host, port) for host, port, *_ in memory.tcpClients] == [("93.184.216.34", 8443)]
    assert names.lookups == ["rebind.example.com"]
    connecting.cancel()
    connecting.addErrback(lambda failure: None)


@pytest_twisted.ensureDeferred
async def test_each_new_connection_resolves_once_and_goes_where_that_answer_says(
        listen: Any, upstreams: Upstreams) -> None:
    """Lookup n answers 127.0.0.2 for n = 1 and 127.0.0.3 after: the first connection is
    on .2, every later one on .3, one lookup each; idle connections are reused without one."""
    first, port = listen(interface="127.0.0.2")
    later, _ = listen(interface="127.0.0.3", port=port)
    answers = iter([["127.0.0.2"]])
    names = DictResolver({"rebind.example.com": lambda: next(answers, ["127.0.0.3"])})
    session = upstreams.session(StreamableHttpUpstream, "rebind",
                                f"http://rebind.example.com:{port}/mcp",
                                upstreams.pool(names, allow_insecure=True))
    await session.start()
    for _ in range(5):
        assert await tiny_call(session) == "tiny answer"
    assert first.connections == 1
    assert len(names.lookups) == first.connections + later.connections < 5


@pytest.fixture(scope="module")
def legacy_server() -> Iterator[int]:
    """The SDK's reference server over the 2024-11-05 HTTP+SSE transport."""
    port = free_port()
    with local_servers([[sys.executable, HTTP_REFERENCE, "--transport", "sse", "--port",
                         str(port)]], [port]):
        yield port


@pytest_twisted.ensureDeferred
async def test_a_legacy_servers_post_endpoint_connection_is_checked_too(
        legacy_server: int, upstreams: Upstreams) -> None:
    """The GET stream holds one connection; the POSTs to the endpoint the server announced
    need another: each is resolved and checked by the endpoints, none bypasses them."""
    # (the SDK's server refuses other Host headers than its own: DNS rebinding protection)
    names = DictResolver({"localhost": ["127.0.0.1"]})
    session = upstreams.session(LegacySseUpstream, "legacy",
                                f"http://localhost:{legacy_server}/sse",
                                upstreams.pool(names, allow_insecure=True))
    await session.start()
    result = await session.request("tools/call", {"name": "echo", "arguments": {"text": "hi"}})
    assert "hi" in json.dumps(result)
    assert session.endpoint is not None \
        and urlsplit(session.endpoint).hostname == "localhost"
    assert names.lookups == ["localhost"] * 2  # the stream, then the POSTs


# --- redirects ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_redirect_to_loopback_is_not_followed(listen: Any, upstreams: Upstreams) -> None:
    target, target_port = listen()
    target_url = f"http://127.0.0.1:{target_port}/mcp"
    redirecting, port = listen(TinyMcp(redirect=target_url))
    names = DictResolver({"moved.example.com": ["127.0.0.1"]})
    url = f"http://moved.example.com:{port}/mcp"
    session = upstreams.session(StreamableHttpUpstream, "moved", url,
                                upstreams.pool(names, allow_insecure=True))
    message = await refusal(session)
    assert f"POST {url}: HTTP 307" in message, message
    assert f"(to {target_url}; redirects are not followed)" in message
    assert redirecting.connections > 0 and target.connections == 0


# --- TLS: verified for the URL's name, not for the address connected to ------------------------

def certificate_for(name: str) -> Any:
    """A self-signed certificate (its own CA) for the DNS name ``name``, with its key."""
    certificate_pem, key_pem = self_signed_certificate(name)
    return ssl.PrivateCertificate.loadPEM(certificate_pem + key_pem)


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")  # twisted's server side
@pytest_twisted.ensureDeferred
async def test_tls_is_verified_for_the_name_after_connecting_to_the_checked_address(
        listen: Any, upstreams: Upstreams) -> None:
    certificate = certificate_for("tls.example.com")
    _, port = listen(certificate=certificate)
    names = DictResolver({"tls.example.com": ["127.0.0.1"], "other.example.com": ["127.0.0.1"]})
    trusted = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate(certificate.original))
    pool = upstreams.pool(names, allow_insecure=True, tls=trusted)
    session = upstreams.session(StreamableHttpUpstream, "tls",
                                f"https://tls.example.com:{port}/mcp", pool)
    await session.start()
    assert await tiny_call(session) == "tiny answer"
    # The same address under another name: the certificate is not for that name.
    url = f"https://other.example.com:{port}/mcp"
    other = upstreams.session(StreamableHttpUpstream, "tls", url, pool)
    assert await refusal(other) == \
        f"[tls] POST {url}: TLS: the certificate is not valid for this host name"
    assert names.lookups[-1] == "other.example.com"


# --- a daemon restarted without the flag -------------------------------------------------------

def tools_listed(daemon: Daemon, key: str, playbook: str) -> list[str]:
    """The tool names a handshake-era client of ``playbook`` is given (raw HTTP)."""
    headers = {"accept": "application/json, text/event-stream",
               "content-type": "application/json", "x-api-key": key}
    path = f"/playbooks/{playbook}/mcp"

    def post(message: dict[str, Any], session: str | None = None) -> tuple[int, Any, Any]:
        sent = headers if session is None else {**headers, "mcp-session-id": session}
        status, answer_headers, body = daemon.request("POST", path, json.dumps(message).encode(),
                                                      sent)
        return status, answer_headers, json.loads(body) if body else None

    status, answer_headers, _ = post({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                      "params": {"protocolVersion": "2025-11-25",
                                                 "capabilities": {},
                                                 "clientInfo": {"name": "raw", "version": "1"}}})
    assert status == 200
    session = answer_headers["mcp-session-id"]
    assert post({"jsonrpc": "2.0", "method": "notifications/initialized"}, session)[0] == 202
    status, _, answer = post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session)
    assert status == 200, answer
    return [tool["name"] for tool in answer["result"]["tools"]]


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")  # twisted's server side
@pytest_twisted.ensureDeferred
async def test_a_daemon_restarted_without_the_flag_refuses_a_stored_name_that_is_local(
        start_daemon: Callable[..., Daemon], migrated_url: str, listen: Any,
        tmp_path: Path) -> None:
    """A server stored under the flag, its URL an https name that passes every name rule
    (this machine's host name) and resolves to a loopback or private address (/etc/hosts).
    Restarted without the flag, the daemon resolves it when it connects and refuses: its tools
    are absent, the log says why, and no connection reaches the server."""
    host = socket.gethostname()
    addresses = [str(info[4][0]) for info in socket.getaddrinfo(host, 443,
                                                                 type=socket.SOCK_STREAM)]
    assert rails.name_refusal(host) is None and rails.address_kind(addresses[0]), (
        f"this test needs a host name that resolves to a non-public address: {host} -> "
        f"{addresses}")
    certificate = certificate_for(host)
    site, port = listen(TinyMcp(), interface=addresses[0], certificate=certificate)
    trusted = tmp_path / "ca.pem"  # how the daemon's TLS (OpenSSL's default paths) trusts it
    trusted.write_bytes(ssl.Certificate(certificate.original).dumpPEM())
    environment = {"DATABASE_URL": migrated_url, "SSL_CERT_FILE": str(trusted)}
    url = f"https://{host}:{port}/mcp"

    def with_the_flag() -> tuple[str, list[str]]:
        daemon = start_daemon(**environment, DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS="true")
        daemon.wait_healthy()
        owner = sign_up(daemon, "ssrf@example.com")
        assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Near"},
                    key=owner.key)[0] == 201
        status, _, body = call(daemon, "POST", "/api/v1/playbooks/near/servers",
                               {"name": "tiny", "type": "http", "url": url, "prefix": "t_"},
                               key=owner.key)
        assert status == 201, body
        tools = tools_listed(daemon, owner.key, "near")
        daemon.terminate()
        return owner.key, tools

    key, tools = await threads.deferToThread(with_the_flag)
    assert "t_tiny" in tools and site.connections > 0  # (the server is reachable, and trusted)
    site.connections = 0

    def without_the_flag() -> tuple[list[str], dict[str, Any]]:
        daemon = start_daemon(**environment)
        daemon.wait_healthy()
        return tools_listed(daemon, key, "near"), daemon.wait_for_log(f"{host} resolves to")

    tools, logged = await threads.deferToThread(without_the_flag)
    assert "t_tiny" not in tools
    assert f"[tiny] {url}: {host} resolves to " in logged["msg"] \
        and logged["msg"].endswith(f", {rails.address_kind(addresses[0])}; {FLAG}"), logged
    assert site.connections == 0
