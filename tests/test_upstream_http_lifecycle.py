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
from director.mcp.upstream.lifecycle import LifecycleHooks, SessionLifecycle, session_lifecycle


class Told:
    """A machine and what its transitions told the session."""

    def __init__(self) -> None:
        self.restored = 0
        self.lost: list[str] = []
        self.machine: SessionLifecycle = session_lifecycle(LifecycleHooks(
            restored=self.count_restored, reported_lost=self.lost.append))

    def count_restored(self) -> None:
        self.restored += 1


def test_a_fresh_session_is_established_by_its_first_handshake_without_a_restore() -> None:
    told = Told()
    assert not told.machine.established()
    told.machine.lost("refused")  # never established: the caller's failure alone
    assert told.machine.handshake_succeeded()
    assert told.machine.established() and told.restored == 0 and told.lost == []


def test_a_forgotten_session_is_re_established_silently_and_restored() -> None:
    told = Told()
    told.machine.handshake_succeeded()
    told.machine.forgotten()
    assert not told.machine.established()
    told.machine.forgotten()  # a second request hearing the same 404
    assert told.machine.handshake_succeeded()
    assert told.machine.established() and told.restored == 1 and told.lost == []


def test_a_loss_is_reported_once_until_the_session_is_re_established() -> None:
    told = Told()
    told.machine.handshake_succeeded()
    told.machine.forgotten()
    told.machine.lost("re-initialising failed")
    told.machine.lost("re-initialising failed again")
    told.machine.forgotten()
    assert told.lost == ["re-initialising failed"] and not told.machine.established()
    told.machine.handshake_succeeded()
    told.machine.lost("the SSE stream was lost")
    assert told.restored == 1
    assert told.lost == ["re-initialising failed", "the SSE stream was lost"]


def test_nothing_leaves_closed() -> None:
    told = Told()
    told.machine.handshake_succeeded()
    assert told.machine.close() and told.machine.closed()
    assert not told.machine.close()
    told.machine.forgotten()
    told.machine.lost("connection lost")
    assert not told.machine.handshake_succeeded()  # a handshake that finished too late
    assert told.machine.closed() and not told.machine.established()
    assert told.restored == 0 and told.lost == []


def test_an_established_session_cannot_be_established_again() -> None:
    told = Told()
    told.machine.handshake_succeeded()
    with pytest.raises(NoTransition):
        told.machine.handshake_succeeded()
    assert told.machine.established() and told.restored == 0


class HandshakeByHand(HttpSession):
    """An HTTP session whose handshake is a Deferred the test fires (no I/O at all)."""

    def __init__(self, clock: task.Clock) -> None:
        super().__init__("by-hand", "http://127.0.0.1:9/mcp", {}, clock, None)
        self.handshakes: list[defer.Deferred[None]] = []
        self.restored: list[dict[str, Any]] = []
        self.lost: list[str] = []
        self.on_restored = self.restored.append
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
    assert again.called and session.restored == [{"handshake": 2}] and session.lost == []


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
