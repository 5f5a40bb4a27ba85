"""The lifecycle of a Streamable HTTP session's GET stream in process: the machine
(``get_stream_lifecycle``) on its own, every transition and every input it refuses, then through
the real ``GetStream`` with GETs the test answers by hand, then through a
``StreamableHttpUpstream`` whose HTTP agent the test plays, all on ``task.Clock``. The
transport's own tests (tests/test_upstream_http.py) drive the same paths over real HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest
from automat import NoTransition
from twisted.internet import defer, task
from twisted.internet.error import ConnectionLost
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from director.mcp.protocol import LATEST_LEGACY_VERSION
from director.mcp.sse import SseParser
from director.mcp.upstream.get_stream import GetAttempt, GetStream
from director.mcp.upstream.get_stream_lifecycle import GetStreamLifecycle, lifecycle
from director.mcp.upstream.http_plumbing import SHORT_EXCHANGE_TIMEOUT, _HttpCall
from director.mcp.upstream.streamable import StreamableHttpUpstream
from tests.test_upstream_lifecycles import RecordingCore

#: How to reach each state of the GET stream's machine from ``idle``.
DRIVES: dict[str, tuple[tuple[Any, ...], ...]] = {
    "idle": (),
    "connecting": (("start",),),
    "open": (("start",), ("connected",)),
    "waiting": (("start",), ("failed", "HTTP 502")),
    "refused": (("start",), ("refused",)),
    "closed": (("close",),),
}
#: Every input of the machine, with arguments.
INPUTS: dict[str, tuple[Any, ...]] = {
    "start": (), "stop": (), "connected": (), "failed": ("HTTP 502",), "ended": (None,),
    "refused": (), "expired": ("s1",), "delay_elapsed": (), "close": (),
}
NEW_STREAM = [("_begin",), ("_connect",)]
#: (state, input): (the state it leads to, the outputs in order); any other pair is refused.
TRANSITIONS: dict[tuple[str, str], tuple[str, list[tuple[Any, ...]]]] = {
    ("idle", "start"): ("connecting", NEW_STREAM),
    ("idle", "stop"): ("idle", []),
    ("idle", "close"): ("closed", []),
    ("connecting", "start"): ("connecting", [("_drop",), *NEW_STREAM]),
    ("connecting", "stop"): ("idle", [("_drop",)]),
    ("connecting", "close"): ("closed", [("_drop",)]),
    ("connecting", "connected"): ("open", [("_opened",)]),
    ("connecting", "failed"): ("waiting", [("_schedule_reconnect", "HTTP 502")]),
    ("connecting", "refused"): ("refused", [("_unsupported",)]),
    ("connecting", "expired"): ("idle", [("_renew_session", "s1")]),
    ("open", "start"): ("connecting", [("_drop",), *NEW_STREAM]),
    ("open", "stop"): ("idle", [("_drop",)]),
    ("open", "close"): ("closed", [("_drop",)]),
    ("open", "ended"): ("waiting", [("_schedule_reconnect", None)]),
    ("waiting", "start"): ("connecting", [("_cancel_reconnect",), *NEW_STREAM]),
    ("waiting", "stop"): ("idle", [("_cancel_reconnect",)]),
    ("waiting", "close"): ("closed", [("_cancel_reconnect",)]),
    ("waiting", "delay_elapsed"): ("connecting", [("_connect",)]),
    ("refused", "start"): ("refused", []),
    ("refused", "stop"): ("refused", []),
    ("refused", "close"): ("closed", []),
    ("closed", "start"): ("closed", []),
    ("closed", "stop"): ("closed", []),
    ("closed", "close"): ("closed", []),
}


def machine_in(state: str) -> tuple[RecordingCore, GetStreamLifecycle]:
    core = RecordingCore()
    inputs = lifecycle(core)
    for symbol, *arguments in DRIVES[state]:
        getattr(inputs, symbol)(*arguments)
    assert core.state == state
    core.outputs.clear()
    return core, inputs


@pytest.mark.parametrize(("where", "symbol"), sorted(TRANSITIONS))
def test_transitions(where: str, symbol: str) -> None:
    core, inputs = machine_in(where)
    getattr(inputs, symbol)(*INPUTS[symbol])
    assert (core.state, core.outputs) == TRANSITIONS[where, symbol]


@pytest.mark.parametrize(("where", "symbol"), sorted(
    (where, symbol) for where in DRIVES for symbol in INPUTS
    if (where, symbol) not in TRANSITIONS))
def test_impossible_inputs_are_refused(where: str, symbol: str) -> None:
    core, inputs = machine_in(where)
    with pytest.raises(NoTransition):
        getattr(inputs, symbol)(*INPUTS[symbol])
    assert (core.state, core.outputs) == (where, [])


class Gets:
    """``GetStream``'s ``get`` and ``renew``: each GET is an attempt the test answers."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.attempts: list[GetAttempt] = []
        self.renewed: list[str | None] = []
        self.events: list[str] = []
        self.stream = GetStream("up", self.get, self.renew,
                                lambda event: self.events.append(event.data), self.clock)

    async def get(self, attempt: GetAttempt) -> None:
        attempt.call = _HttpCall()
        self.attempts.append(attempt)

    async def renew(self, session_id: str | None) -> None:
        self.renewed.append(session_id)

    @property
    def last(self) -> GetAttempt:
        return self.attempts[-1]

    def answer(self, body: bytes = b"") -> GetAttempt:
        """The last GET is answered with a stream that carries ``body``."""
        attempt = self.last
        parser = SseParser()
        parser.last_event_id = attempt.last_event_id
        attempt.connected(parser)
        for event in parser.feed(body):
            attempt.event(event)
        return attempt

    def retried_after(self, problem: str) -> float:
        """The current GET fails with ``problem``: the delay after which the next is made."""
        self.last.failed(problem)
        [delay] = self.waits()
        self.clock.advance(delay)
        return delay

    def waits(self) -> list[float]:
        """The delays of the reconnections scheduled, from now."""
        return [call.getTime() - self.clock.seconds() for call in self.clock.getDelayedCalls()]


