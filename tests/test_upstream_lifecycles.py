"""The upstream lifecycle machines in process: the stdio upstream's (``stdio_lifecycle``)
driven with a core that records its outputs, the ``subscriptions/listen`` stream's
(``listen_lifecycle``) through the real ``ChangeListener``; ``task.Clock`` for time. The
transports' own tests drive both through real processes and servers. (The Streamable HTTP GET
stream's: tests/test_upstream_get_stream.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from automat import NoTransition
from twisted.internet import defer, task

from director.mcp.protocol import METHOD_NOT_FOUND
from director.mcp.upstream.base import UpstreamError, UpstreamRequestError
from director.mcp.upstream.envelope import LISTEN_KINDS, ChangeListener
from director.mcp.upstream.listen_lifecycle import lifecycle as listen_lifecycle
from director.mcp.upstream.stdio_lifecycle import REPORTED, StdioLifecycle, lifecycle

# --- stdio ---------------------------------------------------------------------------------


class Core:
    """A ``StdioCore`` that records each output as ``(name, *arguments)``; the restart delay
    is one second of ``clock``, and a refusal fails with the message (or "last error")."""

    name = "up"

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.state = "idle"
        self.outputs: list[tuple[Any, ...]] = []
        self.inputs: StdioLifecycle = lifecycle(self)

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_") or name.startswith("__"):
            raise AttributeError(name)
        return lambda *args: self.outputs.append((name, *args))

    def _entered(self, state: str) -> None:
        self.state = state

    def _schedule_restart(self) -> None:
        self.outputs.append(("_schedule_restart",))
        self.clock.callLater(1.0, self.inputs.delay_elapsed)

    def _answer(self, ready: defer.Deferred[None]) -> None:
        ready.callback(None)

    def _refuse(self, ready: defer.Deferred[None], message: str | None) -> None:
        ready.errback(UpstreamError(message or "last error"))

    def taken(self) -> list[tuple[Any, ...]]:
        """The outputs since the last call, by name (Deferreds left out)."""
        outputs, self.outputs = self.outputs, []
        return [tuple(a for a in output if not isinstance(a, defer.Deferred))
                for output in outputs]


def started() -> Core:
    core = Core()
    core.inputs.start(defer.Deferred(), 5.0)
    core.inputs.launched()
    assert core.state == "ready"
    core.taken()
    return core


def outcome(deferred: defer.Deferred[None]) -> str:
    """"ok", "waiting", or the failure's message."""
    seen: list[str] = []
    deferred.addCallbacks(lambda _: seen.append("ok"),
                          lambda failure: seen.append(failure.getErrorMessage()))
    return seen[0] if seen else "waiting"


def test_first_start_and_wait_ready() -> None:
    core = Core()
    idle: defer.Deferred[None] = defer.Deferred()
    core.inputs.wait_ready(idle, 5.0)
    assert outcome(idle) == "[up] not started"

    ready: defer.Deferred[None] = defer.Deferred()
    core.inputs.start(ready, 5.0)
    assert core.state == "starting" and REPORTED[core.state] == "starting"
    assert core.outputs == [("_launch_first", ready)]
    core.taken()

    # A second start, and a request, wait for the first.
    second: defer.Deferred[None] = defer.Deferred()
    request: defer.Deferred[None] = defer.Deferred()
    core.inputs.start(second, 5.0)
    core.inputs.wait_ready(request, 7.0)
    assert core.outputs == [("_add_waiter", second, 5.0), ("_add_waiter", request, 7.0)]
    core.taken()

    core.inputs.launched()
    assert core.state == "ready" and core.taken() == [("_became_ready",)]
    now: defer.Deferred[None] = defer.Deferred()
    core.inputs.wait_ready(now, 1.0)
    assert outcome(now) == "ok"
    core.inputs.start(now := defer.Deferred(), 1.0)
    assert outcome(now) == "ok"


