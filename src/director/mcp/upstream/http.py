"""Upstream MCP servers over HTTP: which transport, Streamable HTTP or the 2024-11-05 HTTP+SSE.

Handshake era only (protocol revisions 2024-11-05 … 2025-11-25); the modules are
``http_plumbing`` (agent, pool, bodies), ``http_session`` (what both transports share),
``streamable`` and ``legacy_sse``. The ``mcp`` SDK is never used here.

``connect_http`` follows the specification's backwards-compatibility procedure: try
Streamable HTTP, and if the ``initialize`` POST is answered 400, 404 or 405, fall back to
the legacy transport at the same URL. ``HttpUpstream`` does the same inside ``start()``,
for factories that must hand out an unstarted session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from director.mcp.jsonrpc import Message
from director.mcp.upstream.base import (
    RequestHandler,
    UpstreamError,
    UpstreamSession,
    default_request_handler,
)
from director.mcp.upstream.http_plumbing import HttpStatusError, display_url
from director.mcp.upstream.http_session import HttpSession
from director.mcp.upstream.legacy_sse import LegacySseUpstream
from director.mcp.upstream.streamable import FALLBACK_STATUSES, StreamableHttpUpstream

log = Logger(namespace="mcp.upstream.http")  # one namespace for the HTTP transports


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

    def wire(session: HttpSession) -> None:
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
