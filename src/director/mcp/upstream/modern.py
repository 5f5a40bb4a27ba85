"""Upstream servers of the stateless era (MCP 2026-07-28) over Streamable HTTP.

``ModernHttpUpstream`` is a ``StreamableHttpUpstream`` that can speak either era to its
server; ``connect_http(..., streamable_class=ModernHttpUpstream)`` (what the factory uses for
``http`` servers) puts it in front of the HTTP+SSE fallback.

Which era. It depends on the era of the downstream clients the session serves, so that a server
that speaks both eras is used in the clients' own era and nothing needs bridging:

* a session for modern clients (``prefer_modern``: ``ModernFirstHttpUpstream``) probes
  ``server/discover`` first and uses the stateless era when the answer lists ``2026-07-28`` among
  its ``supportedVersions``; otherwise (an error, a 4xx, other versions) it does the handshake;
* a session for handshake-era clients does the handshake first — ``resources/subscribe``,
  ``logging/setLevel``, notifications on the GET stream and server→client requests in the middle
  of a call exist only there — and probes ``server/discover`` when ``initialize`` is refused
  (HTTP 400/404/405 or a JSON-RPC error).

When both are refused the handshake's refusal stands (and ``connect_http`` goes on to try
HTTP+SSE); an outage (connection refused, 5xx, timeout) is never taken for an era verdict.
What was learnt is remembered per URL and era (``upstream.eras.EraMemory``, the service's, for
an hour): a server known not to speak the preferred era is asked in the other one first, and
when that fails the preferred one is tried again (re-probing); so is a modern request answered
``-32022`` (the server no longer speaks this version), or with a 400/404/405 that carries no
JSON-RPC error (the URL no longer serves this era): the session forgets, re-probes and retries
the request once.

In the modern era each request is one POST with the envelope in ``params._meta``
(``io.modelcontextprotocol/protocolVersion``, ``…/clientCapabilities``, ``…/clientInfo`` and,
after ``logging/setLevel``, ``…/logLevel`` — the level is kept here since the era has no such
method) and the headers ``MCP-Protocol-Version``, ``Mcp-Method``, ``Mcp-Name`` and, for ``tools/call``,
the ``Mcp-Param-*`` of the arguments the tool's schema marks ``x-mcp-header`` (schemas from the
session's own ``tools/list`` answers); no session id,
no GET stream, no notifications (a cancelled request is cancelled by dropping its exchange).
Answers with an HTTP error status and a JSON-RPC error body fail the request with that error,
verbatim. ``initialize_result`` is made from the discover result (``protocolVersion``
``2026-07-28``, its ``capabilities``, ``serverInfo`` from its ``_meta``, ``instructions``).

Multi-round trips: a result with ``resultType: "input_required"`` is resolved here — each of its
``inputRequests`` (``sampling/createMessage``, ``elicitation/create``, ``roots/list``) is handed
to ``on_request`` exactly like a handshake-era server→client request (so the gateway relays it
to the client that caused the call: a real request on a legacy client's stream, or an
``input_required`` of its own for a modern client), and the request is sent again with
``inputResponses`` and the echoed ``requestState``, at most ``INPUT_REQUIRED_MAX_ROUNDS`` times
(``envelope.settle``). A caller that relays a modern client's call as is
(``return_input_required=True``, with the client's ``clientCapabilities`` and ``logLevel`` in
``params._meta``, which win over the session's) gets the ``input_required`` result verbatim
instead: the client answers the server itself, and its retry carries the server's own
``requestState`` through any instance of the gateway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from director.mcp.headers import Annotations, encode_header_value, header_annotations, mirrored
from director.mcp.jsonrpc import Message
from director.mcp.protocol import HEADER_MISMATCH, MODERN_VERSION, UNSUPPORTED_PROTOCOL_VERSION
from director.mcp.upstream.base import UpstreamError, UpstreamRequestError
from director.mcp.upstream.envelope import (
    LISTEN_TIMEOUT,
    ChangeListener,
    NotModern,
    answered_here,
    discovered,
    enveloped,
    listened,
    settle,
)
from director.mcp.upstream.eras import EraMemory, http_key
from director.mcp.upstream.http_plumbing import (
    EVENT_STREAM,
    JSON,
    HttpStatusError,
    _content_type,
    _HttpCall,
    _Response,
)
from director.mcp.upstream.peer import Outgoing
from director.mcp.upstream.streamable import FALLBACK_STATUSES, StreamableHttpUpstream

log = Logger(namespace="mcp.upstream.modern")

NAME_BEARING_METHODS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
class ModernHttpUpstream(StreamableHttpUpstream):
    """A Streamable HTTP session in whichever era its server speaks (module docstring)."""

    #: Probe ``server/discover`` before the handshake (sessions serving modern clients).
    prefer_modern = False

    def __init__(self, *arguments: Any, eras: EraMemory | None = None, **options: Any) -> None:
        super().__init__(*arguments, **options)
        #: What this and the other sessions learnt of the servers' eras (the service's).
        self.eras = eras if eras is not None else EraMemory(self._reactor)
        #: "modern" once ``server/discover`` succeeded, "legacy" after a handshake.
        self.era: str | None = None
        self.log_level: str | None = None
        self._probing = False
        #: The era's change notifications (``envelope.ChangeListener``), once modern.
        self.changes = ChangeListener(self.name, self._listen, self._reactor)
        #: The ``x-mcp-header`` annotations of each tool's input schema, from the server's
        #: tools/list answers: a tools/call copies those arguments into ``Mcp-Param-*``
        #: headers, which the server checks.
        self.tool_headers: dict[str, Annotations] = {}

    @property
    def modern(self) -> bool:
        return self.era == "modern" or self._probing

    # --- establishing ---------------------------------------------------------------------

    async def _handshake(self) -> None:
        if self.prefer_modern:
            first, second = self._try_discover, self._try_legacy
            if self.eras.verdict(http_key(self.url, "modern")) is False:
                first, second = second, first
        else:
            first, second = self._try_legacy, self._try_discover
            if self.eras.verdict(http_key(self.url, "legacy")) is False:
                first, second = second, first
        refusal = await first()
        if refusal is None:
            return
        other = await second()
        if other is None:
            return
        # Neither era: the handshake's refusal is the precise answer (and lets connect_http
        # fall back to HTTP+SSE on 400/404/405).
        legacy_refusal = refusal if first == self._try_legacy else other
        raise legacy_refusal

    async def _try_legacy(self) -> UpstreamError | None:
        """The handshake; its refusal (not an outage, which raises) is returned."""
        try:
            await self._legacy_handshake()
        except (HttpStatusError, UpstreamRequestError) as refused:
            if isinstance(refused, HttpStatusError) and refused.status not in FALLBACK_STATUSES:
                raise
            self.eras.learnt(http_key(self.url, "legacy"), False)
            log.debug("[{server}] initialize refused: {error}", server=self.name,
                      error=str(refused))
            return refused
        self.eras.learnt(http_key(self.url, "legacy"), True)
        return None

    async def _try_discover(self) -> UpstreamError | None:
        """``server/discover``; a refusal is returned, an outage raises."""
        try:
            await self._discover()
        except (HttpStatusError, UpstreamRequestError, NotModern) as refused:
            self.eras.learnt(http_key(self.url, "modern"), False)
            log.debug("[{server}] server/discover refused: {error}", server=self.name,
                      error=str(refused))
            return refused
        self.eras.learnt(http_key(self.url, "modern"), True)
        log.info("[{server}] the server speaks MCP {version}", server=self.name,
                 version=MODERN_VERSION)
        self._reactor.callLater(0, self.changes.start)  # once the handshake has finished
        return None

    async def _legacy_handshake(self) -> None:
        self.era = None
        await super()._handshake()
        self.era = "legacy"

    async def _discover(self) -> None:
        self._get_stream.stop()
        self.session_id = None
        self.era = None
        self._probing = True
        try:
            result = await self._open("server/discover", self._envelope({}), None, None,
                                      handshake=True).deferred
        finally:
            self._probing = False
        self.initialize_result = discovered(self.name, result)
        self.protocol_version = MODERN_VERSION
        self.era = "modern"

    # --- requests ---------------------------------------------------------------------------

    def _envelope(self, params: dict[str, Any] | None) -> dict[str, Any]:
        return enveloped(params, self.client_capabilities, self.log_level)

    async def request(self, method: str, params: dict[str, Any] | None = None, *,
                      timeout: float | None = None,
                      on_progress: Callable[[dict[str, Any]], object] | None = None,
                      return_input_required: bool = False) -> dict[str, Any]:
        if self.era is None and not self._closed:
            await self._ensure_established()
        local = answered_here(self, method, params) if self.modern else None
        if local is not None:
            return local
        try:
            result = await super().request(method, params, timeout=timeout,
                                           on_progress=on_progress)
        except (UpstreamRequestError, HttpStatusError) as failure:
            if self.modern and self._schema_unknown(method, params, failure):
                # A call before this session saw the tool's schema (its Mcp-Param-* headers
                # could not be derived): learn it, then call again once.
                self._remember_schemas(await super().request("tools/list", None,
                                                             timeout=timeout))
                result = await super().request(method, params, timeout=timeout,
                                               on_progress=on_progress)
                return await self._settled(method, params, result, timeout, on_progress,
                                           return_input_required)
            if not self.modern or not _era_refused(failure):
                raise
            log.info("[{server}] the server no longer speaks {version} ({error}); probing "
                     "again", server=self.name, version=MODERN_VERSION, error=str(failure))
            self.eras.forget(http_key(self.url, "modern"), http_key(self.url, "legacy"))
            self._established = False
            self.era = None
            result = await super().request(method, params, timeout=timeout,
                                           on_progress=on_progress)
        return await self._settled(method, params, result, timeout, on_progress,
                                   return_input_required)

    async def _settled(self, method: str, params: dict[str, Any] | None, result: dict[str, Any],
                       timeout: float | None,
                       on_progress: Callable[[dict[str, Any]], object] | None,
                       return_input_required: bool) -> dict[str, Any]:
        if method == "tools/list" and self.modern:
            self._remember_schemas(result)
        if return_input_required:
            return result

        async def resend(retry: dict[str, Any]) -> dict[str, Any]:
            return await super(ModernHttpUpstream, self).request(
                method, retry, timeout=timeout, on_progress=on_progress)

        return await settle(self.name, method, params, result, resend, self.on_request,
                            self._sleep)

    def _schema_unknown(self, method: str, params: dict[str, Any] | None,
                        failure: UpstreamError) -> bool:
        name = (params or {}).get("name")
        return method == "tools/call" and isinstance(failure, UpstreamRequestError) \
            and failure.error.get("code") == HEADER_MISMATCH and isinstance(name, str) \
            and name not in self.tool_headers

    def _remember_schemas(self, listing: Any) -> None:
        tools = listing.get("tools") if isinstance(listing, dict) else None
        for tool in tools if isinstance(tools, list) else ():
            if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                self.tool_headers[tool["name"]] = header_annotations(tool.get("inputSchema")) or []

    async def _listen(self, params: dict[str, Any]) -> dict[str, Any]:
        return await self.request("subscriptions/listen", params, timeout=LISTEN_TIMEOUT,
                                  return_input_required=True)

    def _notified(self, message: Message) -> None:
        routed = listened(message) if self.modern else message
        if routed is not None:
            super()._notified(routed)

    async def close(self) -> None:
        self.changes.stop()
        await super().close()

    async def _send_request(self, pending: Outgoing) -> None:
        if not pending.handshake and not self._established:
            await self._ensure_established()
        params = pending.message.get("params")
        if self.modern and pending.method != "server/discover":
            pending.message = dict(pending.message, params=self._envelope(
                params if isinstance(params, dict) else None))
        await super()._send_request(pending)

    async def _send_message(self, message: Message, body: bytes | None = None) -> None:
        if self.modern:
            return  # no client→server notifications (nor answers) in this era
        await super()._send_message(message, body)

    def _post_headers(self, message: Message, session_id: str | None) -> dict[str, str]:
        if not self.modern:
            return super()._post_headers(message, session_id)
        headers = self._base_headers()
        headers["Accept"] = f"{JSON}, {EVENT_STREAM}"
        headers["Content-Type"] = JSON
        method = str(message.get("method"))
        headers["MCP-Protocol-Version"] = MODERN_VERSION
        headers["Mcp-Method"] = method
        params = message.get("params")
        key = NAME_BEARING_METHODS.get(method)
        if key is not None and isinstance(params, dict) and isinstance(params.get(key), str):
            headers["Mcp-Name"] = encode_header_value(params[key])
            if method == "tools/call":
                headers.update(mirrored(self.tool_headers.get(params[key], []),
                                        params.get("arguments")))
        return headers

    async def _refusal(self, method: str, response: _Response, call: _HttpCall,
                       session_id: str | None) -> HttpStatusError:
        """Modern errors come with 4xx statuses and a JSON-RPC error body: that error answers
        the request (verbatim); the status error is what ``_post`` then raises (ignored for
        a request already failed)."""
        if not self.modern or _content_type(response) != JSON:
            return await super()._refusal(method, response, call, session_id)
        body = await self._read_body(response, call, self.max_message_size)
        self._received_json_body(body)  # (_received logs what it cannot handle)
        text = body.decode("utf-8", errors="replace").strip()[:200]
        return HttpStatusError(f"[{self.name}] {method} {self._display}: HTTP "
                               f"{response.code}: {text}", response.code, text)


def _era_refused(failure: UpstreamRequestError | HttpStatusError) -> bool:
    """Whether a modern request's failure says the server stopped speaking the era: -32022,
    or a 400/404/405 without a JSON-RPC body (a modern server's own errors carry one and
    fail the request as ``UpstreamRequestError``)."""
    if isinstance(failure, HttpStatusError):
        return failure.status in FALLBACK_STATUSES
    return failure.error.get("code") == UNSUPPORTED_PROTOCOL_VERSION


class ModernFirstHttpUpstream(ModernHttpUpstream):
    """The session of modern clients: ``server/discover`` first (module docstring)."""

    prefer_modern = True
