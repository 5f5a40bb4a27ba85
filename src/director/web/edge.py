"""Edge policy applied to every request before any route sees it.

In order: a trace id (from ``traceparent`` when valid), security headers, the Host check
(DNS-rebinding protection), the Origin check, CORS, then the application. Bodies larger than
``MAX_REQUEST_BODY_BYTES`` are refused with 413 while they arrive, before being buffered.
Every finished request gets one access-log line with ``key=`` redacted.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from director.config import Settings, origin_of
from director.logs import THRESHOLD
from director.web.errors import error_body

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
#: Paths exempt from the Host check: load balancers probe health by IP address.
HOST_CHECK_EXEMPT = (b"/api/health",)
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_KEY_PARAMETER = re.compile(rb"([?&]key=)[^&#]*")
_LOOPBACK_NAMES = ("localhost", "localhost.")


def trace_id_for(traceparent: bytes | None) -> str:
    """The W3C trace id of a valid ``traceparent`` (not all zeros), else a fresh one."""
    if traceparent:
        match = _TRACEPARENT.match(traceparent.decode("latin-1").strip().lower())
        if match and match[1] != "0" * 32:
            return match[1]
    return secrets.token_hex(16)


def redact(uri: bytes) -> str:
    return _KEY_PARAMETER.sub(rb"\1[REDACTED]", uri).decode("latin-1")


def _is_loopback_host(host: str) -> bool:
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostname(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class DirectorRequest(server.Request):
    """A request that refuses oversized bodies while they arrive and remembers its trace id."""

    trace_id = ""
    _body_bytes = 0
    _rejected = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Every body here is JSON or YAML: parsing form posts into request.args would only cost
        # a Content-Type parse (with the email package) per POST, ~40 µs on the MCP hot path.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)
        self.started = time.monotonic()

    def process(self) -> None:
        site: Any = self.channel.site  # type: ignore[attr-defined]
        site.in_flight.add(self)
        super().process()

    # Leaving ``site.in_flight`` where Twisted fires ``notifyFinish`` (finished, or the
    # connection lost), not through a Deferred of its own: an open stream held one for its life.

    def _cleanup(self) -> None:
        self._leave_in_flight()
        super()._cleanup()

    def connectionLost(self, reason: Any) -> None:
        self._leave_in_flight()
        super().connectionLost(reason)

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
        body = error_body(
            "payload_too_large",
            f"request body exceeds the limit of {self._limit} bytes",
            {"limit": self._limit},
        )
        head = [b"HTTP/1.1 413 Payload Too Large", b"Content-Type: application/json",
                b"Content-Length: " + str(len(body)).encode(), b"Connection: close",
                b"X-Trace-Id: " + self.trace_id.encode()]
        head += [name + b": " + value for name, value in SECURITY_HEADERS.items()]
        transport: Any = self.channel.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        log.info("{method} {path} 413 body too large", method=self.method.decode("latin-1"),
                 path=redact(self.uri), status=413, trace_id=self.trace_id)
        metrics = getattr(getattr(self.channel, "site", None), "metrics", None)
        if metrics is not None:
            self.code = 413
            metrics.http_request(self, time.monotonic() - self.started)
        transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        super().requestReceived(command, path, version)


class DirectorSite(server.Site):
    requestFactory = DirectorRequest

    def __init__(self, resource: Resource, settings: Settings, metrics: Metrics | None = None,
                 **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.metrics = metrics
        self.max_body_bytes = settings.max_request_body_bytes
        # The access line is at info: below LOG_LEVEL it is not even built (~10 µs a request).
        self.access_log = THRESHOLD.get(settings.log_level, 30) <= THRESHOLD["info"]
        self.displayTracebacks = False
        self.open_channels: set[Any] = set()
        self.in_flight: set[DirectorRequest] = set()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.open_channels.add(channel)
        lost = channel.connectionLost

        def connection_lost(reason: Any) -> None:
            self.open_channels.discard(channel)
            lost(reason)

        channel.connectionLost = connection_lost
        return channel

    def log(self, request: http.Request) -> None:
        started = getattr(request, "started", None)
        duration = (time.monotonic() - started) * 1000 if started is not None else 0.0
        if self.metrics is not None:
            self.metrics.http_request(request, duration / 1000)
        if not self.access_log:
            return
        log.info(
            "{method} {path} {status} {duration_ms:.1f}ms",
            method=request.method.decode("latin-1"),
            path=redact(request.uri),
            status=request.code,
            duration_ms=round(duration, 3),
            trace_id=getattr(request, "trace_id", ""),
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
            {base_host, *origin_hosts, *(_hostname(h) for h in settings.allowed_hosts)}
        )

    def origin_allowed(self, origin: str) -> bool:
        if origin_of(origin) in self.allowed_origins:
            return True
        if self.settings.production:
            return False
        return _is_loopback_host((urlsplit(origin).hostname or "").lower())

    def host_allowed(self, host_header: str) -> bool:
        host = _hostname(host_header)
        return host in self.allowed_hosts or _is_loopback_host(host)

    def render(self, request: DirectorRequest) -> Any:
        request.trace_id = trace_id_for(request.getHeader(b"traceparent"))
        request.setHeader(b"x-trace-id", request.trace_id.encode())
        request.setHeader(b"server", b"director")
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)

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
