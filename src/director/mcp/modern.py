"""The stateless era of MCP (2026-07-28) on ``/playbooks/{id}/mcp``, next to the handshake era.

A modern request is one self-contained POST: no ``initialize``, no ``Mcp-Session-Id``; every
request carries ``params._meta`` (``io.modelcontextprotocol/protocolVersion``,
``…/clientCapabilities``, optionally ``…/clientInfo`` and ``…/logLevel``) and the routing headers
``MCP-Protocol-Version``, ``Mcp-Method`` and, for ``tools/call``, ``prompts/get`` and
``resources/read``, ``Mcp-Name``. Any instance can answer any request.

Which era (``is_modern_request``, following the SDK's serving logic, extended to the body):
a POST without ``Mcp-Session-Id`` is modern when its ``MCP-Protocol-Version`` header names a
version that is not a handshake version, or when its body carries the ``protocolVersion``
envelope key whatever the header says (a missing or handshake-era header then fails the header
check, which is the precise answer).
``initialize`` always opens a legacy session: it does not exist in the modern era. A request
with ``Mcp-Session-Id`` is always legacy. GET and DELETE without a session id but with a modern
``MCP-Protocol-Version`` header are answered 405 (``modern_method_not_allowed``).

The validation ladder mirrors the SDK's (``mcp.shared.inbound``), first failure wins: a
duplicated routing header or headers that disagree with the body → 400 ``-32020``; a missing
envelope → 400 ``-32602``; an unsupported version → 400 ``-32022`` whose ``data.supported`` lists
the modern version(s) first, then the handshake versions (served after ``initialize``), so that
a client can fall back as well as forward; an unknown method → 404 ``-32601``. Errors from
handling map to HTTP statuses through the same table (``HTTP_STATUS``). ``tools/call``'s
``Mcp-Param-*`` headers are checked against the called tool's ``x-mcp-header`` annotations
(fail-open when the schema cannot be found, like the SDK).

Every result carries ``resultType`` and the gateway's ``serverInfo`` in ``_meta`` (an upstream's
own value would win; handshake-era upstreams send none). Cacheable results (the lists,
``resources/read``, ``server/discover``) carry ``ttlMs`` (``LIST_TTL_MS``: 0, immediately stale —
the gateway cannot promise freshness of upstream data; change notifications come through
``subscriptions/listen``) and always ``cacheScope: private``: the gateway answers per user,
with that user's upstream credentials, whatever an upstream claims. Lists keep the router's
deterministic order.

State. The protocol is stateless, the gateway is not: it needs upstream connections, and
HTTP upstreams cost a handshake each. So each (credential, playbook) has one long-lived
``StatelessContext`` per instance — a ``DownstreamSession`` with ``transport="modern"`` kept in
the engine's session table (so the per-user cap, idle expiry, playbook edits and deletion,
revocation of its credential and shutdown treat it like any session) but never reachable
through an ``Mcp-Session-Id``. It owns the HTTP upstream sessions and the router's routes, and
is reused by every modern request made with that API key (or cookie session) on that playbook
on this instance; stdio upstreams are shared per playbook anyway.
Nothing a client relies on lives only there: another instance builds its own on first use.

Within a request: progress goes on the request's own response (which turns into an SSE stream
when something precedes the result, and after ``KEEPALIVE_SECONDS`` of silence so that proxies
do not cut a long call); upstream log messages (``notifications/message``) go there too, only
when the request carries ``io.modelcontextprotocol/logLevel`` and at or above that level.
Upstreams are handshake-era: the envelope keys are removed from ``_meta`` before forwarding, the
gateway never sends ``logging/setLevel`` for a modern request (the level is session-wide
upstream), and — as the engine routes log lines to the latest call of the session that used the
upstream last — a log line goes to the context's most recent call still waiting on an upstream,
and only if that request asked for its level (one user's concurrent calls on one playbook can
therefore see each other's log lines; nobody else's). A server→client
request from an upstream (sampling, elicitation, roots — a handshake-era upstream's real
request, or one of a stateless upstream's ``inputRequests``) during a modern ``tools/call``,
``prompts/get`` or ``resources/read`` is bridged (``Exchange``): the client's POST is answered
at once with ``resultType: "input_required"``, ``inputRequests`` (the upstream's requests,
verbatim) and a ``requestState`` naming the exchange, while the upstream call stays pending; the
client's retry with ``inputResponses`` and that ``requestState`` answers the upstream's requests
and goes on waiting for the call (or for the next question). Limits: the pending call lives in
the instance that holds the upstream call, so the retry must reach the same instance (another
instance answers ``-32602`` "unknown or expired requestState": call again from the start), and
it waits at most ``BRIDGE_WAIT_SECONDS`` for the retry (then the upstream's request is answered
with a timeout error and the exchange is forgotten); progress and log lines after the first
round go nowhere (their stream was the first POST). Outside such a call (or for another
method) the request is refused with -32600, as the SDK's own modern server answers a handler's
server request.

``subscriptions/listen``: the response is an SSE stream; the first event is
``notifications/subscriptions/acknowledged`` (every requested kind is honoured, as the SDK
does), sent once the playbook's upstreams have been started — through the context's lists,
which wait for a server still starting no longer than a client's list does — so that their
change notifications can reach us, and once the requested resources are subscribed upstream
(``resources/subscribe``, reference-counted per context); all bounded by
``LISTEN_PREPARE_SECONDS``. Then ``notifications/{tools,prompts,resources}/list_changed`` and
``notifications/resources/updated`` as the client asked, each with the subscription id
(the listen request's id) in ``_meta``. They come from the same sources as the handshake era's
GET stream: the upstreams' own notifications, playbook edits, which reach every instance
through the playbook cache's database notifications, and servers that became ready after a
list of this context (or the acknowledgement) went without them (``router``). When the
context ends (playbook deleted, shutdown, cap) each stream gets its final
``SubscriptionsListenResult``; when its credential is revoked, an error (-32000, ``data.code``
``credential_revoked``) instead, and the stream ends.

The spec's string constants are defined here rather than imported from ``mcp_types`` (which
would add ~10 MB and half a second to every daemon's start); the tests check that they agree.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any
from uuid import UUID

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from director import tracing
from director.accounts.cache import Credential
from director.mcp import jsonrpc
from director.mcp.capabilities import describe, missing
from director.mcp.headers import (
    PARAM_HEADER_PREFIX,
    decode_header_value,
    param_header_mismatch,
)
from director.mcp.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    Message,
    ProtocolError,
)
from director.mcp.protocol import (
    CLIENT_CAPABILITIES_META,
    CLIENT_INFO_META,
    HEADER_MISMATCH,
    LOG_LEVEL_META,
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    MODERN_VERSIONS,
    PROTOCOL_VERSION_META,
    RESOURCE_NOT_FOUND,
    SERVER_ERROR,
    SERVER_INFO_META,
    SUBSCRIPTION_ID_META,
    UNSUPPORTED_PROTOCOL_VERSION,
)
from director.mcp.sessions import (
    LOG_LEVELS,
    SERVER_CAPABILITIES,
    SERVER_INFO,
    CallChannel,
    Channel,
    DownstreamSession,
    McpEngine,
    SessionChannel,
    log_level_allows,
)
from director.mcp.streams import EventStream, StreamRegistry, frame, json_bytes
from director.mcp.upstream.base import LEGACY_VERSIONS, UpstreamError, UpstreamRequestError
from director.playbooks.model import Server
from director.playbooks.store import Playbook

log = Logger(namespace="mcp.modern")

#: What a -32022 answer lists: the stateless version(s), then those served after ``initialize``.
SUPPORTED_VERSIONS = (*MODERN_VERSIONS, *LEGACY_VERSIONS)

#: Request ``_meta`` keys of the modern envelope, removed before forwarding to an upstream.
ENVELOPE_KEYS = (PROTOCOL_VERSION_META, CLIENT_CAPABILITIES_META, CLIENT_INFO_META,
                 LOG_LEVEL_META)

#: JSON-RPC error code -> HTTP status for modern answers (unlisted codes: 200).
HTTP_STATUS = {PARSE_ERROR: 400, INVALID_REQUEST: 400, INVALID_PARAMS: 400, HEADER_MISMATCH: 400,
               MISSING_REQUIRED_CLIENT_CAPABILITY: 400, UNSUPPORTED_PROTOCOL_VERSION: 400,
               METHOD_NOT_FOUND: 404}

PROTOCOL_VERSION_HEADER = "mcp-protocol-version"
METHOD_HEADER = "mcp-method"
NAME_HEADER = "mcp-name"
ROUTING_HEADERS = (PROTOCOL_VERSION_HEADER, METHOD_HEADER, NAME_HEADER)
#: Method -> the params key mirrored in ``Mcp-Name``.
NAME_BEARING_METHODS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

METHODS = frozenset({"server/discover", "subscriptions/listen", "tools/list", "tools/call",
                     "prompts/list", "prompts/get", "resources/list", "resources/read",
                     "resources/templates/list", "completion/complete"})
CACHEABLE_METHODS = frozenset({"server/discover", "tools/list", "prompts/list", "resources/list",
                               "resources/templates/list", "resources/read"})
LIST_TTL_MS = 0
#: Methods whose modern answer may be ``input_required`` (SEP-2322).
INPUT_METHODS = frozenset({"tools/call", "prompts/get", "resources/read"})
#: How long a bridged call waits for the client's retry with ``inputResponses``.
BRIDGE_WAIT_SECONDS = 60.0
REQUEST_STATE_PREFIX = "director-exchange:"
KEEPALIVE_SECONDS = 15.0
LISTEN_PREPARE_SECONDS = 10.0
MAX_PENDING_EVENTS = 100

LIST_CHANGED_FILTERS = {"notifications/tools/list_changed": "toolsListChanged",
                        "notifications/prompts/list_changed": "promptsListChanged",
                        "notifications/resources/list_changed": "resourcesListChanged"}


class Rejection(ProtocolError):
    """A modern request refused before handling (answered with ``http_status(code)``)."""


def http_status(code: Any) -> int:
    return HTTP_STATUS.get(code, 200) if isinstance(code, int) else 200


@attrs.frozen
class Envelope:
    version: str
    client_capabilities: dict[str, Any]
    client_info: dict[str, Any] | None
    log_level: str | None


# --- era and envelope ---------------------------------------------------------------------


def _header(request: Any, name: str) -> str | None:
    value = request.getHeader(name.encode())
    return value.decode("latin-1") if value is not None else None


def is_modern_request(request: Any, message: Message) -> bool:
    """Whether a POST to the MCP endpoint belongs to the stateless era."""
    version = _header(request, PROTOCOL_VERSION_HEADER)
    if message.get("method") == "initialize":
        # initialize does not exist in the stateless era: under its version header it is an
        # unknown method (404 -32601), otherwise the start of a handshake-era session.
        return version in MODERN_VERSIONS
    if request.getHeader(b"mcp-session-id") is not None:
        return False
    if version is not None and version not in LEGACY_VERSIONS:
        return True
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and PROTOCOL_VERSION_META in meta


def modern_method_not_allowed(request: Any) -> bool:
    """GET/DELETE: no session and a modern ``MCP-Protocol-Version`` → 405 (no GET stream,
    no session to end in the stateless era)."""
    version = _header(request, PROTOCOL_VERSION_HEADER)
    return request.getHeader(b"mcp-session-id") is None and version is not None and \
        version not in LEGACY_VERSIONS


def unsupported(requested: Any) -> Rejection:
    return Rejection(UNSUPPORTED_PROTOCOL_VERSION,
                     f"Unsupported protocol version {requested!r}: this server speaks "
                     f"{', '.join(MODERN_VERSIONS)} statelessly and {', '.join(LEGACY_VERSIONS)} "
                     f"after initialize",
                     # Only what server/discover also lists (the handshake-era versions are
                     # reached through initialize, named in the message).
                     {"supported": list(MODERN_VERSIONS), "requested": str(requested or "")})


def duplicated_routing_header(request: Any) -> str | None:
    for name in ROUTING_HEADERS:
        values = request.requestHeaders.getRawHeaders(name.encode()) or []
        if len(values) > 1:
            return name
    return None


def classify(message: Message, header: Callable[[str], str | None]) -> Envelope:
    """The request's envelope, or ``Rejection`` for the first rung of the ladder it fails."""
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict):
        raise Rejection(INVALID_PARAMS, f"params._meta must be an object carrying the required "
                                        f"{PROTOCOL_VERSION_META!r} and "
                                        f"{CLIENT_CAPABILITIES_META!r} envelope keys")
    missing = [key for key in (PROTOCOL_VERSION_META, CLIENT_CAPABILITIES_META) if key not in meta]
    if missing:
        raise Rejection(INVALID_PARAMS, f"params._meta is missing the required envelope key(s): "
                                        f"{', '.join(missing)}")
    assert isinstance(params, dict)
    version = meta[PROTOCOL_VERSION_META]
    if header(PROTOCOL_VERSION_HEADER) != version:
        raise Rejection(HEADER_MISMATCH, "MCP-Protocol-Version header is missing or does not "
                                         "match the request envelope's protocol version")
    method = message.get("method")
    if header(METHOD_HEADER) != method:
        raise Rejection(HEADER_MISMATCH, "Mcp-Method header is missing or does not match the "
                                         "request body's method")
    name_key = NAME_BEARING_METHODS.get(str(method))
    if name_key is not None and params.get(name_key) is not None and \
            decode_header_value(header(NAME_HEADER)) != params[name_key]:
        raise Rejection(HEADER_MISMATCH, f"Mcp-Name header is missing or does not match the "
                                         f"request body's {name_key!r} parameter")
    if not isinstance(version, str):
        raise Rejection(INVALID_PARAMS, "the protocol-version envelope value must be a string")
    if version not in MODERN_VERSIONS:
        raise unsupported(version)
    capabilities = meta[CLIENT_CAPABILITIES_META]
    if not isinstance(capabilities, dict):
        raise Rejection(INVALID_PARAMS, f"{CLIENT_CAPABILITIES_META} must be an object")
    info = meta.get(CLIENT_INFO_META)
    if info is not None and not (isinstance(info, dict) and isinstance(info.get("name"), str)
                                 and isinstance(info.get("version"), str)):
        raise Rejection(INVALID_PARAMS, f"{CLIENT_INFO_META} must be an object with a name and "
                                        f"a version")
    level = meta.get(LOG_LEVEL_META)
    if level is not None and level not in LOG_LEVELS:
        raise Rejection(INVALID_PARAMS, f"{LOG_LEVEL_META} must be one of {', '.join(LOG_LEVELS)}")
    return Envelope(version, capabilities, info, level)


