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


def in_slices(clock: Any, items: Sequence[Item], act: Callable[[Item], object],
              start: int = 0) -> None:
    """``act(item)`` for ``items[start:]``: ``SLICE`` of them now, the rest on the following
    turns of ``clock`` (a reactor runs a call scheduled with no delay on its next turn, after
    the I/O that is ready)."""
    end = start + SLICE
    for item in items[start:end]:
        act(item)
    if end < len(items):
        clock.callLater(0, in_slices, clock, items, act, end)
