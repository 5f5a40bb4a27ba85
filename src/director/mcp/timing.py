"""A client request and its upstream requests timed for the metrics (and traced when on).

A client request's duration minus the time it waited for upstream answers is the gateway's own
(``UpstreamWait``); each upstream request is timed per server with its outcome. Time comes from
the engine's clock (``director.mcp.clock``).
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from director import tracing
from director.mcp.upstream.base import UpstreamRequestError, UpstreamSession, UpstreamTimeout
from director.playbooks.model import Server

if TYPE_CHECKING:
    from uuid import UUID

    from director.mcp.downstream import DownstreamSession
    from director.metrics import Metrics


class UpstreamWait:
    """How long one client request waited for upstream answers (overlapping waits counted
    once): the request's time minus this is the gateway's own, for metrics."""

    __slots__ = ("outstanding", "since", "total")

    def __init__(self) -> None:
        self.outstanding = 0
        self.since = 0.0
        self.total = 0.0

    def begin(self, now: float) -> None:
        if self.outstanding == 0:
            self.since = now
        self.outstanding += 1

    def end(self, now: float) -> None:
        self.outstanding -= 1
        if self.outstanding == 0:
            self.total += now - self.since


#: The ``UpstreamWait`` of the client request being handled (set only when metrics are on;
#: each request runs in a context of its own, which Twisted copies for every coroutine).
_WAITING: ContextVar[UpstreamWait | None] = ContextVar("director_upstream_wait", default=None)


class ClientRequestTiming:
    """One client request being timed: from its creation to ``done``, in its own context."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.started = clock.seconds()
        self.waited = UpstreamWait()
        self._token: Token[UpstreamWait | None] = _WAITING.set(self.waited)

    def done(self, metrics: Metrics, method: Any, outcome: str, playbook_pk: UUID) -> None:
        _WAITING.reset(self._token)
        metrics.mcp_request(method, outcome, self.clock.seconds() - self.started, playbook_pk,
                            self.waited.total)


def outcome_of(failure: BaseException) -> str:
    """How an upstream request failed, as the metrics label it."""
    if isinstance(failure, UpstreamTimeout):
        return "timeout"
    if isinstance(failure, UpstreamRequestError):
        return "error"
    if isinstance(failure, defer.CancelledError):
        return "cancelled"
    return "failed"


async def upstream_request(downstream: DownstreamSession, server: Server,
                           session: UpstreamSession, method: str,
                           params: dict[str, Any] | None, **options: Any) -> dict[str, Any]:
    """``session.request`` for ``downstream``, timed for the metrics (per server, and as the
    client request's wait) when they are on, in a client span when tracing is."""
    if not tracing.spans():
        return await _timed_request(downstream, server, session, method, params, **options)
    span = tracing.upstream_span(server.name, session, method, params)
    token = tracing.attach(span)
    try:
        result = await _timed_request(downstream, server, session, method, params, **options)
        tracing.result_outcome(span, result)
        return result
    except BaseException as failure:
        tracing.fail(span, failure)
        raise
    finally:
        tracing.detach(token)
        span.end()


async def _timed_request(downstream: DownstreamSession, server: Server,
                         session: UpstreamSession, method: str, params: dict[str, Any] | None,
                         **options: Any) -> dict[str, Any]:
    metrics = downstream.engine.metrics
    if metrics is None:
        return await session.request(method, params, **options)
    clock = downstream.engine.clock
    waited = _WAITING.get()
    started = clock.seconds()
    if waited is not None:
        waited.begin(started)
    outcome = "failed"
    try:
        result = await session.request(method, params, **options)
        outcome = "ok"
        return result
    except BaseException as failure:
        outcome = outcome_of(failure)
        raise
    finally:
        now = clock.seconds()
        if waited is not None:
            waited.end(now)
        metrics.upstream_request(downstream.playbook_pk, server.name, outcome, now - started)
