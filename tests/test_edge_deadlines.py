"""The edge's connection deadlines and its refusal log, in process on a clock the test moves
(``task.Clock`` as the site's reactor, a ``StringTransport`` as the connection): the same
behaviour test_daemon.py shows a real daemon having by waiting, here to the millisecond.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request

from director.config import Settings
from director.web.edge import DirectorChannel, DirectorSite

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\n"


class Answer(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"answered"


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


@pytest.fixture
def site(clock: task.Clock) -> Iterator[DirectorSite]:
    settings = attrs.evolve(Settings(), request_header_timeout_seconds=1.0,
                            request_body_timeout_seconds=1.0, max_connections_per_address=1)
    started = DirectorSite(Answer(), settings, reactor=clock)
    started.doStart()
    yield started
    started.doStop()


def connect(site: DirectorSite) -> tuple[DirectorChannel | None, StringTransport]:
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    if channel is not None:
        channel.makeConnection(transport)
    return channel, transport


def test_a_head_trickled_line_by_line_is_cut_at_its_deadline(clock: task.Clock,
                                                             site: DirectorSite) -> None:
    channel, transport = connect(site)
    assert channel is not None
    channel.dataReceived(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n")
    for _ in range(3):  # each line well inside the idle timeout, the head never complete
        clock.advance(0.25)
        channel.dataReceived(b"X-Line: trickled\r\n")
    assert transport.value() == b"" and not transport.disconnecting
    clock.advance(0.25)  # 1 s after the first byte: the sweep due then cuts it
    assert transport.value().startswith(REQUEST_TIMEOUT)
    assert b'"request_timeout"' in transport.value() and transport.disconnecting


def test_a_body_is_due_within_its_deadline_of_the_end_of_the_head(clock: task.Clock,
                                                                  site: DirectorSite) -> None:
    channel, transport = connect(site)
    assert channel is not None
    clock.advance(0.75)  # the body's deadline starts with the head, not the connection
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n")
    channel.dataReceived(b"12345")
    clock.advance(0.75)  # the head's deadline (1.0) has passed, but it was in time
    assert transport.value() == b""
    clock.advance(0.5)  # 1.25 s after the head, at the first sweep past its deadline
    assert transport.value().startswith(REQUEST_TIMEOUT)
    assert b"the request body did not arrive within 1 s" in transport.value()


def test_a_slow_but_complete_request_is_answered(clock: task.Clock, site: DirectorSite) -> None:
    channel, transport = connect(site)
    assert channel is not None
    parts = [b"POST /x HTTP/1.1\r\nHost: local", b"host\r\nConnection: close\r\n",
             b"Content-Length: 10\r\n\r\n", b"12345", b"67890"]
    for part in parts:  # the head in 0.9 s, the body in 0.9 s more: each within its own
        channel.dataReceived(part)
        clock.advance(0.45)
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert transport.value().endswith(b"answered")


def test_refusals_by_the_cap_are_logged_once_a_minute_per_address(clock: task.Clock,
                                                                  site: DirectorSite) -> None:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "http":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        held, _ = connect(site)  # the one connection the address may hold
        assert held is not None
        assert connect(site)[0] is None
        clock.advance(59.999)
        assert connect(site)[0] is None and connect(site)[0] is None
        clock.advance(0.001)
        assert connect(site)[0] is None
    finally:
        globalLogPublisher.removeObserver(observe)
    counts = [line.split(" connection(s)")[0] for line in lines]
    assert counts == ["refused 1", "refused 3"]
