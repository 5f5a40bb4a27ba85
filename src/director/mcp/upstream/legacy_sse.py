"""One MCP session over the 2024-11-05 HTTP+SSE transport (``LegacySseUpstream``).

GET the SSE URL, wait for the ``endpoint`` event (resolved against the SSE URL; it must stay on
the same origin, so the configured credentials are never sent elsewhere), POST messages there
(202) and read every answer, notification and server→client request from the one stream. That
stream *is* the session: when it ends, pending requests fail and ``on_closed`` is called; the
next request reconnects and re-initialises.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin, urlsplit

from twisted.internet import defer
from twisted.logger import Logger

from director.mcp import jsonrpc
from director.mcp.jsonrpc import Message
from director.mcp.sse import Event
from director.mcp.upstream.base import UpstreamError, encoded
from director.mcp.upstream.http_plumbing import (
    EVENT_STREAM,
    JSON,
    SHORT_EXCHANGE_TIMEOUT,
    _Aborted,
    _content_type,
    _HttpCall,
    _Response,
    display_url,
)
from director.mcp.upstream.http_session import HttpSession
from director.mcp.upstream.peer import Outgoing

log = Logger(namespace="mcp.upstream.http")  # one namespace for the HTTP transports


class LegacySseUpstream(HttpSession):
    """One MCP session over the 2024-11-05 HTTP+SSE transport (see the module docstring)."""

    transport_name = "sse"

    def __init__(self, *arguments: Any, **options: Any) -> None:
        """``HttpSession``'s arguments."""
        super().__init__(*arguments, **options)
        self.endpoint: str | None = None
        self._stream_call: _HttpCall | None = None
        self._endpoint_waiter: defer.Deferred[str] | None = None

    async def _handshake(self) -> None:
        try:
            await self._connect()
        except BaseException:
            self._drop_stream()
            raise

    async def _connect(self) -> None:
        self._drop_stream()
        self.endpoint = None
        call, deadline = self._timed_call(self.timeout_default)
        self._stream_call = call
        headers = self._base_headers()
        headers["Accept"] = EVENT_STREAM
        try:
            try:
                response = await self._http(call, "GET", self.url, headers)
            except _Aborted:
                if deadline.active():  # aborted by close()
                    raise
                raise UpstreamError(f"[{self.name}] GET {self._display}: no answer within "
                                    f"{self.timeout_default:g} s") from None
            finally:
                if deadline.active():
                    deadline.cancel()
            if response.code != 200:
                raise await self._status_error("GET", self.url, response, call)
            if _content_type(response) != EVENT_STREAM:
                await self._discard(response, call)
                raise UpstreamError(f"[{self.name}] GET {self._display}: not an SSE stream "
                                    f"({_content_type(response) or 'no content type'})")
        except BaseException:
            self._calls.discard(call)
            raise
        waiter = self._endpoint_waiter = defer.Deferred()
        defer.ensureDeferred(self._read_stream(response, call)).addErrback(
            lambda failure: log.failure("[{server}] reading the SSE stream failed", failure,
                                        server=self.name))
        timer = self._reactor.callLater(self.timeout_default, waiter.errback, UpstreamError(
            f"[{self.name}] GET {self._display}: no endpoint event within "
            f"{self.timeout_default:g} s"))
        try:
            self.endpoint = await waiter
        finally:
            if timer.active():
                timer.cancel()
            self._endpoint_waiter = None
        self._accept(await self._initialize())
        await self._send_message(jsonrpc.notification("notifications/initialized"))

    def _drop_stream(self) -> None:
        call, self._stream_call = self._stream_call, None
        if call is not None:
            call.abort()
            self._calls.discard(call)

    def _legacy_event(self, event: Event, call: _HttpCall) -> None:
        if call is not self._stream_call:
            return
        if event.event == "endpoint":
            endpoint = urljoin(self.url, event.data.strip())
            mine, theirs = urlsplit(self.url), urlsplit(endpoint)
            waiter = self._endpoint_waiter
            if (mine.scheme, mine.hostname, mine.port) != (theirs.scheme, theirs.hostname,
                                                           theirs.port):
                if waiter is not None and not waiter.called:
                    waiter.errback(UpstreamError(
                        f"[{self.name}] the SSE endpoint {display_url(endpoint)} is on another "
                        f"origin than {self._display}; refusing to send messages there"))
                return
            if waiter is not None and not waiter.called:
                waiter.callback(endpoint)
            else:
                self.endpoint = endpoint
        else:
            self._event(event)

    async def _read_stream(self, response: _Response, call: _HttpCall) -> None:
        try:
            _, dropped = await self._read_events(
                response, call, lambda event: self._legacy_event(event, call))
            reason = f"the SSE stream was lost ({dropped})" if dropped else \
                "the server ended the SSE stream"
        except _Aborted:
            reason = "the SSE stream was closed"
        except UpstreamError as failure:
            reason = str(failure).removeprefix(f"[{self.name}] ")
            call.abort()
        finally:
            self._calls.discard(call)
        if call is not self._stream_call:
            return
        self._stream_call = None
        self.endpoint = None
        waiter = self._endpoint_waiter
        if waiter is not None and not waiter.called:
            waiter.errback(UpstreamError(f"[{self.name}] GET {self._display}: {reason} before "
                                         f"the endpoint event"))
        self._report_lost(reason)
        self._peer.fail_all(UpstreamError(f"[{self.name}] {reason}"))

    async def _send_request(self, pending: Outgoing) -> None:
        call = _HttpCall()
        self._attach(pending, call)
        pending.sent = True
        try:
            await self._post(pending.message, call)
        finally:
            self._detach(pending, call)

    async def _send_message(self, message: Message, body: bytes | None = None) -> None:
        call, deadline = self._timed_call(SHORT_EXCHANGE_TIMEOUT)
        try:
            await self._post(message, call, body)
        except _Aborted:
            raise self._unanswered(deadline) from None
        finally:
            if deadline.active():
                deadline.cancel()

    async def _post(self, message: Message, call: _HttpCall, body: bytes | None = None) -> None:
        endpoint = self.endpoint
        if endpoint is None:
            raise UpstreamError(f"[{self.name}] not connected")
        headers = self._base_headers()
        headers["Content-Type"] = JSON
        try:
            response = await self._http(call, "POST", endpoint, headers,
                                        encoded(self.name, message) if body is None else body)
            if not 200 <= response.code < 300:
                raise await self._status_error("POST", endpoint, response, call)
            if _content_type(response) == JSON and response.code != 202:
                # Not what the transport specifies (answers come on the stream), but harmless.
                body = await self._read_body(response, call, self.max_message_size)
                if body.strip():
                    self._received_json_body(body)
            else:
                await self._discard(response, call)
        finally:
            self._calls.discard(call)

    async def _close_transport(self) -> None:
        self._drop_stream()
        self.endpoint = None