def legacy_params(params: Any) -> dict[str, Any]:
    """The request's params as a handshake-era upstream accepts them: envelope keys removed."""
    if not isinstance(params, dict):
        return {}
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        return params
    kept = {key: value for key, value in meta.items() if key not in ENVELOPE_KEYS}
    stripped = {key: value for key, value in params.items() if key != "_meta"}
    if kept:
        stripped["_meta"] = kept
    return stripped


def relayed(params: dict[str, Any], envelope: Envelope) -> dict[str, Any]:
    """A call for an upstream of this era, as the client made it: with its capabilities and
    log level, its ``inputResponses`` and ``requestState``; the upstream's ``input_required``
    then goes back to the client as it is (no ``Exchange``, nothing kept here)."""
    meta = dict(params.get("_meta") or {})
    meta[CLIENT_CAPABILITIES_META] = envelope.client_capabilities
    if envelope.log_level is not None:
        meta[LOG_LEVEL_META] = envelope.log_level
    return dict(params, _meta=meta)


def translated(method: str, failure: ProtocolError | UpstreamRequestError
               ) -> ProtocolError | None:
    """A handshake-era error as this era says it, None when it says it the same way:
    "resource not found" is -32002 there (the gateway's own for an unknown URI, or a
    handshake-era upstream's) and -32602 here (SEP-2164); the message and data are kept."""
    error = failure.error_object() if isinstance(failure, ProtocolError) else failure.error
    if method != "resources/read" or error.get("code") != RESOURCE_NOT_FOUND:
        return None
    return ProtocolError(INVALID_PARAMS, str(error.get("message", "")), error.get("data"))


