"""The downstream session layer in process, on Twisted's ``task.Clock``: idle expiry, the
per-user cap, the memory of revoked credentials, a client that never answers, a stuck stream
reader and the request timings are tested exactly, without sleeping or starting a daemon
(tests/test_mcp_gateway.py, with real clients and a real daemon, stays the acceptance layer).

The upstream sessions are fakes built by the real ``UpstreamManager`` (those of
tests/test_upstreams_inprocess.py); the playbook cache is a dictionary.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import attrs
import pytest
from twisted.internet import defer, task

from director.accounts.cache import Credential, Revocation
from director.config import load_settings
from director.mcp.channels import SessionChannel
from director.mcp.downstream import CLIENT_REQUEST_TIMEOUT, DownstreamSession
from director.mcp.engine import REVOKED_MEMORY_SECONDS, CredentialRevoked, McpEngine
from director.mcp.jsonrpc import REQUEST_TIMEOUT, ProtocolError
from director.mcp.slices import SLICE as FANOUT_SLICE
from director.mcp.streams import HEARTBEAT_SECONDS, STUCK_SECONDS, EventStream, StreamRegistry
from director.mcp.upstreams import UpstreamManager
from director.playbooks.store import Playbook
from tests.test_upstreams_inprocess import SERVER, FakeSession

IDLE_SECONDS = 10.0  # the expiry loop runs every 5 s (half of it)
CAP = 3
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


class FakeUpstream(FakeSession):
    """An upstream session with one tool, whose ``tools/call`` answers when the test says
    (``calls``)."""

    def __init__(self) -> None:
        super().__init__("ok")
        self.calls: list[defer.Deferred[dict[str, Any]]] = []

    async def request(self, method: str, params: dict[str, Any] | None = None, *,
                      timeout: float = 60.0, on_progress: Any = None) -> dict[str, Any]:
        if method == "tools/list":
            return {"tools": [{"name": "wait", "inputSchema": {"type": "object"}}]}
        answer: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.calls.append(answer)
        return await answer


class Playbooks:
    """What the engine asks of the playbook cache."""

    def __init__(self, *playbooks: Playbook) -> None:
        self.playbooks = {playbook.pk: playbook for playbook in playbooks}
        self.listeners: list[Any] = []

    def subscribe(self, listener: Any) -> None:
        self.listeners.append(listener)

    def changed(self, old: Playbook | None, new: Playbook | None) -> None:
        for listener in self.listeners:
            listener(old, new)

    def by_pk(self, pk: uuid.UUID) -> Playbook | None:
        return self.playbooks.get(pk)


class Metrics:
    """The engine's metrics, as the calls it made."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, *args))


class Harness:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_000)
        self.upstream = FakeUpstream()
        self.playbook = Playbook(uuid.uuid4(), uuid.uuid4(), "work", "Work", "", 0, 1, NOW, NOW,
                                 servers=(SERVER,))
        settings = load_settings({})
        manager = UpstreamManager(lambda *_: self.upstream, settings, clock=self.clock)
        self.playbooks = Playbooks(self.playbook)
        self.engine = McpEngine(settings, self.playbooks, manager,
                                self.clock, clock=self.clock, max_sessions_per_user=CAP,
                                idle_seconds=IDLE_SECONDS, metrics=metrics)
        self.engine.start()

    def open(self, user: uuid.UUID | None = None, transport: str = "streamable",
             credential: Credential | None = None) -> DownstreamSession:
        user = user or self.playbook.user_id
        return self.engine.create(user, credential or Credential("api_key", uuid.uuid4()),
                                  self.playbook, transport)

    def live(self, *sessions: DownstreamSession) -> list[bool]:
        return [session.id in self.engine.sessions for session in sessions]


# --- idle expiry ----------------------------------------------------------------------------


