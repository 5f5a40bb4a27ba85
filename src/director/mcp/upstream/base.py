"""What the router needs from an upstream MCP connection, whatever its transport.

An ``UpstreamSession`` is one initialised MCP session with one upstream server. Transports
(``stdio.py``, ``streamable.py``, ``legacy_sse.py``, ``modern.py``) implement it around one
``peer.Peer`` each (the JSON-RPC rules below are the peer's, so they are the same over every
transport); the router and the downstream sessions use only this.

Contract:

* ``start()`` connects and performs the handshake (``initialize`` + ``notifications/
  initialized``); afterwards ``initialize_result`` holds the upstream's answer (``capabilities``,
  ``serverInfo``, ``protocolVersion``, ``instructions``). Failure raises ``UpstreamError``
  with a message of the form ``[name] what happened``.
* ``request(method, params, timeout=…, on_progress=…)`` sends one request and returns its
  ``result`` object untouched (a dict, byte-faithful to what the upstream sent). A JSON-RPC
  error from the upstream raises ``UpstreamRequestError`` carrying the upstream's error object
  unchanged. Ids are remapped so concurrent callers never collide. If ``params._meta.
  progressToken`` is present, it is replaced by the request's own upstream id (an integer) on
  the way up and restored on the way down; ``on_progress(params)`` receives each matching
  ``notifications/progress`` params (with the caller's original token). Each progress
  notification restarts the timeout. On timeout, and when the returned Deferred is cancelled
  (the downstream client cancelled or went away), ``notifications/cancelled`` with the
  upstream request id is sent and the Deferred fails (``UpstreamTimeout`` /
  ``CancelledError``).
* ``notify(method, params)`` sends a notification (e.g. ``notifications/roots/list_changed``).
* ``on_notification`` (settable attribute, default no-op): called with every notification that
  is not a progress notification matched to a pending request (``notifications/message``,
  ``…/list_changed``, ``notifications/resources/updated``, …) as the whole message dict; never
  ``notifications/cancelled``, which only ever names the server's own requests to the gateway
  (``peer.py``).
* ``on_request`` (settable attribute): async callable ``(method, params) -> result dict``
  answering server→client requests (``sampling/createMessage``, ``elicitation/create``,
  ``roots/list``, ``ping``); raising ``ProtocolError`` answers with that JSON-RPC error. The
  default answers ``ping`` with ``{}`` and anything else with -32601.
* ``on_closed`` (settable attribute): called once with a reason string when the session ends
  for any reason other than ``close()`` (process exited, connection lost, 404 on a session).
* ``close()`` ends the session (stdio: close stdin, SIGTERM after a grace period, SIGKILL
  after another; HTTP: DELETE the session) and fails pending requests with
  ``UpstreamError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from twisted.logger import Logger

from director.jsontext import JsonTextError
from director.mcp import jsonrpc
from director.mcp.capabilities import GATEWAY
from director.mcp.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    Message,
    ProtocolError,
)
from director.mcp.protocol import LATEST_LEGACY_VERSION, LEGACY_VERSIONS  # noqa: F401

CLIENT_INFO = {"name": "director", "version": "0.1.0"}

log = Logger(namespace="mcp.upstream")


class UpstreamError(Exception):
    """The upstream cannot be reached or misbehaved; ``str()`` starts with ``[server name]``."""


class UpstreamTimeout(UpstreamError):
    """No answer (nor progress) within the server's timeout."""


class UpstreamRequestError(UpstreamError):
    """The upstream answered with a JSON-RPC error; ``error`` is its error object verbatim."""

    def __init__(self, name: str, error: dict[str, Any]) -> None:
        super().__init__(f"[{name}] {error.get('message', 'error')}")
        self.error = error


def own_request_id(answer_id: object) -> int | None:
    """The gateway's request id that an upstream's answer refers to. The gateway numbers its
    requests with integers; a server that echoes the id as a digit string (some do) is
    understood, in every transport alike."""
    if isinstance(answer_id, int) and not isinstance(answer_id, bool):
        return answer_id
    if isinstance(answer_id, str) and answer_id.isascii() and answer_id.isdigit():
        return int(answer_id)
    return None


def run_hook(name: str, hook: str, callback: Callable[[Any], object], value: Any) -> None:
    """Hand ``value`` to a session's ``callback`` (``on_progress``, ``on_notification``): a
    failure there is the gateway's own bug, logged, and must not break the transport's read
    loop or the request it belongs to."""
    try:
        callback(value)
    except Exception:
        log.failure("[{server}] {hook} failed", server=name, hook=hook)


def answer_of(name: str, message: dict[str, Any]) -> dict[str, Any] | UpstreamError:
    """What a JSON-RPC response from upstream ``name`` means: its result, or the error to fail
    the request with. Every MCP result is an object; an upstream that answers anything else
    is lying, and passing that on would hand the client (or the aggregator) a shape it
    cannot use."""
    if "error" in message:
        error = message["error"]
        if not isinstance(error, dict):
            error = {"code": INTERNAL_ERROR, "message": str(error)}
        return UpstreamRequestError(name, error)
    result = message["result"]
    if not isinstance(result, dict):
        return UpstreamError(f"[{name}] answered with a result that is not a JSON object "
                             f"({type(result).__name__}); every MCP result is one")
    return result


def encoded(name: str, message: Message) -> bytes:
    """The message as its transport writes it (compact JSON); one that has no JSON form fails
    its call at once with -32602 rather than leaving it to wait for an answer that cannot come
    (the transports call this before anything is registered or sent)."""
    try:
        return jsonrpc.encode(message)
    except JsonTextError as failure:
        what = message.get("method") or "an answer"
        raise UpstreamRequestError(name, {"code": INVALID_PARAMS, "message": (
            f"{what} cannot be sent to {name}: {failure}")}) from None


RequestHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


async def default_request_handler(method: str, params: dict[str, Any]) -> dict[str, Any]:
    if method == "ping":
        return {}
    raise ProtocolError(METHOD_NOT_FOUND, f"method not supported by the gateway: {method}")


class UpstreamSession(Protocol):
    name: str
    initialize_result: dict[str, Any]
    on_notification: Callable[[Message], object]
    on_request: RequestHandler
    on_closed: Callable[[str], object]
    #: Called with the new ``initialize_result`` once the session is re-established by itself:
    #: a stdio server restarted, an HTTP server that forgot the session re-initialised. What
    #: the server was told before (subscriptions, log level) must be told again.
    on_restored: Callable[[dict[str, Any]], object]

    async def start(self) -> None: ...

    async def request(self, method: str, params: dict[str, Any] | None = None, *,
                      timeout: float = 60.0,
                      on_progress: Callable[[dict[str, Any]], object] | None = None
                      ) -> dict[str, Any]: ...

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None: ...

    async def close(self) -> None: ...


def initialize_params(client_capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the gateway sends upstream: the client capabilities it relays for this session,
    all of them when None (``director.mcp.capabilities``)."""
    return {"protocolVersion": LATEST_LEGACY_VERSION,
            "capabilities": client_capabilities if client_capabilities is not None else GATEWAY,
            "clientInfo": CLIENT_INFO}
