"""What the modern requests of one credential on one playbook share on one instance.

State. The protocol is stateless, the gateway is not: it needs upstream connections, and
HTTP upstreams cost a handshake each. So each (credential, playbook) has one long-lived
``StatelessContext`` per instance — a ``DownstreamSession`` with ``transport="modern"`` kept in
the engine's session table (so the per-user cap, idle expiry, playbook edits and deletion,
revocation of its credential and shutdown treat it like any session) but never reachable
through an ``Mcp-Session-Id``. It owns the HTTP upstream sessions and the router's routes, and
is reused by every modern request made with that API key (or cookie session) on that playbook
on this instance; stdio upstreams are shared per playbook anyway.
Nothing a client relies on lives only there: another instance builds its own on first use.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from twisted.internet import defer
from twisted.logger import Logger

from director import tracing
from director.accounts.cache import Credential
from director.mcp import jsonrpc
from director.mcp.channels import Channel
from director.mcp.downstream import DownstreamSession
from director.mcp.engine import McpEngine
from director.mcp.handshake import SERVER_INFO
from director.mcp.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    Message,
    ProtocolError,
)
from director.mcp.modern.envelope import (
    METHODS,
    Rejection,
    discover_result,
    legacy_params,
    relayed,
    server_info,
    shape_result,
    translated,
)
from director.mcp.modern.exchange import Exchange, ModernCallChannel
from director.mcp.modern.listen import LISTEN_PREPARE_SECONDS, Listener, ListenHub
from director.mcp.streams import EventStream
from director.mcp.upstream.base import UpstreamError, UpstreamRequestError
from director.playbooks.model import Server

log = Logger(namespace="mcp.modern")


# --- the per-(user, playbook) context -----------------------------------------------------


class StatelessContext(DownstreamSession):
    """What modern requests of one credential on one playbook share on this instance."""

    def __init__(self, engine: McpEngine, session_id: str, user_id: UUID, credential: Credential,
                 playbook_pk: UUID, transport: str) -> None:
        super().__init__(engine, session_id, user_id, credential, playbook_pk, transport)
        self.hub = ListenHub(session_id)
        self.channel = self.hub
        self.forwarding: list[ModernCallChannel] = []
        self.uri_listeners: dict[str, int] = {}
        #: Calls waiting for the client's retry (or running), by ``requestState``.
        self.exchanges: dict[str, Exchange] = {}

    # --- requests -------------------------------------------------------------------------

    async def handle(self, message: Message, channel: Channel) -> Message:
        return await super().handle(dict(message, params=legacy_params(message.get("params"))),
                                    channel)

    async def _dispatch(self, method: str, params: dict[str, Any], channel: Channel) -> Any:
        if method not in METHODS or method == "subscriptions/listen":
            raise ProtocolError(METHOD_NOT_FOUND, f"Method not found: {method}", method)
        playbook = self.playbook
        if method == "server/discover":
            value = discover_result(playbook)
        else:
            try:
                value = await super()._dispatch(method, params, channel)
            except (ProtocolError, UpstreamRequestError) as failure:
                replacement = translated(method, failure)
                if replacement is None:
                    raise
                raise replacement from None
        return shape_result(method, value, server_info(playbook))

    async def _forward(self, server: Server, method: str, params: dict[str, Any],
                       channel: Channel) -> dict[str, Any]:
        tracked = channel if isinstance(channel, ModernCallChannel) else None
        if tracked is not None:
            self.forwarding.append(tracked)
        try:
            session = await self.engine.upstreams.ready(self.upstream(server))
            if tracked is not None and tracked.envelope is not None and \
                    getattr(session, "era", None) == "modern":
                return await self._send(session, server, method,
                                        relayed(params, tracked.envelope), channel,
                                        return_input_required=True)
            if "requestState" in params:
                # Not one of ours (those resume their Exchange) and not for an upstream of
                # this era: running the call afresh could do its work twice.
                raise Rejection(INVALID_PARAMS, (
                    "unknown requestState: this call was not waiting for input; call again "
                    "without requestState"))
            # (unsolicited inputResponses are ignored, as the era says)
            return await self._send(session, server, method, {
                key: value for key, value in params.items() if key != "inputResponses"},
                channel)
        finally:
            if tracked is not None:
                self.forwarding.remove(tracked)

    async def ask_client(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Bridged to ``input_required`` for the latest call that can carry it."""
        channel = next((c for c in reversed(self.forwarding)
                        if c.exchange is not None and not c.exchange.done), None)
        if channel is None or channel.exchange is None:
            raise ProtocolError(INVALID_REQUEST,  # what the SDK's NoBackChannelError says
                                f"{method} cannot reach the client: it speaks MCP 2026-07-28 "
                                f"and no call of it that could carry input_required is waiting")
        if tracing.spans():
            with tracing.relay_span(method, channel.trace_span):
                return await channel.exchange.ask(method, params)
        return await channel.exchange.ask(method, params)

    def send_related(self, message: Message) -> None:
        """An upstream's log line: on the stream of the latest call waiting on an upstream,
        if that request asked for logs at this level; this era has no other place for it."""
        if message.get("method") != "notifications/message":
            super().send_related(message)
            return
        channel = next((c for c in reversed(self.forwarding) if c.open), None)
        if channel is not None:
            channel.log(message)

    def notify(self, message: Message) -> None:
        if self.closed:
            return
        if message.get("method") == "notifications/message":
            self.send_related(message)
        else:
            self.hub.send(message)

    def cached_tool(self, name: str) -> dict[str, Any] | None:
        """The entry of a tool this context has listed, from its server's cached list (no
        request, no wait: what a call's header check needs on the hot path)."""
        route = self.aggregator.routes.tools.get(name)
        server = self.playbook.server(route[0]) if route is not None else None
        if route is None or server is None or server.disabled:
            return None
        cached = self.upstream(server).lists.get("tools/list") or ()
        return next((tool for tool in cached if tool.get("name") == route[1]), None)

    # --- subscriptions/listen ---------------------------------------------------------------

    async def listen(self, request: Any, message: Message) -> None:
        params = message.get("params") or {}
        notifications = params.get("notifications")
        if not isinstance(notifications, dict):
            raise Rejection(INVALID_PARAMS, "subscriptions/listen needs params.notifications, an "
                                            "object naming what to receive")
        listener = Listener(message["id"], notifications)
        self.touch()
        self.hub.listeners.append(listener)
        try:
            preparing = defer.ensureDeferred(self._prepare(listener))
            preparing.addTimeout(LISTEN_PREPARE_SECONDS, self.engine.reactor)
            try:
                await preparing
            except defer.TimeoutError:
                log.info("subscriptions/listen: upstreams still starting; acknowledging anyway")
            if self.closed:
                raise ProtocolError(jsonrpc.INTERNAL_ERROR, "the playbook's MCP context ended")
            closed: defer.Deferred[None] = defer.Deferred()
            request.setResponseCode(200)
            stream = EventStream(request, self.engine.streams,
                                 on_close=lambda _: closed.callback(None))
            listener.start(stream)
            await closed
        finally:
            self._release(listener)

    async def _prepare(self, listener: Listener) -> None:
        """Start the playbook's upstreams (so that their notifications reach us) and subscribe
        the listener's resources upstream."""
        await self.start_upstreams()
        for uri in listener.uris:
            count = self.uri_listeners.get(uri, 0)
            self.uri_listeners[uri] = count + 1
            self.subscriptions.add(uri)
            if count == 0:
                await self._subscribe_upstream(uri, "resources/subscribe")

    async def start_upstreams(self) -> None:
        """Start every server, through the lists: a server not ready within a list's wait
        is owed its ``list_changed`` (on this context's listeners) like after a client's
        list, since the client may have listed anywhere (another instance) before."""
        await self.aggregator.all_lists(self.playbook)

    async def _subscribe_upstream(self, uri: str, method: str) -> None:
        try:
            playbook = self.playbook
            server = await self.aggregator.resource_route(playbook, uri)
            upstream = await self._fetch(server)
            resources = upstream.capabilities.get("resources") if upstream else None
            if upstream is None or not isinstance(resources, dict) or not resources.get("subscribe"):
                return
            session = await self.engine.upstreams.ready(upstream)
            await session.request(method, {"uri": uri}, timeout=min(30.0, server.timeout_seconds))
        except (ProtocolError, UpstreamError) as failure:
            log.info("{method} {uri} upstream failed: {error}", method=method, uri=uri,
                     error=str(failure))

    def _release(self, listener: Listener) -> None:
        if listener.released:
            return
        listener.released = True
        if listener in self.hub.listeners:
            self.hub.listeners.remove(listener)
        self.touch()
        for uri in listener.uris:
            count = self.uri_listeners.get(uri, 0) - 1
            if count > 0:
                self.uri_listeners[uri] = count
                continue
            self.uri_listeners.pop(uri, None)
            self.subscriptions.discard(uri)
            if not self.closed:
                unsubscribing = defer.ensureDeferred(
                    self._subscribe_upstream(uri, "resources/unsubscribe"))
                unsubscribing.addErrback(lambda failure: log.failure("unsubscribing", failure))

    # --- end ------------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        playbook = self.engine.playbooks.by_pk(self.playbook_pk)
        info = server_info(playbook) if playbook is not None else dict(SERVER_INFO)
        super().close()
        for listener in list(self.hub.listeners):
            if self.ended_because == "revoked":
                listener.revoked()
            else:
                listener.end(info)
