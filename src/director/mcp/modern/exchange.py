"""One modern request's answer, and an upstream's questions bridged to the client.

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
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet import defer

from director.mcp import jsonrpc
from director.mcp.capabilities import describe, missing
from director.mcp.channels import CallChannel
from director.mcp.fanout import log_level_allows
from director.mcp.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND, Message, ProtocolError
from director.mcp.modern.envelope import Envelope, http_status
from director.mcp.protocol import MISSING_REQUIRED_CLIENT_CAPABILITY
from director.mcp.streams import EventStream, StreamRegistry, json_bytes

# --- channels -----------------------------------------------------------------------------


#: Methods whose modern answer may be ``input_required`` (SEP-2322).
INPUT_METHODS = frozenset({"tools/call", "prompts/get", "resources/read"})
#: How long a bridged call waits for the client's retry with ``inputResponses``.
BRIDGE_WAIT_SECONDS = 60.0
REQUEST_STATE_PREFIX = "director-exchange:"
#: Silence after which a call's answer turns into an SSE stream (proxies cut silent ones).
KEEPALIVE_SECONDS = 15.0


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

    def _gone(self, lost: bool) -> None:
        super()._gone(lost)
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
