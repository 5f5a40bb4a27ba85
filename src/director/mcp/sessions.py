"""Downstream MCP sessions (handshake era) and the engine that owns them.

Each session is independent: its own aggregated routes, its own upstream sessions for HTTP
servers, its own GET stream, subscriptions, log level and pending server→client requests.
Many sessions on one playbook never see each other's answers or notifications (the original
shared one server object between all of them).

Messages for a session travel on one of two kinds of ``Channel``:

* ``CallChannel`` — the answer to one POST. It stays plain ``application/json`` unless
  something must be sent before the result (progress, a log line, a sampling request), in
  which case it turns into an SSE stream on the fly (headers are not sent until then).
* the session channel — the GET stream (Streamable HTTP) or the one stream of the legacy
  HTTP+SSE transport — for notifications outside any request.

A session belongs to the credential that opened it (an API key or a cookie session): only that
credential reaches it again, and when it is revoked — or its user disabled, or all its user's
cookie sessions ended by a password change — the engine ends the session: its stream is
finished, its calls in progress cancelled, its upstream sessions released (``McpEngine.revoked``,
told by the account cache, which every instance keeps fresh by NOTIFY).
With several instances, a handshake-era or ``/sse`` session is not this process's alone:
``director.mcp.shared_sessions`` stores its facts when it starts, and any instance that gets a
request for it adopts it (``McpEngine.adopted``) and serves it as its own; ``McpEngine.shared``
is then set, a session's end reaches every instance (``McpEngine.end``, ``everywhere``), and the
session channel writes its events to the shared log or relays them to the instance holding the
stream (``SessionChannel.send_encoded``).
Why bound to the credential and not to the user: revoking a key must end exactly what that key
opened, and a session another credential could continue would either outlive the revocation or
be cut under the other credential's feet; clients keep one credential per connection anyway.
"""

from __future__ import annotations

import secrets
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from twisted.internet import defer, task
from twisted.logger import Logger

from director import tracing
from director.accounts.cache import Credential, Revocation
from director.config import Settings
from director.mcp import jsonrpc
from director.mcp.capabilities import describe, missing, relayed
from director.mcp.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    Message,
    ProtocolError,
)
from director.mcp.router import (
    Aggregator,
    enabled_servers,
    render_prompt,
    settled_within,
    upstream_error,
)
from director.mcp.streams import (
    EventStream,
    ReplayBuffer,
    StreamRegistry,
    frame,
    json_bytes,
    response_bytes,
)
from director.mcp.upstream.base import (
    LEGACY_VERSIONS,
    UpstreamError,
    UpstreamRequestError,
    UpstreamSession,
    UpstreamTimeout,
)
from director.mcp.upstreams import LIST_METHODS, Upstream, UpstreamManager
from director.playbooks.cache import PlaybookCache
from director.playbooks.model import Server
from director.playbooks.store import Playbook

if TYPE_CHECKING:
    from director.mcp.shared_sessions import SharedSessions, StoredSession
    from director.metrics import Metrics

log = Logger(namespace="mcp.sessions")

SERVER_INFO = {"name": "director", "title": "Director MCP gateway", "version": "0.1.0"}
CLIENT_REQUEST_TIMEOUT = 300.0
#: How long a revoked credential is remembered, so that a request that authenticated just
#: before the revocation (then waited, e.g. for a rate-limit lease) cannot open a session.
REVOKED_MEMORY_SECONDS = 60.0
SERVER_CAPABILITIES = {
    "tools": {"listChanged": True},
    "prompts": {"listChanged": True},
    "resources": {"subscribe": True, "listChanged": True},
    "logging": {},
    "completions": {},
}
LIST_CHANGED = ("notifications/tools/list_changed", "notifications/prompts/list_changed",
                "notifications/resources/list_changed")
#: Each as ``SessionChannel`` writes it, encoded once for a fan-out to every session.
LIST_CHANGED_ENCODED = {method: json_bytes(jsonrpc.notification(method))
                        for method in LIST_CHANGED}


