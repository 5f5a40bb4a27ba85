"""What the gateway has learnt of which protocol era each upstream speaks.

A session that finds an HTTP server refusing ``server/discover`` (or ``initialize``), or a
stdio command line that does not speak 2026-07-28, records the verdict here, so that the next
sessions with that server skip the probe that would fail. One ``EraMemory`` belongs to the
service (``service.py``) and is handed to every upstream session through the factory: nothing
is learnt at module level, tests get a memory of their own, and the memory is bounded (the
oldest verdicts make room) and forgets (a verdict older than ``lifetime`` is probed again: a
server may be upgraded in place).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from director.clock import Clock

#: How long a verdict holds before the server is probed again.
ERA_MEMORY_SECONDS = 3600.0
#: Verdicts kept at most: servers in use on one instance, with room to spare.
ERA_MEMORY_LIMIT = 4096


class EraMemory:
    """Verdicts by key: ``("http", url, era)`` (does the server at ``url`` speak ``era``,
    "modern" or "legacy"), ``("stdio", command, args, cwd)`` (does that command line speak
    2026-07-28)."""

    def __init__(self, clock: Clock,
                 lifetime: float = ERA_MEMORY_SECONDS, limit: int = ERA_MEMORY_LIMIT) -> None:
        self._clock = clock
        self._lifetime = lifetime
        self._limit = limit
        self._verdicts: OrderedDict[Hashable, tuple[bool, float]] = OrderedDict()

    def verdict(self, key: Hashable) -> bool | None:
        """True or False as learnt lately, None when not known (or forgotten)."""
        entry = self._verdicts.get(key)
        if entry is None:
            return None
        if self._clock.seconds() - entry[1] > self._lifetime:
            del self._verdicts[key]
            return None
        return entry[0]

    def learnt(self, key: Hashable, verdict: bool) -> None:
        self._verdicts[key] = (verdict, self._clock.seconds())
        self._verdicts.move_to_end(key)
        while len(self._verdicts) > self._limit:
            self._verdicts.popitem(last=False)

    def forget(self, *keys: Hashable) -> None:
        for key in keys:
            self._verdicts.pop(key, None)

    def __len__(self) -> int:
        return len(self._verdicts)


def http_key(url: str, era: str) -> tuple[str, str, str]:
    return ("http", url, era)


def stdio_key(command: str, args: list[str] | tuple[str, ...],
              cwd: str | None) -> tuple[str, str, tuple[str, ...], str | None]:
    return ("stdio", command, tuple(args), cwd)
