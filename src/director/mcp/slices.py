"""Work over every stream or session of the process, a slice per reactor turn.

Some events concern everything a process holds: a playbook change tells each of its sessions,
a heartbeat writes to each open stream. Done in one go, 10,000 of them hold the reactor for
100 to 200 ms on a shared 2-core machine, and every other request waits that long. Done
``SLICE`` at a time with the reactor's turns in between (a few milliseconds each), a request
arriving meanwhile waits for one slice; the whole takes a few per cent longer (bench ``mcp``:
"worst latency of a concurrent /api/health" during a fan-out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

Item = TypeVar("Item")

#: Items handled per reactor turn.
SLICE = 256


class Slicer:
    """Runs such work, and knows whether some is under way (``running``): the collector's
    full passes wait until none is (``director.collector``)."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.running = 0

    def run(self, items: Sequence[Item], act: Callable[[Item], object]) -> None:
        """``act(item)`` for each of ``items``: ``SLICE`` of them now, the rest on the
        following turns of ``clock`` (a reactor runs a call scheduled with no delay on its next
        turn, after the I/O that is ready)."""
        self.running += 1
        self.slice(items, act, 0)

    def slice(self, items: Sequence[Item], act: Callable[[Item], object], start: int) -> None:
        end = start + SLICE
        try:
            for item in items[start:end]:
                act(item)
        finally:  # one item failing (logged by the reactor) does not stop the others
            if end < len(items):
                self.clock.callLater(0, self.slice, items, act, end)
            else:
                self.running -= 1
