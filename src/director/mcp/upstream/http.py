"""Upstream MCP servers over HTTP: Streamable HTTP and the 2024-11-05 HTTP+SSE transport.

Handshake era only (protocol revisions 2024-11-05 … 2025-11-25). Everything runs on the
Twisted reactor through ``twisted.web.client.Agent`` over a shared, persistent
``UpstreamPool`` whose every new connection is made by ``connect.CheckedEndpoints``: the
SSRF rail on the addresses actually connected to, TLS verified by a browser-like policy with
service-identity. Redirects are not followed (a 3xx is an error naming its target). The
``mcp`` SDK is never used here.

``StreamableHttpUpstream`` — one MCP session over Streamable HTTP:

* every message is a POST (``Accept: application/json, text/event-stream``) carrying the
  configured headers, ``Mcp-Session-Id`` once the server issued one and
  ``MCP-Protocol-Version`` once negotiated. A request's answer is either one JSON body or an
  SSE stream that may carry notifications, progress, log messages and server→client
  requests before the response; server→client requests are answered by POSTing the
  response (a JSON body holding several messages, one per line, as the TypeScript SDK's
  conformance fixture sends, is taken message by message). Notifications and responses
  expect 202.
* after ``initialize`` + ``notifications/initialized`` a GET stream is opened for
  server-initiated messages (405: the server has none, fine). When it drops it is reopened
  with a growing delay (the server's ``retry:`` if it sent one) and ``Last-Event-ID``.
  A POST stream that ends before its response is resumed the same way, if the server gave
  its events ids (the 2025-11-25 polling pattern); otherwise the request fails.
* session expiry: a 404 to a request that carried a session id (or a 400 whose body talks
  about the session, as servers built on the TypeScript SDK's example answer) means the
  server forgot the session. The session re-initialises transparently, once per request,
  and retries that request; this is logged but ``on_closed`` is *not* called, because the
  session object goes on working (``on_restored`` is called). Only if re-initialising
  fails is ``on_closed`` called (once per such loss); the next request tries the handshake
  again, so the object heals itself when the server comes back.
* ``close()`` aborts everything in flight and DELETEs the session.

``LegacySseUpstream`` — the 2024-11-05 HTTP+SSE transport: GET the SSE URL, wait for the
``endpoint`` event (resolved against the SSE URL; it must stay on the same origin, so the
configured credentials are never sent elsewhere), POST messages there (202) and read every
answer, notification and server→client request from the one stream. That stream *is* the
session: when it ends, pending requests fail and ``on_closed`` is called; the next request
reconnects and re-initialises.

``connect_http`` follows the specification's backwards-compatibility procedure: try
Streamable HTTP, and if the ``initialize`` POST is answered 400, 404 or 405, fall back to
the legacy transport at the same URL. ``HttpUpstream`` does the same inside ``start()``,
for factories that must hand out an unstarted session.

Common behaviour: the JSON-RPC side (ids, timeouts restarted by progress, progress tokens,
cancellation both ways, dispatch) is the session's ``peer.Peer``, as over stdio; these classes
move its messages. A request's POST (and its resumptions) is aborted when the request times
out or is cancelled (``notifications/cancelled`` is POSTed), and left to end by itself once
the server answered it. Server→client requests (``on_request``) that arrived on a request's
stream are cancelled when that request ends, since the server no longer waits for them; their
answers, notifications and cancellations are POSTed in the background. Messages larger than
``max_message_size`` (16 MiB) fail the request (or are dropped from the GET stream) without
ever being buffered whole. Error messages read ``[name] POST https://host/path: HTTP 401
Unauthorized: <first 200 characters of the body>`` or ``[name] failed to connect to
https://host/path: connection refused``; query strings are never shown (they may hold keys).

An optional ``authorization`` (``authorization.UpstreamAuthorization``, given by the factory
for servers behind OAuth) adds its headers to every request and is told of each 401/403,
which it may have sent again once; that is all the transports know of OAuth.

A later protocol era (2026-07-28, stateless) can subclass ``StreamableHttpUpstream``:
``_handshake`` (what ``start()`` and re-initialisation do) and ``_post_headers`` (the
headers of each POST) are the two places that differ.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urljoin, urlsplit, urlunsplit

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from director import __version__, tracing
from director.mcp import jsonrpc
from director.mcp.jsonrpc import Message, ProtocolError
from director.mcp.sse import Event, EventTooLarge, SseParser
from director.mcp.upstream.authorization import UpstreamAuthorization
from director.mcp.upstream.backoff import Backoff
from director.mcp.upstream.base import (
    LEGACY_VERSIONS,
    RequestHandler,
    UpstreamError,
    UpstreamSession,
    default_request_handler,
    encoded,
    initialize_params,
    run_hook,
)
from director.mcp.upstream.connect import CheckedEndpoints, Refused
from director.mcp.upstream.peer import Outgoing, Peer, Timer

log = Logger(namespace="mcp.upstream.http")

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: How long a notification or response POST may take to be accepted (202).
SHORT_EXCHANGE_TIMEOUT = 10.0
#: How long close() waits for the DELETE of the session.
CLOSE_TIMEOUT = 5.0
ERROR_BODY_CHARS = 200
#: Answers to the ``initialize`` POST that mean "no Streamable HTTP here" (spec, backwards
#: compatibility); 401/403 and the rest are real errors and are reported as such.
FALLBACK_STATUSES = frozenset({400, 404, 405})
#: Reconnection delays of the GET stream (and of a POST stream's resumption), in seconds.
RECONNECT_INITIAL = 1.0
RECONNECT_MAX = 30.0
#: A dropped POST stream is resumed at most this many times in a row without news.
RESUME_ATTEMPTS = 3
DEFAULT_POOL_SIZE = 16

JSON = "application/json"
EVENT_STREAM = "text/event-stream"


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory …" log line for every connection


class UpstreamPool(HTTPConnectionPool):
    """Connections to upstream servers, and ``endpoints``: how every new one is made."""

    _factory = _QuietFactory

    def __init__(self, reactor: Any, endpoints: CheckedEndpoints, persistent: bool = True) -> None:
        super().__init__(reactor, persistent=persistent)
        self.endpoints = endpoints


def new_pool(reactor: Any, max_per_host: int = DEFAULT_POOL_SIZE, *,
             endpoints: CheckedEndpoints | None = None) -> UpstreamPool:
    """The one connection pool all HTTP upstream sessions of a daemon share: persistent,
    at most ``max_per_host`` idle connections kept per host (busy ones are not limited).
    ``endpoints`` default: the rails with ``DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS`` off."""
    pool = UpstreamPool(reactor, endpoints if endpoints is not None else CheckedEndpoints(reactor))
    pool.maxPersistentPerHost = max_per_host
    return pool


def upstream_agent(reactor: Any, pool: HTTPConnectionPool | None) -> Agent:
    """An Agent whose new connections are all checked: ``pool``'s endpoints, or the strict
    default for any other pool."""
    endpoints = pool.endpoints if isinstance(pool, UpstreamPool) else CheckedEndpoints(reactor)
    return Agent.usingEndpointFactory(reactor, endpoints, pool=pool)


def display_url(url: str) -> str:
    """``url`` for messages: no credentials, no query (``?key=…``), no fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


