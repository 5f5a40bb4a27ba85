"""One MCP session over Streamable HTTP (``StreamableHttpUpstream``), handshake era
(protocol revisions 2025-03-26 … 2025-11-25).

* every message is a POST (``Accept: application/json, text/event-stream``) carrying the
  configured headers, ``Mcp-Session-Id`` once the server issued one and
  ``MCP-Protocol-Version`` once negotiated. A request's answer is either one JSON body or an
  SSE stream that may carry notifications, progress, log messages and server→client
  requests before the response; server→client requests are answered by POSTing the
  response (a JSON body holding several messages, one per line, as the TypeScript SDK's
  conformance fixture sends, is taken message by message). Notifications and responses
  expect 202.
* after ``initialize`` + ``notifications/initialized`` a GET stream is opened for
  server-initiated messages (405: the server has none, fine). When it drops it is reopened
  with a growing delay (the server's ``retry:`` if it sent one) and ``Last-Event-ID``
  (``get_stream.py``; when, ``get_stream_lifecycle.py``).
  A POST stream that ends before its response is resumed the same way, if the server gave
  its events ids (the 2025-11-25 polling pattern); otherwise the request fails.
* session expiry: a 404 to a request that carried a session id (or a 400 whose body talks
  about the session, as servers built on the TypeScript SDK's example answer) means the
  server forgot the session. The session re-initialises transparently, once per request,
  and retries that request; this is logged but ``on_closed`` is *not* called, because the
  session object goes on working (``on_restored`` is called). Only if re-initialising
  fails is ``on_closed`` called (once per such loss); the next request tries the handshake
  again, so the object heals itself when the server comes back.
* ``close()`` aborts everything in flight and DELETEs the session.

A later protocol era (2026-07-28, stateless) can subclass ``StreamableHttpUpstream``
(``upstream.modern``): ``_handshake`` (what ``start()`` and re-initialisation do) and
``_post_headers`` (the headers of each POST) are the two places that differ.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from director import tracing
from director.mcp import jsonrpc
from director.mcp.jsonrpc import Message
from director.mcp.sse import SseParser
from director.mcp.upstream.backoff import Backoff
from director.mcp.upstream.base import UpstreamError, encoded
from director.mcp.upstream.get_stream import (
    RECONNECT_INITIAL,
    RECONNECT_MAX,
    GetAttempt,
    GetStream,
)
from director.mcp.upstream.http_plumbing import (
    EVENT_STREAM,
    JSON,
    SHORT_EXCHANGE_TIMEOUT,
    HttpStatusError,
    _Aborted,
    _content_type,
    _header,
    _HttpCall,
    _Response,
)
from director.mcp.upstream.http_session import HttpSession
from director.mcp.upstream.peer import Outgoing

log = Logger(namespace="mcp.upstream.http")  # one namespace for the HTTP transports


#: How long close() waits for the DELETE of the session.
CLOSE_TIMEOUT = 5.0
#: Answers to the ``initialize`` POST that mean "no Streamable HTTP here" (spec, backwards
#: compatibility); 401/403 and the rest are real errors and are reported as such.
FALLBACK_STATUSES = frozenset({400, 404, 405})
#: A dropped POST stream is resumed at most this many times in a row without news.
RESUME_ATTEMPTS = 3


class _SessionExpired(Exception):
    """404 (or a 400 about the session) to a message that carried a session id."""


def _valid_session_id(value: str) -> bool:
    return bool(value) and all(0x21 <= ord(char) <= 0x7E for char in value)


class StreamableHttpUpstream(HttpSession):
    """One MCP session with a Streamable HTTP server (see the module docstring)."""

    transport_name = "streamable-http"

    def __init__(self, *arguments: Any, **options: Any) -> None:
        """``HttpSession``'s arguments."""
        super().__init__(*arguments, **options)
        self.session_id: str | None = None
        #: The ``Mcp-Session-Id`` of the answer to the handshake's POST.
        self._issued_session_id: str | None = None
        #: The stream of server-initiated messages (``get_stream.py``).
        self._get_stream = GetStream(self.name, self._get, self._renew, self._event,
                                     self._reactor)

    @property
    def get_stream_supported(self) -> bool | None:
        """None until the server answered a GET; False once it answered 405."""
        return self._get_stream.supported

    # --- the handshake ---------------------------------------------------------------------

    async def _handshake(self) -> None:
        self._get_stream.stop()
        self.session_id = None
        self.protocol_version = None
        self._issued_session_id = None
        result = await self._initialize()
        issued = self._issued_session_id
        if issued is not None and not _valid_session_id(issued):
            raise UpstreamError(f"[{self.name}] the server issued an invalid session id")
        self.session_id = issued
        try:
            self._accept(result)
            await self._send_message(jsonrpc.notification("notifications/initialized"))
        except HttpStatusError as failure:
            # Only the initialize POST's status decides about falling back to HTTP+SSE.
            self._abandon_session()
            raise UpstreamError(str(failure)) from None
        except BaseException:
            self._abandon_session()
            raise
        self._get_stream.start()

    def _abandon_session(self) -> None:
        """A half-made session: DELETE it in the background."""
        if self.session_id is not None:
            defer.ensureDeferred(self._delete_session()).addErrback(lambda failure: None)

    async def _renew(self, stale: str | None) -> None:
        """The server forgot session ``stale``: initialise a new one (once for everyone)."""
        if self._closed:
            raise UpstreamError(f"[{self.name}] the session is closed")
        if self._established and self.session_id != stale:
            return  # somebody else renewed it already
        if self._established:
            log.info("[{server}] the upstream forgot session {session}; re-initialising",
                     server=self.name, session=stale)
            self._lifecycle.forgotten()
            self._get_stream.stop()
        try:
            if not tracing.spans():
                await self._establish()
            else:
                with tracing.span("upstream reinitialize", attributes={
                        "director.server.name": self.name,
                        "director.upstream.transport": tracing.upstream_transport(self)}):
                    await self._establish()
        except UpstreamError as failure:
            self._report_lost(f"the session expired and re-initialising failed: {failure}")
            raise

    def _post_headers(self, message: Message, session_id: str | None) -> dict[str, str]:
        headers = self._base_headers()
        headers["Accept"] = f"{JSON}, {EVENT_STREAM}"
        headers["Content-Type"] = JSON
        if message.get("method") != "initialize":
            if session_id is not None:
                headers["Mcp-Session-Id"] = session_id
            if self.protocol_version is not None:
                headers["MCP-Protocol-Version"] = self.protocol_version
        return headers

    def _get_headers(self, session_id: str | None, last_event_id: str) -> dict[str, str]:
        headers = self._base_headers()
        headers["Accept"] = EVENT_STREAM
        if session_id is not None:
            headers["Mcp-Session-Id"] = session_id
        if self.protocol_version is not None:
            headers["MCP-Protocol-Version"] = self.protocol_version
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        return headers

    async def _refusal(self, method: str, response: _Response, call: _HttpCall,
                       session_id: str | None) -> HttpStatusError:
        """The error for an unsuccessful answer, or ``_SessionExpired`` if it says that the
        server forgot the session: 404 (the specification), or a 400 whose body talks about
        the session (what servers built on the TypeScript SDK's example answer)."""
        if response.code == 404 and session_id is not None:
            await self._discard(response, call)
            raise _SessionExpired()
        problem = await self._status_error(method, self.url, response, call)
        if problem.status == 400 and session_id is not None and "session" in problem.body.lower():
            raise _SessionExpired()
        return problem

    # --- requests ---------------------------------------------------------------------------

    async def _send_request(self, pending: Outgoing) -> None:
        retried = False
        while not pending.finished:
            if not pending.handshake:
                await self._ensure_established()
            session_id = self.session_id
            try:
                await self._post(pending.message, session_id, pending)
                return
            except _SessionExpired:
                if pending.handshake:
                    raise UpstreamError(f"[{self.name}] POST {self._display}: HTTP 404 "
                                        f"to initialize") from None
                if retried:
                    raise UpstreamError(f"[{self.name}] {pending.method}: the upstream "
                                        f"forgot the session again right after "
                                        f"re-initialising") from None
                retried = True
                await self._renew(session_id)

    async def _send_message(self, message: Message, body: bytes | None = None) -> None:
        call, deadline = self._timed_call(SHORT_EXCHANGE_TIMEOUT)
        try:
            await self._post(message, self.session_id, None, call, body)
        except _SessionExpired:
            log.info("[{server}] {what} not delivered: the session expired", server=self.name,
                     what=message.get("method") or "an answer")
        except _Aborted:
            raise self._unanswered(deadline) from None
        finally:
            if deadline.active():
                deadline.cancel()

    async def _post(self, message: Message, session_id: str | None, pending: Outgoing | None,
                    call: _HttpCall | None = None, body: bytes | None = None) -> None:
        """POST one message and read what comes back, dispatching every message in it."""
        call = call or _HttpCall()
        if pending is not None:
            self._attach(pending, call)
            pending.sent = True
        try:
            response = await self._http(call, "POST", self.url,
                                        self._post_headers(message, session_id),
                                        encoded(self.name, message) if body is None else body)
            if pending is not None and pending.handshake:
                self._issued_session_id = _header(response, b"mcp-session-id")
            if not 200 <= response.code < 300:
                raise await self._refusal("POST", response, call, session_id)
            content_type = _content_type(response)
            if pending is not None and response.code != 202 and response.length == 0:
                await self._discard(response, call)
                raise UpstreamError(f"[{self.name}] POST {self._display}: HTTP "
                                    f"{response.code} with an empty body to {pending.method}")
            if pending is None or response.code == 202:
                # (202 to a request breaks the spec; its answer may still come on the GET stream.)
                await self._discard(response, call)
                return
            if content_type == EVENT_STREAM:
                parser, dropped = await self._read_events(
                    response, call, lambda event: self._event(event, pending))
                if not pending.finished:
                    await self._resume(pending, parser, dropped)
            elif content_type == JSON:
                self._received_json_body(
                    await self._read_body(response, call, self.max_message_size))
                if not pending.finished:
                    raise UpstreamError(f"[{self.name}] POST {self._display}: the JSON answer "
                                        f"did not answer {pending.method}")
            else:
                await self._discard(response, call)
                raise UpstreamError(f"[{self.name}] POST {self._display}: unexpected content "
                                    f"type {content_type or 'none'!r}")
        finally:
            self._calls.discard(call)
            if pending is not None:
                self._detach(pending, call)

    async def _resume(self, pending: Outgoing, parser: SseParser, dropped: str | None) -> None:
        """A request's stream ended before its response: GET it again from its last event id
        (2025-11-25 resumability), as long as the server gave its events ids."""
        attempts = 0
        backoff = Backoff(RECONNECT_INITIAL, RECONNECT_MAX)
        while not pending.finished:
            if not parser.last_event_id or attempts >= RESUME_ATTEMPTS:
                how = f"was lost ({dropped})" if dropped else "ended"
                raise UpstreamError(f"[{self.name}] POST {self._display}: the stream {how} "
                                    f"before the answer to {pending.method}")
            attempts += 1
            if parser.retry is not None:
                backoff.prefer(parser.retry / 1000)
            await self._sleep(backoff.next_delay())
            if pending.finished:
                return
            before = parser.last_event_id
            call = _HttpCall(keep_once_answered=False)
            self._attach(pending, call)
            session_id = self.session_id
            try:
                response = await self._http(call, "GET", self.url,
                                            self._get_headers(session_id, before))
                if response.code != 200 or _content_type(response) != EVENT_STREAM:
                    raise await self._refusal("GET", response, call, session_id)
                try:
                    parser, dropped = await self._read_events(
                        response, call, lambda event: self._event(event, pending), parser)
                except _Aborted:
                    if pending.finished:
                        return
                    raise
            finally:
                self._calls.discard(call)
                self._detach(pending, call)
            if parser.last_event_id != before:
                attempts = 0

    # --- the GET stream ------------------------------------------------------------------------

    async def _get(self, attempt: GetAttempt) -> None:
        """One GET of the stream (``GetStream``'s ``get``); what became of it goes to
        ``attempt``."""
        session_id = self.session_id
        call, deadline = self._timed_call(SHORT_EXCHANGE_TIMEOUT)
        attempt.call = call
        in_time = True
        try:
            try:
                response = await self._http(call, "GET", self.url,
                                            self._get_headers(session_id, attempt.last_event_id))
            finally:
                in_time = deadline.active()
                if in_time:
                    deadline.cancel()
            await self._got(attempt, response, call, session_id)
        except _Aborted:
            if not in_time:  # (otherwise it was dropped: nobody waits for its outcome)
                attempt.failed("no answer to the GET")
        except UpstreamError as failure:
            attempt.failed(str(failure))
        finally:
            self._calls.discard(call)

    async def _got(self, attempt: GetAttempt, response: _Response, call: _HttpCall,
                   session_id: str | None) -> None:
        """The server's answer to a GET of the stream."""
        if response.code == 405:
            await self._discard(response, call)
            attempt.refused()
        elif response.code != 200 or _content_type(response) != EVENT_STREAM:
            try:
                attempt.failed(str(await self._refusal("GET", response, call, session_id)))
            except _SessionExpired:
                attempt.expired(session_id)
        else:
            parser = SseParser(self.max_message_size)
            parser.last_event_id = attempt.last_event_id
            attempt.connected(parser)
            try:
                _, dropped = await self._read_events(response, call, attempt.event, parser)
            except UpstreamError as failure:  # a message too large
                dropped = str(failure)
            attempt.ended(dropped)

    # --- closing -----------------------------------------------------------------------------

    async def _close_transport(self) -> None:
        self._get_stream.close()
        await self._delete_session()

    async def _delete_session(self) -> None:
        session_id, self.session_id = self.session_id, None
        if session_id is None:
            return
        headers = self._base_headers()
        headers["Mcp-Session-Id"] = session_id
        if self.protocol_version is not None:
            headers["MCP-Protocol-Version"] = self.protocol_version
        call, deadline = self._timed_call(CLOSE_TIMEOUT)
        try:
            response = await self._http(call, "DELETE", self.url, headers)
            await self._discard(response, call)
            if response.code not in (200, 202, 204, 404, 405):
                log.info("[{server}] DELETE of the session answered HTTP {code}",
                         server=self.name, code=response.code)
        except (UpstreamError, _Aborted) as failure:
            log.info("[{server}] DELETE of the session failed: {error}", server=self.name,
                     error=str(failure) or "timed out")
        finally:
            self._calls.discard(call)
            if deadline.active():
                deadline.cancel()


