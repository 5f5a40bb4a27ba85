"""How a response leaves the edge, in process: its head, body and end in one ``send(2)`` on the
socket when nothing of the connection waits in Twisted's buffer, else through that buffer in
order (``director.direct_send``, ``DirectorChannel.hold_writes``).

The channel is Director's own on its site; the transport is Twisted's ``StringTransport``
(what goes through Twisted's buffer) with a real socket pair under it (what is sent at once),
both writing to one ordered record of what the client receives. The same rule for the lines a
stdio server reads, on a real pipe (``direct_send.write_pipe``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols import policies
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from director import direct_send
from director.config import Settings
from director.request_end import when_done
from director.web.edge import DirectorChannel, DirectorSite, EdgeResource, RandomHex

GET = b"GET /answer HTTP/1.1\r\nHost: localhost\r\n\r\n"


class Answer(Resource):
    isLeaf = True

    def render(self, request: Request) -> Any:
        if request.path == b"/chunks":  # no length: chunked, written in two parts
            request.write(b"first")
            request.write(b"second")
            request.finish()
            return NOT_DONE_YET
        return b"answered"


class Held(Resource):
    """Answers nothing yet: the test finishes the request, or the client goes away first."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []
        self.told: list[tuple[bytes, bool]] = []

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        when_done(request, lambda lost: self.told.append((request.path, lost)))
        return NOT_DONE_YET


class Wire:
    """What the client receives, in order, and by which way each piece went."""

    def __init__(self) -> None:
        self.pieces: list[tuple[str, bytes]] = []

    def received(self) -> bytes:
        return b"".join(data for _, data in self.pieces)

    def ways(self) -> list[str]:
        return [way for way, _ in self.pieces]


class CountingSocket:
    """A real socket's ``send``, recorded; ``room`` bytes at most are taken, like a socket
    whose buffer is nearly full (0: full, ``BlockingIOError``)."""

    def __init__(self, sock: socket.socket, wire: Wire, room: int | None = None) -> None:
        self.sock = sock
        self.wire = wire
        self.room = room

    def send(self, data: bytes) -> int:
        if self.room == 0:
            raise BlockingIOError
        sent = self.sock.send(data if self.room is None else data[:self.room])
        self.wire.pieces.append(("send", bytes(data[:sent])))
        return sent


class SocketTransport(StringTransport):
    """``StringTransport`` with what ``direct_send`` reads of a plain TCP transport."""

    TLS = False

    def __init__(self, sock: CountingSocket, wire: Wire) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.socket = sock
        self.wire = wire
        self.connected = True
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []
        self.host_asked = 0

    def write(self, data: bytes) -> None:
        self.wire.pieces.append(("buffer", data))
        self._tempDataBuffer.append(data)  # what Twisted holds until the reactor's next turn
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def getHost(self) -> Any:
        self.host_asked += 1
        return super().getHost()


@pytest.fixture
def site() -> Iterator[DirectorSite]:
    settings = attrs.evolve(Settings(), max_connections_per_address=0)
    started = DirectorSite(Answer(), settings, reactor=task.Clock())
    started.doStart()
    yield started
    started.doStop()


@pytest.fixture
def edge_site() -> Iterator[DirectorSite]:
    settings = attrs.evolve(Settings(), max_connections_per_address=0)
    started = DirectorSite(EdgeResource(Answer(), settings), settings, reactor=task.Clock())
    started.doStart()
    yield started
    started.doStop()


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    client.setblocking(False)
    yield server, client
    server.close()
    client.close()


def connect(site: DirectorSite, server: socket.socket,
            room: int | None = None) -> tuple[DirectorChannel, SocketTransport, Wire]:
    wire = Wire()
    transport = SocketTransport(CountingSocket(server, wire, room), wire)
    channel = site.buildProtocol(transport.getPeer())
    channel.makeConnection(transport)
    return channel, transport, wire