class _Response(Protocol):
    """The parts of ``_Response`` used here (zope interfaces are no types to mypy)."""

    code: int
    phrase: bytes
    headers: Headers
    length: Any

    def deliverBody(self, protocol: protocol.Protocol) -> None: ...


class HttpStatusError(UpstreamError):
    """The server answered with an HTTP error status (``body``: the start of its body)."""

    def __init__(self, message: str, status: int, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class _SessionExpired(Exception):
    """404 (or a 400 about the session) to a message that carried a session id."""


class _Aborted(Exception):
    """We dropped the exchange ourselves (cancelled, timed out, closed, finished)."""


class _Enough(Exception):
    """Enough of an error body was read."""


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BodyReader(protocol.Protocol):
    """Hands a response body to ``sink`` chunk by chunk; ``abort()`` drops the connection."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        self.done: defer.Deferred[None] = defer.Deferred()
        self.finished = False
        self.aborted = False
        self.failure: Exception | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.aborted:
            return
        try:
            self._sink(data)
        except Exception as failure:
            self.failure = failure
            self.abort()

    def abort(self) -> None:
        if self.aborted or self.finished:
            return
        self.aborted = True
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.finished = True
        if self.failure is not None:
            self.done.errback(self.failure)
        elif self.aborted:
            self.done.errback(_Aborted())
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class _HttpCall:
    """One HTTP exchange in flight; ``abort()`` drops it at whatever stage it is."""

    def __init__(self, keep_once_answered: bool = True) -> None:
        #: A request's own POST stream is left to end by itself once the answer is in (so
        #: its connection goes back to the pool); resumption streams are dropped.
        self.keep_once_answered = keep_once_answered
        self.requesting: defer.Deferred[_Response] | None = None
        self.reader: _BodyReader | None = None
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        if self.requesting is not None and not self.requesting.called:
            self.requesting.cancel()
        if self.reader is not None:
            self.reader.abort()


class _Once:
    """Runs one coroutine at a time: concurrent callers share its outcome, and a caller's
    cancellation never cancels it for the others."""

    def __init__(self) -> None:
        self._waiters: list[defer.Deferred[None]] | None = None

    @property
    def running(self) -> bool:
        return self._waiters is not None

    async def run(self, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._waiters is None:
            self._waiters = [waiter]
            defer.ensureDeferred(factory()).addBoth(self._finish)
        else:
            self._waiters.append(waiter)
        await waiter

    def _finish(self, result: object) -> None:
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)


class _HttpSession:
    """What both HTTP transports share: requests, progress, timeouts, dispatch."""

    transport_name = "http"

    def __init__(self, name: str, url: str, headers: dict[str, str], reactor: Any,
                 pool: HTTPConnectionPool | None, *, timeout_default: float = 60.0,
                 max_message_size: int = MAX_MESSAGE_SIZE,
                 client_capabilities: dict[str, Any] | None = None,
                 authorization: UpstreamAuthorization | None = None) -> None:
        self.name = name
        self.url = url
        self.headers = dict(headers)
        #: Adds credentials to each request and hears of its 401/403 (``authorization.py``).
        self.authorization = authorization
        self.timeout_default = timeout_default
        self.max_message_size = max_message_size
        self.client_capabilities = client_capabilities
        self.initialize_result: dict[str, Any] = {}
        self.protocol_version: str | None = None
        self.on_notification: Callable[[Message], object] = lambda message: None
        self.on_request: RequestHandler = default_request_handler
        self.on_closed: Callable[[str], object] = lambda reason: None
        #: Called with the new ``initialize`` result after a transparent re-initialisation
        #: (the upstream forgot the session): subscriptions, log levels and cached lists of
        #: the old session are gone upstream.
        self.on_restored: Callable[[dict[str, Any]], object] = lambda result: None
        self._reactor: Any = reactor
        self._agent: Any = upstream_agent(reactor, pool)
        self._display = display_url(url)
        #: The JSON-RPC conversation (``peer.py``); this class moves its messages over HTTP.
        self._peer = Peer(name, self._transmit, reactor,
                          on_request=lambda method, params: self.on_request(method, params),
                          on_notification=self._notified, on_finished=self._request_ended)
        #: The HTTP exchanges of each request still in flight (its POST, its resumptions).
        self._exchanges: dict[Outgoing, set[_HttpCall]] = {}
        self._calls: set[_HttpCall] = set()
        self._sleeps: set[defer.Deferred[None]] = set()
        self._closed = False
        self._established = False
        self._ever_established = False
        self._loss_reported = False
        self._several_messages_noted = False
        self._connecting = _Once()

    # --- the UpstreamSession interface ---------------------------------------------------

    async def start(self) -> None:
        await self._establish()

    async def request(self, method: str, params: dict[str, Any] | None = None, *,
                      timeout: float | None = None,
                      on_progress: Callable[[dict[str, Any]], object] | None = None
                      ) -> dict[str, Any]:
        if self._closed:
            raise UpstreamError(f"[{self.name}] the session is closed")
        return await self._open(method, params, timeout, on_progress).deferred

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        if self._closed:
            return
        async def send() -> None:
            await self._ensure_established()
            self._peer.notify(method, params)

        defer.ensureDeferred(send()).addErrback(
            lambda failure: log.warn("[{server}] {method} could not be sent: {error}",
                                     server=self.name, method=method,
                                     error=failure.getErrorMessage()))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._established = False
        self._peer.fail_all(UpstreamError(f"[{self.name}] the session was closed"))
        for sleep in list(self._sleeps):
            sleep.cancel()
        for call in list(self._calls):
            call.abort()
        await self._close_transport()

    # --- what the transports implement -------------------------------------------------

    async def _handshake(self) -> None:
        raise NotImplementedError

    async def _send_request(self, pending: Outgoing) -> None:
        raise NotImplementedError

    async def _send_message(self, message: Message, body: bytes | None = None) -> None:
        """POST a notification or a response (no answer expected but an HTTP status);
        ``body``: its encoding, if made already."""
        raise NotImplementedError

    async def _close_transport(self) -> None:
        pass

    # --- session establishment ---------------------------------------------------------

    async def _establish(self) -> None:
        if self._closed:
            raise UpstreamError(f"[{self.name}] the session is closed")
        await self._connecting.run(self._handshake_once)

    async def _handshake_once(self) -> None:
        if self._established:
            return
        try:
            await self._handshake()
        except _Aborted:
            raise UpstreamError(f"[{self.name}] the handshake was aborted"
                                f"{' (the session was closed)' if self._closed else ''}"
                                ) from None
        if self._closed:
            raise UpstreamError(f"[{self.name}] the session was closed")
        self._established = True
        self._loss_reported = False
        reinitialised = self._ever_established
        self._ever_established = True
        if reinitialised:
            run_hook(self.name, "on_restored", self.on_restored, self.initialize_result)

    async def _ensure_established(self) -> None:
        if not self._established:
            await self._establish()

    async def _initialize(self) -> dict[str, Any]:
        """Send ``initialize``: its result."""
        return await self._open("initialize", initialize_params(self.client_capabilities),
                                None, None, handshake=True).deferred

    def _accept(self, result: dict[str, Any]) -> None:
        version = result.get("protocolVersion")
        if version not in LEGACY_VERSIONS:
            raise UpstreamError(f"[{self.name}] the server answered initialize with protocol "
                                f"version {version!r}, which the gateway does not speak")
        self.initialize_result = result
        self.protocol_version = version

    def _report_lost(self, reason: str) -> None:
        self._established = False
        if self._closed or self._loss_reported or not self._ever_established:
            return
        self._loss_reported = True
        log.warn("[{server}] upstream session lost: {reason}", server=self.name, reason=reason)
        try:
            self.on_closed(reason)
        except Exception:
            log.failure("[{server}] on_closed failed", server=self.name)

    # --- requests ------------------------------------------------------------------------

    def _open(self, method: str, params: dict[str, Any] | None, timeout: float | None,
              on_progress: Callable[[dict[str, Any]], object] | None, *,
              handshake: bool = False) -> Outgoing:
        """A request registered with the peer (its timeout runs from now, establishing the
        session included) and on its way."""
        outgoing = self._peer.open(
            method, params, timeout=self.timeout_default if timeout is None else timeout,
            on_progress=on_progress, handshake=handshake)
        defer.ensureDeferred(self._deliver(outgoing)).addErrback(self._delivery_failed,
                                                                 outgoing)
        return outgoing

    async def _deliver(self, pending: Outgoing) -> None:
        if not pending.handshake:
            await self._ensure_established()
        if not pending.finished:
            await self._send_request(pending)

    def _delivery_failed(self, failure: Failure, pending: Outgoing) -> None:
        if pending.finished:
            return
        if failure.check(UpstreamError):
            self._peer.fail(pending, failure.value)  # type: ignore[arg-type]
        elif failure.check(_Aborted, defer.CancelledError):
            self._peer.fail(pending, UpstreamError(f"[{self.name}] {pending.method}: aborted"))
        else:
            log.failure("[{server}] sending {method} failed", failure, server=self.name,
                        method=pending.method)
            self._peer.fail(pending, UpstreamError(
                f"[{self.name}] {pending.method}: {failure.getErrorMessage()}"))

    def _attach(self, pending: Outgoing, call: _HttpCall) -> None:
        if not pending.finished:
            self._exchanges.setdefault(pending, set()).add(call)

    def _detach(self, pending: Outgoing, call: _HttpCall) -> None:
        calls = self._exchanges.get(pending)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self._exchanges[pending]

    def _request_ended(self, pending: Outgoing, answered: bool) -> None:
        """The peer's ``on_finished``: what is still in flight for the request is dropped, but
        for its own POST stream once the server answered (a result or an error): it is left to
        end by itself, so that its connection goes back to the pool whole. (Dropped there, in
        the middle of reading the answer's event, it could go back to the pool closing, and
        fail the next POST.)"""
        for call in self._exchanges.pop(pending, ()):
            if not (answered and call.keep_once_answered):
                call.abort()

    def _transmit(self, message: Message) -> None:
        """The peer's ``send`` for notifications and answers: POSTed in the background."""
        if self._closed:
            return
        body = encoded(self.name, message)
        defer.ensureDeferred(self._send_message(message, body)).addErrback(
            lambda failure: log.info("[{server}] {what} not delivered: {error}",
                                     server=self.name, what=message.get("method") or "an answer",
                                     error=failure.getErrorMessage()))

    # --- incoming messages ------------------------------------------------------------------

    def _event(self, event: Event, origin: Outgoing | None = None) -> None:
        if event.event == "message" and event.data.strip():
            self._received(event.data, origin)

    def _received(self, raw: str | bytes, origin: Outgoing | None = None) -> None:
        """One message from the upstream; ``origin``: the request on whose stream it came."""
        try:
            message = jsonrpc.parse_message(raw, repair=True)
        except ProtocolError as problem:
            log.warn("[{server}] ignored a malformed message from the upstream: {problem}",
                     server=self.name, problem=problem.message)
            return
        self._peer.received(message, origin)

    def _received_json_body(self, body: bytes) -> None:
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = None
            lines = [line for line in body.split(b"\n") if line.strip()]
            if len(lines) > 1:  # several messages, one per line: each is handled
                self._note_several_messages(len(lines))
                for line in lines:
                    self._received(line)
                return
        if isinstance(decoded, list):  # a 2025-03-26 batch
            for item in decoded:
                self._received(json.dumps(item))
        else:
            self._received(body)

    def _note_several_messages(self, count: int) -> None:
        """Logged once per session: the TypeScript SDK's conformance fixture answers this way
        (notifications, then the response) for every such call."""
        if not self._several_messages_noted:
            self._several_messages_noted = True
            log.info("[{server}] answered with {count} JSON-RPC messages in one "
                     "application/json body (one per line, not one JSON text as the "
                     "specification says); each is handled", server=self.name, count=count)

    def _notified(self, message: Message) -> None:
        self.on_notification(message)

    # --- HTTP plumbing ------------------------------------------------------------------------

    def _base_headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"director/{__version__}"}
        headers.update(self.headers)
        if tracing.TRACER is not None:  # W3C trace context of the request being made
            tracing.headers_with_context(headers)
        return headers

    async def _http(self, call: _HttpCall, method: str, url: str, headers: dict[str, str],
                    body: bytes | None = None) -> _Response:
        authorization = self.authorization
        if authorization is None:
            return await self._exchange(call, method, url, headers, body)
        return await self._authorized_exchange(authorization, call, method, url, headers, body)

    async def _authorized_exchange(self, authorization: UpstreamAuthorization, call: _HttpCall,
                                   method: str, url: str, headers: dict[str, str],
                                   body: bytes | None) -> _Response:
        """``_exchange`` with the authorization's headers; a 401/403 it claims is sent again
        once (``authorization.py`` states the contract)."""
        sent = {**headers, **await authorization.headers(url)}
        response = await self._exchange(call, method, url, sent, body)
        for retried in (False, True):
            if response.code not in (401, 403):
                return response
            challenges = [value.decode("latin-1") for value in
                          response.headers.getRawHeaders(b"www-authenticate") or []]
            try:
                again = await authorization.refused(url, response.code, challenges, sent,
                                                    retried)
            except BaseException:
                await self._discard(response, call)
                raise
            if not again or retried:
                return response
            await self._discard(response, call)
            sent = {**headers, **await authorization.headers(url)}
            response = await self._exchange(call, method, url, sent, body)
        return response

    async def _exchange(self, call: _HttpCall, method: str, url: str, headers: dict[str, str],
                        body: bytes | None = None) -> _Response:
        if call.aborted:
            raise _Aborted()
        self._calls.add(call)
        producer: Any = _BytesProducer(body) if body is not None else None
        requesting: defer.Deferred[_Response] = self._agent.request(
            method.encode(), url.encode(),
            Headers({key: [value] for key, value in headers.items()}), producer)
        call.requesting = requesting
        try:
            return await requesting
        except defer.CancelledError:
            raise _Aborted() from None
        except Exception as failure:
            if call.aborted:
                raise _Aborted() from None
            raise self._connection_error(method, url, failure) from None

    def _connection_error(self, method: str, url: str, failure: Exception) -> UpstreamError:
        shown = display_url(url)
        if isinstance(failure, Refused):
            return UpstreamError(f"[{self.name}] {shown}: {failure}")
        reasons = getattr(failure, "reasons", None)
        if reasons:  # ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed
            inner = reasons[0].value
            if isinstance(inner, error.ConnectionDone | error.ConnectionLost):
                detail = "the connection closed without an answer"
            else:
                detail = _describe(inner)
            return UpstreamError(f"[{self.name}] {method} {shown}: {detail}")
        if isinstance(failure, error.ConnectError | error.DNSLookupError):
            return UpstreamError(f"[{self.name}] failed to connect to {shown}: "
                                 f"{_describe(failure)}")
        return UpstreamError(f"[{self.name}] {method} {shown}: {_describe(failure)}")

    async def _read_body(self, response: _Response, call: _HttpCall, limit: int, *,
                         truncate: bool = False) -> bytes:
        """The body, at most ``limit`` bytes (more: ``truncate`` cuts, otherwise it fails)."""
        parts: list[bytes] = []
        size = 0

        def sink(data: bytes) -> None:
            nonlocal size
            size += len(data)
            parts.append(data)
            if size > limit:
                raise _Enough() if truncate else UpstreamError(
                    f"[{self.name}] a message from {self._display} is larger than {limit} bytes")

        reader = _BodyReader(sink)
        call.reader = reader
        response.deliverBody(reader)
        if call.aborted:
            reader.abort()
        elif response.length is not UNKNOWN_LENGTH and response.length > limit:
            if not truncate:
                reader.failure = UpstreamError(f"[{self.name}] a message from {self._display} "
                                               f"is larger than {limit} bytes")
            reader.abort()
        try:
            await reader.done
        except _Enough:
            pass
        except (UpstreamError, _Aborted):
            raise
        except Exception as failure:
            if not truncate:
                raise self._connection_error("read", self.url, failure) from None
        return b"".join(parts)[:limit]

    async def _discard(self, response: _Response, call: _HttpCall) -> None:
        await self._read_body(response, call, 65536, truncate=True)

    async def _read_events(self, response: _Response, call: _HttpCall,
                           on_event: Callable[[Event], None],
                           parser: SseParser | None = None) -> tuple[SseParser, str | None]:
        """Read an SSE body to its end: the parser (last event id, retry) and why it ended
        early (``None``: the server ended it)."""
        parser = parser or SseParser(self.max_message_size)

        def sink(data: bytes) -> None:
            for event in parser.feed(data):
                on_event(event)

        reader = _BodyReader(sink)
        call.reader = reader
        response.deliverBody(reader)
        if call.aborted:
            reader.abort()
        try:
            await reader.done
        except EventTooLarge:
            raise UpstreamError(f"[{self.name}] a message from {self._display} is larger than "
                                f"{self.max_message_size} bytes") from None
        except _Aborted:
            raise
        except Exception as failure:
            return parser, _describe(failure)
        return parser, None

    async def _status_error(self, method: str, url: str, response: _Response,
                            call: _HttpCall) -> HttpStatusError:
        body = await self._read_body(response, call, ERROR_BODY_CHARS * 4, truncate=True)
        text = body.decode("utf-8", errors="replace").strip()[:ERROR_BODY_CHARS]
        phrase = response.phrase.decode("latin-1", errors="replace") if response.phrase else ""
        message = f"[{self.name}] {method} {display_url(url)}: HTTP {response.code}"
        if phrase:
            message += f" {phrase}"
        location = _header(response, b"location")
        if 300 <= response.code < 400 and location:
            message += f" (to {display_url(urljoin(url, location))}; redirects are not followed)"
        if text:
            message += f": {text}"
        return HttpStatusError(message, response.code, text)

    async def _sleep(self, seconds: float) -> None:
        def stop(sleep: defer.Deferred[None]) -> None:
            if timer.active():
                timer.cancel()

        sleep: defer.Deferred[None] = defer.Deferred(stop)
        timer = self._reactor.callLater(seconds, sleep.callback, None)
        self._sleeps.add(sleep)
        try:
            await sleep
        finally:
            self._sleeps.discard(sleep)

    def _timed_call(self, seconds: float) -> tuple[_HttpCall, Timer]:
        call = _HttpCall()
        return call, self._reactor.callLater(seconds, call.abort)

    def _unanswered(self, deadline: Timer) -> UpstreamError:
        """Why a ``_timed_call`` was aborted: its deadline, or close()."""
        if deadline.active():
            return UpstreamError(f"[{self.name}] the session was closed")
        return UpstreamError(f"[{self.name}] POST {self._display}: no answer within "
                             f"{SHORT_EXCHANGE_TIMEOUT:g} s")


