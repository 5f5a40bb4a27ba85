"""Upstream servers of the stateless era (MCP 2026-07-28) over Streamable HTTP.

``ModernHttpUpstream`` is a ``StreamableHttpUpstream`` that can speak either era to its
server; ``connect_http(..., streamable_class=ModernHttpUpstream)`` (what the factory uses for
``http`` servers) puts it in front of the HTTP+SSE fallback.

Which era. The handshake comes first: for a server that speaks both eras the handshake era is
what the gateway's legacy sessions need to stay transparent — ``resources/subscribe``,
``logging/setLevel``, notifications on the GET stream and tools that ask the client in the
middle of a call (the SDK's ``ctx.session.create_message``/``ctx.elicit`` fail in the modern
era) exist only there. When the server refuses ``initialize`` (HTTP 400/404/405, or a JSON-RPC
error), ``server/discover`` is probed; if it answers with ``2026-07-28`` among its
``supportedVersions`` the session is modern, otherwise the original refusal stands (and
``connect_http`` goes on to try HTTP+SSE). The outcome is remembered per URL
(``ERA_MEMORY``, for ``ERA_MEMORY_SECONDS``) so that later sessions with a modern-only server
skip the refused ``initialize``; a remembered choice that fails is forgotten and the whole
sequence runs again, and so does a modern request answered ``-32022`` (the server no longer
speaks this version): the session re-probes and retries the request once.

In the modern era each request is one POST with the envelope in ``params._meta``
(``io.modelcontextprotocol/protocolVersion``, ``…/clientCapabilities``, ``…/clientInfo`` and,
after ``logging/setLevel``, ``…/logLevel`` — the level is kept here since the era has no such
method) and the headers ``MCP-Protocol-Version``, ``Mcp-Method`` and ``Mcp-Name``; no session id,
no GET stream, no notifications (a cancelled request is cancelled by dropping its exchange).
Answers with an HTTP error status and a JSON-RPC error body fail the request with that error,
verbatim. ``initialize_result`` is made from the discover result (``protocolVersion``
``2026-07-28``, its ``capabilities``, ``serverInfo`` from its ``_meta``, ``instructions``).

Multi-round trips: a result with ``resultType: "input_required"`` is resolved here — each of its
``inputRequests`` (``sampling/createMessage``, ``elicitation/create``, ``roots/list``) is handed
to ``on_request`` exactly like a handshake-era server→client request (so the gateway relays it
to the client that caused the call: a real request on a legacy client's stream, or an
``input_required`` of its own for a modern client), and the request is sent again with
``inputResponses`` and the echoed ``requestState``, at most ``INPUT_REQUIRED_MAX_ROUNDS`` times.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from director.mcp.jsonrpc import Message, ProtocolError
from director.mcp.upstream.base import CLIENT_INFO, UpstreamError, UpstreamRequestError
from director.mcp.upstream.http import (
    EVENT_STREAM,
    FALLBACK_STATUSES,
    JSON,
    HttpStatusError,
    StreamableHttpUpstream,
    _content_type,
    _HttpCall,
    _Pending,
    _Response,
)

log = Logger(namespace="mcp.upstream.modern")

MODERN_VERSION = "2026-07-28"
PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO_META = "io.modelcontextprotocol/clientInfo"
LOG_LEVEL_META = "io.modelcontextprotocol/logLevel"
SERVER_INFO_META = "io.modelcontextprotocol/serverInfo"
UNSUPPORTED_PROTOCOL_VERSION = -32022
NAME_BEARING_METHODS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
INPUT_REQUIRED_MAX_ROUNDS = 10
ERA_MEMORY_SECONDS = 3600.0
#: URL -> (era, when it was learnt): "modern" or "legacy".
ERA_MEMORY: dict[str, tuple[str, float]] = {}


def remembered_era(url: str) -> str | None:
    entry = ERA_MEMORY.get(url)
    if entry is None or time.monotonic() - entry[1] > ERA_MEMORY_SECONDS:
        ERA_MEMORY.pop(url, None)
        return None
    return entry[0]


def header_value(value: str) -> str:
    """A header-safe rendering of ``Mcp-Name``: as is when visible ASCII, else the base64
    sentinel the modern era defines (``=?base64?…?=``)."""
    if value and value == value.strip() and all(0x20 <= ord(c) <= 0x7E for c in value):
        return value
    return "=?base64?" + base64.b64encode(value.encode()).decode() + "?="


class ModernHttpUpstream(StreamableHttpUpstream):
    """A Streamable HTTP session in whichever era its server speaks (module docstring)."""

    def __init__(self, *arguments: Any, **options: Any) -> None:
        super().__init__(*arguments, **options)
        #: "modern" once ``server/discover`` succeeded, "legacy" after a handshake.
        self.era: str | None = None
        self.log_level: str | None = None
        self._probing = False

    @property
    def modern(self) -> bool:
        return self.era == "modern" or self._probing

    # --- establishing ---------------------------------------------------------------------

    async def _handshake(self) -> None:
        remembered = remembered_era(self.url)
        if remembered == "modern":
            try:
                await self._discover()
                return
            except UpstreamError as failure:
                log.info("[{server}] the remembered modern era failed ({error}); probing again",
                         server=self.name, error=str(failure))
                ERA_MEMORY.pop(self.url, None)
        try:
            await self._legacy_handshake()
        except (HttpStatusError, UpstreamRequestError) as refused:
            if isinstance(refused, HttpStatusError) and refused.status not in FALLBACK_STATUSES:
                raise
            try:
                await self._discover()
            except UpstreamError as failure:
                log.debug("[{server}] server/discover failed too: {error}", server=self.name,
                          error=str(failure))
                raise refused from None
            log.info("[{server}] initialize refused; the server speaks MCP {version}",
                     server=self.name, version=MODERN_VERSION)
            return
        ERA_MEMORY[self.url] = ("legacy", time.monotonic())

    async def _legacy_handshake(self) -> None:
        self.era = None
        await super()._handshake()
        self.era = "legacy"

    async def _discover(self) -> None:
        self._stop_get_stream()
        self.session_id = None
        self.era = None
        self._probing = True
        try:
            pending = self._new_pending("server/discover", self._envelope({}), None, None,
                                        handshake=True)
            defer.ensureDeferred(self._deliver(pending)).addErrback(self._delivery_failed,
                                                                    pending)
            result = await pending.deferred
        finally:
            self._probing = False
        versions = result.get("supportedVersions")
        if not isinstance(versions, list) or MODERN_VERSION not in versions:
            raise UpstreamError(f"[{self.name}] server/discover does not offer "
                                f"{MODERN_VERSION} (it offers {versions!r})")
        meta = result.get("_meta")
        info = meta.get(SERVER_INFO_META) if isinstance(meta, dict) else None
        capabilities = result.get("capabilities")
        initialize_result: dict[str, Any] = {
            "protocolVersion": MODERN_VERSION,
            "capabilities": capabilities if isinstance(capabilities, dict) else {},
            "serverInfo": info if isinstance(info, dict) else {"name": self.name,
                                                                "version": ""}}
        if isinstance(result.get("instructions"), str):
            initialize_result["instructions"] = result["instructions"]
        self.initialize_result = initialize_result
        self.protocol_version = MODERN_VERSION
        self.era = "modern"
        ERA_MEMORY[self.url] = ("modern", time.monotonic())

    # --- requests ---------------------------------------------------------------------------

    def _envelope(self, params: dict[str, Any] | None) -> dict[str, Any]:
        params = dict(params or {})
        meta = params.get("_meta")
        envelope: dict[str, Any] = {
            **(meta if isinstance(meta, dict) else {}),
            PROTOCOL_VERSION_META: MODERN_VERSION,
            CLIENT_CAPABILITIES_META: self.client_capabilities if
            self.client_capabilities is not None else {
                "sampling": {}, "elicitation": {"form": {}}, "roots": {}},
            CLIENT_INFO_META: CLIENT_INFO}
        if self.log_level is not None:
            envelope[LOG_LEVEL_META] = self.log_level
        params["_meta"] = envelope
        return params

    async def request(self, method: str, params: dict[str, Any] | None = None, *,
                      timeout: float | None = None,
                      on_progress: Callable[[dict[str, Any]], object] | None = None
                      ) -> dict[str, Any]:
        if self.era is None and not self._closed:
            await self._ensure_established()
        if self.modern and method == "logging/setLevel":
            level = (params or {}).get("level")
            self.log_level = level if isinstance(level, str) else None
            return {}
        try:
            result = await super().request(method, params, timeout=timeout,
                                           on_progress=on_progress)
        except UpstreamRequestError as failure:
            if not self.modern or failure.error.get("code") != UNSUPPORTED_PROTOCOL_VERSION:
                raise
            log.info("[{server}] the server no longer speaks {version}; probing again",
                     server=self.name, version=MODERN_VERSION)
            ERA_MEMORY.pop(self.url, None)
            self._established = False
            self.era = None
            result = await super().request(method, params, timeout=timeout,
                                           on_progress=on_progress)
        rounds = 0
        while isinstance(result, dict) and result.get("resultType") == "input_required":
            rounds += 1
            if rounds > INPUT_REQUIRED_MAX_ROUNDS:
                raise UpstreamError(f"[{self.name}] {method}: still input_required after "
                                    f"{INPUT_REQUIRED_MAX_ROUNDS} rounds")
            retry = {key: value for key, value in (params or {}).items()
                     if key not in ("inputResponses", "requestState")}
            requests = result.get("inputRequests")
            if isinstance(requests, dict) and requests:
                retry["inputResponses"] = await self._fulfil(method, requests)
            else:
                await self._sleep(min(0.05 * 2 ** (rounds - 1), 0.25))
            if isinstance(result.get("requestState"), str):
                retry["requestState"] = result["requestState"]
            result = await super().request(method, retry, timeout=timeout,
                                           on_progress=on_progress)
        return result

    async def _fulfil(self, method: str, requests: dict[str, Any]) -> dict[str, Any]:
        """Each input request through ``on_request`` (relayed to the client), concurrently."""
        async def one(key: str, wanted: Any) -> tuple[str, dict[str, Any]]:
            if not isinstance(wanted, dict) or not isinstance(wanted.get("method"), str):
                raise UpstreamError(f"[{self.name}] {method}: malformed input request {key!r}")
            params = wanted.get("params")
            return key, await self.on_request(wanted["method"],
                                              params if isinstance(params, dict) else {})

        try:
            answers = await defer.gatherResults(
                [defer.ensureDeferred(one(key, wanted)) for key, wanted in requests.items()],
                consumeErrors=True)
        except defer.FirstError as failure:
            problem = failure.subFailure.value
            if isinstance(problem, ProtocolError):
                raise UpstreamRequestError(self.name, problem.error_object()) from None
            if isinstance(problem, BaseException):
                raise problem from None
            raise
        return dict(answers)

    async def _send_request(self, pending: _Pending) -> None:
        if not pending.handshake and not self._established:
            await self._ensure_established()
        params = pending.message.get("params")
        if self.modern and pending.method != "server/discover":
            pending.message = dict(pending.message, params=self._envelope(
                params if isinstance(params, dict) else None))
        await super()._send_request(pending)

    async def _send_message(self, message: Message) -> None:
        if self.modern:
            return  # no client→server notifications (nor answers) in this era
        await super()._send_message(message)

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
            headers["Mcp-Name"] = header_value(params[key])
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
