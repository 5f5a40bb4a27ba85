"""The clock that time-dependent code outside the MCP engine takes: the reactor in the daemon
(``IReactorTime``, passed down the service tree), ``task.Clock`` in tests.

``seconds()`` is the wall clock (Twisted's reactors read ``time.time``), and so are the times
of every ``callLater`` and ``LoopingCall``: what is compared with a time stored in the database
(a session's or a token's expiry, a rate limit's leases) must be that clock, and a deadline
read from it moves with a clock step exactly as the timer that checks it does.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import task
from twisted.internet.interfaces import IDelayedCall


class Clock(Protocol):
    """What of ``IReactorTime`` is read here (a Protocol: mypy cannot check zope interfaces'
    methods, which are declared without ``self``)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kwargs: Any) -> IDelayedCall: ...


def repeating(clock: Clock, seconds: float, call: Callable[[], object],
              now: bool = False) -> task.LoopingCall:
    """``call`` every ``seconds`` of ``clock`` from now on (the first at once with ``now``)."""
    loop = task.LoopingCall(call)
    loop.clock = clock  # type: ignore[assignment]
    loop.start(seconds, now=now)
    return loop


def stop_repeating(loop: task.LoopingCall | None) -> None:
    if loop is not None and loop.running:
        loop.stop()


def utc_now(clock: Clock) -> datetime.datetime:
    """``clock``'s time as an aware UTC datetime, to compare with ``timestamptz`` columns."""
    return datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)
