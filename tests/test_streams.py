"""``EventStream``'s write path, in-process: one ``send(2)`` straight to the socket when that is
safe, Twisted's buffered ``Request.write`` otherwise — and never a byte out of order.

The request and transport are small stand-ins with the attributes the stream reads; the socket
is a real one (a socket pair), so what the client would read is what is asserted. Every daemon
test that holds a GET stream runs the same path against real clients.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer, task

from director.mcp.channels import LIST_CHANGED, SessionChannel, list_changed_encoded
from director.mcp.slices import SLICE, SLICE_SECONDS, Slicer
from director.mcp.streams import EventStream, StreamRegistry, frame, json_bytes


class Transport:
    """What ``EventStream`` reads of a Twisted TCP transport."""

    TLS = False

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.connected = True
        self.disconnecting = False
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []

    def write(self, data: bytes) -> None:  # Twisted's buffer: kept in order, sent later
        self._tempDataBuffer.append(data)


class Channel:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport


class Request:
    """A chunked HTTP/1.1 response whose headers went out; ``write`` frames as Twisted does
    and queues behind what the transport holds (``Request.write`` → ``writeSequence``)."""

    def __init__(self, transport: Transport) -> None:
        self.channel = Channel(transport)
        self.startedWriting = True
        self.chunked = True
        self.finished = False
        self.sentLength = 0
        self.through_twisted: list[bytes] = []

    def setHeader(self, name: bytes, value: bytes) -> None:
        pass

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def finish(self) -> None:
        self.finished = True

    def notifyFinish(self) -> defer.Deferred[None]:
        return defer.Deferred()

    def write(self, data: bytes) -> None:
        self.through_twisted.append(data)
        self.channel.transport.write(b"%x\r\n%s\r\n" % (len(data), data))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    server.setblocking(False)
    client.setblocking(False)
    yield server, client
    server.close()
    client.close()


def received(client: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            data += client.recv(1 << 20)
        except BlockingIOError:
            return data


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def stream_on(server: socket.socket) -> tuple[EventStream, Request, Transport]:
    transport = Transport(server)
    request = Request(transport)
    return EventStream(request, StreamRegistry(task.Clock())), request, transport


def test_an_event_goes_straight_to_the_socket_framed_as_a_chunk(pair: Any) -> None:
    server, client = pair
    stream, request, transport = stream_on(server)
    stream.send(b"data: one\n\n")
    stream.send(b"data: two\n\n")
    assert received(client) == chunk(b"data: one\n\n") + chunk(b"data: two\n\n")
    assert request.through_twisted == [] and transport._tempDataBuffer == []
    assert request.sentLength == 2 * len(b"data: one\n\n")


def test_what_twisted_holds_for_the_connection_goes_first(pair: Any) -> None:
    server, client = pair
    stream, request, transport = stream_on(server)
    transport._tempDataBuffer.append(chunk(b"held"))
    stream.send(b"after")
    assert received(client) == b""  # nothing overtook the held bytes
    assert request.through_twisted == [b"after"]
    assert transport._tempDataBuffer == [chunk(b"held"), chunk(b"after")]


def test_a_full_socket_leaves_the_rest_to_twisteds_buffer(pair: Any) -> None:
    server, client = pair
    filled = 0
    try:
        while True:
            filled += server.send(b"x" * 65536)
    except BlockingIOError:
        pass
    stream, _, transport = stream_on(server)
    event = b"data: " + b"y" * 200_000 + b"\n\n"
    stream.send(event)
    framed = chunk(event)
    kept = b"".join(transport._tempDataBuffer)
    assert kept and framed.endswith(kept)  # the unsent tail, for Twisted to send in order
    assert received(client) == b"x" * filled + framed[:len(framed) - len(kept)]


@pytest.mark.parametrize("unsafe", ["headers not sent", "not chunked", "tls", "closing",
                                    "no socket"])
def test_anything_but_a_plain_chunked_socket_goes_through_request_write(pair: Any,
                                                                        unsafe: str) -> None:
    server, client = pair
    transport = Transport(server)
    request = Request(transport)
    if unsafe == "headers not sent":
        request.startedWriting = False
    elif unsafe == "not chunked":
        request.chunked = False
    elif unsafe == "tls":
        transport.TLS = True
    elif unsafe == "closing":
        transport.disconnecting = True
    else:
        del transport.socket
    stream = EventStream(request, StreamRegistry(task.Clock()))
    stream.send(b"event")
    assert request.through_twisted == [b"event"]
    assert received(client) == b""


def test_a_paused_stream_queues_and_resumes_in_order(pair: Any) -> None:
    server, client = pair
    stream, _, _ = stream_on(server)
    stream.pauseProducing()
    stream.send(b"a")
    stream.send(b"b")
    assert received(client) == b""
    stream.resumeProducing()
    assert received(client) == chunk(b"a") + chunk(b"b")


def test_a_heartbeat_writes_a_slice_of_the_streams_per_reactor_turn() -> None:
    clock = task.Clock()
    registry = StreamRegistry(clock)
    requests = [Request(Transport(None)) for _ in range(SLICE + 10)]  # type: ignore[arg-type]
    for request in requests:
        request.startedWriting = False  # through request.write: counted there
        EventStream(request, registry)
    registry.beat()
    assert sum(1 for request in requests if request.through_twisted) == SLICE
    ended = next(request for request in requests if not request.through_twisted)
    for stream in list(registry._streams):
        if stream.request is ended:
            stream.finish()
    clock.advance(0)  # the next turn: the rest, but not the stream that ended meanwhile
    assert [request.through_twisted for request in requests].count([b": ping\n\n"]) == \
        len(requests) - 1
    assert ended.through_twisted == []


def test_a_playbook_change_writes_its_notifications_to_a_stream_at_once(pair: Any) -> None:
    """A change of servers tells each session three ``list_changed``: one chunk, one
    ``send(2)``, three events with consecutive ids, each kept for ``Last-Event-ID``."""
    server, client = pair
    stream, request, _ = stream_on(server)
    channel = SessionChannel("abcdefgh-session")
    channel.stream = stream
    sent: list[bytes] = []
    real_send = server.send

    class CountingSocket:
        def send(self, data: bytes) -> int:
            sent.append(data)
            return real_send(data)

    stream._raw_transport().socket = CountingSocket()
    channel.send_encoded(list_changed_encoded(LIST_CHANGED), derived=True)
    events = b"".join(
        b"id: abcdefgh-%d\nevent: message\ndata: %b\n\n"
        % (number, json_bytes({"jsonrpc": "2.0", "method": method}))
        for number, method in enumerate(LIST_CHANGED, start=1))
    assert received(client) == chunk(events)
    assert len(sent) == 1 and request.through_twisted == []
    assert b"".join(channel.replay.after("abcdefgh-0") or []) == events
    assert channel.replay.after("abcdefgh-2") == [events.split(b"\n\n")[2] + b"\n\n"]


def test_a_message_with_a_line_break_is_framed_as_several_data_lines() -> None:
    assert frame(b'{"a":\n1}', "s-1") == b'id: s-1\nevent: message\ndata: {"a":\ndata: 1}\n\n'
    assert frame(b"{}", "s-2") == b"id: s-2\nevent: message\ndata: {}\n\n"
    assert frame(b"{}") == b"event: message\ndata: {}\n\n"


class SlowClock(task.Clock):
    """A clock on which each item's work takes ``per_item`` seconds."""

    def __init__(self, per_item: float) -> None:
        super().__init__()
        self.per_item = per_item

    def act(self, item: int, done: list[int]) -> None:
        self.advance(self.per_item)
        done.append(item)


def test_a_slice_ends_when_its_time_is_up_on_a_slow_machine() -> None:
    clock = SlowClock(per_item=SLICE_SECONDS / 40)  # 40 items take a slice's time
    slicer = Slicer(clock)
    done: list[int] = []
    slicer.run(range(SLICE), lambda item: clock.act(item, done))
    # the clock is read every 16 items: the first read past the deadline ends the slice
    assert done == list(range(48))
    assert slicer.running == 1
    while clock.getDelayedCalls():
        clock.advance(0)
    assert done == list(range(SLICE))
    assert slicer.running == 0


def test_an_item_that_raises_does_not_stop_or_repeat_the_others() -> None:
    clock = task.Clock()
    slicer = Slicer(clock)
    done: list[int] = []

    def act(item: int) -> None:
        if item == 3:
            raise ValueError(item)
        done.append(item)

    with pytest.raises(ValueError):
        slicer.run(range(SLICE + 5), act)
    assert done == [0, 1, 2]
    clock.advance(0)  # the rest of the first slice
    clock.advance(0)  # and the next
    assert done == [item for item in range(SLICE + 5) if item != 3]
    assert slicer.running == 0