def test_resumes_after_its_last_event_with_backoff() -> None:
    gets = Gets()
    stream = gets.stream
    assert stream.state == "idle" and stream.supported is None and gets.attempts == []
    stream.start()
    assert stream.state == "connecting" and gets.last.last_event_id == ""
    gets.answer(b"id: 7\ndata: one\n\n")
    assert stream.state == "open" and stream.supported is True and gets.events == ["one"]

    gets.last.ended(None)  # the server ended it
    assert stream.state == "waiting" and gets.waits() == [1.0]
    gets.clock.advance(0.99)
    assert len(gets.attempts) == 1
    gets.clock.advance(0.01)
    assert stream.state == "connecting" and len(gets.attempts) == 2
    assert gets.last.last_event_id == "7"

    # Failed GETs wait longer each time (the end waited 1 s already), and keep the position;
    # an answer resets the delay.
    for delay in (2.0, 4.0, 8.0):
        assert gets.retried_after("HTTP 502 Bad Gateway") == delay
        assert stream.state == "connecting" and gets.last.last_event_id == "7"
    gets.answer(b"retry: 5000\nid: 8\ndata: two\n\n")
    gets.last.ended("connection lost")
    assert gets.waits() == [5.0]  # the server's retry: is the next delay
    gets.clock.advance(5.0)
    assert gets.last.last_event_id == "8" and gets.events == ["one", "two"]
    gets.answer()
    gets.last.ended(None)
    assert gets.waits() == [1.0]


