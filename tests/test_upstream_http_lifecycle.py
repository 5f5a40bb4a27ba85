"""The life of an HTTP upstream session object (``director.mcp.upstream.lifecycle``) in process:
the machine's transitions on their own, then through an ``HttpSession`` whose handshake the test
finishes by hand, on ``task.Clock``. The transports' own tests drive the same paths over real
HTTP (tests/test_upstream_http.py)."""

from __future__ import annotations

from typing import Any

import pytest
from automat import NoTransition
from twisted.internet import defer, task
from twisted.python.failure import Failure

from director.mcp.upstream.base import UpstreamError
from director.mcp.upstream.http_session import HttpSession
from director.mcp.upstream.lifecycle import Handshake, Nothing, session_lifecycle


def test_a_fresh_session_is_established_by_its_first_handshake_without_a_restore() -> None:
    machine = session_lifecycle(Nothing())
    assert not machine.established() and not machine.closed()
    assert not machine.lost("refused")  # never established: the caller's failure alone
    assert machine.handshake_succeeded() is Handshake.FIRST
    assert machine.established()


def test_a_forgotten_session_is_re_established_silently_and_restored() -> None:
    machine = session_lifecycle(Nothing())
    machine.handshake_succeeded()
    machine.forgotten()
    assert not machine.established()
    machine.forgotten()  # a second request hearing the same 404
    assert machine.handshake_succeeded() is Handshake.RESTORED
    assert machine.established()


def test_a_loss_is_reported_once_until_the_session_is_re_established() -> None:
    machine = session_lifecycle(Nothing())
    machine.handshake_succeeded()
    machine.forgotten()
    assert machine.lost("re-initialising failed")
    assert not machine.lost("re-initialising failed again")
    machine.forgotten()
    assert not machine.established()
    assert machine.handshake_succeeded() is Handshake.RESTORED
    assert machine.lost("the SSE stream was lost")


def test_nothing_leaves_closed() -> None:
    machine = session_lifecycle(Nothing())
    machine.handshake_succeeded()
    assert machine.close() and machine.closed()
    assert not machine.close()
    machine.forgotten()
    assert not machine.lost("connection lost")
    assert machine.handshake_succeeded() is Handshake.TOO_LATE  # finished too late
    assert machine.closed() and not machine.established()


def test_an_established_session_cannot_be_established_again() -> None:
    machine = session_lifecycle(Nothing())
    machine.handshake_succeeded()
    with pytest.raises(NoTransition):
        machine.handshake_succeeded()
    assert machine.established()


class HandshakeByHand(HttpSession):
    """An HTTP session whose handshake is a Deferred the test fires (no I/O at all)."""

    def __init__(self, clock: task.Clock) -> None:
        super().__init__("by-hand", "http://127.0.0.1:9/mcp", {}, clock, None)
        self.handshakes: list[defer.Deferred[None]] = []
        self.restored: list[dict[str, Any]] = []
        self.lost: list[str] = []
        # The callbacks may use the session at once (the router re-subscribes from
        # on_restored): the machine must not be in the middle of a transition then.
        self.on_restored = lambda result: self.restored.append(
            {**result, "established": self._established, "closed": self._closed})
        self.on_closed = self.lost.append

    async def _handshake(self) -> None:
        handshake: defer.Deferred[None] = defer.Deferred()
        self.handshakes.append(handshake)
        await handshake
        self.initialize_result = {"handshake": len(self.handshakes)}


def test_concurrent_establishing_shares_one_handshake_and_restores_once() -> None:
    session = HandshakeByHand(task.Clock())
    first, second = defer.ensureDeferred(session.start()), defer.ensureDeferred(session.start())
    assert len(session.handshakes) == 1
    session.handshakes[0].callback(None)
    assert first.called and second.called and session.restored == []
    session._established = False  # what upstream.modern does to probe its era again
    again = defer.ensureDeferred(session._ensure_established())
    session.handshakes[1].callback(None)
    assert again.called and session.lost == []
    assert session.restored == [{"handshake": 2, "established": True, "closed": False}]


def test_a_lost_session_reports_once_and_close_during_a_handshake_refuses_it() -> None:
    clock = task.Clock()
    session = HandshakeByHand(clock)
    defer.ensureDeferred(session.start())
    session.handshakes[0].callback(None)
    session._report_lost("the SSE stream was lost")
    session._report_lost("the SSE stream was lost")
    assert session.lost == ["the SSE stream was lost"]
    failures: list[Failure] = []
    defer.ensureDeferred(session._ensure_established()).addErrback(failures.append)
    defer.ensureDeferred(session.close())
    session.handshakes[1].callback(None)
    assert [failure.check(UpstreamError) for failure in failures] == [UpstreamError]
    assert "the session was closed" in failures[0].getErrorMessage()
    assert session.restored == [] and session._closed
    clock.advance(60)  # nothing was left waiting on the clock
    assert clock.getDelayedCalls() == []
