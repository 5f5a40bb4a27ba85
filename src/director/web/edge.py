"""Edge policy applied to every request before any route sees it.

In order: a trace id (from ``traceparent`` when valid; with tracing on, the request's server
span continuing it, current while the application renders: ``director.tracing``), security
headers, the Host check (DNS-rebinding protection), the Origin check, CORS, then the application.
Bodies larger than ``MAX_REQUEST_BODY_BYTES`` are refused with 413 while they arrive, before
being buffered.
Every finished request gets one access-log line; every line that names a request's URI
redacts the API key from it in every spelling the authenticator reads (``web/querykey.py``).

Below the requests, the connections (``DirectorChannel``, ``DirectorSite``): a request's head
and body must arrive within deadlines that trickling cannot extend, idle keep-alives are
closed, and one client address may hold only so many connections that are not event streams.

Every time here (deadlines, durations, the refusal log) is the site's reactor's ``seconds()``
(``director.clock``; ``task.Clock`` in tests): a deadline moves with a wall-clock step exactly
as the sweep that checks it does, and a duration logged across a step is off by it, once.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.internet import task
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from director import direct_send, tracing
from director.config import Settings, origin_of
from director.logs import THRESHOLD
from director.web import stored_headers
from director.web.errors import error_body
from director.web.hosts import host_name, is_loopback_name
from director.web.querykey import redact
from director.web.routes import OTHER, route_template
from director.web.stored_headers import put, stored_name

if TYPE_CHECKING:
    from director.metrics import Metrics

log = Logger(namespace="http")

SECURITY_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"x-xss-protection": b"0",
    b"referrer-policy": b"strict-origin-when-cross-origin",
    b"permissions-policy": b"accelerometer=(), camera=(), geolocation=(), gyroscope=(), "
    b"magnetometer=(), microphone=(), payment=(), usb=()",
}
EXPOSED_HEADERS = (b"Mcp-Session-Id, Mcp-Protocol-Version, WWW-Authenticate, X-Trace-Id, "
                   b"Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset")
ALLOWED_METHODS = b"GET, HEAD, PUT, PATCH, POST, DELETE"


#: What every response the application renders carries, each name as ``Headers`` keys it.
EVERY_RESPONSE_HEADERS = tuple((stored_name(name), value)
                               for name, value in SECURITY_HEADERS.items())
TRACE_ID_HEADER = stored_name(b"x-trace-id")
SERVER_HEADER = stored_name(b"server")
DATE_HEADER = stored_name(b"date")
#: Request headers read on every request (the edge, authentication, the MCP routes), each with
#: the name ``Headers`` keys it under (``DirectorRequest.getHeader``).
_READ_ON_EVERY_REQUEST = {name: stored_name(name) for name in (
    b"host", b"origin", b"traceparent", b"x-api-key", b"authorization", b"cookie", b"accept",
    b"content-type", b"mcp-session-id", b"mcp-protocol-version", b"last-event-id")}
#: Paths exempt from the Host check: load balancers probe health by IP address.
HOST_CHECK_EXEMPT = (b"/api/health",)
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
#: How often request deadlines are checked: a slow request is cut at most this late.
SWEEP_SECONDS = 0.5


class RandomHex:
    """Random hex strings cut from one ``os.urandom`` read of many bytes.

    A fresh trace id per request through ``secrets.token_hex`` is a ``getrandom(2)`` call
    each, 2.7 % of a proxied call's CPU under load (py-spy, bench ``mcp``); one read of 4 KiB
    serves 256 ids. The bytes are the kernel's CSPRNG's all the same, only the calls are
    fewer; a forked child drops what its parent had read, so the two never share ids."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._pool = b""
        self._offset = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool, self._offset = b"", 0

    def hex(self, nbytes: int) -> str:
        start = self._offset
        if start + nbytes > len(self._pool):
            self._pool, start = os.urandom(max(self._size, nbytes)), 0
        self._offset = start + nbytes
        return self._pool[start:start + nbytes].hex()


random_hex = RandomHex()