def test_an_idle_session_ends_after_its_idle_time_and_not_before() -> None:
    harness = Harness()
    session = harness.open()
    harness.clock.advance(IDLE_SECONDS)  # idle exactly that long at this check: kept
    assert harness.live(session) == [True] and not session.closed
    harness.clock.advance(IDLE_SECONDS / 2)
    assert harness.live(session) == [False]
    assert session.closed and session.ended_because == "idle"


def test_use_postpones_the_expiry() -> None:
    harness = Harness()
    used, unused = harness.open(), harness.open()
    harness.clock.advance(IDLE_SECONDS - 1)
    used.touch()
    harness.clock.advance(6)  # 15 s after the start: the unused one is past its time
    assert harness.live(used, unused) == [True, False]
    harness.clock.advance(5)  # 11 s after its use
    assert harness.live(used) == [False]


class OpenStream:
    open = True

    def finish(self) -> None:
        self.open = False


def test_an_open_stream_or_a_call_in_progress_keeps_an_idle_session() -> None:
    harness = Harness()
    listening, calling = harness.open(), harness.open()
    listening.channel.stream = OpenStream()
    call: defer.Deferred[Any] = defer.Deferred()
    calling.in_flight[1] = call
    harness.clock.advance(IDLE_SECONDS * 10)
    assert harness.live(listening, calling) == [True, True]
    listening.channel.stream.finish()
    del calling.in_flight[1]
    harness.clock.advance(IDLE_SECONDS / 2)
    assert harness.live(listening, calling) == [False, False]


def test_the_expiry_stops_with_the_engine() -> None:
    harness = Harness()
    session = harness.open()
    defer.ensureDeferred(harness.engine.stop())
    assert session.ended_because == "shutdown"
    assert harness.clock.getDelayedCalls() == []  # no expiry loop, no heartbeat left


# --- the per-user cap -----------------------------------------------------------------------


def test_the_cap_ends_the_users_least_recently_used_session() -> None:
    metrics = Metrics()
    harness = Harness(metrics)
    first = harness.open()
    harness.clock.advance(1)
    second = harness.open()
    harness.clock.advance(1)
    third = harness.open()
    someone_elses = harness.open(user=uuid.uuid4())
    harness.clock.advance(1)
    first.touch()  # now the second is the least recently used
    harness.clock.advance(1)
    fourth = harness.open()
    assert harness.live(first, second, third, fourth, someone_elses) == [
        True, False, True, True, True]
    assert second.closed and second.ended_because == "cap"
    assert ("session_ended", "streamable", "cap") in metrics.calls
    # At the cap again: the third (used at its creation) goes next.
    harness.open()
    assert harness.live(first, third, fourth) == [True, False, True]


# --- revoked credentials --------------------------------------------------------------------


def test_a_revoked_credential_is_refused_for_a_while_then_forgotten() -> None:
    harness = Harness()
    revoked = Credential("api_key", uuid.uuid4())
    session = harness.open(credential=revoked)
    harness.engine.revoked(Revocation("api_key", revoked.id))
    assert session.ended_because == "revoked"
    with pytest.raises(CredentialRevoked):
        harness.open(credential=revoked)
    # Forgotten once older than the memory, at the next revocation (no timer of its own).
    harness.clock.advance(REVOKED_MEMORY_SECONDS - 1)
    harness.engine.revoked(Revocation("api_key", uuid.uuid4()))
    with pytest.raises(CredentialRevoked):
        harness.open(credential=revoked)
    harness.clock.advance(1)
    harness.engine.revoked(Revocation("api_key", uuid.uuid4()))
    assert harness.open(credential=revoked).credential == revoked


# --- what waits on time during a session ----------------------------------------------------


