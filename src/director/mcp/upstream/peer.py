"""One JSON-RPC connection to an upstream server, without I/O: what every transport shares.

A ``Peer`` owns the gateway's side of the conversation: request ids, the requests awaiting
their answers, their timeouts, progress, cancellation in both directions, and the dispatch of
what the server says (answers, notifications, server→client requests, which it answers).
The transport only moves bytes: it hands each message it reads to ``received()`` and writes
each message the peer gives its ``send`` (stdio: one line; Streamable HTTP and HTTP+SSE: a
POST; the stateless era: nothing but requests, each its own POST). ``send`` may raise
``UpstreamError`` to refuse a message (the child stopped reading its input, the message has no
JSON form: ``base.encoded``'s -32602); a refused request fails at once.

The rules, the same over every transport (``base.UpstreamSession`` states the contract):

* ids are integers counted per peer; an answer whose id is the same number as a digit
  string is understood (``base.own_request_id``);
* a request that relays progress (``params._meta.progressToken``) goes up with its own id as
  the token, and each matching ``notifications/progress`` reaches ``on_progress`` with the
  caller's token back and restarts the request's timeout;
* on timeout, and when the caller cancels the request's Deferred, ``notifications/cancelled``
  names the request's id, unless the request is part of the handshake (the specification
  forbids cancelling ``initialize``) or was never handed to the transport; an answer that
  comes later is dropped;
* a server→client request is answered through ``on_request`` (``ProtocolError`` → that
  JSON-RPC error, any other failure → ``INTERNAL_ERROR``); the server may cancel it with
  ``notifications/cancelled``, and then it is never answered. Such a notification is always
  the peer's own business and never reaches ``on_notification``: its ``requestId`` is in the
  server's id space and names a request the server made of the gateway, so passing it on could
  only cancel some unrelated client request that happens to carry the same id. One naming a
  request that is already answered (or was never made) refers to nothing pending: it is
  swallowed (logged at debug level), as the specification allows for a cancellation that
  crosses the answer;
* an exception in ``on_progress`` or ``on_notification`` is logged (``base.run_hook``) and
  neither the request nor the transport's read loop notices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from director.mcp import jsonrpc
from director.mcp.jsonrpc import INTERNAL_ERROR, Message, ProtocolError, RequestId
from director.mcp.upstream.base import (
    RequestHandler,
    UpstreamError,
    UpstreamRequestError,
    UpstreamTimeout,
    answer_of,
    own_request_id,
    run_hook,
)

log = Logger(namespace="mcp.upstream")

Progress = Callable[[dict[str, Any]], object]


class Timer(Protocol):
    """What ``callLater`` returns (``IDelayedCall``, which mypy cannot use as a type)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...

    def reset(self, seconds: float) -> None: ...