def trace_id_for(traceparent: bytes | None) -> str:
    """The W3C trace id of a valid ``traceparent`` (not all zeros), else a fresh one."""
    if traceparent:
        match = _TRACEPARENT.match(traceparent.decode("latin-1").strip().lower())
        if match and match[1] != "0" * 32:
            return match[1]
    return random_hex.hex(16)


class RefusalLog:
    """One log line per address per minute at most, counting the connections refused by
    ``MAX_CONNECTIONS_PER_ADDRESS`` since the previous line: a client hammering the cap
    cannot flood the log with it."""

    INTERVAL = 60.0
    #: Past this many addresses remembered, those not logged within the interval are dropped.
    MAX_REMEMBERED = 10_000

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._addresses: dict[str, tuple[float, int]] = {}  # key: (next line due, unlogged)

    def refused(self, key: str, now: float) -> None:
        due, unlogged = self._addresses.get(key, (now, 0))
        if now < due:
            self._addresses[key] = (due, unlogged + 1)
            return
        log.info("refused {count} connection(s) from {address}: it holds "
                 "MAX_CONNECTIONS_PER_ADDRESS={cap} connections that are not event streams "
                 "(behind a proxy on this host, set it to 0)",
                 count=unlogged + 1, address=key, cap=self.cap)
        if len(self._addresses) >= self.MAX_REMEMBERED:
            self._addresses = {k: v for k, v in self._addresses.items() if v[0] > now}
        self._addresses[key] = (now + self.INTERVAL, 0)


def _in_networks(host: str, networks: tuple[Any, ...]) -> bool:
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return any(address in network for network in networks)