def test_a_new_session_drops_the_old_stream_which_is_not_heard_again() -> None:
    gets = Gets()
    stream = gets.stream
    stream.start()
    old = gets.answer(b"id: 3\ndata: one\n\n")
    gets.last.ended(None)
    gets.clock.advance(1.0)
    old = gets.answer()
    assert old.last_event_id == "3"
    stream.stop()  # the server forgot the session: it is re-initialised
    assert stream.state == "idle" and old.call is not None and old.call.aborted
    stream.start()  # the new session
    new = gets.last
    assert new is not old and stream.state == "connecting"
    assert new.last_event_id == ""  # another session's position means nothing here

    # The old stream's last events and its end change nothing.
    for event in SseParser().feed(b"id: 4\ndata: stale\n\n"):
        old.event(event)
    old.ended("connection lost")
    old.failed("HTTP 404")
    assert stream.state == "connecting" and gets.clock.getDelayedCalls() == []
    assert gets.events == ["one"] and stream.attempt is new

    gets.answer(b"id: 1\ndata: fresh\n\n")
    assert stream.state == "open" and gets.events == ["one", "fresh"]
    # A start while a stream is open (a handshake without a stop first) replaces it too.
    stream.start()
    assert new.call is not None and new.call.aborted and gets.last.last_event_id == ""
    new.ended(None)
    assert stream.state == "connecting" and gets.clock.getDelayedCalls() == []


def test_backoff_starts_over_with_a_new_session() -> None:
    gets = Gets()
    stream = gets.stream
    stream.start()
    assert gets.retried_after("connection refused") == 1.0
    gets.last.failed("connection refused")
    assert gets.waits() == [2.0]
    stream.start()  # re-initialised during the backoff: the timer goes, a GET at once
    assert stream.state == "connecting" and gets.clock.getDelayedCalls() == []
    assert len(gets.attempts) == 3
    gets.last.failed("connection refused")
    assert gets.waits() == [1.0]


@pytest.mark.parametrize("how", ["stop", "close"])
def test_stop_or_close_during_the_backoff_cancels_the_timer(how: str) -> None:
    gets = Gets()
    stream = gets.stream
    stream.start()
    gets.last.failed("connection refused")
    assert gets.waits() == [1.0]
    getattr(stream, how)()
    assert stream.state == ("idle" if how == "stop" else "closed")
    assert gets.clock.getDelayedCalls() == []
    gets.clock.advance(60.0)
    assert len(gets.attempts) == 1


@pytest.mark.parametrize("where", ["idle", "connecting", "open", "waiting", "refused"])
def test_close_from_every_state(where: str) -> None:
    gets = Gets()
    stream = gets.stream
    if where != "idle":
        stream.start()
    if where == "open":
        gets.answer()
    elif where == "waiting":
        gets.last.failed("HTTP 502")
    elif where == "refused":
        gets.last.refused()
    assert stream.state == where
    stream.close()
    assert stream.state == "closed" and stream.attempt is None
    assert gets.clock.getDelayedCalls() == []
    for attempt in gets.attempts:
        assert attempt.call is not None and attempt.call.aborted == (where in ("connecting",
                                                                               "open"))
        attempt.ended("aborted")  # (late, and not listened to)
    stream.start()  # a handshake that finished after close()
    stream.stop()
    stream.close()
    assert stream.state == "closed" and len(gets.attempts) == (0 if where == "idle" else 1)


def test_405_is_final() -> None:
    gets = Gets()
    stream = gets.stream
    stream.start()
    gets.last.refused()
    assert stream.state == "refused" and stream.supported is False
    assert gets.clock.getDelayedCalls() == []
    stream.stop()  # the session is re-initialised …
    stream.start()  # … and its new session is not asked either
    gets.clock.advance(60.0)
    assert stream.state == "refused" and len(gets.attempts) == 1


