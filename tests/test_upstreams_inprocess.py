"""The upstream manager in process: fake upstream sessions and Twisted's ``task.Clock``, so
that backoff after a failed start, the start's deadline and a restored session are tested exactly,
without sleeping or starting a process (the real-process tests, e.g.
tests/test_slow_upstreams.py, stay the acceptance layer)."""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet import defer, task
from twisted.python.failure import Failure

from director.config import load_settings
from director.mcp.upstream.base import UpstreamError
from director.mcp.upstreams import RETRY_AFTER_FAILURE_SECONDS, Upstream, UpstreamManager
from director.playbooks.model import Server

SERVER = Server(name="remote", type="http", url="https://mcp.example.com/mcp",
                timeout_seconds=5)


class FakeSession:
    """An ``UpstreamSession`` whose start the test decides: ``"ok"``, ``"fail"`` or
    ``"hang"`` (a start that never ends until cancelled)."""

    def __init__(self, start: str) -> None:
        self.name = SERVER.name
        self.initialize_result: dict[str, Any] = {"capabilities": {"tools": {}}}
        self.on_notification: Any = None
        self.on_request: Any = None
        self.on_closed: Any = None
        self.on_restored: Any = None
        self.behaviour = start
        self.closed = False

    async def start(self) -> None:
        if self.behaviour == "fail":
            raise UpstreamError(f"[{self.name}] refused to start")
        if self.behaviour == "hang":
            await defer.Deferred()

    async def request(self, method: str, params: dict[str, Any] | None = None, *,
                      timeout: float = 60.0, on_progress: Any = None) -> dict[str, Any]:
        return {}

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


class Harness:
    def __init__(self, *starts: str) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_000_000)  # a wall clock's worth: retry_at 0.0 is long past
        self.starts = list(starts)
        self.made: list[FakeSession] = []
        self.manager = UpstreamManager(self.factory, load_settings({}), clock=self.clock)

    def factory(self, server: Server, era: str, playbook_pk: Any,
                client_capabilities: Any) -> FakeSession:
        session = FakeSession(self.starts.pop(0))
        self.made.append(session)
        return session

    def upstream(self) -> Upstream:
        return self.manager.upstream_for(uuid.uuid4(), SERVER, {}, object())

    def ready(self, upstream: Upstream) -> defer.Deferred[Any]:
        return defer.ensureDeferred(self.manager.ready(upstream))


def failure_of(d: defer.Deferred[Any]) -> Failure:
    assert d.called, "still waiting"
    outcome = d.result
    assert isinstance(outcome, Failure), outcome
    d.addErrback(lambda _: None)
    return outcome


def test_a_failed_start_is_retried_only_after_its_pause() -> None:
    harness = Harness("fail", "ok")
    upstream = harness.upstream()
    first = failure_of(harness.ready(upstream))
    assert first.check(UpstreamError) and str(first.value) == "[remote] refused to start"
    # Within the pause: refused at once with the same reason, no new session made.
    harness.clock.advance(RETRY_AFTER_FAILURE_SECONDS - 0.25)
    assert str(failure_of(harness.ready(upstream)).value) == "[remote] refused to start"
    assert len(harness.made) == 1 and harness.made[0].closed
    # The pause over: started again.
    harness.clock.advance(0.25)
    started = harness.ready(upstream)
    assert started.called and started.result is harness.made[1]
    assert len(harness.made) == 2


def test_a_start_is_bounded_by_the_servers_timeout() -> None:
    harness = Harness("hang")
    upstream = harness.upstream()
    starting = harness.ready(upstream)
    harness.clock.advance(SERVER.timeout_seconds - 0.25)
    assert not starting.called
    harness.clock.advance(0.25)
    timed_out = failure_of(starting)
    assert str(timed_out.value) == "[remote] did not start within 5 s (its timeout_seconds)"
    assert harness.made[0].closed  # nothing of it lingers


def test_a_restored_session_is_told_again_and_its_lists_forgotten() -> None:
    harness = Harness("ok")
    restored: list[Upstream] = []
    harness.manager.on_restored = restored.append
    upstream = harness.upstream()
    session = harness.ready(upstream).result
    upstream.lists["tools"] = [{"name": "stale"}]
    session.on_restored({"capabilities": {}})
    assert restored == [upstream] and upstream.lists == {}


def test_waiters_share_one_start_and_its_outcome() -> None:
    harness = Harness("hang")
    upstream = harness.upstream()
    waiters = [harness.ready(upstream) for _ in range(3)]
    assert len(harness.made) == 1
    harness.clock.advance(SERVER.timeout_seconds)
    assert {str(failure_of(waiter).value) for waiter in waiters} == {
        "[remote] did not start within 5 s (its timeout_seconds)"}