def test_a_failed_first_start_is_final() -> None:
    core = Core()
    core.inputs.start(defer.Deferred(), 5.0)
    core.inputs.ended("[up] failed to run 'x': exit 3")  # before its handshake answered
    assert core.state == "starting"
    core.inputs.launch_failed("[up] failed to run 'x': exit 3")
    assert core.state == "failed" and REPORTED[core.state] == "failed"
    assert core.taken() == [("_launch_first",), ("_fail_pending", "[up] failed to run 'x': exit 3"),
                            ("_failed", "[up] failed to run 'x': exit 3")]
    for symbol in (core.inputs.start, core.inputs.wait_ready):
        refused: defer.Deferred[None] = defer.Deferred()
        symbol(refused, 5.0)
        assert outcome(refused) == "last error"
    assert core.clock.getDelayedCalls() == []  # no restart after a first start


def test_crash_restart_backoff_and_recovery() -> None:
    core = started()
    core.inputs.exiting()
    assert core.state == "exiting" and REPORTED[core.state] == "restarting"
    core.inputs.exiting()  # told again (an oversized line, then the exit): nothing more
    waiter: defer.Deferred[None] = defer.Deferred()
    core.inputs.wait_ready(waiter, 30.0)
    core.inputs.ended("[up] process exited unexpectedly: exit 1")
    assert core.state == "waiting"
    assert core.taken() == [("_add_waiter", 30.0),
                            ("_lost", "[up] process exited unexpectedly: exit 1"),
                            ("_schedule_restart",)]

    core.clock.advance(1.0)
    assert core.state == "relaunching" and core.taken() == [("_relaunch",)]
    core.inputs.launch_failed("[up] initialize failed: no")
    assert core.state == "retrying" and REPORTED[core.state] == "failed"
    assert core.taken() == [("_restart_failed", "[up] initialize failed: no"),
                            ("_schedule_restart",)]
    refused: defer.Deferred[None] = defer.Deferred()
    core.inputs.wait_ready(refused, 5.0)
    assert outcome(refused) == "last error"  # fails at once while the last attempt failed

    core.clock.advance(1.0)
    assert core.state == "relaunching"
    core.inputs.launched()
    assert core.state == "ready"
    assert core.taken() == [("_relaunch",), ("_became_ready",), ("_restored",)]


def test_without_restart_an_exit_is_final() -> None:
    core = started()
    core.inputs.exiting_for_good("[up] process exited")
    assert core.state == "stopping" and REPORTED[core.state] == "failed"
    core.inputs.exiting_for_good("[up] process exited")
    core.inputs.ended("[up] process exited unexpectedly: exit 1")
    assert core.state == "failed"
    assert core.taken() == [("_exited_for_good", "[up] process exited"),
                            ("_lost", "[up] process exited unexpectedly: exit 1"),
                            ("_failed", "[up] process exited unexpectedly: exit 1")]
    assert core.clock.getDelayedCalls() == []


def test_notifications_go_to_a_ready_child_only() -> None:
    core = Core()
    core.inputs.notify("notifications/roots/list_changed", None)
    core.inputs.start(defer.Deferred(), 5.0)
    core.inputs.notify("notifications/roots/list_changed", None)
    core.inputs.launched()
    core.inputs.notify("notifications/roots/list_changed", {"a": 1})
    core.inputs.exiting()
    core.inputs.notify("notifications/roots/list_changed", None)
    assert [o for o in core.taken() if "notification" in o[0]] == [
        ("_drop_notification", "notifications/roots/list_changed"),
        ("_drop_notification", "notifications/roots/list_changed"),
        ("_send_notification", "notifications/roots/list_changed", {"a": 1}),
        ("_drop_notification", "notifications/roots/list_changed")]


@pytest.mark.parametrize("where", ["idle", "starting", "ready", "exiting", "waiting",
                                   "relaunching", "retrying", "stopping", "failed"])
