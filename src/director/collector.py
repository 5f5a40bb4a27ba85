"""When CPython's cyclic garbage collector makes its full passes: the daemon decides.

A full pass stops everything for as long as it takes to scan every tracked object: with
10,000 sessions held, 160 to 340 ms on a shared 2-core machine (bench ``mcp``, measured with
``gc.callbacks``). CPython starts one whenever the objects that survived since the last one
number a quarter of those that had, whatever the reactor is doing; while sessions come and go
that is every few thousand sessions, and it was the whole of the 200-ms "stall" seen during a
fan-out to every stream. So:

* CPython's own full passes are off (the oldest generation's threshold is out of reach); it
  still collects the two young generations as usual (a few ms each);
* every ``YOUNG_SECONDS`` the daemon collects what is not frozen (what survived since the last
  such pass: cheap) and freezes the survivors (``gc.freeze``: no pass scans them again);
* a sweep of everything (unfreeze, collect, freeze) comes only once the frozen population has
  doubled since the last sweep, so cyclic garbage among frozen objects (sessions that ended
  after being frozen) is at most as large as what lives; a sweep pauses like CPython's full
  pass, a quarter as often;
* neither runs while a write to every stream is under way (``Slicer.running``): it waits for
  the next turn of the check.

What is loaded at start is frozen by the service before this starts.

When it starts and after each sweep, the heap that is free again goes back to the system
(glibc's ``malloc_trim``): freed memory in the middle of the heap otherwise stays resident,
counted in the daemon's RSS for good. At start that is what loading left behind (1.3 MiB of
the idle RSS, bench ``memory``); after a sweep, what ended sessions held. It costs a walk of
malloc's free lists (0.04 ms with a 240 MB heap here), at those moments only.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from director.clock import repeating, stop_repeating

log = Logger(namespace="director.collector")

#: How often young survivors are collected and frozen, and a sweep considered.
YOUNG_SECONDS = 10.0
#: A sweep waits for at least this many objects frozen since the last (small processes).
SWEEP_MINIMUM_GROWTH = 200_000
#: Out of reach: CPython never starts a full pass itself.
NEVER = 2**30


def heap_trimmer() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)`` (gives back every free page of the heap), or None where the C
    library has none (musl)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class Collector:
    def __init__(self, clock: Any, busy: Callable[[], bool], collector: Any = gc,
                 trim_heap: Callable[[], object] | None = None) -> None:
        self.clock = clock
        self.busy = busy
        self.gc = collector
        self.trim_heap = trim_heap
        self.swept_at = 0  # the frozen count after the last sweep
        self.sweeps = 0
        self._loop: task.LoopingCall | None = None
        self._thresholds: tuple[int, ...] = ()

    def start(self) -> None:
        self._thresholds = self.gc.get_threshold()
        young, middle = self._thresholds[:2]
        self.gc.set_threshold(young, middle, NEVER)
        self.swept_at = self.gc.get_freeze_count()
        self._give_back()
        self._loop = repeating(self.clock, YOUNG_SECONDS, self.turn)

    def stop(self) -> None:
        stop_repeating(self._loop)
        if self._thresholds:
            self.gc.set_threshold(*self._thresholds)

    def turn(self) -> None:
        if self.busy():
            return
        frozen = self.gc.get_freeze_count()
        if frozen >= max(2 * self.swept_at, self.swept_at + SWEEP_MINIMUM_GROWTH):
            started = self.clock.seconds()
            self.gc.unfreeze()
            found = self.gc.collect()
            self.gc.freeze()
            self.swept_at = self.gc.get_freeze_count()
            self.sweeps += 1
            self._give_back()
            log.debug("collector sweep: {found} unreachable, {kept} kept, {ms:.0f} ms",
                      found=found, kept=self.swept_at,
                      ms=(self.clock.seconds() - started) * 1000)
            return
        self.gc.collect()
        self.gc.freeze()

    def _give_back(self) -> None:
        if self.trim_heap is not None:
            self.trim_heap()
