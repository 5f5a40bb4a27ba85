"""What both HTTP transports share: a ``peer.Peer`` whose messages they move, and how.

The JSON-RPC side (ids, timeouts restarted by progress, progress tokens, cancellation both ways,
dispatch) is the session's ``peer.Peer``, as over stdio; ``HttpSession`` moves its messages.
A request's POST (and its resumptions) is aborted when the request times out or is cancelled
(``notifications/cancelled`` is POSTed), and left to end by itself once the server answered it.
Server→client requests (``on_request``) that arrived on a request's stream are cancelled when
that request ends, since the server no longer waits for them; their answers, notifications and
cancellations are POSTed in the background. Messages larger than ``max_message_size`` (16 MiB)
fail the request (or are dropped from the GET stream) without ever being buffered whole. Error
messages read ``[name] POST https://host/path: HTTP 401 Unauthorized: <first 200 characters of
the body>`` or ``[name] failed to connect to https://host/path: connection refused``.

An optional ``authorization`` (``authorization.UpstreamAuthorization``, given by the factory
for servers behind OAuth) adds its headers to every request and is told of each 401/403,
which it may have sent again once; that is all the transports know of OAuth.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from director import __version__, tracing
from director.mcp import jsonrpc
from director.mcp.jsonrpc import Message, ProtocolError
from director.mcp.sse import Event, EventTooLarge, SseParser
from director.mcp.upstream.authorization import UpstreamAuthorization
from director.mcp.upstream.base import (
    LEGACY_VERSIONS,
    RequestHandler,
    UpstreamError,
    default_request_handler,
    encoded,
    initialize_params,
    run_hook,
)
from director.mcp.upstream.connect import Refused
from director.mcp.upstream.http_plumbing import (
    ERROR_BODY_CHARS,
    MAX_MESSAGE_SIZE,
    SHORT_EXCHANGE_TIMEOUT,
    HttpStatusError,
    _Aborted,
    _BodyReader,
    _BytesProducer,
    _describe,
    _Enough,
    _header,
    _HttpCall,
    _Once,
    _Response,
    display_url,
    upstream_agent,
)
from director.mcp.upstream.lifecycle import Handshake, Nothing, session_lifecycle
from director.mcp.upstream.peer import Outgoing, Peer, Timer

log = Logger(namespace="mcp.upstream.http")  # one namespace for the HTTP transports


class HttpSession:
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
        #: Established, re-initialising, lost, closed (``lifecycle.py``).
        self._lifecycle = session_lifecycle(Nothing())
        self._several_messages_noted = False
        self._connecting = _Once()

    @property
    def _closed(self) -> bool:
        return self._lifecycle.closed()

    @property
    def _established(self) -> bool:
        return self._lifecycle.established()

    @_established.setter
    def _established(self, value: bool) -> None:
        """Only ever set False (``upstream.modern`` re-probing the era): the next request
        establishes the session again."""
        assert not value, "a session is established by its handshake only"
        self._lifecycle.forgotten()

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
        if not self._lifecycle.close():
            return
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
        outcome = self._lifecycle.handshake_succeeded()
        if outcome is Handshake.TOO_LATE:
            raise UpstreamError(f"[{self.name}] the session was closed")
        if outcome is Handshake.RESTORED:
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
        if not self._lifecycle.lost(reason):
            return
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