def test_a_stream_that_finds_the_session_forgotten_renews_it() -> None:
    gets = Gets()
    stream = gets.stream
    stream.start()
    gets.last.expired("s1")
    assert stream.state == "idle" and gets.renewed == ["s1"]
    assert gets.clock.getDelayedCalls() == []  # the new session opens the next stream
    stream.stop()  # (what the renewal does first)
    stream.start()
    assert stream.state == "connecting" and len(gets.attempts) == 2


def test_logs_its_first_problem_after_each_success() -> None:
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "mcp.upstream.http":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        get_stream_with_problems()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [line for line in lines if "GET stream" in line] == [
        "[up] GET stream: HTTP 502 Bad Gateway; reconnecting",
        "[up] GET stream: connection lost; reconnecting"]


def get_stream_with_problems() -> None:
    """Two failed GETs, a stream the server ends, one that is lost."""
    gets = Gets()
    gets.stream.start()
    gets.retried_after("HTTP 502 Bad Gateway")
    gets.retried_after("connection refused")
    gets.answer()
    gets.last.ended(None)  # the server ended it: nothing to tell
    gets.clock.advance(1.0)
    gets.answer()
    gets.last.ended("connection lost")


# --- through StreamableHttpUpstream, over an agent the test answers ------------------------------


class Answer:
    """A response: its body there at once (``body``), or an event stream the test writes and
    ends. It is its body reader's transport too: the reader's abort drops it."""

    def __init__(self, code: int, content_type: bytes = b"", body: bytes | None = b"",
                 session_id: str | None = None) -> None:
        self.code = code
        self.phrase = b""
        self.length = UNKNOWN_LENGTH
        self.headers = Headers({b"content-type": [content_type]} if content_type else {})
        if session_id is not None:
            self.headers.setRawHeaders(b"mcp-session-id", [session_id.encode()])
        self.body = body
        self.reader: Any = None

    def deliverBody(self, reader: Any) -> None:
        self.reader = reader
        reader.makeConnection(self)
        if self.body is not None:
            reader.dataReceived(self.body)
            self.end()

    def send(self, data: bytes) -> None:
        self.reader.dataReceived(data)

    def end(self) -> None:
        self.reader.connectionLost(Failure(ResponseDone()))

    def stopProducing(self) -> None:
        """The reader dropped the connection: it is lost (once)."""
        self.reader.connectionLost(Failure(ConnectionLost()))