def test_a_response_leaves_in_one_send_straight_to_the_socket(site: DirectorSite,
                                                              sockets: Any) -> None:
    channel, transport, wire = connect(site, sockets[0])
    channel.dataReceived(GET)
    assert wire.ways() == ["send"]
    response = wire.received()
    assert response.startswith(b"HTTP/1.1 200 OK\r\n") and response.endswith(b"\r\n\r\nanswered")
    assert b"\r\nContent-Length: 8\r\n" in response
    assert sockets[1].recv(65536) == response  # what the client reads
    assert transport.value() == b""


def test_a_chunked_response_goes_through_twisteds_buffer_whole(site: DirectorSite,
                                                               sockets: Any) -> None:
    channel, _, wire = connect(site, sockets[0])
    channel.dataReceived(GET.replace(b"/answer", b"/chunks"))
    # More may follow each chunk: the turn's parts wait in Twisted's buffer, which sends them
    # as one, the end included (a send each would cost a packet each).
    assert wire.ways() == ["buffer", "buffer", "buffer"]
    response = wire.received()
    assert b"\r\nTransfer-Encoding: chunked\r\n" in response
    assert response.endswith(b"\r\n\r\n5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n")


def test_what_twisted_holds_for_the_connection_goes_first(site: DirectorSite,
                                                          sockets: Any) -> None:
    channel, transport, wire = connect(site, sockets[0])
    transport._tempDataBuffer.append(b"earlier")
    channel.dataReceived(GET)
    assert wire.ways() == ["buffer"]  # behind what waits, never past it
    assert wire.received().startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("room", [0, 20])
def test_what_the_socket_does_not_take_goes_through_twisteds_buffer(site: DirectorSite,
                                                                    sockets: Any,
                                                                    room: int) -> None:
    channel, transport, wire = connect(site, sockets[0], room=room)
    channel.dataReceived(GET)
    assert wire.ways() == (["buffer"] if room == 0 else ["send", "buffer"])
    response = wire.received()
    assert response.startswith(b"HTTP/1.1 200 OK\r\n") and response.endswith(b"answered")
    assert transport.value() == response[room:]


@pytest.mark.parametrize("way", ["TLS", "closed", "no socket"])
def test_a_connection_that_cannot_take_a_direct_send_gets_twisteds_path(site: DirectorSite,
                                                                       sockets: Any,
                                                                       way: str) -> None:
    channel, transport, wire = connect(site, sockets[0])
    if way == "TLS":
        transport.TLS = True  # type: ignore[misc]
    elif way == "closed":
        transport.connected = False
    else:
        del transport.socket
    channel.dataReceived(GET)
    assert wire.ways() == ["buffer"]
    assert wire.received().endswith(b"answered")


def test_a_tls_listeners_transport_is_never_written_around(site: DirectorSite,
                                                           sockets: Any) -> None:
    """A TLS listener's transport (``TLSMemoryBIOProtocol``) is a protocol wrapper, which
    lends every attribute of the TCP transport under it, the socket included: bytes sent on
    that socket would leave unencrypted."""
    tcp = SocketTransport(CountingSocket(sockets[0], Wire()), Wire())
    wrapper = policies.ProtocolWrapper(policies.WrappingFactory(Factory()), Protocol())
    wrapper.makeConnection(tcp)
    assert wrapper.socket is tcp.socket and wrapper.TLS is False  # lent, not its own
    assert not direct_send.plain_socket(wrapper)
    channel = site.buildProtocol(tcp.getPeer())
    channel.makeConnection(wrapper)
    channel.dataReceived(GET)
    assert tcp.wire.ways() == ["buffer"] and tcp.value().endswith(b"answered")


def test_a_closing_transport_is_not_idle(sockets: Any) -> None:
    transport = SocketTransport(CountingSocket(sockets[0], Wire()), Wire())
    assert direct_send.plain_socket(transport) and direct_send.idle(transport)
    transport.disconnecting = True  # what it holds must go out before it closes
    assert not direct_send.idle(transport)