def _describe(failure: BaseException) -> str:
    if isinstance(failure, SSL.Error):
        details = failure.args[0] if failure.args and isinstance(failure.args[0], list) else []
        texts = [str(detail[-1]) for detail in details if isinstance(detail, tuple) and detail]
        return "TLS: " + ("; ".join(texts) or str(failure) or "handshake failed")
    if isinstance(failure, VerificationError):
        return "TLS: the certificate is not valid for this host name"
    if isinstance(failure, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(failure, error.DNSLookupError):
        return "host name not found"
    if isinstance(failure, error.TimeoutError):
        return "connection timed out"
    if isinstance(failure, error.ConnectionDone | error.ConnectionLost):
        return "connection lost"
    reasons = getattr(failure, "reasons", None)
    if reasons:
        return _describe(reasons[0].value)
    text = str(failure).strip()
    return f"{type(failure).__name__}: {text}" if text else type(failure).__name__


def _content_type(response: _Response) -> str:
    raw = response.headers.getRawHeaders(b"content-type") or [b""]
    return raw[0].split(b";")[0].strip().lower().decode("latin-1")


def _header(response: _Response, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _valid_session_id(value: str) -> bool:
    return bool(value) and all(0x21 <= ord(char) <= 0x7E for char in value)


class StreamableHttpUpstream(_HttpSession):
    """One MCP session with a Streamable HTTP server (see the module docstring)."""

    transport_name = "streamable-http"

    def __init__(self, name: str, url: str, headers: dict[str, str], reactor: Any,
                 pool: HTTPConnectionPool | None, *, timeout_default: float = 60.0,
                 max_message_size: int = MAX_MESSAGE_SIZE,
                 client_capabilities: dict[str, Any] | None = None,
                 authorization: UpstreamAuthorization | None = None) -> None:
        super().__init__(name, url, headers, reactor, pool, timeout_default=timeout_default,
                         max_message_size=max_message_size,
                         client_capabilities=client_capabilities, authorization=authorization)
        self.session_id: str | None = None
        #: The ``Mcp-Session-Id`` of the answer to the handshake's POST.
        self._issued_session_id: str | None = None
        self._get_generation = 0
        self._get_call: _HttpCall | None = None
        #: False once the server answered the GET stream with 405.
        self.get_stream_supported: bool | None = None

    # --- the handshake ---------------------------------------------------------------------

    async def _handshake(self) -> None:
        self._stop_get_stream()
        self.session_id = None
        self.protocol_version = None
        self._issued_session_id = None
        result = await self._initialize()
        issued = self._issued_session_id
        if issued is not None and not _valid_session_id(issued):
            raise UpstreamError(f"[{self.name}] the server issued an invalid session id")
        self.session_id = issued
        try:
            self._accept(result)
            await self._send_message(jsonrpc.notification("notifications/initialized"))
        except HttpStatusError as failure:
            # Only the initialize POST's status decides about falling back to HTTP+SSE.
            self._abandon_session()
            raise UpstreamError(str(failure)) from None
        except BaseException:
            self._abandon_session()
            raise
        self._start_get_stream()

    def _abandon_session(self) -> None:
        """A half-made session: DELETE it in the background."""
        if self.session_id is not None:
            defer.ensureDeferred(self._delete_session()).addErrback(lambda failure: None)

    async def _renew(self, stale: str | None) -> None:
        """The server forgot session ``stale``: initialise a new one (once for everyone)."""
        if self._closed:
            raise UpstreamError(f"[{self.name}] the session is closed")
        if self._established and self.session_id != stale:
            return  # somebody else renewed it already
        if self._established:
            log.info("[{server}] the upstream forgot session {session}; re-initialising",
                     server=self.name, session=stale)
            self._established = False
            self._stop_get_stream()
        try:
            if not tracing.spans():
                await self._establish()
            else:
                with tracing.span("upstream reinitialize", attributes={
                        "director.server.name": self.name,
                        "director.upstream.transport": tracing.upstream_transport(self)}):
                    await self._establish()
        except UpstreamError as failure:
            self._report_lost(f"the session expired and re-initialising failed: {failure}")
            raise

    def _post_headers(self, message: Message, session_id: str | None) -> dict[str, str]:
        headers = self._base_headers()
        headers["Accept"] = f"{JSON}, {EVENT_STREAM}"
        headers["Content-Type"] = JSON
        if message.get("method") != "initialize":
            if session_id is not None:
                headers["Mcp-Session-Id"] = session_id
            if self.protocol_version is not None:
                headers["MCP-Protocol-Version"] = self.protocol_version
        return headers

    def _get_headers(self, session_id: str | None, last_event_id: str) -> dict[str, str]:
        headers = self._base_headers()
        headers["Accept"] = EVENT_STREAM
        if session_id is not None:
            headers["Mcp-Session-Id"] = session_id
        if self.protocol_version is not None:
            headers["MCP-Protocol-Version"] = self.protocol_version
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        return headers

    async def _refusal(self, method: str, response: _Response, call: _HttpCall,
                       session_id: str | None) -> HttpStatusError:
        """The error for an unsuccessful answer, or ``_SessionExpired`` if it says that the
        server forgot the session: 404 (the specification), or a 400 whose body talks about
        the session (what servers built on the TypeScript SDK's example answer)."""
        if response.code == 404 and session_id is not None:
            await self._discard(response, call)
            raise _SessionExpired()
        problem = await self._status_error(method, self.url, response, call)
        if problem.status == 400 and session_id is not None and "session" in problem.body.lower():
            raise _SessionExpired()
        return problem

    # --- requests ---------------------------------------------------------------------------

    async def _send_request(self, pending: Outgoing) -> None:
        retried = False
        while not pending.finished:
            if not pending.handshake:
                await self._ensure_established()
            session_id = self.session_id
            try:
                await self._post(pending.message, session_id, pending)
                return
            except _SessionExpired:
                if pending.handshake:
                    raise UpstreamError(f"[{self.name}] POST {self._display}: HTTP 404 "
                                        f"to initialize") from None
                if retried:
                    raise UpstreamError(f"[{self.name}] {pending.method}: the upstream "
                                        f"forgot the session again right after "
                                        f"re-initialising") from None
                retried = True
                await self._renew(session_id)

    async def _send_message(self, message: Message, body: bytes | None = None) -> None:
        call, deadline = self._timed_call(SHORT_EXCHANGE_TIMEOUT)
        try:
            await self._post(message, self.session_id, None, call, body)
        except _SessionExpired:
            log.info("[{server}] {what} not delivered: the session expired", server=self.name,
                     what=message.get("method") or "an answer")
        except _Aborted:
            raise self._unanswered(deadline) from None
        finally:
            if deadline.active():
                deadline.cancel()

    async def _post(self, message: Message, session_id: str | None, pending: Outgoing | None,
                    call: _HttpCall | None = None, body: bytes | None = None) -> None:
        """POST one message and read what comes back, dispatching every message in it."""
        call = call or _HttpCall()
        if pending is not None:
            self._attach(pending, call)
            pending.sent = True
        try:
            response = await self._http(call, "POST", self.url,
                                        self._post_headers(message, session_id),
                                        encoded(self.name, message) if body is None else body)
            if pending is not None and pending.handshake:
                self._issued_session_id = _header(response, b"mcp-session-id")
            if not 200 <= response.code < 300:
                raise await self._refusal("POST", response, call, session_id)
            content_type = _content_type(response)
            if pending is not None and response.code != 202 and response.length == 0:
                await self._discard(response, call)
                raise UpstreamError(f"[{self.name}] POST {self._display}: HTTP "
                                    f"{response.code} with an empty body to {pending.method}")
            if pending is None or response.code == 202:
                # (202 to a request breaks the spec; its answer may still come on the GET stream.)
                await self._discard(response, call)
                return
            if content_type == EVENT_STREAM:
                parser, dropped = await self._read_events(
                    response, call, lambda event: self._event(event, pending))
                if not pending.finished:
                    await self._resume(pending, parser, dropped)
            elif content_type == JSON:
                self._received_json_body(
                    await self._read_body(response, call, self.max_message_size))
                if not pending.finished:
                    raise UpstreamError(f"[{self.name}] POST {self._display}: the JSON answer "
                                        f"did not answer {pending.method}")
            else:
                await self._discard(response, call)
                raise UpstreamError(f"[{self.name}] POST {self._display}: unexpected content "
                                    f"type {content_type or 'none'!r}")
        finally:
            self._calls.discard(call)
            if pending is not None:
                self._detach(pending, call)

    async def _resume(self, pending: Outgoing, parser: SseParser, dropped: str | None) -> None:
        """A request's stream ended before its response: GET it again from its last event id
        (2025-11-25 resumability), as long as the server gave its events ids."""
        attempts = 0
        backoff = Backoff(RECONNECT_INITIAL, RECONNECT_MAX)
        while not pending.finished:
            if not parser.last_event_id or attempts >= RESUME_ATTEMPTS:
                how = f"was lost ({dropped})" if dropped else "ended"
                raise UpstreamError(f"[{self.name}] POST {self._display}: the stream {how} "
                                    f"before the answer to {pending.method}")
            attempts += 1
            if parser.retry is not None:
                backoff.prefer(parser.retry / 1000)
            await self._sleep(backoff.next_delay())
            if pending.finished:
                return
            before = parser.last_event_id
            call = _HttpCall(keep_once_answered=False)
            self._attach(pending, call)
            session_id = self.session_id
            try:
                response = await self._http(call, "GET", self.url,
                                            self._get_headers(session_id, before))
                if response.code != 200 or _content_type(response) != EVENT_STREAM:
                    raise await self._refusal("GET", response, call, session_id)
                try:
                    parser, dropped = await self._read_events(
                        response, call, lambda event: self._event(event, pending), parser)
                except _Aborted:
                    if pending.finished:
                        return
                    raise
            finally:
                self._calls.discard(call)
                self._detach(pending, call)
            if parser.last_event_id != before:
                attempts = 0

    # --- the GET stream ------------------------------------------------------------------------

    def _start_get_stream(self) -> None:
        self._stop_get_stream()
        if self.get_stream_supported is False or self._closed:
            return
        generation = self._get_generation
        defer.ensureDeferred(self._get_stream(generation)).addErrback(
            lambda failure: None if failure.check(_Aborted, defer.CancelledError) else
            log.failure("[{server}] the GET stream failed", failure, server=self.name))

    def _stop_get_stream(self) -> None:
        self._get_generation += 1
        if self._get_call is not None:
            self._get_call.abort()
            self._get_call = None

    async def _get_stream(self, generation: int) -> None:
        backoff = Backoff(RECONNECT_INITIAL, RECONNECT_MAX)
        last_event_id = ""
        warned = False
        while generation == self._get_generation and not self._closed:
            session_id = self.session_id
            call, deadline = self._timed_call(SHORT_EXCHANGE_TIMEOUT)
            self._get_call = call
            parser: SseParser | None = None
            problem: str | None = None
            try:
                try:
                    response = await self._http(call, "GET", self.url,
                                                self._get_headers(session_id, last_event_id))
                finally:
                    if deadline.active():
                        deadline.cancel()
                    elif generation == self._get_generation and not self._closed:
                        problem = "no answer to the GET"
                if response.code == 405:
                    await self._discard(response, call)
                    self.get_stream_supported = False
                    log.debug("[{server}] no GET stream (405)", server=self.name)
                    return
                if response.code != 200 or _content_type(response) != EVENT_STREAM:
                    try:
                        problem = str(await self._refusal("GET", response, call, session_id))
                    except _SessionExpired:
                        if generation == self._get_generation:
                            defer.ensureDeferred(self._renew(session_id)).addErrback(
                                lambda failure: None)
                        return
                else:
                    self.get_stream_supported = True
                    backoff.succeeded()
                    warned = False
                    parser = SseParser(self.max_message_size)
                    parser.last_event_id = last_event_id
                    parser, dropped = await self._read_events(response, call, self._event,
                                                              parser)
                    problem = dropped
            except _Aborted:
                if problem is None:
                    return
            except UpstreamError as failure:
                problem = str(failure)
            finally:
                self._calls.discard(call)
                if self._get_call is call:
                    self._get_call = None
            if parser is not None:
                last_event_id = parser.last_event_id
                if parser.retry is not None:
                    backoff.prefer(parser.retry / 1000)
            if problem is not None:
                if not warned:
                    log.info("[{server}] GET stream: {problem}; reconnecting",
                             server=self.name, problem=problem)
                warned = True
            try:
                await self._sleep(backoff.next_delay())
            except defer.CancelledError:
                return

    # --- closing -----------------------------------------------------------------------------

    async def _close_transport(self) -> None:
        self._stop_get_stream()
        await self._delete_session()

    async def _delete_session(self) -> None:
        session_id, self.session_id = self.session_id, None
        if session_id is None:
            return
        headers = self._base_headers()
        headers["Mcp-Session-Id"] = session_id
        if self.protocol_version is not None:
            headers["MCP-Protocol-Version"] = self.protocol_version
        call, deadline = self._timed_call(CLOSE_TIMEOUT)
        try:
            response = await self._http(call, "DELETE", self.url, headers)
            await self._discard(response, call)
            if response.code not in (200, 202, 204, 404, 405):
                log.info("[{server}] DELETE of the session answered HTTP {code}",
                         server=self.name, code=response.code)
        except (UpstreamError, _Aborted) as failure:
            log.info("[{server}] DELETE of the session failed: {error}", server=self.name,
                     error=str(failure) or "timed out")
        finally:
            self._calls.discard(call)
            if deadline.active():
                deadline.cancel()


class LegacySseUpstream(_HttpSession):
    """One MCP session over the 2024-11-05 HTTP+SSE transport (see the module docstring)."""

    transport_name = "sse"

    def __init__(self, name: str, url: str, headers: dict[str, str], reactor: Any,
                 pool: HTTPConnectionPool | None, *, timeout_default: float = 60.0,
                 max_message_size: int = MAX_MESSAGE_SIZE,
                 client_capabilities: dict[str, Any] | None = None,
                 authorization: UpstreamAuthorization | None = None) -> None:
        super().__init__(name, url, headers, reactor, pool, timeout_default=timeout_default,
                         max_message_size=max_message_size,
                         client_capabilities=client_capabilities, authorization=authorization)
        self.endpoint: str | None = None
        self._stream_call: _HttpCall | None = None
        self._endpoint_waiter: defer.Deferred[str] | None = None

    async def _handshake(self) -> None:
        try:
            await self._connect()
        except BaseException:
            self._drop_stream()
            raise

    async def _connect(self) -> None:
        self._drop_stream()
        self.endpoint = None
        call, deadline = self._timed_call(self.timeout_default)
        self._stream_call = call
        headers = self._base_headers()
        headers["Accept"] = EVENT_STREAM
        try:
            try:
                response = await self._http(call, "GET", self.url, headers)
            except _Aborted:
                if deadline.active():  # aborted by close()
                    raise
                raise UpstreamError(f"[{self.name}] GET {self._display}: no answer within "
                                    f"{self.timeout_default:g} s") from None
            finally:
                if deadline.active():
                    deadline.cancel()
            if response.code != 200:
                raise await self._status_error("GET", self.url, response, call)
            if _content_type(response) != EVENT_STREAM:
                await self._discard(response, call)
                raise UpstreamError(f"[{self.name}] GET {self._display}: not an SSE stream "
                                    f"({_content_type(response) or 'no content type'})")
        except BaseException:
            self._calls.discard(call)
            raise
        waiter = self._endpoint_waiter = defer.Deferred()
        defer.ensureDeferred(self._read_stream(response, call)).addErrback(
            lambda failure: log.failure("[{server}] reading the SSE stream failed", failure,
                                        server=self.name))
        timer = self._reactor.callLater(self.timeout_default, waiter.errback, UpstreamError(
            f"[{self.name}] GET {self._display}: no endpoint event within "
            f"{self.timeout_default:g} s"))
        try:
            self.endpoint = await waiter
        finally:
            if timer.active():
                timer.cancel()
            self._endpoint_waiter = None
        self._accept(await self._initialize())
        await self._send_message(jsonrpc.notification("notifications/initialized"))

    def _drop_stream(self) -> None:
        call, self._stream_call = self._stream_call, None
        if call is not None:
            call.abort()
            self._calls.discard(call)

    def _legacy_event(self, event: Event, call: _HttpCall) -> None:
        if call is not self._stream_call:
            return
        if event.event == "endpoint":
            endpoint = urljoin(self.url, event.data.strip())
            mine, theirs = urlsplit(self.url), urlsplit(endpoint)
            waiter = self._endpoint_waiter
            if (mine.scheme, mine.hostname, mine.port) != (theirs.scheme, theirs.hostname,
                                                           theirs.port):
                if waiter is not None and not waiter.called:
                    waiter.errback(UpstreamError(
                        f"[{self.name}] the SSE endpoint {display_url(endpoint)} is on another "
                        f"origin than {self._display}; refusing to send messages there"))
                return
            if waiter is not None and not waiter.called:
                waiter.callback(endpoint)
            else:
                self.endpoint = endpoint
        else:
            self._event(event)

    async def _read_stream(self, response: _Response, call: _HttpCall) -> None:
        try:
            _, dropped = await self._read_events(
                response, call, lambda event: self._legacy_event(event, call))
            reason = f"the SSE stream was lost ({dropped})" if dropped else \
                "the server ended the SSE stream"
        except _Aborted:
            reason = "the SSE stream was closed"
        except UpstreamError as failure:
            reason = str(failure).removeprefix(f"[{self.name}] ")
            call.abort()
        finally:
            self._calls.discard(call)
        if call is not self._stream_call:
            return
        self._stream_call = None
        self.endpoint = None
        waiter = self._endpoint_waiter
        if waiter is not None and not waiter.called:
            waiter.errback(UpstreamError(f"[{self.name}] GET {self._display}: {reason} before "
                                         f"the endpoint event"))
        self._report_lost(reason)
        self._peer.fail_all(UpstreamError(f"[{self.name}] {reason}"))

    async def _send_request(self, pending: Outgoing) -> None:
        call = _HttpCall()
        self._attach(pending, call)
        pending.sent = True
        try:
            await self._post(pending.message, call)
        finally:
            self._detach(pending, call)

    async def _send_message(self, message: Message, body: bytes | None = None) -> None:
        call, deadline = self._timed_call(SHORT_EXCHANGE_TIMEOUT)
        try:
            await self._post(message, call, body)
        except _Aborted:
            raise self._unanswered(deadline) from None
        finally:
            if deadline.active():
                deadline.cancel()

    async def _post(self, message: Message, call: _HttpCall, body: bytes | None = None) -> None:
        endpoint = self.endpoint
        if endpoint is None:
            raise UpstreamError(f"[{self.name}] not connected")
        headers = self._base_headers()
        headers["Content-Type"] = JSON
        try:
            response = await self._http(call, "POST", endpoint, headers,
                                        encoded(self.name, message) if body is None else body)
            if not 200 <= response.code < 300:
                raise await self._status_error("POST", endpoint, response, call)
            if _content_type(response) == JSON and response.code != 202:
                # Not what the transport specifies (answers come on the stream), but harmless.
                body = await self._read_body(response, call, self.max_message_size)
                if body.strip():
                    self._received_json_body(body)
            else:
                await self._discard(response, call)
        finally:
            self._calls.discard(call)

    async def _close_transport(self) -> None:
        self._drop_stream()
        self.endpoint = None


class HttpUpstream:
    """An ``http`` server whose transport is decided at ``start()`` (``connect_http``)."""

    def __init__(self, name: str, url: str, headers: dict[str, str], reactor: Any,
                 pool: HTTPConnectionPool | None, **options: Any) -> None:
        self.name = name
        self.url = url
        self._arguments = (name, url, headers, reactor, pool)
        self._options = options
        self.session: StreamableHttpUpstream | LegacySseUpstream | None = None
        self.on_notification: Callable[[Message], object] = lambda message: None
        self.on_request: RequestHandler = default_request_handler
        self.on_closed: Callable[[str], object] = lambda reason: None
        self.on_restored: Callable[[dict[str, Any]], object] = lambda result: None
        self._closed = False

    @property
    def initialize_result(self) -> dict[str, Any]:
        return self.session.initialize_result if self.session is not None else {}

    @initialize_result.setter
    def initialize_result(self, value: dict[str, Any]) -> None:
        if self.session is not None:
            self.session.initialize_result = value

    @property
    def transport_name(self) -> str | None:
        return self.session.transport_name if self.session is not None else None

    @property
    def era(self) -> str | None:
        """"modern" when the session speaks the stateless era (``upstream.modern``)."""
        return getattr(self.session, "era", None)

    async def start(self) -> None:
        session = await connect_http(
            *self._arguments, on_notification=lambda message: self.on_notification(message),
            on_request=lambda method, params: self.on_request(method, params),
            on_closed=lambda reason: self.on_closed(reason), **self._options)
        session.on_restored = lambda result: self.on_restored(result)
        if self._closed:
            await session.close()
            raise UpstreamError(f"[{self.name}] the session was closed")
        self.session = session

    async def request(self, method: str, params: dict[str, Any] | None = None, *,
                      timeout: float | None = None,
                      on_progress: Callable[[dict[str, Any]], object] | None = None,
                      return_input_required: bool = False) -> dict[str, Any]:
        if self.session is None:
            raise UpstreamError(f"[{self.name}] not started")
        if return_input_required:  # only asked of a modern session (upstream.modern)
            return await self.session.request(  # type: ignore[call-arg]
                method, params, timeout=timeout, on_progress=on_progress,
                return_input_required=True)
        return await self.session.request(method, params, timeout=timeout,
                                          on_progress=on_progress)

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        if self.session is not None:
            self.session.notify(method, params)

    async def close(self) -> None:
        self._closed = True
        if self.session is not None:
            await self.session.close()


async def connect_http(name: str, url: str, headers: dict[str, str], reactor: Any,
                       pool: HTTPConnectionPool | None, *,
                       on_notification: Callable[[Message], object] | None = None,
                       on_request: RequestHandler | None = None,
                       on_closed: Callable[[str], object] | None = None,
                       streamable_class: Callable[..., StreamableHttpUpstream] | None = None,
                       **options: Any) -> StreamableHttpUpstream | LegacySseUpstream:
    """A started session: Streamable HTTP, or the 2024-11-05 HTTP+SSE transport if the
    server answers the ``initialize`` POST with 400, 404 or 405. ``streamable_class``: makes the
    Streamable HTTP session to try first (e.g. ``upstream.modern.ModernHttpUpstream``, or a
    ``functools.partial`` of it with its ``eras``)."""

    def wire(session: _HttpSession) -> None:
        if on_notification is not None:
            session.on_notification = on_notification
        if on_request is not None:
            session.on_request = on_request
        if on_closed is not None:
            session.on_closed = on_closed

    streamable = (streamable_class or StreamableHttpUpstream)(name, url, headers, reactor,
                                                               pool, **options)
    wire(streamable)
    try:
        await streamable.start()
        return streamable
    except HttpStatusError as failure:
        if failure.status not in FALLBACK_STATUSES:
            await streamable.close()
            raise
        first = failure
    except BaseException:
        await streamable.close()
        raise
    await streamable.close()
    log.info("[{server}] no Streamable HTTP at {url} (HTTP {status}); trying the HTTP+SSE "
             "transport", server=name, url=display_url(url), status=first.status)
    legacy = LegacySseUpstream(name, url, headers, reactor, pool, **options)
    wire(legacy)
    try:
        await legacy.start()
    except UpstreamError as failure:
        await legacy.close()
        detail = str(failure).removeprefix(f"[{name}] ")
        raise UpstreamError(f"{first}; HTTP+SSE fallback: {detail}") from failure
    except BaseException:
        await legacy.close()
        raise
    return legacy


if TYPE_CHECKING:  # all three satisfy the contract
    def _conforms(a: StreamableHttpUpstream, b: LegacySseUpstream,
                  c: HttpUpstream) -> list[UpstreamSession]:
        return [a, b, c]