def test_close_from_every_state(where: str) -> None:
    core = Core()
    drive = {
        "starting": [("start", defer.Deferred(), 5.0)],
        "ready": [("start", defer.Deferred(), 5.0), ("launched",)],
        "exiting": [("start", defer.Deferred(), 5.0), ("launched",), ("exiting",)],
        "waiting": [("start", defer.Deferred(), 5.0), ("launched",), ("exiting",),
                    ("ended", "gone")],
        "relaunching": [("start", defer.Deferred(), 5.0), ("launched",), ("exiting",),
                        ("ended", "gone"), ("delay_elapsed",)],
        "retrying": [("start", defer.Deferred(), 5.0), ("launched",), ("exiting",),
                     ("ended", "gone"), ("delay_elapsed",), ("launch_failed", "no")],
        "stopping": [("start", defer.Deferred(), 5.0), ("launched",),
                     ("exiting_for_good", "gone")],
        "failed": [("start", defer.Deferred(), 5.0), ("launch_failed", "no")],
    }.get(where, [])
    for symbol, *arguments in drive:
        getattr(core.inputs, symbol)(*arguments)
    assert core.state == where
    core.taken()

    first: defer.Deferred[None] = defer.Deferred()
    second: defer.Deferred[None] = defer.Deferred()
    core.inputs.close(first)
    assert core.state == "closing" and REPORTED[core.state] == "closed"
    assert core.outputs == [("_shut_down", first)]
    core.clock.advance(1.0)  # a restart timer close() raced is ignored
    core.inputs.close(second)
    # Late news of the child and of a handshake changes nothing.
    core.inputs.launched()
    core.inputs.launch_failed("late")
    core.inputs.exiting()
    core.inputs.ended("late")
    refused: defer.Deferred[None] = defer.Deferred()
    core.inputs.start(refused, 5.0)
    assert outcome(refused) == "[up] closed"
    core.inputs.reaped()
    assert core.state == "closed"
    assert core.taken() == [("_shut_down",), ("_join_shutdown",),
                            ("_fail_pending", "[up] closed"), ("_closed",)]
    third: defer.Deferred[None] = defer.Deferred()
    core.inputs.close(third)
    assert outcome(third) == "ok"
    core.inputs.wait_ready(refused := defer.Deferred(), 5.0)
    assert outcome(refused) == "[up] closed"


@pytest.mark.parametrize(("where", "symbol", "arguments"), [
    ("idle", "launched", ()),
    ("idle", "ended", ("gone",)),
    ("idle", "delay_elapsed", ()),
    ("ready", "launched", ()),
    ("ready", "delay_elapsed", ()),
    ("ready", "reaped", ()),
    ("waiting", "ended", ("gone",)),
    ("waiting", "launched", ()),
    ("failed", "delay_elapsed", ()),
    ("failed", "exiting", ()),
])
def test_impossible_inputs_are_refused(where: str, symbol: str, arguments: tuple[Any, ...]
                                       ) -> None:
    core = Core()
    if where != "idle":
        core.inputs.start(defer.Deferred(), 5.0)
        if where == "failed":
            core.inputs.launch_failed("no")
        else:
            core.inputs.launched()
        if where == "waiting":
            core.inputs.exiting()
            core.inputs.ended("gone")
    core.taken()
    with pytest.raises(NoTransition):
        getattr(core.inputs, symbol)(*arguments)
    assert core.state == where and core.outputs == []


def test_outputs_run_once_the_machine_has_settled() -> None:
    """``on_closed`` calling ``close()`` (or a failed start's caller reading ``state``) finds
    the machine in its new state; the outputs keep their order."""
    core = started()
    seen: list[str] = []

    def lost(message: str) -> None:
        seen.append(core.state)
        core.outputs.append(("_lost", message))
        core.inputs.close(defer.Deferred())
        seen.append(core.state)

    core._lost = lost  # type: ignore[method-assign]
    core.inputs.exiting()
    core.inputs.ended("gone")
    assert seen == ["waiting", "closing"]
    assert core.taken() == [("_lost", "gone"), ("_schedule_restart",), ("_shut_down",)]


# --- subscriptions/listen ------------------------------------------------------------------