def test_pipelined_answers_keep_their_order_and_a_bad_request_comes_last(
        site: DirectorSite, sockets: Any) -> None:
    channel, _, wire = connect(site, sockets[0])
    # Three requests in one read: two good ones, then one with a header line without a colon,
    # which Twisted answers 400 itself, past the channel's writes.
    channel.dataReceived(GET + GET + b"GET /answer HTTP/1.1\r\nNo colon here\r\n\r\n")
    response = wire.received()
    assert response.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert response.index(b"HTTP/1.1 400 Bad Request") > response.rindex(b"answered")


def test_the_edges_headers_are_each_sent_once_under_their_usual_names(
        edge_site: DirectorSite, sockets: Any) -> None:
    channel, _, wire = connect(edge_site, sockets[0])
    channel.dataReceived(GET)
    head = wire.received().split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    names = [line.split(b": ", 1)[0] for line in head]
    assert len(names) == len(set(names))  # Twisted's own Server header replaced, not doubled
    headers = dict(line.split(b": ", 1) for line in head)
    assert headers[b"Server"] == b"director" and headers[b"X-Frame-Options"] == b"DENY"
    assert headers[b"X-XSS-Protection"] == b"0" and len(headers[b"X-Trace-Id"]) == 32
    assert {b"X-Content-Type-Options", b"Referrer-Policy", b"Permissions-Policy"} <= set(names)
    # By the site's clock (a test's task.Clock at 1970), made once a second.
    assert headers[b"Date"] == b"Thu, 01 Jan 1970 00:00:00 GMT"


def test_the_date_is_the_sites_clocks_second() -> None:
    clock = task.Clock()
    site = DirectorSite(Answer(), Settings(), reactor=clock)
    clock.advance(1_765_000_000.75)
    assert site.http_date() == b"Sat, 06 Dec 2025 05:46:40 GMT"
    clock.advance(0.2)
    assert site.http_date() == b"Sat, 06 Dec 2025 05:46:40 GMT"
    clock.advance(0.05)
    assert site.http_date() == b"Sat, 06 Dec 2025 05:46:41 GMT"


@pytest.mark.parametrize(("method", "status"), [(b"OPTIONS", b"200 OK"),
                                                (b"GET", b"405 Method Not Allowed")])
def test_a_request_for_star_is_answered_as_twisted_does_without_naming_it(
        site: DirectorSite, sockets: Any, method: bytes, status: bytes) -> None:
    channel, _, wire = connect(site, sockets[0])
    channel.dataReceived(method + b" * HTTP/1.1\r\nHost: localhost\r\n\r\n")
    response = wire.received()
    assert response.startswith(b"HTTP/1.1 " + status + b"\r\n")
    assert b"\r\nServer: director\r\n" in response and b"Twisted" not in response
    assert response.endswith(b"\r\nContent-Length: 0\r\n\r\n")
    assert (b"\r\nAllow: OPTIONS\r\n" in response) is (method != b"OPTIONS")


def test_the_local_address_is_asked_of_the_socket_once_per_connection(site: DirectorSite,
                                                                      sockets: Any) -> None:
    channel, transport, wire = connect(site, sockets[0])
    channel.dataReceived(GET)
    channel.dataReceived(GET)
    assert wire.received().count(b"answered") == 2
    assert transport.host_asked == 1


