"""The client side of the stateless era (MCP 2026-07-28), whatever the transport.

What an upstream session in that era does on every request, shared by Streamable HTTP
(``modern.py``) and stdio (``stdio.py``): put the envelope in ``params._meta`` (``enveloped``),
turn a ``server/discover`` answer into the ``initialize_result`` the router reads
(``discovered``), and resolve multi-round ``input_required`` results (``settle``): each of the
``inputRequests`` goes to the session's ``on_request`` like a handshake-era server→client request,
and the request is sent again with ``inputResponses`` and the echoed ``requestState``; and keep a
``subscriptions/listen`` stream open for change notifications (``ChangeListener``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from director.mcp.jsonrpc import Message, ProtocolError
from director.mcp.protocol import (
    CLIENT_CAPABILITIES_META,
    CLIENT_INFO_META,
    LOG_LEVEL_META,
    METHOD_NOT_FOUND,
    MODERN_VERSION,
    PROTOCOL_VERSION_META,
    SERVER_INFO_META,
)
from director.mcp.upstream.backoff import Backoff
from director.mcp.upstream.base import (
    CLIENT_INFO,
    RequestHandler,
    UpstreamError,
    UpstreamRequestError,
)
from director.mcp.upstream.listen_lifecycle import lifecycle

INPUT_REQUIRED_MAX_ROUNDS = 10
#: How soon an ``input_required`` result that asks for nothing is asked again (the server is
#: still working): 50 ms, doubling up to 250 ms.
INPUT_POLL_INITIAL = 0.05
INPUT_POLL_MAX = 0.25
#: What the gateway can relay to its clients.
GATEWAY_CLIENT_CAPABILITIES: dict[str, Any] = {
    "sampling": {}, "elicitation": {"form": {}, "url": {}}, "roots": {}}


class NotModern(UpstreamError):
    """``server/discover`` answered, without ``2026-07-28``."""


def enveloped(params: dict[str, Any] | None, capabilities: dict[str, Any] | None,
              log_level: str | None) -> dict[str, Any]:
    """``params`` with the envelope in ``_meta``: ``capabilities`` (the gateway's when None),
    the gateway's client info and ``log_level`` — unless ``params._meta`` names its own (those
    of a modern client whose call is relayed as is). The version is always ours."""
    params = dict(params or {})
    meta = params.get("_meta")
    envelope: dict[str, Any] = {
        CLIENT_CAPABILITIES_META: capabilities if capabilities is not None
        else GATEWAY_CLIENT_CAPABILITIES,
        CLIENT_INFO_META: CLIENT_INFO}
    if log_level is not None:
        envelope[LOG_LEVEL_META] = log_level
    envelope.update(meta if isinstance(meta, dict) else {})
    envelope[PROTOCOL_VERSION_META] = MODERN_VERSION
    params["_meta"] = envelope
    return params


def discovered(name: str, result: Any) -> dict[str, Any]:
    """The ``initialize_result`` equivalent of a ``server/discover`` answer (``NotModern`` if
    it does not offer ``2026-07-28``)."""
    versions = result.get("supportedVersions") if isinstance(result, dict) else None
    if not isinstance(versions, list) or MODERN_VERSION not in versions:
        raise NotModern(f"[{name}] server/discover does not offer {MODERN_VERSION} (it offers "
                        f"{versions!r})")
    meta = result.get("_meta")
    info = meta.get(SERVER_INFO_META) if isinstance(meta, dict) else None
    capabilities = result.get("capabilities")
    initialize_result: dict[str, Any] = {
        "protocolVersion": MODERN_VERSION,
        "capabilities": capabilities if isinstance(capabilities, dict) else {},
        "serverInfo": info if isinstance(info, dict) else {"name": name, "version": ""}}
    if isinstance(result.get("instructions"), str):
        initialize_result["instructions"] = result["instructions"]
    return initialize_result


async def settle(name: str, method: str, params: dict[str, Any] | None, result: dict[str, Any],
                 resend: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
                 on_request: RequestHandler,
                 sleep: Callable[[float], Awaitable[None]]) -> dict[str, Any]:
    """``result``, or the final result after answering its ``inputRequests`` through
    ``on_request`` and sending the request again (``resend``), round after round."""
    rounds = 0
    polling = Backoff(INPUT_POLL_INITIAL, INPUT_POLL_MAX)
    while isinstance(result, dict) and result.get("resultType") == "input_required":
        rounds += 1
        if rounds > INPUT_REQUIRED_MAX_ROUNDS:
            raise UpstreamError(f"[{name}] {method}: still input_required after "
                                f"{INPUT_REQUIRED_MAX_ROUNDS} rounds")
        retry = {key: value for key, value in (params or {}).items()
                 if key not in ("inputResponses", "requestState")}
        requests = result.get("inputRequests")
        if isinstance(requests, dict) and requests:
            retry["inputResponses"] = await _fulfil(name, method, requests, on_request)
        else:  # nothing to answer: the server is still working; ask again shortly
            await sleep(polling.next_delay())
        if isinstance(result.get("requestState"), str):
            retry["requestState"] = result["requestState"]
        result = await resend(retry)
    return result


async def _fulfil(name: str, method: str, requests: dict[str, Any],
                  on_request: RequestHandler) -> dict[str, Any]:
    """Each input request through ``on_request`` (relayed to the client), concurrently."""
    async def one(key: str, wanted: Any) -> tuple[str, dict[str, Any]]:
        if not isinstance(wanted, dict) or not isinstance(wanted.get("method"), str):
            raise UpstreamError(f"[{name}] {method}: malformed input request {key!r}")
        params = wanted.get("params")
        return key, await on_request(wanted["method"], params if isinstance(params, dict) else {})

    try:
        answers = await defer.gatherResults(
            [defer.ensureDeferred(one(key, wanted)) for key, wanted in requests.items()],
            consumeErrors=True)
    except defer.FirstError as failure:
        problem = failure.subFailure.value
        if isinstance(problem, ProtocolError):
            raise UpstreamRequestError(name, problem.error_object()) from None
        if isinstance(problem, BaseException):
            raise problem from None
        raise
    return dict(answers)


class ModernSession(Protocol):
    log_level: str | None
    changes: ChangeListener


def answered_here(session: ModernSession, method: str,
                  params: dict[str, Any] | None) -> dict[str, Any] | None:
    """The answer to a handshake-era request that the stateless era has no method for, kept
    on the client side instead (None for any other request): ``logging/setLevel`` becomes the
    envelope's ``logLevel``, ``resources/(un)subscribe`` the listen stream's filter."""
    if method == "logging/setLevel":
        level = (params or {}).get("level")
        session.log_level = level if isinstance(level, str) else None
        return {}
    if method in ("resources/subscribe", "resources/unsubscribe"):
        uri = (params or {}).get("uri")
        if isinstance(uri, str):
            (session.changes.subscribe if method == "resources/subscribe"
             else session.changes.unsubscribe)(uri)
        return {}
    return None


# --- change notifications: subscriptions/listen -------------------------------------------

SUBSCRIPTION_ID_META = "io.modelcontextprotocol/subscriptionId"
LISTEN_KINDS = ("toolsListChanged", "promptsListChanged", "resourcesListChanged")
#: A listen request has no answer until the stream ends: only an upper bound.
LISTEN_TIMEOUT = 24 * 3600.0
LISTEN_BACKOFF_INITIAL = 1.0
LISTEN_BACKOFF_MAX = 60.0
LISTEN_HEALTHY_AFTER = 60.0


def listened(message: Message) -> Message | None:
    """A notification from an upstream's listen stream as the gateway routes it (the
    upstream's subscription id removed: the gateway stamps its own), None for the
    acknowledgement, which only concerns this connection."""
    if message.get("method") == "notifications/subscriptions/acknowledged":
        return None
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or SUBSCRIPTION_ID_META not in meta:
        return message
    kept = {key: value for key, value in meta.items() if key != SUBSCRIPTION_ID_META}
    stripped = {key: value for key, value in params.items() if key != "_meta"}  # type: ignore[union-attr]
    if kept:
        stripped["_meta"] = kept
    return dict(message, params=stripped)


class ChangeListener:
    """Keeps one ``subscriptions/listen`` request open on an upstream of the stateless era,
    the way the handshake era keeps its GET stream: list changes of every kind, and updates of
    the resources the gateway's clients subscribed to (``resources/subscribe`` does not exist
    in that era: the session turns it into ``subscribe``, which re-opens the stream with the new
    filter). The notifications arrive through the session's ``on_notification``; a stream that
    ends is opened again after a backoff (1 s doubling to 60 s, reset once a stream lived a
    minute); a server without the method (-32601) is not asked again. When each may happen is
    ``listen_lifecycle.py``'s."""

    def __init__(self, name: str, listen: Callable[[dict[str, Any]], Coroutine[Any, Any, Any]],
                 reactor: Any) -> None:
        self.name = name
        self.listen = listen
        self.reactor = reactor
        self.uris: dict[str, int] = {}
        self._current: defer.Deferred[Any] | None = None
        self._retry: Any = None
        self._backoff = Backoff(LISTEN_BACKOFF_INITIAL, LISTEN_BACKOFF_MAX,
                                healthy_after=LISTEN_HEALTHY_AFTER, clock=reactor)
        #: The machine's state, as it tells us.
        self.state = "idle"
        self._lifecycle = lifecycle(self)

    @property
    def listening(self) -> bool:
        return self._current is not None

    def start(self) -> None:
        self._lifecycle.start()

    def subscribe(self, uri: str) -> None:
        self.uris[uri] = self.uris.get(uri, 0) + 1
        if self.uris[uri] == 1:
            self._lifecycle.resubscribe()

    def unsubscribe(self, uri: str) -> None:
        count = self.uris.get(uri, 0) - 1
        if count > 0:
            self.uris[uri] = count
        elif self.uris.pop(uri, None) is not None:
            self._lifecycle.resubscribe()

    def stop(self) -> None:
        self._lifecycle.stop()

    # --- the lifecycle's outputs (``listen_lifecycle.ListenCore``) -------------------------

    def _entered(self, state: str) -> None:
        self.state = state

    def _open(self) -> None:
        notifications: dict[str, Any] = {kind: True for kind in LISTEN_KINDS}
        if self.uris:
            notifications["resourceSubscriptions"] = sorted(self.uris)
        self._backoff.running()
        current: defer.Deferred[Any] = defer.ensureDeferred(
            self.listen({"notifications": notifications}))
        self._current = current
        current.addBoth(self._ended, current)

    def _drop_stream(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            current.cancel()

    def _schedule_retry(self) -> None:
        self._retry = self.reactor.callLater(self._backoff.next_delay(), self._delay_elapsed)

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _ended(self, outcome: Any, which: defer.Deferred[Any]) -> None:
        if which is not self._current:
            return None  # replaced or stopped: its end (a cancellation) is expected
        self._current = None
        failure = outcome.value if isinstance(outcome, Failure) else None
        if isinstance(failure, UpstreamRequestError) and \
                failure.error.get("code") == METHOD_NOT_FOUND:
            self._lifecycle.refused()
        else:
            self._lifecycle.ended()
        return None

    def _delay_elapsed(self) -> None:
        self._retry = None
        self._lifecycle.delay_elapsed()