class CredentialRevoked(Exception):
    """A session was to be opened with a credential revoked a moment ago (answered 401)."""


class UpstreamWait:
    """How long one client request waited for upstream answers (overlapping waits counted
    once): the request's time minus this is the gateway's own, for metrics."""

    __slots__ = ("outstanding", "since", "total")

    def __init__(self) -> None:
        self.outstanding = 0
        self.since = 0.0
        self.total = 0.0

    def begin(self, now: float) -> None:
        if self.outstanding == 0:
            self.since = now
        self.outstanding += 1

    def end(self, now: float) -> None:
        self.outstanding -= 1
        if self.outstanding == 0:
            self.total += now - self.since


#: The ``UpstreamWait`` of the client request being handled (set only when metrics are on;
#: each request runs in a context of its own, which Twisted copies for every coroutine).
_WAITING: ContextVar[UpstreamWait | None] = ContextVar("director_upstream_wait", default=None)


def outcome_of(failure: BaseException) -> str:
    """How an upstream request failed, as the metrics label it."""
    if isinstance(failure, UpstreamTimeout):
        return "timeout"
    if isinstance(failure, UpstreamRequestError):
        return "error"
    if isinstance(failure, defer.CancelledError):
        return "cancelled"
    return "failed"


class Channel(Protocol):
    @property
    def open(self) -> bool: ...

    def send(self, message: Message) -> None: ...


class CallChannel:
    """The answer to one POSTed request: JSON, or SSE once something precedes the result."""

    #: With tracing on, the span of the request this channel answers (the parent of what the
    #: upstream asks the client meanwhile, which arrives in no request's context).
    trace_span: Any = None

    def __init__(self, request: Any, streams: StreamRegistry) -> None:
        self.request = request
        self.streams = streams
        self.stream: EventStream | None = None
        self.open = True
        request.notifyFinish().addBoth(self._gone)

    def _gone(self, _: object) -> None:
        self.open = False

    def send(self, message: Message) -> None:
        if not self.open:
            return
        if self.stream is None:
            self.request.setResponseCode(200)
            self.stream = EventStream(self.request, self.streams)
        self.stream.send(frame(json_bytes(message)))

    def finish(self, response: Message) -> None:
        if not self.open:
            return
        self.open = False
        if self.stream is not None:
            self.stream.send(frame(response_bytes(response)))
            self.stream.finish()
            return
        self.request.setResponseCode(200)
        self.request.setHeader(b"content-type", b"application/json")
        self.request.write(response_bytes(response))
        self.request.finish()