class Clock(Protocol):
    """The part of ``IReactorTime`` a peer uses (a zope interface is no type to mypy)."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kwargs: Any) -> Any: ...


@attrs.define(eq=False)
class Outgoing:
    """One request of the gateway's, from ``open()`` until it is answered, fails, times out
    or is cancelled (``finished``)."""

    id: int
    method: str
    #: The request as it goes up (the transport may rewrite its params before sending it).
    message: Message
    timeout: float
    deferred: defer.Deferred[dict[str, Any]]
    on_progress: Progress | None = None
    #: The caller's progress token, restored on each progress notification.
    caller_token: Any = None
    relays_progress: bool = False
    #: Part of the handshake: never cancelled upstream.
    handshake: bool = False
    #: Handed to the transport (``transmit()``, or the transport's own sending): only then
    #: does a cancellation need telling.
    sent: bool = False
    finished: bool = False
    timer: Timer | None = None
    #: The server→client requests that came on this request's own stream (HTTP), being
    #: answered: they are cancelled when it ends, since the server no longer waits for them.
    inbound: set[defer.Deferred[None]] = attrs.field(factory=set)


def _ignore(*_: Any) -> None:
    return None


class Peer:
    """The gateway's end of one JSON-RPC connection (see the module docstring)."""

    def __init__(self, name: str, send: Callable[[Message], None], clock: Clock, *,
                 on_request: RequestHandler,
                 on_notification: Callable[[Message], object],
                 on_finished: Callable[[Outgoing, bool], None] = _ignore) -> None:
        self.name = name
        self._send = send
        self._clock = clock
        self._on_request = on_request
        self._on_notification = on_notification
        #: Told of each request that ends, and whether the server's answer (a result or an
        #: error) ended it: a transport drops what it still has in flight for it, but may
        #: let the exchange that carried the answer end by itself.
        self._on_finished = on_finished
        self._next_id = 0
        self._pending: dict[int, Outgoing] = {}
        self._incoming: dict[RequestId, defer.Deferred[None]] = {}

    @property
    def pending(self) -> int:
        """How many requests await their answer."""
        return len(self._pending)

    # --- the gateway's requests ----------------------------------------------------------

    def open(self, method: str, params: dict[str, Any] | None, *, timeout: float,
             on_progress: Progress | None = None, handshake: bool = False,
             first: float | None = None) -> Outgoing:
        """Register a request (its timeout runs from now) without sending it: the transport
        sends ``message`` when it can (``transmit()``, or its own way). ``first``: what is left
        of ``timeout`` for the first wait (the caller waited already, e.g. for a restart)."""
        self._next_id += 1
        request_id = self._next_id
        meta = params.get("_meta") if isinstance(params, dict) else None
        relays_progress = isinstance(meta, dict) and "progressToken" in meta
        caller_token = None
        if relays_progress:
            assert isinstance(params, dict) and isinstance(meta, dict)
            caller_token = meta["progressToken"]
            params = {**params, "_meta": {**meta, "progressToken": request_id}}
        outgoing = Outgoing(request_id, method, jsonrpc.request(request_id, method, params),
                            timeout, defer.Deferred(lambda _: self._cancelled(outgoing)),
                            on_progress, caller_token, relays_progress, handshake)
        self._pending[request_id] = outgoing
        outgoing.timer = self._clock.callLater(timeout if first is None else first,
                                               self._timed_out, outgoing)
        return outgoing

    def transmit(self, outgoing: Outgoing) -> None:
        """Send a request through ``send``; one it refuses fails at once."""
        if outgoing.finished:
            return
        try:
            self._send(outgoing.message)
        except UpstreamError as refused:
            self.fail(outgoing, refused)
            return
        outgoing.sent = True

    def request(self, method: str, params: dict[str, Any] | None, *, timeout: float,
                on_progress: Progress | None = None, handshake: bool = False,
                first: float | None = None) -> defer.Deferred[dict[str, Any]]:
        """``open()`` and ``transmit()``: the request's Deferred (its ``result``)."""
        outgoing = self.open(method, params, timeout=timeout, on_progress=on_progress,
                             handshake=handshake, first=first)
        self.transmit(outgoing)
        return outgoing.deferred

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        self._deliver(jsonrpc.notification(method, params))

    def fail(self, outgoing: Outgoing, error: Exception, *, answered: bool = False) -> None:
        """End a request with ``error`` (nothing if it has ended already)."""
        if outgoing.finished:
            return
        self._finish(outgoing, answered)
        outgoing.deferred.errback(error)

    def fail_all(self, error: Exception) -> None:
        """The transport died (or was closed): every request fails with ``error`` and the
        server→client requests being answered are dropped, since no answer can reach the
        server that asked."""
        for outgoing in list(self._pending.values()):
            self.fail(outgoing, error)
        for handling in list(self._incoming.values()):
            handling.cancel()
        self._incoming.clear()

    def _resolve(self, outgoing: Outgoing, result: dict[str, Any]) -> None:
        self._finish(outgoing, True)
        outgoing.deferred.callback(result)

    def _finish(self, outgoing: Outgoing, answered: bool) -> None:
        outgoing.finished = True
        self._pending.pop(outgoing.id, None)
        if outgoing.timer is not None and outgoing.timer.active():
            outgoing.timer.cancel()
        outgoing.timer = None
        for handling in list(outgoing.inbound):
            handling.cancel()
        outgoing.inbound.clear()
        self._on_finished(outgoing, answered)

    def _timed_out(self, outgoing: Outgoing) -> None:
        outgoing.timer = None
        if outgoing.finished:
            return
        self._cancel_upstream(outgoing, "timeout")
        self.fail(outgoing, UpstreamTimeout(
            f"[{self.name}] no answer to {outgoing.method} within {outgoing.timeout:g} s"))

    def _cancelled(self, outgoing: Outgoing) -> None:
        # The Deferred's canceller: it fails with CancelledError once this returns.
        if outgoing.finished:
            return
        self._cancel_upstream(outgoing, "cancelled by the client")
        self._finish(outgoing, False)

    def _cancel_upstream(self, outgoing: Outgoing, reason: str) -> None:
        if outgoing.handshake or not outgoing.sent:
            return
        self.notify("notifications/cancelled", {"requestId": outgoing.id, "reason": reason})

    def _deliver(self, message: Message) -> None:
        """Send a notification or an answer; the transport's refusal is only logged (nothing
        waits for either), and an answer that has no JSON form is replaced by an error."""
        try:
            self._send(message)
        except UpstreamRequestError as failure:  # no JSON form: a gateway bug
            log.warn("{error}; not sent", error=str(failure))
            if jsonrpc.is_response(message):
                self._deliver(jsonrpc.error(message["id"], INTERNAL_ERROR, str(failure)))
        except UpstreamError as failure:
            log.info("[{server}] {what} not sent: {error}", server=self.name,
                     what=message.get("method") or "an answer", error=str(failure))

    # --- what the server says ------------------------------------------------------------

    def received(self, message: Message, origin: Outgoing | None = None) -> None:
        """Handle one message from the server; ``origin``: the request on whose own stream it
        came (HTTP), if any."""
        if jsonrpc.is_response(message):
            self._answer(message)
        elif jsonrpc.is_request(message):
            self._server_request(message, origin)
        else:
            self._notification(message)

    def _answer(self, message: Message) -> None:
        own_id = own_request_id(message["id"])
        outgoing = self._pending.get(own_id) if own_id is not None else None
        if outgoing is None:
            if "error" in message:
                log.warn("[{server}] error answer to an unknown request {id}: {error}",
                         server=self.name, id=message["id"], error=message["error"])
            else:
                log.debug("[{server}] answer to an unknown or abandoned request {id}",
                          server=self.name, id=message["id"])
            return
        answer = answer_of(self.name, message)
        if isinstance(answer, UpstreamError):
            self.fail(outgoing, answer, answered=True)
        else:
            self._resolve(outgoing, answer)

    def _notification(self, message: Message) -> None:
        method = message["method"]
        params = message.get("params")
        if not isinstance(params, dict):
            params = {}
        if method == "notifications/progress":
            own_id = own_request_id(params.get("progressToken"))
            outgoing = self._pending.get(own_id) if own_id is not None else None
            if outgoing is not None and outgoing.relays_progress:
                if outgoing.timer is not None and outgoing.timer.active():
                    outgoing.timer.reset(outgoing.timeout)
                if outgoing.on_progress is not None:
                    run_hook(self.name, "on_progress", outgoing.on_progress,
                             {**params, "progressToken": outgoing.caller_token})
                return
        elif method == "notifications/cancelled":
            request_id = params.get("requestId")
            handling = self._incoming.pop(request_id, None) \
                if isinstance(request_id, str | int) else None
            if handling is not None:
                handling.cancel()
            else:
                log.debug("[{server}] cancellation of {id}, which is not being answered: "
                          "ignored", server=self.name, id=request_id)
            return
        run_hook(self.name, "on_notification", self._on_notification, message)

    def _server_request(self, message: Message, origin: Outgoing | None) -> None:
        request_id: RequestId = message["id"]
        method: str = message["method"]
        params = message.get("params") or {}

        async def answer() -> None:
            try:
                value = await self._on_request(method, params)
                if not isinstance(value, dict):
                    raise ProtocolError(INTERNAL_ERROR, "the gateway produced no result")
            except ProtocolError as failure:
                reply = jsonrpc.error(request_id, failure.code, failure.message, failure.data)
            except defer.CancelledError:
                return  # the server cancelled it or went away: no answer is expected
            except Exception as failure:
                log.failure("[{server}] answering {method} failed", server=self.name,
                            method=method)
                reply = jsonrpc.error(request_id, INTERNAL_ERROR, f"gateway error: {failure}")
            else:
                reply = jsonrpc.result(request_id, value)
            self._deliver(reply)

        handling = defer.ensureDeferred(answer())
        if handling.called:
            return
        self._incoming[request_id] = handling
        if origin is not None:
            origin.inbound.add(handling)

        def handled(outcome: object) -> None:
            if self._incoming.get(request_id) is handling:
                del self._incoming[request_id]
            if origin is not None:
                origin.inbound.discard(handling)
            if isinstance(outcome, Failure) and not outcome.check(defer.CancelledError):
                log.failure("[{server}] answering {method} failed", outcome,
                            server=self.name, method=method)

        handling.addBoth(handled)