# --- results ------------------------------------------------------------------------------


def server_info(playbook: Playbook) -> dict[str, Any]:
    return dict(SERVER_INFO, name=f"director/{playbook.id}")


def with_server_info(result: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    meta = result.get("_meta")
    if meta is None:
        result["_meta"] = {SERVER_INFO_META: info}
    elif isinstance(meta, dict) and meta.get(SERVER_INFO_META) is None:
        result["_meta"] = {**meta, SERVER_INFO_META: info}
    return result


def shape_result(method: str, value: Any, info: dict[str, Any]) -> dict[str, Any]:
    """A result as the modern era wants it: ``resultType``, cache hints, ``serverInfo``."""
    result = dict(value) if isinstance(value, dict) else {}
    if method in CACHEABLE_METHODS:
        ttl = result.get("ttlMs")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 0:
            result["ttlMs"] = LIST_TTL_MS
        result["cacheScope"] = "private"
    result.setdefault("resultType", "complete")
    return with_server_info(result, info)


def discover_result(playbook: Playbook) -> dict[str, Any]:
    result: dict[str, Any] = {"supportedVersions": list(MODERN_VERSIONS),
                              "capabilities": {key: dict(value) for key, value
                                               in SERVER_CAPABILITIES.items()}}
    if playbook.description:
        result["instructions"] = playbook.description
    return result


# --- channels -----------------------------------------------------------------------------


class ModernCallChannel(CallChannel):
    """The answer to one modern POST: JSON with the table's status for an early error, else
    200; SSE once progress or a log line precedes the result, or after ``KEEPALIVE_SECONDS``."""

    def __init__(self, request: Any, streams: StreamRegistry, reactor: Any,
                 log_level: str | None) -> None:
        self._keepalive: Any = None
        super().__init__(request, streams)
        self.log_level = log_level
        #: The request's envelope (the client's capabilities, for a modern upstream).
        self.envelope: Envelope | None = None
        #: Set for a call whose upstream may ask the client something (``INPUT_METHODS``).
        self.exchange: Exchange | None = None
        self._keepalive = reactor.callLater(KEEPALIVE_SECONDS, self._commit)

    def _gone(self, _: object) -> None:
        super()._gone(_)
        self._stop_keepalive()

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()

    def _commit(self) -> None:
        if self.open and self.stream is None:
            self.request.setResponseCode(200)
            self.stream = EventStream(self.request, self.streams)
            self.stream.comment()

    def log(self, message: Message) -> None:
        """An upstream's ``notifications/message``: sent when the request asked for this level."""
        if self.log_level is not None and \
                log_level_allows(self.log_level, (message.get("params") or {}).get("level")):
            self.send(message)

    def finish(self, response: Message) -> None:
        self._stop_keepalive()
        error = response.get("error")
        status = http_status(error.get("code")) if isinstance(error, dict) else 200
        if status == 200 or not self.open or self.stream is not None:
            super().finish(response)
            return
        self.open = False
        self.request.setResponseCode(status)
        self.request.setHeader(b"content-type", b"application/json")
        self.request.write(json_bytes(response))
        self.request.finish()


class Exchange:
    """One modern call whose upstream may ask the client (sampling, elicitation, roots),
    across the client's rounds (module docstring)."""

    def __init__(self, method: str, handling: defer.Deferred[Message], reactor: Any,
                 registry: dict[str, Exchange],
                 client_capabilities: dict[str, Any] | None = None) -> None:
        self.method = method
        self.client_capabilities = client_capabilities or {}
        #: Set when the upstream asked for something the client did not declare it can do.
        self.refused: Message | None = None
        self.state = REQUEST_STATE_PREFIX + secrets.token_urlsafe(18)
        self.reactor = reactor
        #: Where the client's retry finds it by ``requestState``: it is there from now until
        #: the call ends or the retry does not come, even when the call ends at once.
        self.registry = registry
        registry[self.state] = self
        self.asks: dict[str, tuple[dict[str, Any], defer.Deferred[Any]]] = {}
        self.response: Message | None = None
        self._keys = 0
        self._wake: defer.Deferred[None] | None = None
        self._expiry: Any = None
        handling.addBoth(self._finished)

    @property
    def done(self) -> bool:
        return self.response is not None

    def _finished(self, response: Any) -> Any:
        self.response = response if isinstance(response, dict) else jsonrpc.error(
            None, jsonrpc.INTERNAL_ERROR, "the call ended without an answer")
        self._stop_expiry()
        self._poke()
        self.registry.pop(self.state, None)
        return response

    def _poke(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.called:
            wake.callback(None)

    def _stop_expiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    async def ask(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """An upstream's request: held until the client's retry answers it."""
        required = missing(method, params, self.client_capabilities)
        if method == "roots/list" and required is not None:
            # Roots describe the client, not this call: servers ask on their own (right after
            # `initialized`, on roots/list_changed), so the call in flight may have nothing to
            # do with the question. Answer as a handshake-era client without roots does (the
            # SDK's -32601) and let the call go on, rather than failing an unrelated call.
            raise ProtocolError(METHOD_NOT_FOUND, "the client does not offer roots")
        if required is not None:
            # The client's call fails with -32021 (it cannot answer); the upstream is told too.
            message = (f"the server needs the client's {describe(required)!r} capability for "
                       f"{method}, which this request's clientCapabilities do not declare")
            self.refused = jsonrpc.error(None, MISSING_REQUIRED_CLIENT_CAPABILITY, message,
                                         {"requiredCapabilities": required})
            self._poke()
            raise ProtocolError(MISSING_REQUIRED_CLIENT_CAPABILITY, message)
        self._keys += 1
        key = f"{method.replace('/', '-')}-{self._keys}"
        waiting: defer.Deferred[Any] = defer.Deferred()
        self.asks[key] = ({"method": method, "params": params}, waiting)
        self._poke()
        try:
            result = await waiting
        finally:
            self.asks.pop(key, None)
        if not isinstance(result, dict):
            raise ProtocolError(INVALID_PARAMS, f"the client answered {method} with no object")
        return result

    def resume(self, responses: Any) -> None:
        """The client's retry: its ``inputResponses`` answer the upstream's requests."""
        self._stop_expiry()
        if not isinstance(responses, dict):
            return
        for key, value in responses.items():
            held = self.asks.get(key)
            if held is not None and not held[1].called:
                held[1].callback(value)

    def _expire(self) -> None:
        self._expiry = None
        for _, waiting in list(self.asks.values()):
            if not waiting.called:
                waiting.errback(ProtocolError(jsonrpc.REQUEST_TIMEOUT, (
                    f"the client did not retry with inputResponses within "
                    f"{BRIDGE_WAIT_SECONDS:g} s")))
        self.registry.pop(self.state, None)

    async def outcome(self) -> Message | None:
        """The call's response, or None when the client must be asked first."""
        while True:
            if self.refused is not None:
                return self.refused
            if self.response is not None:
                return self.response
            if any(not waiting.called for _, waiting in self.asks.values()):
                return None
            self._wake = defer.Deferred()
            await self._wake

    def input_required(self) -> dict[str, Any]:
        """This round's questions, under a fresh ``requestState`` (one per round)."""
        self.registry.pop(self.state, None)
        self.state = REQUEST_STATE_PREFIX + secrets.token_urlsafe(18)
        self.registry[self.state] = self
        self._stop_expiry()
        self._expiry = self.reactor.callLater(BRIDGE_WAIT_SECONDS, self._expire)
        return {"resultType": "input_required",
                "inputRequests": {key: request for key, (request, waiting) in self.asks.items()
                                  if not waiting.called},
                "requestState": self.state}


class Listener:
    """One ``subscriptions/listen`` stream: its filter, and its events until acknowledged."""

    def __init__(self, subscription_id: Any, notifications: dict[str, Any]) -> None:
        self.id = subscription_id
        self.kinds = {kind for kind in LIST_CHANGED_FILTERS.values()
                      if notifications.get(kind) is True}
        uris = notifications.get("resourceSubscriptions") or []
        if not isinstance(uris, list) or not all(isinstance(uri, str) for uri in uris):
            raise Rejection(INVALID_PARAMS, "notifications.resourceSubscriptions must be a list "
                                            "of URIs")
        self.uris = tuple(dict.fromkeys(uris))
        self.stream: EventStream | None = None
        self.pending: list[bytes] = []
        self.released = False

    @property
    def honored(self) -> dict[str, Any]:
        honored: dict[str, Any] = {kind: True for kind in sorted(self.kinds)}
        if self.uris:
            honored["resourceSubscriptions"] = list(self.uris)
        return honored

    def wants(self, message: Message) -> bool:
        method = message.get("method", "")
        if method in LIST_CHANGED_FILTERS:
            return LIST_CHANGED_FILTERS[method] in self.kinds
        if method == "notifications/resources/updated":
            return (message.get("params") or {}).get("uri") in self.uris
        return False

    def stamped(self, method: str, params: dict[str, Any] | None) -> bytes:
        params = dict(params or {})
        meta = params.get("_meta")
        params["_meta"] = {**(meta if isinstance(meta, dict) else {}),
                           SUBSCRIPTION_ID_META: self.id}
        return frame(json_bytes(jsonrpc.notification(method, params)))

    def deliver(self, message: Message) -> None:
        if not self.wants(message):
            return
        chunk = self.stamped(message["method"], message.get("params"))
        if self.stream is None:
            if chunk not in self.pending and len(self.pending) < MAX_PENDING_EVENTS:
                self.pending.append(chunk)
        else:
            self.stream.send(chunk)

    def start(self, stream: EventStream) -> None:
        """The acknowledgement first, then what arrived while preparing."""
        stream.send(self.stamped("notifications/subscriptions/acknowledged",
                                 {"notifications": self.honored}))
        for chunk in self.pending:
            stream.send(chunk)
        self.pending.clear()
        self.stream = stream

    def end(self, info: dict[str, Any]) -> None:
        """Graceful close: the listen request's result, then the end of the stream."""
        result = with_server_info({"resultType": "complete",
                                   "_meta": {SUBSCRIPTION_ID_META: self.id}}, info)
        self._last(jsonrpc.result(self.id, result))

    def revoked(self) -> None:
        """The credential that opened it was revoked: an error answers the listen request."""
        self._last(jsonrpc.error(self.id, SERVER_ERROR, (  # credential revoked
            "the credential that opened this subscription was revoked (API key revoked, signed "
            "out, password changed or account disabled); authenticate again"),
            {"code": "credential_revoked"}))

    def _last(self, message: Message) -> None:
        if self.stream is None or not self.stream.open:
            return
        self.stream.send(frame(json_bytes(message)))
        self.stream.finish()


class ListenHub(SessionChannel):
    """A context's "session channel": notifications outside requests go to its listeners."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.listeners: list[Listener] = []

    @property
    def open(self) -> bool:  # keeps the context from idle expiry while someone listens
        return bool(self.listeners)

    def send(self, message: Message) -> None:
        for listener in list(self.listeners):
            listener.deliver(message)


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
            version = _header(request, PROTOCOL_VERSION_HEADER)
            if version not in MODERN_VERSIONS:
                raise unsupported(version)
            request.setResponseCode(202)
            return b""
        duplicated = duplicated_routing_header(request)
        if duplicated is not None:
            raise Rejection(HEADER_MISMATCH, f"{duplicated} header appears more than once")
        envelope = classify(message, lambda name: _header(request, name))
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
