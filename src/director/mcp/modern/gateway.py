"""The entry point of the stateless era: serves modern POSTs."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from twisted.internet import defer
from twisted.logger import Logger

from director.accounts.cache import Credential
from director.mcp import jsonrpc
from director.mcp.engine import McpEngine
from director.mcp.headers import PARAM_HEADER_PREFIX, param_header_mismatch
from director.mcp.jsonrpc import INVALID_PARAMS, INVALID_REQUEST, Message, ProtocolError
from director.mcp.modern.context import StatelessContext
from director.mcp.modern.envelope import (
    PROTOCOL_VERSION_HEADER,
    Rejection,
    classify,
    duplicated_routing_header,
    header_value,
    http_status,
    server_info,
    shape_result,
    unsupported,
)
from director.mcp.modern.exchange import (
    BRIDGE_WAIT_SECONDS,
    INPUT_METHODS,
    REQUEST_STATE_PREFIX,
    Exchange,
    ModernCallChannel,
)
from director.mcp.protocol import CLIENT_CAPABILITIES_META, HEADER_MISMATCH, MODERN_VERSIONS
from director.mcp.streams import json_bytes
from director.mcp.upstream.base import UpstreamError
from director.playbooks.store import Playbook

log = Logger(namespace="mcp.modern")


# --- the entry point ----------------------------------------------------------------------


class ModernGateway:
    """Serves modern POSTs; owns the lookup of each (credential, playbook)'s context."""

    def __init__(self, engine: McpEngine) -> None:
        self.engine = engine
        self.contexts: dict[tuple[Credential, UUID], StatelessContext] = {}
        # After the engine's own listener (it replaced changed shared upstreams by then).
        engine.playbooks.subscribe(self._playbook_changed)

    def _playbook_changed(self, old: Playbook | None, new: Playbook | None) -> None:
        """Listening contexts reconnect to changed or added upstreams at once, so that those
        upstreams' notifications keep reaching the listeners."""
        if new is None or (old is not None and old.servers == new.servers):
            return
        for context in list(self.contexts.values()):
            if context.playbook_pk == new.pk and context.hub.listeners and not context.closed:
                starting = defer.ensureDeferred(context.start_upstreams())
                starting.addErrback(lambda failure: log.failure("restarting upstreams", failure))

    def context(self, user_id: UUID, credential: Credential,
                playbook: Playbook) -> StatelessContext:
        key = (credential, playbook.pk)
        context = self.contexts.get(key)
        if context is None or context.closed:
            for stale in [k for k, c in self.contexts.items() if c.closed]:
                del self.contexts[stale]
            created = self.engine.create(user_id, credential, playbook, "modern",
                                         session_type=StatelessContext)
            assert isinstance(created, StatelessContext)
            context = self.contexts[key] = created
            log.info("MCP stateless context opened", playbook_id=playbook.id,
                     context=created.id[:8])
        return context

    async def post(self, request: Any, user_id: UUID, credential: Credential, playbook: Playbook,
                   message: Message) -> bytes | None:
        try:
            return await self._post(request, user_id, credential, playbook, message)
        except ProtocolError as failure:  # refused by the ladder, or before a listen stream
            request.setResponseCode(http_status(failure.code))
            request.setHeader(b"content-type", b"application/json")
            request_id = message.get("id") if jsonrpc.is_request(message) else None
            return json_bytes({"jsonrpc": "2.0", "id": request_id,
                               "error": failure.error_object()})

    async def _post(self, request: Any, user_id: UUID, credential: Credential,
                    playbook: Playbook, message: Message) -> bytes | None:
        if jsonrpc.is_response(message):
            raise Rejection(INVALID_REQUEST, "Body must be a single JSON-RPC request or "
                                             "notification object")
        if jsonrpc.is_notification(message):
            # No client-to-server notifications exist on this wire (a client cancels by
            # closing the response): acknowledged and dropped, as the SDK does.
            version = header_value(request, PROTOCOL_VERSION_HEADER)
            if version not in MODERN_VERSIONS:
                raise unsupported(version)
            request.setResponseCode(202)
            return b""
        duplicated = duplicated_routing_header(request)
        if duplicated is not None:
            raise Rejection(HEADER_MISMATCH, f"{duplicated} header appears more than once")
        envelope = classify(message, lambda name: header_value(request, name))
        context = self.context(user_id, credential, playbook)
        method = message["method"]
        if method == "tools/call":
            await self._check_param_headers(request, context, playbook, message)
        if method == "subscriptions/listen":
            await context.listen(request, message)
            return None
        channel = ModernCallChannel(request, self.engine.streams, self.engine.reactor,
                                    envelope.log_level)
        channel.envelope = envelope
        if method in INPUT_METHODS:
            await self._exchange(request, context, playbook, message, channel)
            return None
        key = object()
        handling = defer.ensureDeferred(context.handle(message, channel))
        context.in_flight[key] = handling
        try:
            response = await handling
        finally:
            context.in_flight.pop(key, None)
        channel.finish(response)
        return None

    async def _exchange(self, request: Any, context: StatelessContext, playbook: Playbook,
                        message: Message, channel: ModernCallChannel) -> None:
        """A call that may need the client's input: a new one, or a retry of a bridged one."""
        params = message.get("params") or {}
        state = params.get("requestState")
        if isinstance(state, str) and state.startswith(REQUEST_STATE_PREFIX):
            exchange = context.exchanges.get(state)
            if exchange is None or exchange.method != message["method"] or exchange.done:
                raise Rejection(INVALID_PARAMS, (
                    f"unknown or expired requestState: the gateway keeps a call that waits for "
                    f"input on the instance that started it, for {BRIDGE_WAIT_SECONDS:g} s; "
                    f"call again without requestState"))
            exchange.resume(params.get("inputResponses"))
        else:
            # A new call, or the retry of a modern upstream's own input_required (its
            # ``inputResponses`` and ``requestState`` go to it; a handshake-era one never sees
            # them: ``StatelessContext._forward``).
            key = object()
            handling = defer.ensureDeferred(context.handle(message, channel))
            context.in_flight[key] = handling

            def done(result: Any) -> Any:
                context.in_flight.pop(key, None)
                return result

            handling.addBoth(done)
            exchange = Exchange(message["method"], handling, self.engine.reactor,
                                context.exchanges,
                                params.get("_meta", {}).get(CLIENT_CAPABILITIES_META))
            channel.exchange = exchange
        response = await exchange.outcome()
        if response is None:
            round_result = exchange.input_required()  # rotates the requestState
            response = jsonrpc.result(message["id"], shape_result(
                message["method"], round_result, server_info(playbook)))
        else:
            response = dict(response, id=message["id"])
        channel.finish(response)

    @staticmethod
    async def _check_param_headers(request: Any, context: StatelessContext, playbook: Playbook,
                                   message: Message) -> None:
        params = message.get("params") or {}
        name, arguments = params.get("name"), params.get("arguments")
        if not isinstance(name, str) or (arguments is not None and not isinstance(arguments, dict)):
            return
        headers = {key.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
                   for key, values in request.requestHeaders.getAllRawHeaders()
                   if key.lower().startswith(PARAM_HEADER_PREFIX.encode())}
        if not arguments and not headers:
            return
        try:
            tool = context.cached_tool(name) or await context.aggregator.listed_tool(
                playbook, name)
        except (ProtocolError, UpstreamError) as failure:  # fail open, as the SDK does
            log.info("Mcp-Param headers not checked: {error}", error=str(failure))
            return
        schema = tool.get("inputSchema") if tool is not None else None
        mismatch = param_header_mismatch(schema, arguments or {}, headers) if schema else None
        if mismatch is not None:
            raise Rejection(HEADER_MISMATCH, mismatch)
