"""The transports' common JSON-RPC peer (``director.mcp.upstream.peer``) in process: a list
for ``send``, ``task.Clock`` for time. Each transport's own tests (and
tests/test_upstream_transports_agree.py) drive it through real bytes."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from director.mcp import jsonrpc
from director.mcp.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS, Message, ProtocolError
from director.mcp.protocol import METHOD_NOT_FOUND, REQUEST_TIMEOUT, RESOURCE_NOT_FOUND
from director.mcp.upstream.base import (
    UpstreamError,
    UpstreamRequestError,
    UpstreamTimeout,
    default_request_handler,
    encoded,
)
from director.mcp.upstream.peer import Peer


class Wire:
    """A peer whose ``send`` appends to ``sent`` (after checking the message has a JSON
    form, as every transport's framing does)."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.sent: list[Message] = []
        self.notifications: list[Message] = []
        self.on_request: Any = default_request_handler
        self.peer = Peer("up", self.send, self.clock,
                         on_request=lambda method, params: self.on_request(method, params),
                         on_notification=self.notifications.append)

    def send(self, message: Message) -> None:
        encoded("up", message)
        self.sent.append(message)

    def cancellations(self) -> list[Any]:
        return [m["params"] for m in self.sent if m.get("method") == "notifications/cancelled"]


def cancellable() -> tuple[defer.Deferred[dict[str, Any]], list[bool]]:
    """A Deferred that never fires, and the list its cancellation appends to."""
    cancelled: list[bool] = []
    return defer.Deferred(lambda _: cancelled.append(True)), cancelled


def failure_of(deferred: defer.Deferred[Any]) -> Failure:
    failures: list[Failure] = []
    deferred.addErrback(failures.append)
    assert len(failures) == 1, "the Deferred has not failed"
    return failures[0]


def result_of(deferred: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addCallback(results.append)
    assert len(results) == 1, "the Deferred has no result"
    return results[0]


def test_a_request_goes_up_with_its_own_id_and_its_answer_comes_back() -> None:
    wire = Wire()
    first = wire.peer.request("tools/list", None, timeout=5)
    second = wire.peer.request("tools/call", {"name": "x"}, timeout=5)
    assert wire.sent == [jsonrpc.request(1, "tools/list"),
                         jsonrpc.request(2, "tools/call", {"name": "x"})]
    wire.peer.received({"jsonrpc": "2.0", "id": "2", "result": {"second": True}})  # digits
    wire.peer.received(jsonrpc.result(1, {"tools": []}))
    assert result_of(first) == {"tools": []}
    assert result_of(second) == {"second": True}
    assert wire.peer.pending == 0


def test_an_error_answer_fails_the_request_with_the_upstreams_error() -> None:
    wire = Wire()
    asked = wire.peer.request("tools/call", {}, timeout=5)
    wire.peer.received(jsonrpc.error(1, REQUEST_TIMEOUT, "nope", {"why": "because"}))
    failure = failure_of(asked)
    assert failure.check(UpstreamRequestError)
    assert failure.value.error == {"code": REQUEST_TIMEOUT, "message": "nope", "data": {"why": "because"}}


def test_a_request_times_out_and_is_cancelled_upstream_and_its_late_answer_dropped() -> None:
    wire = Wire()
    asked = wire.peer.request("tools/call", {}, timeout=2)
    wire.clock.advance(1.9)
    assert not asked.called
    wire.clock.advance(0.1)
    failure = failure_of(asked)
    assert failure.check(UpstreamTimeout)
    assert str(failure.value) == "[up] no answer to tools/call within 2 s"
    assert wire.cancellations() == [{"requestId": 1, "reason": "timeout"}]
    wire.peer.received(jsonrpc.result(1, {"late": True}))  # dropped, not an error
    assert wire.peer.pending == 0


def test_the_first_wait_can_be_shorter_than_the_timeout() -> None:
    wire = Wire()
    asked = wire.peer.request("tools/call", {}, timeout=10, first=1)
    wire.clock.advance(1)
    assert failure_of(asked).check(UpstreamTimeout)


def test_progress_restarts_the_timeout_and_reaches_the_caller_with_its_token() -> None:
    wire = Wire()
    progress: list[dict[str, Any]] = []
    asked = wire.peer.request(
        "tools/call", {"name": "slow", "_meta": {"progressToken": "mine", "other": 1}},
        timeout=2, on_progress=progress.append)
    assert wire.sent[0]["params"]["_meta"] == {"progressToken": 1, "other": 1}
    for step in (1, 2, 3):
        wire.clock.advance(1.5)
        # The token as the request's id, or echoed as its digits: the same request.
        token: Any = 1 if step != 2 else "1"
        wire.peer.received(jsonrpc.notification(
            "notifications/progress", {"progressToken": token, "progress": step}))
    wire.clock.advance(1.5)  # 6 s in all, three times the timeout
    assert not asked.called
    assert progress == [{"progressToken": "mine", "progress": step} for step in (1, 2, 3)]
    assert wire.notifications == []
    wire.clock.advance(0.5)
    assert failure_of(asked).check(UpstreamTimeout)


def test_progress_of_a_request_that_relays_none_is_a_plain_notification() -> None:
    wire = Wire()
    wire.peer.request("tools/call", {}, timeout=2)
    stray = jsonrpc.notification("notifications/progress", {"progressToken": 1, "progress": 1})
    wire.peer.received(stray)
    assert wire.notifications == [stray]


def test_a_failing_hook_is_logged_and_nothing_else_notices(logged_failures: list[str]) -> None:
    """As over every transport (tests/test_upstream_transports_agree.py)."""
    wire = Wire()

    def broken(_: Any) -> None:
        raise RuntimeError("bug in the gateway")

    wire.peer = Peer("up", wire.send, wire.clock, on_request=default_request_handler,
                     on_notification=broken)
    asked = wire.peer.request("tools/call", {"_meta": {"progressToken": 5}}, timeout=2,
                              on_progress=broken)
    wire.peer.received(jsonrpc.notification("notifications/progress",
                                            {"progressToken": 1, "progress": 1}))
    wire.peer.received(jsonrpc.notification("notifications/tools/list_changed"))
    wire.peer.received(jsonrpc.result(1, {"ok": True}))
    assert result_of(asked) == {"ok": True}
    assert logged_failures == ["[up] on_progress failed", "[up] on_notification failed"]


def test_cancelling_the_deferred_sends_notifications_cancelled_with_the_upstream_id() -> None:
    wire = Wire()
    wire.peer.request("ping", None, timeout=5)
    asked = wire.peer.request("tools/call", {}, timeout=5)
    asked.cancel()
    assert failure_of(asked).check(defer.CancelledError)
    assert wire.cancellations() == [{"requestId": 2, "reason": "cancelled by the client"}]
    wire.clock.advance(4.9)  # its timer is gone with it
    assert wire.cancellations() == [{"requestId": 2, "reason": "cancelled by the client"}]
    assert wire.peer.pending == 1


def test_handshake_requests_and_unsent_ones_are_never_cancelled_upstream() -> None:
    wire = Wire()
    initialize = wire.peer.request("initialize", {}, timeout=1, handshake=True)
    waiting = wire.peer.open("tools/call", {}, timeout=1)  # the transport has not sent it
    wire.clock.advance(1)
    assert failure_of(initialize).check(UpstreamTimeout)
    assert failure_of(waiting.deferred).check(UpstreamTimeout)
    assert wire.cancellations() == []


def test_unencodable_params_fail_at_once_with_invalid_params() -> None:
    wire = Wire()
    asked = wire.peer.request("tools/call", {"arguments": {"ratio": float("nan")}}, timeout=5)
    failure = failure_of(asked)
    assert failure.check(UpstreamRequestError)
    assert failure.value.error["code"] == INVALID_PARAMS
    assert wire.sent == [] and wire.peer.pending == 0
    wire.clock.advance(10)
    assert wire.cancellations() == []


def test_a_refusing_transport_fails_the_request_at_once() -> None:
    clock = task.Clock()

    def refuse(message: Message) -> None:
        raise UpstreamError("[up] the server is not reading its input")

    peer = Peer("up", refuse, clock, on_request=default_request_handler,
                on_notification=lambda message: None)
    failure = failure_of(peer.request("tools/call", {}, timeout=5))
    assert str(failure.value) == "[up] the server is not reading its input"
    assert peer.pending == 0 and clock.getDelayedCalls() == []


def test_a_server_request_is_answered() -> None:
    wire = Wire()

    async def roots(method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert (method, params) == ("roots/list", {"x": 1})
        return {"roots": []}

    wire.peer.received(jsonrpc.request(7, "sampling/createMessage"))  # the default: -32601
    wire.on_request = roots
    wire.peer.received(jsonrpc.request("s-1", "roots/list", {"x": 1}))
    assert wire.sent[0]["id"] == 7 and wire.sent[0]["error"]["code"] == METHOD_NOT_FOUND
    assert wire.sent[1] == jsonrpc.result("s-1", {"roots": []})


def test_a_server_request_that_fails_is_answered_with_an_error() -> None:
    wire = Wire()

    async def failing(method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method == "elicitation/create":
            raise ProtocolError(RESOURCE_NOT_FOUND, "declined", {"reason": "user"})
        raise KeyError("a bug")

    wire.on_request = failing
    wire.peer.received(jsonrpc.request(1, "elicitation/create"))
    wire.peer.received(jsonrpc.request(2, "roots/list"))
    assert wire.sent[0] == jsonrpc.error(1, RESOURCE_NOT_FOUND, "declined", {"reason": "user"})
    assert wire.sent[1]["id"] == 2 and wire.sent[1]["error"]["code"] == INTERNAL_ERROR
    assert "a bug" in wire.sent[1]["error"]["message"]


def test_an_unencodable_answer_is_replaced_by_an_internal_error() -> None:
    wire = Wire()

    async def odd(method: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"value": float("inf")}

    wire.on_request = odd
    wire.peer.received(jsonrpc.request(3, "roots/list"))
    assert [m["id"] for m in wire.sent] == [3]
    assert wire.sent[0]["error"]["code"] == INTERNAL_ERROR


def test_the_server_cancels_its_own_request_which_is_then_never_answered() -> None:
    wire = Wire()
    answering, cancelled = cancellable()
    wire.on_request = lambda method, params: answering
    wire.peer.received(jsonrpc.request("r", "sampling/createMessage"))
    wire.peer.received(jsonrpc.notification("notifications/cancelled",
                                            {"requestId": "r", "reason": "changed my mind"}))
    assert cancelled == [True]
    assert wire.sent == [] and wire.notifications == []


def test_a_cancellation_of_a_finished_server_request_is_swallowed() -> None:
    wire = Wire()
    wire.peer.received(jsonrpc.request("p", "ping"))
    assert wire.sent == [jsonrpc.result("p", {})]
    for request_id in ("p", "never-made", None):
        wire.peer.received(jsonrpc.notification("notifications/cancelled",
                                                {"requestId": request_id}))
    assert wire.notifications == [] and wire.sent == [jsonrpc.result("p", {})]


def test_server_requests_on_a_requests_stream_end_with_it() -> None:
    wire = Wire()
    answering, cancelled = cancellable()
    wire.on_request = lambda method, params: answering
    origin = wire.peer.open("tools/call", {}, timeout=5)
    wire.peer.transmit(origin)
    wire.peer.received(jsonrpc.request("s", "elicitation/create"), origin)
    wire.peer.received(jsonrpc.result(1, {"done": True}), origin)
    assert result_of(origin.deferred) == {"done": True}
    assert cancelled == [True]
    assert wire.sent == [origin.message]


def test_fail_all_fails_every_request_and_drops_the_server_requests() -> None:
    wire = Wire()
    answering, cancelled = cancellable()
    wire.on_request = lambda method, params: answering
    asked = [wire.peer.request("tools/call", {"n": n}, timeout=5) for n in range(3)]
    wire.peer.received(jsonrpc.request("s", "roots/list"))
    wire.peer.fail_all(UpstreamError("[up] process exited"))
    assert [str(failure_of(each).value) for each in asked] == ["[up] process exited"] * 3
    assert cancelled == [True]
    assert wire.peer.pending == 0 and wire.clock.getDelayedCalls() == []
    assert wire.cancellations() == []
    wire.peer.received(jsonrpc.result(2, {}))  # late: dropped
    assert wire.peer.request("ping", None, timeout=5) is not None  # the peer goes on


def test_an_answer_that_is_not_an_object_fails_the_request() -> None:
    wire = Wire()
    asked = wire.peer.request("ping", None, timeout=5)
    wire.peer.received({"jsonrpc": "2.0", "id": 1, "result": 7})
    assert "not a JSON object" in str(failure_of(asked).value)


@pytest.mark.parametrize("bad", [{"progressToken": True}, []])
def test_odd_progress_params_are_plain_notifications(bad: Any) -> None:
    wire = Wire()
    wire.peer.request("tools/call", {"_meta": {"progressToken": 1}}, timeout=5)
    stray = jsonrpc.notification("notifications/progress", bad)
    wire.peer.received(stray)
    assert wire.notifications == [stray]
