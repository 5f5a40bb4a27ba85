"""A downstream MCP session (handshake era, or legacy ``/sse``): its state and its traffic.

Each session is independent: its own aggregated routes, its own upstream sessions for HTTP
servers, its own GET stream (``director.mcp.channels``), subscriptions, log level and pending
server→client requests. Many sessions on one playbook never see each other's answers or
notifications (the original shared one server object between all of them). The methods a client
request calls are ``director.mcp.dispatch``'s; ``director.mcp.engine`` owns the sessions.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any
from uuid import UUID

from twisted.internet import defer
from twisted.logger import Logger

from director import tracing
from director.accounts.cache import Credential
from director.mcp import jsonrpc
from director.mcp.capabilities import describe, missing, relayed
from director.mcp.channels import CallChannel, Channel, SessionChannel, list_changed_encoded
from director.mcp.dispatch import dispatch
from director.mcp.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    Message,
    ProtocolError,
)
from director.mcp.router import Aggregator, upstream_error
from director.mcp.timing import ClientRequestTiming, upstream_request
from director.mcp.upstream.base import (
    LEGACY_VERSIONS,
    UpstreamError,
    UpstreamSession,
    UpstreamTimeout,
)
from director.mcp.upstreams import LIST_METHODS, Upstream
from director.playbooks.model import Server
from director.playbooks.store import Playbook

if TYPE_CHECKING:
    from director.mcp.engine import McpEngine

log = Logger(namespace="mcp.sessions")

CLIENT_REQUEST_TIMEOUT = 300.0


class DownstreamSession:
    #: The hash of ``id`` when the session is shared by instances (``director.mcp.shared_sessions``).
    key: bytes | None = None

    def __init__(self, engine: McpEngine, session_id: str, user_id: UUID, credential: Credential,
                 playbook_pk: UUID, transport: str) -> None:
        self.engine = engine
        self.id = session_id
        self.user_id = user_id
        #: What opened it; only this reaches it again, and its revocation ends it.
        self.credential = credential
        self.playbook_pk = playbook_pk
        self.transport = transport  # "streamable" or "sse"
        self.protocol_version = LEGACY_VERSIONS[0]
        self.client_capabilities: dict[str, Any] = {}
        self.client_info: dict[str, Any] = {}
        self.initialized = False
        self.channel = SessionChannel(session_id, engine.instance_tag)
        self.upstreams: dict[str, Upstream] = {}
        # The aggregator and the subscriptions are created at first use: an idle session (a
        # client holding its GET stream) never needs them, and they are ~0.7 KB of its memory.
        self._aggregator: Aggregator | None = None
        self.in_flight: dict[Any, defer.Deferred[Any]] = {}
        self.call_channels: list[Channel] = []
        self.client_requests: dict[str, defer.Deferred[Any]] = {}
        self._subscriptions: set[str] | None = None
        self.log_level: str | None = None
        self.last_active = engine.clock.seconds()
        self.closed = False
        #: Why the engine ended it ("client", "idle", "cap", "revoked", "deleted", "shutdown").
        self.ended_because: str | None = None

    # --- helpers --------------------------------------------------------------------------

    @property
    def aggregator(self) -> Aggregator:
        aggregator = self._aggregator
        if aggregator is None:
            aggregator = self._aggregator = Aggregator(
                self._fetch, self._list, self.engine.clock,
                self.engine.settings.mcp_list_wait_seconds, self._list_grew)
        return aggregator

    @property
    def subscriptions(self) -> set[str]:
        """The resource URIs this client subscribed to."""
        subscriptions = self._subscriptions
        if subscriptions is None:
            subscriptions = self._subscriptions = set()
        return subscriptions

    @property
    def playbook(self) -> Playbook:
        playbook = self.engine.playbooks.by_pk(self.playbook_pk)
        if playbook is None:
            raise ProtocolError(INTERNAL_ERROR, "the playbook was deleted")
        return playbook

    def touch(self) -> None:
        self.last_active = self.engine.clock.seconds()

    def upstream(self, server: Server) -> Upstream:
        upstream = self.engine.upstreams.upstream_for(
            self.playbook_pk, server, self.upstreams, self,
            "modern" if self.transport == "modern" else "legacy", self.upstream_capabilities())
        upstream.users[self] = self.engine.clock.seconds()
        return upstream

    def upstream_capabilities(self) -> dict[str, Any] | None:
        """What this session's own upstreams are told its client can do: what it declared
        at ``initialize``, of what the gateway relays; None (all of it) for a modern context,
        whose requests each declare their own (``director.mcp.capabilities``)."""
        return None if self.transport == "modern" else relayed(self.client_capabilities)

    async def _fetch(self, server: Server) -> Upstream | None:
        upstream = self.upstream(server)
        try:
            await self.engine.upstreams.ready(upstream)
        except UpstreamError:
            return None
        return upstream

    async def _list(self, upstream: Upstream, method: str) -> list[dict[str, Any]]:
        cached = upstream.lists.get(method)
        if cached is not None:
            return cached
        key = LIST_METHODS[method][0]
        session = await self.engine.upstreams.ready(upstream)
        entries: list[dict[str, Any]] = []
        cursor = None
        for _ in range(100):  # bounded: an upstream paging forever is a bug, not our hang
            params = {"cursor": cursor} if cursor else None
            result = await upstream_request(self, upstream.server, session, method, params,
                                            timeout=upstream.server.timeout_seconds)
            entries.extend(e for e in result.get(key, []) if isinstance(e, dict))
            cursor = result.get("nextCursor")
            if not cursor:
                break
        upstream.lists[method] = entries
        return entries

    def facts_changed(self) -> None:
        """The client changed what another instance adopting the session must know."""
        if self.engine.shared is not None and self.key is not None:
            self.engine.shared.facts_changed(self)

    def _list_grew(self, method: str) -> None:
        """A server left out of this session's last ``method`` answer (not ready yet) has
        entries now: the client is told to list again."""
        self.notify_list_changed((LIST_METHODS[method][1],))

    # --- requests from the client ---------------------------------------------------------

    async def handle(self, message: Message, channel: Channel) -> Message:
        """The response to one client request (never raises)."""
        if not tracing.spans():
            return await self._handle(message, channel)
        span = self._method_span(message)
        if isinstance(channel, CallChannel):
            channel.trace_span = span
        token = tracing.attach(span)
        try:
            response = await self._handle(message, channel)
            tracing.response_outcome(span, response)
            return response
        finally:
            tracing.detach(token)
            span.end()

    def _method_span(self, message: Message) -> tracing.Span:
        """The span of an MCP request on this session (MCP conventions: a server span)."""
        params = message.get("params")
        name, attributes = tracing.mcp_attributes(
            message["method"], params if isinstance(params, dict) else {})
        attributes["jsonrpc.request.id"] = str(message.get("id"))
        attributes["director.playbook.id"] = str(self.playbook_pk)
        attributes["director.mcp.transport"] = self.transport
        attributes["network.protocol.name"] = "http"
        if self.transport != "modern":  # a modern context's id is no client's session
            attributes["mcp.session.id"] = self.id[:8]
            attributes["mcp.protocol.version"] = self.protocol_version
        return tracing.start(name, tracing.SERVER, attributes)

    async def _handle(self, message: Message, channel: Channel) -> Message:
        self.touch()
        request_id = message.get("id")
        self.call_channels.append(channel)
        outcome = "error"
        metrics = self.engine.metrics
        timing = ClientRequestTiming(self.engine.clock) if metrics is not None else None
        try:
            value = await self._dispatch(message["method"], message.get("params") or {},
                                         channel)
            outcome = "ok"
            return jsonrpc.result(request_id, value)
        except ProtocolError as failure:
            return {"jsonrpc": "2.0", "id": request_id, "error": failure.error_object()}
        except UpstreamTimeout as failure:
            outcome = "timeout"
            return jsonrpc.error(request_id, jsonrpc.REQUEST_TIMEOUT, str(failure))
        except UpstreamError as failure:
            return {"jsonrpc": "2.0", "id": request_id,
                    "error": upstream_error(failure).error_object()}
        except defer.CancelledError:
            outcome = "cancelled"
            return jsonrpc.error(request_id, jsonrpc.REQUEST_TIMEOUT, "request cancelled")
        except Exception:
            log.failure("unexpected error handling {method}", method=message.get("method"))
            return jsonrpc.error(request_id, jsonrpc.INTERNAL_ERROR,
                                 "internal error in the gateway; the details are in its log")
        finally:
            self.call_channels.remove(channel)
            if metrics is not None and timing is not None:
                timing.done(metrics, message.get("method"), outcome, self.playbook_pk)

    async def _dispatch(self, method: str, params: dict[str, Any], channel: Channel) -> Any:
        """The result of a client request (a subclass adds to the methods it serves)."""
        return await dispatch(self, method, params, channel)

    async def _forward(self, server: Server, method: str, params: dict[str, Any],
                       channel: Channel) -> dict[str, Any]:
        session = await self.engine.upstreams.ready(self.upstream(server))
        return await self._send(session, server, method, params, channel)

    async def _send(self, session: UpstreamSession, server: Server, method: str,
                    params: dict[str, Any], channel: Channel, **options: Any) -> dict[str, Any]:
        """One request to an upstream session, its progress relayed on ``channel``."""
        def progress(notification_params: dict[str, Any]) -> None:
            channel.send(jsonrpc.notification("notifications/progress", notification_params))

        has_token = isinstance(params.get("_meta"), dict) and "progressToken" in params["_meta"]
        return await upstream_request(self, server, session, method, params,
                                      timeout=server.timeout_seconds,
                                      on_progress=progress if has_token else None, **options)

    # --- notifications and responses from the client --------------------------------------

    def handle_notification(self, message: Message) -> None:
        self.touch()
        method = message.get("method")
        params = message.get("params") or {}
        if method == "notifications/initialized":
            self.initialized = True
        elif method == "notifications/cancelled":
            request_id = params.get("requestId")
            if request_id is not None and not jsonrpc.is_valid_id(request_id):
                raise ProtocolError(INVALID_PARAMS, "notifications/cancelled: requestId must be "
                                                    "a string or an integer")
            pending = self.in_flight.get(request_id)
            if pending is not None:
                pending.cancel()
            elif self.engine.shared is not None and self.key is not None:
                self.engine.shared.answer_elsewhere(self, message)  # in flight elsewhere?
        elif method == "notifications/roots/list_changed":
            for upstream in self.upstreams.values():
                if upstream.session is not None:
                    upstream.session.notify(method, params or None)

    def handle_response(self, message: Message) -> None:
        self.touch()
        waiting = self.client_requests.pop(str(message.get("id")), None)
        if waiting is None and self.engine.shared is not None and self.key is not None:
            self.engine.shared.answer_elsewhere(self, message)  # pending on another instance
            return
        if waiting is None:
            log.info("a response to no pending request of this session: {id}",
                     id=message.get("id"))
            return
        if "error" in message:
            waiting.errback(jsonrpc.error_of(message["error"]))
        else:
            waiting.callback(message.get("result"))

    # --- server→client ----------------------------------------------------------------------

    async def ask_client(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Relay an upstream's request (sampling, elicitation, roots) to this client, unless
        it did not declare the capability (a shared stdio process is told all of them)."""
        required = missing(method, params, self.client_capabilities)
        if required is not None:
            code = METHOD_NOT_FOUND if method == "roots/list" else INVALID_PARAMS
            raise ProtocolError(code, f"the client does not support {method} "
                                      f"({describe(required)} is not among its capabilities)")
        channel: Channel = next((c for c in reversed(self.call_channels) if c.open),
                                self.channel)
        if not channel.open and self.transport == "streamable" and \
                not self.channel.held_elsewhere:
            raise ProtocolError(INTERNAL_ERROR, "the client has no open stream to receive the request")
        if tracing.spans():
            with tracing.relay_span(method, getattr(channel, "trace_span", None)):
                return await self._ask(channel, method, params)
        return await self._ask(channel, method, params)

    async def _ask(self, channel: Channel, method: str, params: dict[str, Any]
                   ) -> dict[str, Any]:
        request_id = f"director-{secrets.token_hex(8)}"
        waiting: defer.Deferred[Any] = defer.Deferred()
        self.client_requests[request_id] = waiting
        channel.send(jsonrpc.request(request_id, method, params))
        waiting.addTimeout(CLIENT_REQUEST_TIMEOUT, self.engine.clock)
        try:
            result = await waiting
        except defer.TimeoutError:
            raise ProtocolError(jsonrpc.REQUEST_TIMEOUT,
                                f"the client did not answer {method} in time") from None
        finally:
            self.client_requests.pop(request_id, None)
        if result is None:
            return {}
        if not isinstance(result, dict):
            raise ProtocolError(INVALID_PARAMS, f"the client answered {method} with a result that "
                                                f"is not an object")
        return result

    def send_related(self, message: Message) -> None:
        """A message that belongs to the call in progress, if any; else the session stream."""
        channel = next((c for c in reversed(self.call_channels) if c.open), None)
        if channel is not None:
            channel.send(message)
        else:
            self.notify(message)

    def notify(self, message: Message) -> None:
        """A notification outside any request: on the session's own stream."""
        if not self.closed:
            self.channel.send(message)

    def notify_list_changed(self, methods: tuple[str, ...], derived: bool = False) -> None:
        """``notify`` of parameterless ``list_changed`` notifications, encoded once for all
        sessions and written to the stream at once (``derived``: as
        ``SessionChannel.send_encoded``)."""
        if type(self).notify is not DownstreamSession.notify:  # a subclass routes its own
            for method in methods:
                self.notify(jsonrpc.notification(method))
        elif not self.closed:
            self.channel.send_encoded(list_changed_encoded(methods), derived)

    # --- end ------------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pending in list(self.in_flight.values()):
            pending.cancel()
        for waiting in list(self.client_requests.values()):
            if not waiting.called:
                waiting.errback(ProtocolError(INTERNAL_ERROR, "session closed"))
        self.engine.upstreams.release(self, self.upstreams)
        if self.channel.stream is not None:
            self.channel.stream.finish()