class SessionChannel:
    """The session's notifications: its GET stream, remembered for ``Last-Event-ID`` (here,
    and in the shared event log when several instances serve the session: ``shared``)."""

    #: Set (with ``key``, the session's hash) for a streamable session shared by instances.
    shared: SharedSessions | None = None
    key = b""
    #: This instance held the session's GET stream last (it keeps what the client misses).
    last_holder = False
    #: Another instance opened the session's GET stream since (what is sent here is relayed).
    held_elsewhere = False

    def __init__(self, session_id: str, tag: str = "") -> None:
        self.replay = ReplayBuffer(session_id[:8] + tag)
        self.stream: EventStream | None = None

    @property
    def open(self) -> bool:
        return self.stream is not None and self.stream.open

    def send(self, message: Message) -> None:
        self.send_encoded(response_bytes(message) if jsonrpc.is_response(message)
                          else json_bytes(message))

    def send_encoded(self, data: bytes, derived: bool = False) -> None:
        """``send`` of a message already encoded (``json_bytes``). ``derived``: every instance
        produces it by itself (a playbook change), so only one with the stream sends it."""
        chunk = self.replay.record(data)
        shared = self.shared
        if self.stream is not None and self.stream.open:
            self.stream.send(chunk)
            if shared is not None:  # logged at once: the stream may be dead already, unseen
                shared.events.append(self.key, self.replay.last_id, data, False)
        elif shared is not None and not derived:  # the stream is elsewhere, or nowhere yet
            shared.events.append(self.key, self.replay.last_id, data, True)
        elif shared is not None and self.last_holder:  # every instance has it: one keeps it
            shared.events.append(self.key, self.replay.last_id, data, False)

    def write_relayed(self, event_id: str, data: bytes) -> None:
        """An event another instance produced for this stream (already in the event log)."""
        chunk = frame(data, event_id)
        self.replay.keep(event_id, chunk)
        if self.stream is not None:
            self.stream.send(chunk)


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
        self.last_active = time.monotonic()
        self.closed = False
        #: Why the engine ended it ("client", "idle", "cap", "revoked", "deleted", "shutdown").
        self.ended_because: str | None = None

    # --- helpers --------------------------------------------------------------------------

    @property
    def aggregator(self) -> Aggregator:
        aggregator = self._aggregator
        if aggregator is None:
            aggregator = self._aggregator = Aggregator(
                self._fetch, self._list, self.engine.reactor,
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
        self.last_active = time.monotonic()

    def upstream(self, server: Server) -> Upstream:
        upstream = self.engine.upstreams.upstream_for(
            self.playbook_pk, server, self.upstreams, self,
            "modern" if self.transport == "modern" else "legacy", self.upstream_capabilities())
        upstream.users[self] = time.monotonic()
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
            result = await self._upstream_request(upstream.server, session, method, params,
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
        self.notify_list_changed(LIST_METHODS[method][1])

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
        started, outcome = time.monotonic(), "error"
        metrics = self.engine.metrics
        waited = waiting = None
        if metrics is not None:
            waited = UpstreamWait()
            waiting = _WAITING.set(waited)
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
            if metrics is not None and waited is not None and waiting is not None:
                _WAITING.reset(waiting)
                metrics.mcp_request(message.get("method"), outcome, time.monotonic() - started,
                                    self.playbook_pk, waited.total)

    async def _dispatch(self, method: str, params: dict[str, Any], channel: Channel) -> Any:
        playbook = self.playbook
        if method == "ping":
            return {}
        if method == "tools/list":
            return await self.aggregator.tools(playbook)
        if method == "prompts/list":
            return await self.aggregator.prompts(playbook)
        if method == "resources/list":
            return await self.aggregator.resources(playbook)
        if method == "resources/templates/list":
            return await self.aggregator.templates(playbook)
        if method == "tools/call":
            name = _required_string(params, "name")
            if not tracing.spans():
                server, original = await self.aggregator.tool_route(playbook, name)
            else:
                with tracing.span("route", attributes={"gen_ai.tool.name": name}) as routed:
                    server, original = await self.aggregator.tool_route(playbook, name)
                    assert routed is not None
                    routed.set_attribute("director.server.name", server.name)
            return await self._forward(server, method, dict(params, name=original), channel)
        if method == "prompts/get":
            name = _required_string(params, "name")
            source = await self.aggregator.prompt_route(playbook, name)
            if source is None:
                prompt = playbook.prompt(name)
                assert prompt is not None
                arguments = params.get("arguments") or {}
                if not isinstance(arguments, dict):
                    raise ProtocolError(INVALID_PARAMS, "arguments must be an object")
                return render_prompt(prompt, arguments)
            return await self._forward(source, method, params, channel)
        if method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
            uri = _required_string(params, "uri")
            server = await self.aggregator.resource_route(playbook, uri)
            if method == "resources/read":
                return await self._forward(server, method, params, channel)
            return await self._subscription(server, method, uri, params, channel)
        if method == "completion/complete":
            return await self._complete(playbook, params, channel)
        if method == "logging/setLevel":
            self.log_level = _required_string(params, "level")
            self.facts_changed()
            await self._set_upstream_log_levels(playbook)
            return {}
        raise ProtocolError(METHOD_NOT_FOUND, f"method not found: {method}")

    async def resume(self) -> None:
        """Adopted from another instance: this instance's upstreams are told what the client
        asked there — its log level and its subscriptions, each routed by its URI — as the
        client's own ``logging/setLevel`` and ``resources/subscribe`` tell them (a shared stdio
        process counts this session among those wanting the URI, ``_subscription``)."""
        playbook = self.playbook
        if self.log_level is not None:
            await self._set_upstream_log_levels(playbook)
        for uri in sorted(self._subscriptions or ()):
            if self.closed:
                return
            try:
                server = await self.aggregator.resource_route(playbook, uri)
                await self._subscription(server, "resources/subscribe", uri, {"uri": uri},
                                         self.channel, changed=False)
            except (ProtocolError, UpstreamError) as failure:
                log.info("re-subscribing {uri} of an adopted session failed: {error}",
                         uri=uri, error=str(failure))

    async def _subscription(self, server: Server, method: str, uri: str, params: dict[str, Any],
                            channel: Channel, changed: bool = True) -> dict[str, Any]:
        """``resources/(un)subscribe``: an upstream shared with other sessions is unsubscribed
        only when none of them still wants the URI (``changed``: the session's stored facts
        are updated; not when they are what is re-applied, ``resume``)."""
        upstream = self.upstream(server)
        if method == "resources/subscribe":
            result = await self._forward(server, method, params, channel)
            self.subscriptions.add(uri)
            upstream.subscribed.add(uri)
            if changed:
                self.facts_changed()
            return result
        self.subscriptions.discard(uri)
        self.facts_changed()
        if any(uri in (user._subscriptions or ()) for user in self.engine.users_of(upstream)):
            return {}
        upstream.subscribed.discard(uri)
        return await self._forward(server, method, params, channel)

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
        return await self._upstream_request(server, session, method, params,
                                            timeout=server.timeout_seconds,
                                            on_progress=progress if has_token else None,
                                            **options)

    async def _upstream_request(self, server: Server, session: UpstreamSession, method: str,
                                params: dict[str, Any] | None, **options: Any
                                ) -> dict[str, Any]:
        """``session.request``, timed for the metrics (per server, and as the client request's
        wait) when they are on, in a client span when tracing is."""
        if not tracing.spans():
            return await self._timed_request(server, session, method, params, **options)
        span = tracing.upstream_span(server.name, session, method, params)
        token = tracing.attach(span)
        try:
            result = await self._timed_request(server, session, method, params, **options)
            tracing.result_outcome(span, result)
            return result
        except BaseException as failure:
            tracing.fail(span, failure)
            raise
        finally:
            tracing.detach(token)
            span.end()

    async def _timed_request(self, server: Server, session: UpstreamSession, method: str,
                             params: dict[str, Any] | None, **options: Any) -> dict[str, Any]:
        metrics = self.engine.metrics
        if metrics is None:
            return await session.request(method, params, **options)
        waited = _WAITING.get()
        started = time.monotonic()
        if waited is not None:
            waited.begin(started)
        outcome = "failed"
        try:
            result = await session.request(method, params, **options)
            outcome = "ok"
            return result
        except BaseException as failure:
            outcome = outcome_of(failure)
            raise
        finally:
            now = time.monotonic()
            if waited is not None:
                waited.end(now)
            metrics.upstream_request(self.playbook_pk, server.name, outcome, now - started)

    async def _complete(self, playbook: Playbook, params: dict[str, Any],
                        channel: Channel) -> Any:
        ref = params.get("ref")
        if not isinstance(ref, dict):
            raise ProtocolError(INVALID_PARAMS, "ref must be an object")
        server: Server | None
        if ref.get("type") == "ref/prompt":
            server = await self.aggregator.prompt_route(playbook, _required_string(ref, "name"))
            if server is None:
                return {"completion": {"values": [], "hasMore": False}}
        elif ref.get("type") == "ref/resource":
            server = await self.aggregator.template_route(playbook, _required_string(ref, "uri"))
        else:
            raise ProtocolError(INVALID_PARAMS, "ref.type must be ref/prompt or ref/resource")
        return await self._forward(server, "completion/complete", params, channel)

    async def _set_upstream_log_levels(self, playbook: Playbook) -> None:
        """Each upstream gets the most verbose level any of its sessions asked for (a shared
        stdio process serves several): every session still sees only what it asked for, since
        log lines are filtered per session on their way down."""
        async def one(server: Server) -> None:
            upstream = await self._fetch(server)
            if upstream is not None:
                await self.engine.apply_log_level(upstream)

        # Not longer than a list waits: a server still starting gets the level once it is
        # ready (``one`` goes on).
        setting = [defer.ensureDeferred(one(s)).addErrback(
            lambda failure: log.failure("logging/setLevel upstream", failure))
            for s in enabled_servers(playbook)]
        await settled_within(setting, self.engine.settings.mcp_list_wait_seconds,
                             self.engine.reactor)

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
        waiting.addTimeout(CLIENT_REQUEST_TIMEOUT, self.engine.reactor)
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

    def notify_list_changed(self, method: str, derived: bool = False) -> None:
        """``notify`` of a parameterless ``list_changed``, encoded once for all sessions
        (``derived``: as ``SessionChannel.send_encoded``)."""
        if type(self).notify is not DownstreamSession.notify:  # a subclass routes its own
            self.notify(jsonrpc.notification(method))
        elif not self.closed:
            self.channel.send_encoded(LIST_CHANGED_ENCODED[method], derived)

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


#: RFC 5424 severities as MCP names them, least severe first.
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


def log_level_allows(threshold: str | None, level: Any) -> bool:
    """Whether a message at ``level`` passes a session's ``logging/setLevel`` threshold."""
    if threshold not in LOG_LEVELS or level not in LOG_LEVELS:
        return True
    return LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold)


def _required_string(params: dict[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise ProtocolError(INVALID_PARAMS, f"{name} must be a non-empty string")
    return value


class McpEngine:
    """All downstream sessions of this process, their upstreams and streams."""

    def __init__(self, settings: Settings, playbooks: PlaybookCache, upstreams: UpstreamManager,
                 reactor: Any, max_sessions_per_user: int = 100,
                 idle_seconds: float = 1800.0, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.playbooks = playbooks
        self.upstreams = upstreams
        self.reactor = reactor
        self.streams = StreamRegistry()
        self.sessions: dict[str, DownstreamSession] = {}
        # Per user, for the cap: scanning every session at each open costs O(sessions).
        self._of_user: dict[UUID, dict[str, DownstreamSession]] = {}
        # Per credential, for revocations: one lookup instead of a scan of every session.
        self._of_credential: dict[Credential, dict[str, DownstreamSession]] = {}
        # Credentials revoked lately, oldest first, with when (``REVOKED_MEMORY_SECONDS``).
        self._revoked: dict[Credential, float] = {}
        self.max_sessions_per_user = max_sessions_per_user
        self.idle_seconds = idle_seconds
        #: Set when several instances share the sessions (``director.mcp.shared_sessions``).
        self.shared: SharedSessions | None = None
        self.instance_tag = ""
        self._expiry: task.LoopingCall | None = None
        upstreams.on_notification = self._upstream_notified
        upstreams.on_request = self._upstream_asks
        upstreams.on_restored = self._upstream_restored
        playbooks.subscribe(self._playbook_changed)

    def start(self) -> None:
        self.streams.start()
        self._expiry = task.LoopingCall(self.expire_idle)
        self._expiry.start(min(60.0, self.idle_seconds / 2), now=False)

    async def stop(self) -> None:
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        for session in list(self.sessions.values()):
            self.end(session, "shutdown")
        self.streams.stop()
        self.streams.close_all()
        if self.shared is not None:
            await self.shared.stop()
        await self.upstreams.close_all()

    # --- sessions -------------------------------------------------------------------------

    def create(self, user_id: UUID, credential: Credential, playbook: Playbook, transport: str,
               session_type: type[DownstreamSession] = DownstreamSession) -> DownstreamSession:
        """A new session of ``user_id`` opened with ``credential``; ``CredentialRevoked`` when
        that credential was revoked since the request authenticated."""
        if credential in self._revoked:
            raise CredentialRevoked(credential.kind)
        mine = self._of_user.setdefault(user_id, {})
        if len(mine) >= self.max_sessions_per_user:
            oldest = min(mine.values(), key=lambda s: s.last_active)
            log.info("session cap reached for a user: ending their least recently used session",
                     user_id=str(user_id))
            # Shared sessions: only this copy; the cap across instances is counted when the
            # new one is recorded (``SharedSessions.record``).
            self.end(oldest, "cap", everywhere=self.shared is None)
            mine = self._of_user.setdefault(user_id, {})
        session_id = secrets.token_urlsafe(24)
        session = session_type(self, session_id, user_id, credential, playbook.pk, transport)
        self.sessions[session_id] = session
        mine[session_id] = session
        self._of_credential.setdefault(credential, {})[session_id] = session
        if self.metrics is not None:
            self.metrics.session_created(transport)
        if self.shared is not None and transport in ("streamable", "sse") and \
                credential.kind != "studio":  # the Studio's own stay in its instance
            self.shared.held(session)
        return session

    def adopted(self, session_id: str, stored: StoredSession) -> DownstreamSession:
        """A streamable session another instance created, rebuilt here from its stored facts
        (``SharedSessions.adopt``): its upstream sessions follow lazily, as for a new one,
        except those its log level and subscriptions must be told to now (``resume``: else
        ``notifications/resources/updated`` would stop with the instance that subscribed)."""
        session = DownstreamSession(self, session_id, stored.user_id, stored.credential,
                                    stored.playbook_pk, stored.transport)
        session.protocol_version = stored.protocol_version
        session.client_info = stored.client_info
        session.client_capabilities = stored.client_capabilities
        session.log_level = stored.log_level
        if stored.subscriptions:
            session.subscriptions.update(stored.subscriptions)
        session.initialized = True
        self.sessions[session_id] = session
        self._of_user.setdefault(stored.user_id, {})[session_id] = session
        self._of_credential.setdefault(stored.credential, {})[session_id] = session
        if self.shared is not None:
            self.shared.held(session)
        if session.log_level is not None or stored.subscriptions:
            resuming = defer.ensureDeferred(session.resume())
            resuming.addErrback(lambda failure: log.failure("resuming an adopted session",
                                                            failure))
        return session

    def find(self, session_id: str, credential: Credential,
             playbook: Playbook) -> DownstreamSession | None:
        """The session on this playbook opened with this credential, or None (unknown, ended,
        or opened with another credential: sessions are bound to theirs, module docstring)."""
        session = self.sessions.get(session_id)
        if session is None or session.credential != credential or \
                session.playbook_pk != playbook.pk:
            return None
        return session

    def end(self, session: DownstreamSession, reason: str, everywhere: bool = True) -> None:
        """End ``session`` (idempotent); ``reason`` as ``DownstreamSession.ended_because``.
        A shared session ends on every instance unless ``everywhere`` is false (only this
        copy is dropped: another instance may go on serving it)."""
        if self.sessions.pop(session.id, None) is not None:
            _unindex(self._of_user, session.user_id, session.id)
            _unindex(self._of_credential, session.credential, session.id)
            session.ended_because = reason
            if self.metrics is not None:
                self.metrics.session_ended(session.transport, reason)
            if self.shared is not None:
                self.shared.released(session, reason, everywhere)
        session.close()

    def expire_idle(self) -> None:
        cutoff = time.monotonic() - self.idle_seconds
        for session in list(self.sessions.values()):
            if session.last_active < cutoff and not session.channel.open and \
                    not session.in_flight:
                # A shared session may be in use elsewhere: its row ends by the shared
                # ``last_seen`` (``SharedSessions``), this copy here.
                self.end(session, "idle", everywhere=self.shared is None)

    # --- revocation (``director.accounts.cache.CredentialHolder``) ------------------------

    def revoked(self, revocation: Revocation) -> None:
        """End every session opened with what ``revocation`` names."""
        if revocation.kind in ("api_key", "session", "oauth"):
            credential = Credential(revocation.kind, revocation.id)
            self._remember_revoked(credential)
            ending = list(self._of_credential.get(credential, {}).values())
            if self.shared is not None:
                self.shared.revoked(credential, None)
        else:  # "user": all of them; "sessions_of": those opened by cookie sessions
            ending = [session for session in self._of_user.get(revocation.id, {}).values()
                      if revocation.kind == "user" or session.credential.kind == "session"]
            if self.shared is not None:
                self.shared.revoked(None, revocation.id, revocation.kind != "user")
        for session in ending:
            self.end(session, "revoked", everywhere=False)  # every instance is told
        if ending:
            log.info("ended {count} MCP session(s): their credential was revoked ({kind})",
                     count=len(ending), kind=revocation.kind)

    def held(self) -> list[tuple[UUID, Credential]]:
        return [(next(iter(sessions.values())).user_id, credential)
                for credential, sessions in self._of_credential.items()]

    def _remember_revoked(self, credential: Credential) -> None:
        remember(self._revoked, credential, REVOKED_MEMORY_SECONDS)

    # --- change routing -------------------------------------------------------------------

    def users_of(self, upstream: Upstream) -> list[DownstreamSession]:
        return [u for u in upstream.users if isinstance(u, DownstreamSession) and not u.closed]

    async def apply_log_level(self, upstream: Upstream) -> None:
        """``logging/setLevel`` on ``upstream`` at the most verbose level of its sessions."""
        levels = [user.log_level for user in self.users_of(upstream)
                  if user.log_level in LOG_LEVELS]
        if not levels or "logging" not in upstream.capabilities:
            return
        level = min(levels, key=LOG_LEVELS.index)
        try:
            session = await self.upstreams.ready(upstream)
            await session.request("logging/setLevel", {"level": level}, timeout=10.0)
        except UpstreamError as failure:
            log.info("logging/setLevel failed: {error}", error=str(failure))

    async def _restore(self, upstream: Upstream) -> None:
        """After a restart or re-initialisation: the log level and the subscriptions the
        gateway's sessions still want, told again."""
        await self.apply_log_level(upstream)
        users = self.users_of(upstream)
        wanted = sorted(uri for uri in upstream.subscribed
                        if any(uri in (user._subscriptions or ()) for user in users))
        upstream.subscribed.intersection_update(wanted)
        for uri in wanted:
            try:
                session = await self.upstreams.ready(upstream)
                await session.request("resources/subscribe", {"uri": uri}, timeout=10.0)
            except UpstreamError as failure:
                log.info("re-subscribing {uri} failed: {error}", uri=uri, error=str(failure))

    def _upstream_restored(self, upstream: Upstream) -> None:
        if self.metrics is not None:
            users = self.users_of(upstream)  # an upstream serves one playbook's sessions
            self.metrics.upstream_restarted(users[0].playbook_pk if users else None,
                                            upstream.server.name)
        restoring = defer.ensureDeferred(self._restore(upstream))
        restoring.addErrback(lambda failure: log.failure("restoring an upstream", failure))

    def _upstream_notified(self, upstream: Upstream, message: Message) -> None:
        method = message.get("method", "")
        params = message.get("params") or {}
        users = self.users_of(upstream)
        if method in ("notifications/message", "notifications/elicitation/complete"):
            # A log line belongs to one client: the session that used this upstream last
            # (the only one, unless it is a shared stdio process), on the stream of its
            # call in progress if it has one, and only at or above the level it asked for.
            # So does the end of a URL-mode elicitation: that session was asked.
            if users:
                latest = max(users, key=lambda s: upstream.users.get(s, 0.0))
                if method != "notifications/message" or \
                        log_level_allows(latest.log_level, params.get("level")):
                    latest.send_related(message)
            return
        for session in users:
            if method == "notifications/resources/updated":
                if params.get("uri") in (session._subscriptions or ()):
                    session.notify(message)
            elif method in LIST_CHANGED:
                session.notify(message)

    async def _upstream_asks(self, upstream: Upstream, method: str,
                             params: dict[str, Any]) -> dict[str, Any]:
        users = self.users_of(upstream)
        if method == "ping":
            return {}
        if not users:
            raise ProtocolError(INTERNAL_ERROR, "no client session to relay the request to")
        latest = max(users, key=lambda s: upstream.users.get(s, 0.0))
        return await latest.ask_client(method, params)

    def _playbook_changed(self, old: Playbook | None, new: Playbook | None) -> None:
        playbook = new or old
        assert playbook is not None
        self.upstreams.playbook_changed(
            playbook.pk, {s.name: s for s in new.servers} if new is not None else None)
        affected = [s for s in self.sessions.values() if s.playbook_pk == playbook.pk]
        if new is None:
            for session in affected:
                self.end(session, "deleted")
            return
        servers_changed = old is None or old.servers != new.servers
        prompts_changed = old is None or old.prompts != new.prompts or servers_changed
        for session in affected:
            if servers_changed:
                session.notify_list_changed("notifications/tools/list_changed", True)
                session.notify_list_changed("notifications/resources/list_changed", True)
            if prompts_changed:
                session.notify_list_changed("notifications/prompts/list_changed", True)

    # --- the legacy /sse transport -------------------------------------------------------

    def sse_message(self, session: DownstreamSession, message: Message) -> None:
        """A message POSTed to ``/message`` of ``session``, held here (posted here, or relayed
        from the instance it was posted to); ``ProtocolError`` for a refused notification."""
        if jsonrpc.is_notification(message):
            session.handle_notification(message)
        elif jsonrpc.is_response(message):
            session.handle_response(message)
        elif message["method"] == "initialize":
            playbook = self.playbooks.by_pk(session.playbook_pk)
            if playbook is None:
                return
            result = self.initialize_result(session, message.get("params") or {}, playbook)
            session.channel.send(jsonrpc.result(message["id"], result))
            session.facts_changed()
        else:
            handling = defer.ensureDeferred(session.handle(message, session.channel))
            session.in_flight[message["id"]] = handling

            def answered(response: Message) -> None:
                session.in_flight.pop(message["id"], None)
                session.channel.send(response)

            handling.addCallback(answered)

    # --- the handshake --------------------------------------------------------------------

    def initialize_result(self, session: DownstreamSession, params: dict[str, Any],
                          playbook: Playbook) -> dict[str, Any]:
        requested = params.get("protocolVersion")
        version = requested if requested in LEGACY_VERSIONS else LEGACY_VERSIONS[0]
        session.protocol_version = version
        if self.metrics is not None:
            self.metrics.initialized(session.transport, version)
        capabilities = params.get("capabilities")
        session.client_capabilities = capabilities if isinstance(capabilities, dict) else {}
        info = params.get("clientInfo")
        session.client_info = info if isinstance(info, dict) else {}
        result: dict[str, Any] = {"protocolVersion": version,
                                  "capabilities": SERVER_CAPABILITIES,
                                  "serverInfo": dict(SERVER_INFO, name=f"director/{playbook.id}")}
        if playbook.description:
            result["instructions"] = playbook.description
        return result


def remember(memory: dict[Any, float], key: Any, seconds: float) -> None:
    """Note ``key`` in ``memory`` (oldest first, with when), forgetting what is older than
    ``seconds``."""
    now = time.monotonic()
    while memory:  # oldest first: stop at the first one still young (no copy of it all)
        old, when = next(iter(memory.items()))
        if now - when < seconds:
            break
        del memory[old]
    memory.pop(key, None)
    memory[key] = now


def _unindex(index: dict[Any, dict[str, DownstreamSession]], key: Any, session_id: str) -> None:
    sessions = index.get(key)
    if sessions is not None:
        sessions.pop(session_id, None)
        if not sessions:
            del index[key]
