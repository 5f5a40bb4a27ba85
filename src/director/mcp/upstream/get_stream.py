"""The GET stream of a handshake-era Streamable HTTP session: the server's messages outside
any request (``streamable.StreamableHttpUpstream``).

``GetStream`` keeps one stream open while the session is established, and implements the
outputs of its lifecycle (``get_stream_lifecycle.py``, which says when each may happen). The
session makes each GET (``get``) and tells the ``GetAttempt`` it is handed what became of it;
an attempt that is no longer the stream's current one (a new session replaced it, the session
closed) is not listened to: its events are not delivered and its end schedules nothing.
A stream that ends is opened again after a growing delay (1 s doubling to 30 s, or the
server's ``retry:``; reset once a GET is answered with a stream) with the ``Last-Event-ID``
of the last event, as long as it is the same session's; the first problem after a success is
logged.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from director.mcp.sse import Event, SseParser
from director.mcp.upstream.backoff import Backoff
from director.mcp.upstream.get_stream_lifecycle import GetStreamLifecycle, lifecycle
from director.mcp.upstream.http_plumbing import _HttpCall

log = Logger(namespace="mcp.upstream.http")  # one namespace for the HTTP transports

#: Reconnection delays, in seconds (a dropped POST stream's resumption waits the same way).
RECONNECT_INITIAL = 1.0
RECONNECT_MAX = 30.0


class GetAttempt:
    """One GET of the stream, as the session makes it: it reports to the stream while it is
    the current one, and not at all once it was dropped."""

    def __init__(self, stream: GetStream, last_event_id: str) -> None:
        self._stream = stream
        #: What to resume from (``Last-Event-ID``), empty at the start of a session.
        self.last_event_id = last_event_id
        #: The HTTP exchange, once the session made it: dropping the attempt aborts it.
        self.call: _HttpCall | None = None
        #: The stream's parser, once the GET was answered with one.
        self.parser: SseParser | None = None

    @property
    def current(self) -> bool:
        return self._stream.attempt is self

    def connected(self, parser: SseParser) -> None:
        """The GET was answered with an event stream, read by ``parser``."""
        self.parser = parser
        if self.current:
            self._stream._lifecycle.connected()

    def event(self, event: Event) -> None:
        if self.current:
            self._stream.on_event(event)

    def failed(self, problem: str) -> None:
        """The GET failed: no answer in time, a connection error, an HTTP error status."""
        if self.current:
            self._stream._finished()
            self._stream._lifecycle.failed(problem)

    def ended(self, problem: str | None) -> None:
        """The stream ended: by the server (``problem`` None), or why not."""
        if self.current:
            self._stream._finished()
            self._stream._ended(self, problem)

    def refused(self) -> None:
        """405: the server has no GET stream."""
        if self.current:
            self._stream._finished()
            self._stream._lifecycle.refused()

    def expired(self, session_id: str | None) -> None:
        """The server forgot session ``session_id``."""
        if self.current:
            self._stream._finished()
            self._stream._lifecycle.expired(session_id)


class GetStream:
    """Keeps a session's GET stream open (the module docstring)."""

    def __init__(self, name: str, get: Callable[[GetAttempt], Coroutine[Any, Any, None]],
                 renew: Callable[[str | None], Coroutine[Any, Any, None]],
                 on_event: Callable[[Event], None], reactor: Any) -> None:
        self.name = name
        self.get = get
        self.renew = renew
        self.on_event = on_event
        self.reactor = reactor
        #: None until a GET is answered; True once one was answered with a stream, False
        #: once one was answered 405.
        self.supported: bool | None = None
        #: The GET whose outcome the stream listens to.
        self.attempt: GetAttempt | None = None
        self._last_event_id = ""
        self._backoff = Backoff(RECONNECT_INITIAL, RECONNECT_MAX)
        self._warned = False
        self._reconnect: Any = None
        #: The machine's state, as it tells us.
        self.state = "idle"
        self._lifecycle: GetStreamLifecycle = lifecycle(self)

    def start(self) -> None:
        self._lifecycle.start()

    def stop(self) -> None:
        self._lifecycle.stop()

    def close(self) -> None:
        self._lifecycle.close()

    def _finished(self) -> None:
        """The current attempt is over: it reports no more."""
        self.attempt = None

    def _ended(self, attempt: GetAttempt, problem: str | None) -> None:
        """The stream ended: the next one resumes after its last event, after the delay the
        server asked for (``retry:``) if it did."""
        assert attempt.parser is not None, "only a stream that was answered ends"
        self._last_event_id = attempt.parser.last_event_id
        if attempt.parser.retry is not None:
            self._backoff.prefer(attempt.parser.retry / 1000)
        self._lifecycle.ended(problem)

    # --- the lifecycle's outputs (``get_stream_lifecycle.GetStreamCore``) -------------------

    def _entered(self, state: str) -> None:
        self.state = state

    def _begin(self) -> None:
        self._last_event_id = ""
        self._backoff = Backoff(RECONNECT_INITIAL, RECONNECT_MAX)
        self._warned = False

    def _connect(self) -> None:
        attempt = self.attempt = GetAttempt(self, self._last_event_id)
        defer.ensureDeferred(self.get(attempt)).addErrback(
            lambda failure: log.failure("[{server}] the GET stream failed", failure,
                                        server=self.name))

    def _opened(self) -> None:
        self.supported = True
        self._backoff.succeeded()
        self._warned = False

    def _drop(self) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is not None and attempt.call is not None:
            attempt.call.abort()

    def _schedule_reconnect(self, problem: str | None) -> None:
        if problem is not None and not self._warned:
            log.info("[{server}] GET stream: {problem}; reconnecting", server=self.name,
                     problem=problem)
            self._warned = True
        self._reconnect = self.reactor.callLater(self._backoff.next_delay(),
                                                 self._delay_elapsed)

    def _delay_elapsed(self) -> None:
        self._reconnect = None
        self._lifecycle.delay_elapsed()

    def _cancel_reconnect(self) -> None:
        if self._reconnect is not None and self._reconnect.active():
            self._reconnect.cancel()
        self._reconnect = None

    def _unsupported(self) -> None:
        self.supported = False
        log.debug("[{server}] no GET stream (405)", server=self.name)

    def _renew_session(self, session_id: str | None) -> None:
        defer.ensureDeferred(self.renew(session_id)).addErrback(lambda failure: None)
