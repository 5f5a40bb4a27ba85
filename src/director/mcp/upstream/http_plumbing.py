"""HTTP plumbing of the upstream transports: the agent, its pool, request and response
bodies, and the errors they raise.

Everything runs on the Twisted reactor through ``twisted.web.client.Agent`` over a shared,
persistent ``UpstreamPool`` whose every new connection is made by ``connect.CheckedEndpoints``: the
SSRF rail on the addresses actually connected to, TLS verified by a browser-like policy with
service-identity. Redirects are not followed (a 3xx is an error naming its target). An
``_HttpCall`` is one exchange in flight, which ``abort()`` drops at whatever stage it is;
``_BodyReader`` hands a body on chunk by chunk, so that nothing larger than a limit is ever
buffered whole. ``display_url`` is how a URL is shown: query strings are never (they may hold
keys).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error, protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from director.mcp.upstream.base import UpstreamError
from director.mcp.upstream.connect import CheckedEndpoints

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: How long a notification or response POST may take to be accepted (202).
SHORT_EXCHANGE_TIMEOUT = 10.0
ERROR_BODY_CHARS = 200
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