def test_a_request_to_a_client_that_never_answers_times_out() -> None:
    harness = Harness()
    session = harness.open(transport="sse")
    stream = Request()
    session.channel.stream = EventStream(stream, harness.engine.streams)  # its one stream
    session.client_capabilities = {"roots": {}}
    asking = defer.ensureDeferred(session.ask_client("roots/list", {}))
    outcome: list[Any] = []
    asking.addBoth(outcome.append)
    assert len(session.client_requests) == 1 and b'"method":"roots/list"' in stream.written[0]
    harness.clock.advance(CLIENT_REQUEST_TIMEOUT - 1)
    assert outcome == []
    harness.clock.advance(1)
    assert isinstance(outcome[0].value, ProtocolError)
    assert outcome[0].value.code == REQUEST_TIMEOUT
    assert session.client_requests == {} and not session.closed


def test_a_request_is_timed_with_its_wait_for_the_upstream() -> None:
    metrics = Metrics()
    harness = Harness(metrics)
    session = harness.open()
    channel = SessionChannel(session.id)
    message = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
               "params": {"name": "wait", "arguments": {}}}
    handling = defer.ensureDeferred(session.handle(message, channel))
    assert len(harness.upstream.calls) == 1
    harness.clock.advance(2.5)
    harness.upstream.calls[0].callback({"content": []})
    assert handling.result == {"jsonrpc": "2.0", "id": 7, "result": {"content": []}}
    pk = harness.playbook.pk
    assert ("upstream_request", pk, "remote", "ok", 2.5) in metrics.calls
    assert ("mcp_request", "tools/call", "ok", 2.5, pk, 2.5) in metrics.calls


# --- streams --------------------------------------------------------------------------------


class Transport:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class Request:
    """What an ``EventStream`` uses of a ``twisted.web`` request (one whose headers are not
    sent yet: everything goes through ``write``)."""

    startedWriting = False

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.channel = type("Channel", (), {"transport": Transport()})()

    def setHeader(self, name: bytes, value: bytes) -> None:
        pass

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def notifyFinish(self) -> defer.Deferred[None]:
        return defer.Deferred()

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_a_reader_stuck_longer_than_allowed_is_disconnected() -> None:
    clock = task.Clock()
    registry = StreamRegistry(clock)
    registry.start()
    reading, stuck = Request(), Request()
    EventStream(reading, registry)
    EventStream(stuck, registry).pauseProducing()
    clock.advance(HEARTBEAT_SECONDS)
    assert reading.written == [b": ping\n\n"]  # a heartbeat; the paused one queues its own
    clock.advance(STUCK_SECONDS - HEARTBEAT_SECONDS)  # paused exactly that long: kept
    assert not stuck.channel.transport.aborted
    clock.advance(HEARTBEAT_SECONDS)
    assert stuck.channel.transport.aborted and not reading.channel.transport.aborted
    assert len(reading.written) == 3
    registry.stop()


# --- a playbook change's fan-out --------------------------------------------------------------


def test_a_playbook_change_reaches_every_session_a_slice_per_reactor_turn() -> None:
    harness = Harness()
    sessions = [harness.open(user=uuid.uuid4()) for _ in range(2 * FANOUT_SLICE + 1)]

    def told() -> int:  # each session's channel numbers the events it was given
        return sum(1 for session in sessions if session.channel.replay.last_id)

    harness.playbooks.changed(harness.playbook, attrs.evolve(harness.playbook, servers=()))
    assert told() == FANOUT_SLICE  # the rest waits while the reactor serves other requests
    slicer = harness.engine.streams.slicer
    assert [call.getTime() for call in harness.clock.getDelayedCalls()
            if call.func == slicer.slice] == [harness.clock.seconds()]
    assert slicer.running == 1  # (the collector waits meanwhile: director.collector)
    harness.clock.advance(0)  # (task.Clock runs the following slices' turns at once)
    assert told() == len(sessions)
    # tools and resources changed with the servers, and so may the prompts they offer
    assert {session.channel.replay.last_id.rsplit("-", 1)[1] for session in sessions} == {"3"}
    assert not [call for call in harness.clock.getDelayedCalls() if call.func == slicer.slice]
    assert slicer.running == 0
