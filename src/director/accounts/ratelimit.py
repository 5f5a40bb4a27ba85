"""Per-API-key rate limits in fixed windows, shared by every instance through PostgreSQL.

No instance writes per request. Instead each instance *leases* permits for a key's current
window in batches (5% of the limit, at least one) in a short transaction that locks the
window's row, so it never grants more than the limit in total, then spends them from memory.
So:

* the limit is never exceeded across instances (the database hands out at most ``max``);
* at most one batch per instance is left unspent when a window closes, so a client can be
  refused up to ``instances x 5%`` early — within 10% for two instances;
* the next batch is fetched in the background before the current one runs out, so a request
  waits for the database only when its key's window has just opened on this instance.

If the database is unreachable the limiter falls back to counting locally against the full
limit (it fails open per instance, never closed) and logs it once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from director.db.database import Database
from director.db.interactions import Interaction, Query

log = Logger(namespace="ratelimit")

BATCH_FRACTION = 0.05
CLEANUP_INTERVAL_SECONDS = 60.0

def _claim_permits(key_id: UUID, window_start: int, batch: int,
                  max_requests: int) -> Interaction[int]:
    """Lease up to ``batch`` permits of a key's window; never more than ``max_requests`` in all.

    The row is locked (``FOR UPDATE``) before it is read, so concurrent claims from several
    instances are serialised and each sees what the others were granted.
    """
    yield Query("INSERT INTO rate_limit_windows (key_id, window_start, granted) "
                "VALUES (%s, %s, 0) ON CONFLICT DO NOTHING", (str(key_id), window_start))
    rows = yield Query("SELECT granted FROM rate_limit_windows WHERE key_id = %s "
                       "AND window_start = %s FOR UPDATE", (str(key_id), window_start))
    grant = max(0, min(batch, max_requests - int(rows[0][0])))
    if grant:
        yield Query("UPDATE rate_limit_windows SET granted = granted + %s WHERE key_id = %s "
                    "AND window_start = %s", (grant, str(key_id), window_start))
    return grant


@attrs.frozen
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int  # until the window ends

    def headers(self) -> dict[str, str]:
        headers = {"RateLimit-Limit": str(self.limit),
                   "RateLimit-Remaining": str(self.remaining),
                   "RateLimit-Reset": str(self.reset_seconds)}
        if not self.allowed:
            headers["Retry-After"] = str(self.reset_seconds)
        return headers


@attrs.define
class _KeyWindow:
    window: int
    ends_at: float
    max_requests: int  # a changed limit starts a fresh state (leases were sized for the old)
    permits: int = 0
    used: int = 0
    exhausted: bool = False  # the database has no more permits for this window
    claiming: defer.Deferred[None] | None = None


class RateLimiter:
    def __init__(self, database: Database, clock: Callable[[], float] = time.time) -> None:
        self.database = database
        self.clock = clock
        self._windows: dict[UUID, _KeyWindow] = {}
        self._degraded = False
        self._cleanup: task.LoopingCall | None = None

    def start(self) -> None:
        self._cleanup = task.LoopingCall(self._forget_old_windows)
        self._cleanup.start(CLEANUP_INTERVAL_SECONDS, now=False)

    def stop(self) -> None:
        if self._cleanup is not None and self._cleanup.running:
            self._cleanup.stop()

    async def check(self, key_id: UUID, window_seconds: int, max_requests: int) -> Decision:
        now = self.clock()
        window = int(now // window_seconds)
        reset = max(1, math.ceil((window + 1) * window_seconds - now))
        state = self._windows.get(key_id)
        if state is None or state.window != window or state.max_requests != max_requests:
            state = self._windows[key_id] = _KeyWindow(
                window, (window + 1) * window_seconds, max_requests)
        batch = max(1, math.ceil(max_requests * BATCH_FRACTION))
        while state.permits == 0 and not state.exhausted:
            await self._claim(key_id, state, window * window_seconds, batch, max_requests)
            if state.window != int(self.clock() // window_seconds):
                break  # the window turned while we waited; this request counts in the old one
        if state.permits == 0:
            return Decision(False, max_requests, 0, reset)
        state.permits -= 1
        state.used += 1
        if state.permits < batch / 2 and not state.exhausted and state.claiming is None:
            self._claim(key_id, state, window * window_seconds, batch, max_requests)
        return Decision(True, max_requests, max(0, max_requests - state.used), reset)

    def _claim(self, key_id: UUID, state: _KeyWindow, window_start: int, batch: int,
               max_requests: int) -> defer.Deferred[None]:
        if state.claiming is not None:
            return state.claiming

        def granted(amount: int) -> None:
            state.permits += amount
            if amount < batch:
                state.exhausted = True
            if self._degraded:
                log.info("rate limits are shared through the database again")
                self._degraded = False

        def failed(failure: Any) -> None:
            # Fail open, per instance: count locally against the whole limit.
            if not self._degraded:
                log.warn("rate-limit permits unavailable ({reason}); counting locally",
                         reason=str(failure.value))
                self._degraded = True
            state.permits += max(0, max_requests - state.used - state.permits)
            state.exhausted = True

        def done(_: object) -> None:
            state.claiming = None

        claimed = self.database.run(_claim_permits(key_id, window_start, batch, max_requests))
        d: defer.Deferred[None] = claimed.addCallbacks(granted, failed)
        d.addBoth(done)
        state.claiming = d
        return d

    def _forget_old_windows(self) -> defer.Deferred[Any]:
        now = self.clock()
        stale = [key for key, state in self._windows.items()
                 if state.claiming is None and state.ends_at < now]
        for key in stale:
            del self._windows[key]
        # Windows are at most a day long in practice; older rows are of no use to anyone.
        d = self.database.runOperation(
            "DELETE FROM rate_limit_windows WHERE window_start < %s", (int(now) - 2 * 86_400,))
        d.addErrback(lambda failure: None)
        return d