class Streams:
    """``ChangeListener``'s ``listen``: each stream is a Deferred the test ends."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.opened: list[tuple[dict[str, Any], defer.Deferred[Any]]] = []
        self.listener = ChangeListener("up", self.listen, self.clock)

    async def listen(self, params: dict[str, Any]) -> Any:
        stream: defer.Deferred[Any] = defer.Deferred()
        self.opened.append((params, stream))
        return await stream

    @property
    def last(self) -> defer.Deferred[Any]:
        return self.opened[-1][1]


def test_listen_opens_once_and_reopens_with_backoff() -> None:
    streams = Streams()
    listener = streams.listener
    assert listener.state == "idle" and not listener.listening
    listener.start()
    listener.start()
    assert listener.state == "listening" and len(streams.opened) == 1
    assert streams.opened[0][0] == {"notifications": dict.fromkeys(LISTEN_KINDS, True)}

    streams.last.callback({})  # the stream ended
    assert listener.state == "waiting" and not listener.listening
    listener.start()  # waiting already: nothing
    streams.clock.advance(0.99)
    assert len(streams.opened) == 1
    streams.clock.advance(0.01)
    assert listener.state == "listening" and len(streams.opened) == 2

    streams.last.errback(UpstreamError("[up] connection lost"))
    assert listener.state == "waiting"
    streams.clock.advance(1.99)  # the delay doubled
    assert len(streams.opened) == 2
    streams.clock.advance(0.01)
    assert listener.state == "listening" and len(streams.opened) == 3


def test_listen_subscriptions_reopen_the_stream() -> None:
    streams = Streams()
    listener = streams.listener
    listener.subscribe("file:///a")  # before start: opens with the filter
    assert listener.state == "listening"
    first = streams.last
    listener.subscribe("file:///a")  # counted, same filter: nothing
    listener.subscribe("file:///b")
    assert len(streams.opened) == 2
    assert streams.opened[1][0]["notifications"]["resourceSubscriptions"] == [
        "file:///a", "file:///b"]
    assert first.called  # cancelled; its end is expected, not a reason to reconnect
    assert listener.state == "listening" and streams.clock.getDelayedCalls() == []

    streams.last.callback({})
    assert listener.state == "waiting"
    listener.unsubscribe("file:///b")  # waiting: opens at once, the retry forgotten
    assert listener.state == "listening" and streams.clock.getDelayedCalls() == []
    assert streams.opened[-1][0]["notifications"]["resourceSubscriptions"] == ["file:///a"]


def test_listen_unsupported_is_not_asked_again() -> None:
    streams = Streams()
    listener = streams.listener
    listener.start()
    streams.last.errback(UpstreamRequestError("up", {"code": METHOD_NOT_FOUND,
                                                     "message": "no"}))
    assert listener.state == "unsupported"
    listener.start()
    listener.subscribe("file:///a")
    assert len(streams.opened) == 1 and streams.clock.getDelayedCalls() == []
    listener.stop()
    assert listener.state == "stopped"


@pytest.mark.parametrize("where", ["idle", "listening", "waiting"])
def test_listen_stop_from_every_state(where: str) -> None:
    streams = Streams()
    listener = streams.listener
    if where != "idle":
        listener.start()
    if where == "waiting":
        streams.last.callback({})
    assert listener.state == where
    listener.stop()
    assert listener.state == "stopped" and not listener.listening
    assert streams.clock.getDelayedCalls() == []
    if where == "listening":
        assert streams.last.called  # cancelled
    listener.start()
    listener.subscribe("file:///a")
    listener.stop()
    assert listener.state == "stopped"
    assert len(streams.opened) == (0 if where == "idle" else 1)


class RecordingCore:
    """A machine's core that records each output as ``(name, *arguments)``."""

    def __init__(self) -> None:
        self.state = "idle"
        self.outputs: list[tuple[Any, ...]] = []

    def _entered(self, state: str) -> None:
        self.state = state

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_") or name.startswith("__"):
            raise AttributeError(name)
        return lambda *args: self.outputs.append((name, *args))


@pytest.mark.parametrize(("drive", "symbol"), [
    ((), "ended"),
    ((), "refused"),
    ((), "delay_elapsed"),
    (("start",), "delay_elapsed"),
    (("start", "ended"), "ended"),
    (("start", "ended"), "refused"),
    (("start", "refused"), "ended"),
    (("stop",), "ended"),
    (("stop",), "delay_elapsed"),
])
def test_listen_impossible_inputs_are_refused(drive: tuple[str, ...], symbol: str) -> None:
    core = RecordingCore()
    inputs = listen_lifecycle(core)
    for name in drive:
        getattr(inputs, name)()
    before, outputs = core.state, list(core.outputs)
    with pytest.raises(NoTransition):
        getattr(inputs, symbol)()
    assert (core.state, core.outputs) == (before, outputs)