def test_random_ids_are_fresh_across_refills_and_in_a_forked_child() -> None:
    ids = RandomHex(size=64)
    drawn = [ids.hex(16) for _ in range(100)]  # 25 refills of 4 ids each
    assert len(set(drawn)) == 100 and all(len(i) == 32 for i in drawn)
    int(drawn[0], 16)
    ids.hex(16)  # the pool now holds 2 more ids that the parent will draw
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's own process
        os.write(writer, ids.hex(16).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    in_child = os.read(reader, 64).decode()
    os.close(reader)
    assert len(in_child) == 32 and in_child != ids.hex(16)


# --- a stdio server's stdin pipe ------------------------------------------------------------


class PipeWriter:
    """What ``direct_send.write_pipe`` reads of Twisted's ``ProcessWriter``; ``write`` is
    its buffer."""

    connected = True
    disconnecting = False

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []
        self.buffered: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.buffered.append(data)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    yield reader, writer
    os.close(reader)
    os.close(writer)


def test_a_line_for_an_idle_pipe_is_written_at_once(pipe: tuple[int, int]) -> None:
    writer = PipeWriter(pipe[1])
    direct_send.write_pipe(writer, b'{"jsonrpc":"2.0"}\n')
    assert os.read(pipe[0], 100) == b'{"jsonrpc":"2.0"}\n' and writer.buffered == []


def test_a_line_for_a_pipe_with_a_backlog_queues_behind_it(pipe: tuple[int, int]) -> None:
    writer = PipeWriter(pipe[1])
    writer._tempDataBuffer.append(b"earlier\n")
    direct_send.write_pipe(writer, b"later\n")
    assert writer.buffered == [b"later\n"]
    os.set_blocking(pipe[0], False)
    with pytest.raises(BlockingIOError):
        os.read(pipe[0], 100)


def test_what_a_full_pipe_does_not_take_goes_to_the_writers_buffer(
        pipe: tuple[int, int]) -> None:
    writer = PipeWriter(pipe[1])
    filled = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filled += os.write(pipe[1], b"x" * 4096)
    direct_send.write_pipe(writer, b"line\n")
    assert writer.buffered == [b"line\n"]  # nothing written past the full pipe, nothing lost


def held_site() -> tuple[DirectorSite, Held]:
    held = Held()
    settings = attrs.evolve(Settings(), max_connections_per_address=0)
    started = DirectorSite(held, settings, reactor=task.Clock())
    started.doStart()
    return started, held


def test_a_request_tells_once_that_its_response_finished(sockets: Any) -> None:
    site, held = held_site()
    channel, _, _ = connect(site, sockets[0])
    channel.dataReceived(GET + GET.replace(b"/answer", b"/second"))  # pipelined
    assert [request.path for request in held.requests] == [b"/answer"] and held.told == []
    held.requests[0].write(b"one")
    held.requests[0].finish()
    # Told after the channel moved on to the next request, as notifyFinish is.
    assert held.told == [(b"/answer", False)]
    assert [request.path for request in held.requests] == [b"/answer", b"/second"]
    held.requests[1].finish()
    channel.connectionLost(Failure(ConnectionDone()))
    assert held.told == [(b"/answer", False), (b"/second", False)]  # nothing more, once each
    site.doStop()


def test_a_request_tells_once_that_its_client_went_away_first(sockets: Any) -> None:
    site, held = held_site()
    channel, _, _ = connect(site, sockets[0])
    channel.dataReceived(GET)
    channel.connectionLost(Failure(ConnectionLost()))
    assert held.told == [(b"/answer", True)]
    site.doStop()


class HeaderReader(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.read: dict[bytes, tuple[Any, Any]] = {}

    def render(self, request: Request) -> Any:
        for name in (b"host", b"accept", b"authorization", b"x-api-key", b"mcp-session-id",
                     b"cookie", b"x-other", b"Accept", "accept"):
            key = name if isinstance(name, bytes) else b"str:" + name.encode()
            self.read[key] = (request.getHeader(name), Request.getHeader(request, name))
        return b"read"


def test_the_headers_read_on_every_request_read_as_twisted_reads_them(sockets: Any) -> None:
    reader = HeaderReader()
    settings = attrs.evolve(Settings(), max_connections_per_address=0)
    site = DirectorSite(reader, settings, reactor=task.Clock())
    site.doStart()
    channel, _, _ = connect(site, sockets[0])
    channel.dataReceived(b"GET / HTTP/1.1\r\nHOST: localhost\r\nAccept: text/event-stream\r\n"
                         b"accept: application/json\r\nAUTHORIZATION: Bearer k\r\n"
                         b"Mcp-Session-Id: abc\r\nX-Other: 1\r\n\r\n")
    assert reader.read[b"accept"][0] == b"application/json"  # the last of two, as Twisted
    assert reader.read[b"host"][0] == b"localhost" and reader.read[b"x-api-key"][0] is None
    assert reader.read[b"str:accept"][0] == "application/json"
    for ours, twisteds in reader.read.values():
        assert ours == twisteds
    site.doStop()
