"""How long to wait before trying again: the one delay policy of the upstream transports.

A stdio server's restart, the Streamable HTTP GET stream's reconnection, a dropped POST
stream's resumption, the stateless era's ``subscriptions/listen`` and its ``input_required``
polling all wait ``initial`` seconds after a first failure, ``factor`` times longer after each
further one, never more than ``cap``. Success resets it: at once (``succeeded()``), or once
what was started has kept running ``healthy_after`` seconds (``running()``; a process that
dies right after each start must not be respawned in a tight loop). A server may name its own
delay (SSE ``retry:``): ``prefer()`` makes it the next one, growing from there.
"""

from __future__ import annotations

from typing import Protocol


class Seconds(Protocol):
    """The part of ``IReactorTime`` a backoff reads (a zope interface is no type to mypy)."""

    def seconds(self) -> float: ...


class Backoff:
    """Successive delays: ``initial``, then ``factor`` times the last, at most ``cap``."""

    def __init__(self, initial: float, cap: float, *, factor: float = 2.0,
                 healthy_after: float | None = None, clock: Seconds | None = None) -> None:
        if healthy_after is not None and clock is None:
            raise ValueError("healthy_after needs a clock")
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.healthy_after = healthy_after
        self._clock = clock
        self._next = initial
        self._running_since: float | None = None

    def next_delay(self) -> float:
        """The delay to wait now (after a failure); the following one grows."""
        if self._running_since is not None:
            assert self._clock is not None and self.healthy_after is not None
            if self._clock.seconds() - self._running_since >= self.healthy_after:
                self._next = self.initial
            self._running_since = None
        delay = self._next
        self._next = min(max(delay, self.initial) * self.factor, self.cap)
        return delay

    def succeeded(self) -> None:
        """It worked: the next failure waits ``initial`` again."""
        self._next = self.initial
        self._running_since = None

    def running(self) -> None:
        """It started: if it keeps running ``healthy_after`` seconds, that is a success."""
        assert self._clock is not None, "running() needs a clock"
        self._running_since = self._clock.seconds()

    def prefer(self, seconds: float) -> None:
        """The server asked for this delay (SSE ``retry:``): it is the next one."""
        self._next = max(seconds, 0.0)