class Agent:
    """The session's HTTP agent: each POST answered at once (``initialize`` with a new session
    id, other requests with an empty result, or 404 once the server ``forgot``), each GET held
    for the test, and so is ``initialize`` while ``slow``."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.gets: list[tuple[Headers, defer.Deferred[Answer]]] = []
        self.sessions = 0
        self.forgot = False
        self.slow = False

    def request(self, method: bytes, url: bytes, headers: Headers, body: Any) -> Any:
        if method == b"GET":
            answer: defer.Deferred[Answer] = defer.Deferred()
            self.gets.append((headers, answer))
            return answer
        message = json.loads(body.body) if body is not None else {}
        if message.get("method") == "initialize":
            self.sessions += 1
            self.forgot = False
            result = {"protocolVersion": LATEST_LEGACY_VERSION, "capabilities": {},
                      "serverInfo": {"name": "fake", "version": "1"}}
            initialized = Answer(200, b"application/json", json.dumps(
                {"jsonrpc": "2.0", "id": message["id"], "result": result}).encode(),
                session_id=f"s{self.sessions}")
            if self.slow:
                return task.deferLater(self.clock, 1.0, lambda: initialized)
            return defer.succeed(initialized)
        if self.forgot or method == b"DELETE":
            return defer.succeed(Answer(404))
        if "id" in message and "method" in message:
            return defer.succeed(Answer(200, b"application/json", json.dumps(
                {"jsonrpc": "2.0", "id": message["id"], "result": {}}).encode()))
        return defer.succeed(Answer(202))

    def get(self, index: int) -> tuple[dict[str, str], defer.Deferred[Answer]]:
        """GET number ``index``: the headers that matter here, and its answer to give."""
        headers, answer = self.gets[index]
        return {name: (headers.getRawHeaders(name.encode()) or [b""])[0].decode()
                for name in ("mcp-session-id", "last-event-id")}, answer


def started(clock: task.Clock) -> tuple[StreamableHttpUpstream, Agent]:
    session = StreamableHttpUpstream("up", "http://127.0.0.1:9/mcp", {}, clock, None)
    session._agent = agent = Agent(clock)
    start = defer.ensureDeferred(session.start())
    assert start.called and start.result is None and session.session_id == "s1"
    return session, agent


def test_the_session_resumes_its_stream_times_out_a_get_and_stops_at_405() -> None:
    clock = task.Clock()
    session, agent = started(clock)
    notifications: list[dict[str, Any]] = []
    session.on_notification = notifications.append
    headers, answer = agent.get(0)
    assert headers == {"mcp-session-id": "s1", "last-event-id": ""}
    answer.callback(stream := Answer(200, b"text/event-stream", None))
    assert session.get_stream_supported is True
    stream.send(b'id: 5\ndata: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}'
                b'\n\n')
    assert notifications == [{"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}]

    stream.end()
    clock.advance(1.0)
    headers, answer = agent.get(1)
    assert headers == {"mcp-session-id": "s1", "last-event-id": "5"}
    clock.advance(SHORT_EXCHANGE_TIMEOUT)  # no answer: dropped, and tried again later
    assert answer.called and len(agent.gets) == 2
    clock.advance(2.0)
    headers, answer = agent.get(2)
    assert headers == {"mcp-session-id": "s1", "last-event-id": "5"}
    answer.callback(Answer(405))
    clock.advance(600.0)
    assert session.get_stream_supported is False and len(agent.gets) == 3
    defer.ensureDeferred(session.close())
    assert clock.getDelayedCalls() == []


def test_a_get_that_finds_the_session_forgotten_re_initialises_it() -> None:
    clock = task.Clock()
    session, agent = started(clock)
    restored: list[dict[str, Any]] = []
    session.on_restored = restored.append
    agent.get(0)[1].callback(stream := Answer(200, b"text/event-stream", None))
    stream.send(b"id: 9\ndata: \n\n")
    stream.end()
    agent.forgot = True
    clock.advance(1.0)
    headers, answer = agent.get(1)
    assert headers == {"mcp-session-id": "s1", "last-event-id": "9"}
    answer.callback(Answer(404, b"text/plain", b"no such session"))
    # Re-initialised at once; the new session's stream starts from its beginning.
    assert session.session_id == "s2" and len(restored) == 1
    assert agent.get(2)[0] == {"mcp-session-id": "s2", "last-event-id": ""}
    clock.advance(SHORT_EXCHANGE_TIMEOUT - 1)  # (nothing else was scheduled)
    assert len(agent.gets) == 3


def test_a_request_that_finds_the_session_forgotten_drops_the_old_stream() -> None:
    clock = task.Clock()
    session, agent = started(clock)
    notifications: list[dict[str, Any]] = []
    session.on_notification = notifications.append
    agent.get(0)[1].callback(old := Answer(200, b"text/event-stream", None))
    agent.forgot = agent.slow = True
    listed = defer.ensureDeferred(session.request("tools/list"))
    # While the session re-initialises, the old session's stream is gone already.
    assert old.reader.aborted and session._get_stream.state == "idle"
    assert not listed.called and len(agent.gets) == 1
    clock.advance(1.0)
    assert listed.called and listed.result == {} and session.session_id == "s2"
    assert len(agent.gets) == 2
    assert agent.get(1)[0] == {"mcp-session-id": "s2", "last-event-id": ""}
    old.send(b'data: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}\n\n')
    clock.advance(SHORT_EXCHANGE_TIMEOUT - 1)
    assert notifications == [] and len(agent.gets) == 2
    defer.ensureDeferred(session.close())