def raw_response(status: bytes, trace_id: str, code: str, message: str,
                 details: dict[str, Any]) -> bytes:
    """A complete JSON error response that closes the connection, for the moments when no
    request object can answer (its head or body never arrived in full)."""
    body = error_body(code, message, details)
    head = [b"HTTP/1.1 " + status, b"Content-Type: application/json",
            b"Content-Length: " + str(len(body)).encode(), b"Connection: close",
            b"X-Trace-Id: " + trace_id.encode()]
    head += [name + b": " + value for name, value in SECURITY_HEADERS.items()]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def address_key(host: str) -> str:
    """What ``MAX_CONNECTIONS_PER_ADDRESS`` counts: an IPv4 address (also when mapped into
    IPv6), or an IPv6 /64, the smallest block a client is usually given (a per-address cap
    would be no cap against one host's 2^64 addresses)."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class DirectorRequest(server.Request):
    """A request that refuses oversized bodies while they arrive and remembers its trace id."""

    trace_id = ""
    #: The template of the route that answered, set by a resource that routes without Klein
    #: (``director.web.routes``).
    route: str | None = None
    #: With tracing on: the request's server span, and its id as the logs write it.
    span: Any = None
    span_id = ""
    _body_bytes = 0
    _rejected = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Every body here is JSON or YAML: parsing form posts into request.args would only cost
        # a Content-Type parse (with the email package) per POST, ~40 µs on the MCP hot path.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)
        self.started = self.now()

    def getHeader(self, key: Any) -> Any:
        # Twisted's goes through ``Headers.getRawHeaders`` and its name encoder, three calls
        # for one dictionary read; a proxied call reads a dozen headers (~2 % of its CPU). The
        # names read on every request are looked up in that dictionary directly.
        stored = _READ_ON_EVERY_REQUEST.get(key)
        if stored is None:
            return super().getHeader(key)
        return stored_headers.get(self.requestHeaders, stored)

    def now(self) -> float:
        """Its site's clock (see the module docstring)."""
        site: Any = self.channel.site  # type: ignore[attr-defined]
        return float(site.reactor.seconds())

    def process(self) -> None:
        site: Any = self.channel.site  # type: ignore[attr-defined]
        site.in_flight.add(self)
        # Twisted's ``process``, with its ``Server`` and ``Date`` put as ours: a ``setHeader``
        # each, and a date formatted per request (``DirectorSite.http_date``), were 2 % of a
        # proxied call's CPU. No resource here takes an encoder (``_IEncodingResource``).
        self.site = site
        put(self.responseHeaders, SERVER_HEADER, b"director")
        put(self.responseHeaders, DATE_HEADER, site.http_date())
        if self.path == b"*":  # as Twisted answers it: OPTIONS * is 200, anything else 405
            if self.method != b"OPTIONS":
                self.setResponseCode(http.NOT_ALLOWED)
                self.setHeader(b"allow", b"OPTIONS")
            self.setHeader(b"content-length", b"0")
            self.finish()
            return
        self.prepath = []
        self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        try:
            self.render(site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    # Leaving ``site.in_flight`` where Twisted fires ``notifyFinish`` (finished, or the
    # connection lost), not through a Deferred of its own: an open stream held one for its life.

    def _cleanup(self) -> None:
        self._leave_in_flight()
        # Before the channel turns to the next pipelined request, whose answer (or Twisted's
        # own 400 for it, written past us) must follow this one.
        self.channel.send_held()  # type: ignore[attr-defined]
        super()._cleanup()
        self._done(lost=False)

    # ``notifyFinish`` without Deferreds: a proxied call wanted two (one to cancel its handler
    # when the client goes away, one to stop writing to it), 2 % of its CPU to make and fire.
    _when_done: list[Callable[[bool], object]] | None = None

    def when_done(self, call: Callable[[bool], object]) -> None:
        """``call(lost)`` once: when the response is finished (``lost`` False), or when the
        connection is lost before (True), where ``notifyFinish`` fires."""
        if self._when_done is None:
            self._when_done = [call]
        else:
            self._when_done.append(call)

    def _done(self, lost: bool) -> None:
        calls, self._when_done = self._when_done, None
        for call in calls or ():
            call(lost)

    # A response's head, body and end are sent together, in one ``send(2)`` when the socket
    # has room (``DirectorChannel.hold_writes``): a write that completes a response of known
    # length, or ``finish``. Any other write (a chunk; more may follow in this turn, and the
    # end with ``finish``) goes through Twisted's buffer, which sends what the turn wrote as
    # one: sending it at once would cost a ``send(2)`` and a packet per part.

    def write(self, data: bytes) -> None:
        channel: Any = self.channel
        if channel is None or not channel.hold_writes():
            super().write(data)
            return
        try:
            super().write(data)
        finally:
            channel.send_held(at_once=self._complete())

    def _complete(self) -> bool:
        """Whether all of a response of known length has been written."""
        if self.chunked or self.finished:
            return False
        length = self.responseHeaders.getRawHeaders(b"content-length") or [b""]
        return length[0].isdigit() and self.sentLength >= int(length[0])

    def finish(self) -> None:
        channel: Any = self.channel
        if channel is None or not channel.hold_writes():
            super().finish()
            return
        try:
            super().finish()
        finally:
            channel.send_held()

    def connectionLost(self, reason: Any) -> None:
        self._leave_in_flight()
        super().connectionLost(reason)
        self._done(lost=True)
        if self.span is not None and not self.finished:  # the client went away
            self.end_span(answered=False)

    def end_span(self, answered: bool = True, route: str | None = None) -> None:
        """End the server span (once) with the response's status (``answered``: the response
        was finished, rather than cut by the client going away) and, when one answered, the
        template of the route, which names it (``POST /playbooks/{playbook_id}/mcp``)."""
        span, self.span = self.span, None
        if span is None:
            return
        if route is not None and route != OTHER:
            span.set_attribute("http.route", route)
            span.update_name(f"{self.method.decode('latin-1')} {route}")
        span.set_attribute("http.response.status_code", self.code)
        if self.code >= 500 or not answered:
            tracing.fail(span, kind=str(self.code) if answered else "connection_lost")
        span.end()

    def _leave_in_flight(self) -> None:
        site = getattr(getattr(self, "channel", None), "site", None)
        in_flight = getattr(site, "in_flight", None)
        if in_flight is not None:
            in_flight.discard(self)

    @property
    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_body_bytes", 4 * 1024 * 1024)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit:
            self._reject_oversized()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self._limit:
            self._reject_oversized()
            return
        super().handleContentChunk(data)

    def _reject_oversized(self) -> None:
        """Answer 413 at once and close: reading (even discarding) the rest only costs us."""
        if self._rejected:
            return
        self._rejected = True
        self.trace_id = trace_id_for(self.getHeader(b"traceparent"))
        transport: Any = self.channel.transport
        transport.write(raw_response(
            b"413 Payload Too Large", self.trace_id, "payload_too_large",
            f"request body exceeds the limit of {self._limit} bytes", {"limit": self._limit}))
        log.info("{method} {path} 413 body too large", method=self.method.decode("latin-1"),
                 path=redact(self.uri), status=413, trace_id=self.trace_id)
        metrics = getattr(getattr(self.channel, "site", None), "metrics", None)
        if metrics is not None:
            self.code = 413
            metrics.http_request(self, self.now() - self.started)
        transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        super().requestReceived(command, path, version)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        # Every EventStream registers itself here, its content type set: from now on this
        # connection is an established stream, which the per-address cap does not count.
        content_type = self.responseHeaders.getRawHeaders(b"content-type") or [b""]
        if content_type[0].startswith(b"text/event-stream"):
            self.channel.became_stream()  # type: ignore[attr-defined]


class DirectorChannel(http.HTTPChannel):
    """HTTP/1.1 with deadlines that a trickling client cannot extend, and per-address counting.

    Twisted's own timeout (``timeOut``, from ``Site(timeout=)``) is an *idle* timeout: every
    byte received restarts it, so a client sending one header line every few seconds keeps a
    connection for ever, and it is off while a request is answered. It stays, as the idle
    keep-alive timeout between requests. On top of it: a request's head (request line and
    headers) must be complete within ``REQUEST_HEADER_TIMEOUT_SECONDS`` of its first byte (of
    the connection, for its first request), and its body within
    ``REQUEST_BODY_TIMEOUT_SECONDS`` of the end of the head; past a deadline the client gets
    408 (nothing, if it sent no byte of the request) and the connection closes. A request being
    answered, a stream included, has no deadline.

    The deadlines are checked by the site's sweep (``DirectorSite.sweep``), not by a timer per
    request: a ``callLater`` armed and cancelled costs ~7 µs here, twice per POST, on the MCP
    hot path; a set entry and a clock read cost well under 1 µs."""

    site: DirectorSite  # set by Site.buildProtocol
    #: What the per-address cap counts this connection under; None when nothing is counted.
    address_key: str | None = None
    holds_slot = False  # counted now (every connection but an established stream)
    deadline_at: float | None = None  # the site's clock's time by which the current part is due
    deadline_part = ""  # "head" or "body"
    _request_started = False  # some byte of the request being received has arrived
    _timed_out = False
    _host: Any = None  # the local address (``getHost``)
    _held: list[bytes] | None = None  # what a request wrote, not sent yet (``hold_writes``)

    def connectionMade(self) -> None:
        super().connectionMade()
        self._expect("head", self.site.header_timeout)

    def getHost(self) -> Any:
        """The local address, asked of the socket once: every ``Request`` asks for it, and a
        TCP transport answers with a ``getsockname(2)`` each time (2.5 % of a proxied call's
        CPU), for an address that a connection never changes."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def dataReceived(self, data: bytes) -> None:
        if self._timed_out:
            return  # answered 408 and closing: nothing more is read
        if not self._handlingRequest:
            self._request_started = True
            if self.deadline_at is None:
                self._expect("head", self.site.header_timeout)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        if self.length != 0:  # a Content-Length, or chunked (None)
            self._expect("body", self.site.body_timeout)
        else:
            self._received()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._received()
        self._request_started = False
        super().allContentReceived()

    def became_stream(self) -> None:
        self.site.release_slot(self)

    # --- writing: what a request writes in one call, sent at once -------------------------

    def hold_writes(self) -> bool:
        """Collect what the current request writes until ``send_held``, then send it as one
        (``director.direct_send``: at once when the socket is idle, else through Twisted's
        buffer). False when already collecting: the caller that started sends."""
        if self._held is not None:
            return False
        self._held = []
        return True

    def send_held(self, at_once: bool = True) -> None:
        """Send what was held: at once when that is safe (``at_once``), else (or also then,
        when it is not safe) through Twisted's buffer."""
        held, self._held = self._held, None
        if not held:
            return
        data, transport = b"".join(held), self.transport
        if at_once:
            direct_send.write(transport, data)
        else:
            cast(Any, transport).write(data)

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        held = self._held
        if held is None:
            super().writeHeaders(version, code, reason, headers)
            return
        if not isinstance(headers, Headers):  # as Twisted does: through Headers, sanitised
            pairs, headers = headers, Headers()
            for name, value in pairs:
                headers.addRawHeader(name, value)
        held += (version, b" ", code, b" ", reason, b"\r\n")
        for name, values in headers.getAllRawHeaders():
            for value in values:
                held += (name, b": ", value, b"\r\n")
        held.append(b"\r\n")

    def write(self, data: bytes) -> None:
        if self._held is None:
            super().write(data)
        else:
            self._held.append(data)

    def writeSequence(self, iovec: Any) -> None:
        if self._held is None:
            super().writeSequence(iovec)
        else:
            self._held.extend(iovec)

    def requestDone(self, request: Any) -> None:
        if self.address_key is not None and not self.holds_slot and \
                not self.site.take_slot(self):
            # A stream ended on a connection that would stay open, but its address holds as
            # many as it may meanwhile: the connection ends with the stream.
            self.persistent = False
        super().requestDone(request)

    def timeoutConnection(self) -> None:
        # Twisted's own logs every idle keep-alive it closes, with the peer, at info.
        self._close_and_abort_later()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._received()
        self.site.connection_closed(self)
        super().connectionLost(reason)

    def _expect(self, part: str, seconds: float) -> None:
        reactor: Any = self.site.reactor
        self.deadline_at = reactor.seconds() + seconds
        self.deadline_part = part
        self.site.receiving.add(self)

    def _received(self) -> None:
        if self.deadline_at is not None:
            self.deadline_at = None
            self.site.receiving.discard(self)

    def deadline_passed(self) -> None:
        """Called by the sweep once ``deadline_at`` is past."""
        part = self.deadline_part
        seconds = self.site.header_timeout if part == "head" else self.site.body_timeout
        self._received()
        self._timed_out = True
        if self._request_started:
            trace_id = random_hex.hex(16)
            self.site.request_timed_out(self, part, seconds, trace_id)
            transport: Any = self.transport
            transport.write(raw_response(
                b"408 Request Timeout", trace_id, "request_timeout",
                f"the request {part} did not arrive within {seconds:g} s",
                {"part": part, "seconds": seconds}))
        self._close_and_abort_later()

    def _close_and_abort_later(self) -> None:
        """Close, and abort if the peer does not let us (as Twisted's own timeout does)."""
        if self.abortTimeout is not None:
            reactor: Any = self.site.reactor
            self._abortingCall = reactor.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()


class DirectorSite(server.Site):
    requestFactory = DirectorRequest
    protocol = DirectorChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource, settings: Settings, metrics: Metrics | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("timeout", settings.idle_connection_timeout_seconds)
        super().__init__(resource, **kwargs)
        self.metrics = metrics
        self.max_body_bytes = settings.max_request_body_bytes
        self.header_timeout = settings.request_header_timeout_seconds
        self.body_timeout = settings.request_body_timeout_seconds
        self.connection_cap = settings.max_connections_per_address
        # A trusted proxy speaks for many clients at once: capping it would cap them all (the
        # per-client cap then belongs to the proxy, e.g. nginx's limit_conn).
        self.uncapped = settings.trusted_proxies
        # The access line is at info: below LOG_LEVEL it is not even built (~10 µs a request).
        self.access_log = THRESHOLD.get(settings.log_level, 30) <= THRESHOLD["info"]
        self.displayTracebacks = False
        self.open_channels: set[Any] = set()  # DirectorChannel
        self.in_flight: set[DirectorRequest] = set()
        #: Route templates by Klein rule, for the server spans' names (tracing on).
        self.route_templates: dict[tuple[str, str], str] = {}
        #: Connections counted per address key (see ``address_key``); absent means none.
        self.connections_by_address: dict[str, int] = {}
        self._refusals = RefusalLog(self.connection_cap)
        #: Connections receiving a request's head or body, each with its ``deadline_at``.
        self.receiving: set[DirectorChannel] = set()
        self._sweeper = task.LoopingCall(self.sweep)
        self._date: tuple[int, bytes] = (-1, b"")

    def http_date(self) -> bytes:
        """A response's ``Date`` now, by this site's clock: made once a second."""
        reactor: Any = self.reactor
        second = int(reactor.seconds())
        if second != self._date[0]:
            self._date = (second, http.datetimeToString(second))
        return self._date[1]

    def startFactory(self) -> None:
        super().startFactory()
        self._sweeper.clock = self.reactor
        self._sweeper.start(SWEEP_SECONDS, now=False)

    def stopFactory(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()
        super().stopFactory()

    def sweep(self) -> None:
        """Cut the connections whose head or body is overdue (at most ``SWEEP_SECONDS`` late)."""
        reactor: Any = self.reactor
        now = reactor.seconds()
        for channel in [c for c in self.receiving if c.deadline_at is not None
                        and c.deadline_at <= now]:
            channel.deadline_passed()

    def buildProtocol(self, addr: Any) -> Any:
        key = self._address_key(addr)
        if key is not None and self.connections_by_address.get(key, 0) >= self.connection_cap:
            reactor: Any = self.reactor
            self._refusals.refused(key, reactor.seconds())
            return None  # the listening port closes the connection at once
        channel: DirectorChannel = super().buildProtocol(addr)
        self.open_channels.add(channel)
        if key is not None:
            channel.address_key = key
            self.take_slot(channel)
        return channel

    def _address_key(self, addr: Any) -> str | None:
        if not self.connection_cap:
            return None
        host = getattr(addr, "host", None)  # None for a unix socket
        if not isinstance(host, str) or _in_networks(host, self.uncapped):
            return None
        return address_key(host)

    def take_slot(self, channel: DirectorChannel) -> bool:
        """Count ``channel`` against its address's cap; False when the address is at it."""
        assert channel.address_key is not None
        count = self.connections_by_address.get(channel.address_key, 0)
        if count >= self.connection_cap:
            return False
        self.connections_by_address[channel.address_key] = count + 1
        channel.holds_slot = True
        return True

    def release_slot(self, channel: DirectorChannel) -> None:
        if not channel.holds_slot:
            return
        channel.holds_slot = False
        key = channel.address_key
        assert key is not None
        remaining = self.connections_by_address[key] - 1
        if remaining:
            self.connections_by_address[key] = remaining
        else:
            del self.connections_by_address[key]

    def connection_closed(self, channel: DirectorChannel) -> None:
        self.open_channels.discard(channel)
        self.release_slot(channel)

    def request_timed_out(self, channel: DirectorChannel, part: str, seconds: float,
                          trace_id: str) -> None:
        if not self.access_log:
            return
        # The request line, once it arrived (HTTPChannel keeps it until the body is in).
        method = getattr(channel, "_command", b"-")
        path = getattr(channel, "_path", b"-")
        log.info("{method} {path} 408 request {part} not received within {seconds:g} s",
                 method=method.decode("latin-1"), path=redact(path), status=408, part=part,
                 seconds=seconds, trace_id=trace_id)

    def log(self, request: http.Request) -> None:
        started = getattr(request, "started", None)
        reactor: Any = self.reactor
        duration = (reactor.seconds() - started) * 1000 if started is not None else 0.0
        if self.metrics is not None:
            self.metrics.http_request(request, duration / 1000)
        span_id = getattr(request, "span_id", "")
        if span_id:
            request.end_span(  # type: ignore[attr-defined]
                route=route_template(request, self.route_templates))
        if not self.access_log:
            return
        log.info(
            "{method} {path} {status} {duration_ms:.1f}ms",
            method=request.method.decode("latin-1"),
            path=redact(request.uri),
            status=request.code,
            duration_ms=round(duration, 3),
            trace_id=getattr(request, "trace_id", ""),
            **({"span_id": span_id} if span_id else {}),
        )


class EdgeResource(Resource):
    """Wraps the application resource with the edge policy (see the module docstring)."""

    isLeaf = True

    def __init__(self, application: Resource, settings: Settings) -> None:
        super().__init__()
        self.application = application
        self.settings = settings
        self.allowed_origins = frozenset((settings.base_origin, *settings.allowed_origins))
        base_host = (urlsplit(settings.base_url).hostname or "").lower()
        origin_hosts = {(urlsplit(o).hostname or "").lower() for o in settings.allowed_origins}
        self.allowed_hosts = frozenset(
            {base_host, *origin_hosts, *(host_name(h) for h in settings.allowed_hosts)}
        )

    def origin_allowed(self, origin: str) -> bool:
        """Only BASE_URL's origin and ALLOWED_ORIGINS, in every environment. Loopback origins
        get no favour even in development: any local page or process (``http://evil.localhost``,
        a dev server on another port) could otherwise make credentialed calls with the
        browser's session cookie. A local tool's origin belongs in ALLOWED_ORIGINS."""
        try:
            return origin_of(origin) in self.allowed_origins
        except ValueError:  # a port that is not a number, an unbalanced [: not an origin
            return False

    def host_allowed(self, host_header: str) -> bool:
        host = host_name(host_header)
        return host in self.allowed_hosts or is_loopback_name(host)

    def render(self, request: DirectorRequest) -> Any:
        if tracing.TRACER is None:
            request.trace_id = trace_id_for(request.getHeader(b"traceparent"))
            return self._render(request)
        # The trace id logged and answered is the span's: the client's, or a new trace's.
        span = request.span = tracing.request_span(request)
        request.trace_id, request.span_id = tracing.hex_ids(span)
        token = tracing.attach(span)
        try:
            return self._render(request)
        finally:
            tracing.detach(token)

    def _render(self, request: DirectorRequest) -> Any:
        # Ours and constant (the trace id is hex): straight into ``Headers`` (stored_headers).
        headers = request.responseHeaders
        put(headers, TRACE_ID_HEADER, request.trace_id.encode())
        for name, value in EVERY_RESPONSE_HEADERS:
            put(headers, name, value)

        if request.path not in HOST_CHECK_EXEMPT:
            host = (request.getHeader(b"host") or b"").decode("latin-1")
            if not self.host_allowed(host):
                return self._refuse(
                    request, "host_not_allowed",
                    f"Host {host!r} is not served here; set BASE_URL to the public URL or add "
                    "the name to ALLOWED_HOSTS",
                )

        origin_header = request.getHeader(b"origin")
        if origin_header is not None:
            origin = origin_header.decode("latin-1")
            if not self.origin_allowed(origin):
                return self._refuse(
                    request, "origin_not_allowed",
                    f"Origin {origin!r} is not allowed; add it to ALLOWED_ORIGINS",
                )
            request.setHeader(b"access-control-allow-origin", origin_header)
            request.setHeader(b"access-control-allow-credentials", b"true")
            request.setHeader(b"access-control-expose-headers", EXPOSED_HEADERS)
            request.setHeader(b"vary", b"Origin")
            if request.method == b"OPTIONS" and request.getHeader(
                b"access-control-request-method"
            ):
                request.setResponseCode(204)
                request.setHeader(b"access-control-allow-methods", ALLOWED_METHODS)
                wanted = request.getHeader(b"access-control-request-headers")
                if wanted:
                    request.setHeader(b"access-control-allow-headers", wanted)
                request.setHeader(b"access-control-max-age", b"600")
                return b""
        return self.application.render(request)

    @staticmethod
    def _refuse(request: DirectorRequest, code: str, message: str) -> bytes:
        request.setResponseCode(403)
        request.setHeader(b"content-type", b"application/json")
        # The client's mistake (or an unconfigured name): the access line says 403 and the body
        # the fix; a line of its own at warn per request would be a free log flood.
        log.debug("refused {method} {path}: {reason}", method=request.method.decode("latin-1"),
                 path=redact(request.uri), reason=message, trace_id=request.trace_id)
        return json.dumps({"error": {"code": code, "message": message, "details": {}}}).encode()
