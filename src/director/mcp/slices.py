"""Work over every stream or session of the process, a slice per reactor turn.

Some events concern everything a process holds: a playbook change tells each of its sessions,
a heartbeat writes to each open stream. Done in one go, 10,000 of them hold the reactor for
100 to 200 ms on a shared 2-core machine, and every other request waits that long. Done
a slice at a time with the reactor's turns in between, a request arriving meanwhile waits for
one slice; the whole takes a few per cent longer (bench ``mcp``: "worst latency of a
concurrent /api/health" during a fan-out).

A slice ends after ``SLICE`` items or ``SLICE_SECONDS`` by the clock, whichever comes first.
A request needs several turns (accepted, read, its database query answered, written), each of
which may run one slice: a count alone, set on a quiet machine, lets a slice take two or three
times as long on a busy one, and the request wait that many times longer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

Item = TypeVar("Item")

#: Items handled per reactor turn at most, and the time a turn's slice may take at most
#: (a quiet 2-core machine writes 256 streams' events in about 2 ms).
SLICE = 256
SLICE_SECONDS = 0.002
#: How many items go by between two looks at the clock.
_CLOCK_EVERY = 16


class Slicer:
    """Runs such work, and knows whether some is under way (``running``): the collector's
    full passes wait until none is (``director.collector``)."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.running = 0

    def run(self, items: Sequence[Item], act: Callable[[Item], object]) -> None:
        """``act(item)`` for each of ``items``: a slice of them now, the rest on the following
        turns of ``clock`` (a reactor runs a call scheduled with no delay on its next turn,
        after the I/O that is ready)."""
        self.running += 1
        self.slice(items, act, 0)

    def slice(self, items: Sequence[Item], act: Callable[[Item], object], start: int) -> None:
        end = min(start + SLICE, len(items))
        deadline = self.clock.seconds() + SLICE_SECONDS
        index = start
        try:
            while index < end:
                item = items[index]
                index += 1  # before: an item that raises is not tried again
                act(item)
                if not index % _CLOCK_EVERY and self.clock.seconds() >= deadline:
                    break
        finally:  # one item failing (logged by the reactor) does not stop the others
            if index < len(items):
                self.clock.callLater(0, self.slice, items, act, index)
            else:
                self.running -= 1
