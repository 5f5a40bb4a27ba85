"""The session layer's clock: the reactor's timers, and monotonic time to measure with.

The downstream sessions, their streams and the shared-session upkeep take an ``IReactorTime``
from the service tree, so that tests drive them with ``task.Clock``. In the daemon it is a
``MonotonicClock``: ``reactor.seconds()`` is wall-clock time, and what these modules measure
are durations — a session's idleness, a reader stuck behind back-pressure, a request's time for
the metrics. A wall-clock step (NTP, a resumed VM) would otherwise end every idle session at
once, cut slow readers, or record a negative duration in a histogram.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer


@implementer(IReactorTime)
class MonotonicClock:
    """``reactor``'s timers, with ``seconds()`` from ``time.monotonic``: its timers take
    delays, so their schedule is unaffected (``LoopingCall`` computes them from ``seconds``)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def seconds(self) -> float:
        return time.monotonic()

    def callLater(self, delay: float, function: Callable[..., object], *args: object,
                  **kwargs: object) -> IDelayedCall:
        return self._reactor.callLater(delay, function, *args, **kwargs)

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        return self._reactor.getDelayedCalls()
