"""Rate limits over a sliding window, shared by every instance through PostgreSQL.

A ``Limit`` allows ``max_requests`` (N) per ``window_seconds`` (L) to one *subject*: an API key,
a user (all their keys and cookie sessions together), or a sign-up address. The guarantee is
exact: **no span of L seconds admits more than N requests of one subject, across all
instances** (clock differences between instances aside).

No instance writes per request. It *leases* permits in batches (5% of N, at least one) in a
short transaction that locks the subject's row, which lists the leases that still count (when
each was granted, how many permits). A lease's permits may be spent for ``E = L / 10`` seconds
after it was granted, then they are dropped; the database grants a lease only while the leases
granted in the last ``L + E`` seconds, the new one included, number at most N. Why that is
exact: take any span of L seconds and its last admitted request, at time t. Every request of
the span was admitted at or after t - L, with a lease granted at most E before it, so every
lease used lies within [t - L - E, t] — a stretch of L + E that the database checked, when it
granted the last of those leases, to hold at most N permits.

What it costs, and why not something simpler:

* a fixed window admits 2N across a boundary (N at the end of one window, N at the start of
  the next); the weighted sliding counter (the previous window's count times the part of it
  still inside, plus the current count) assumes the previous window's requests were spread
  evenly, and when they came at its end still admits nearly 2N in one window's length;
* counting L + E rather than L, a client sending steadily at full speed gets about N per 1.1 L
  (91% of N per L);
* a lease that expires with permits unspent (a client slower than a batch per E) gives them
  back at the instance's next lease: the database lowers that lease's count to what was
  spent. Without that, every instance serving a slow client would burn a whole batch each E
  seconds, 55% of N per L + E, and two instances would refuse a client that sent a handful of
  requests. What still counts unspent is each instance's current lease and, for an instance
  that stopped receiving the subject's requests, its last one: a client may be refused up to
  one batch per instance (5%) early;
* a refused request costs no database round trip: the database also answers when its next
  permit frees up (the oldest counted lease leaving the ``L + E`` stretch), which is the
  ``Retry-After``, and the instance asks again only then.

Concurrent requests of one subject share one lease round trip: a request finding no permit
in hand waits for the lease in flight (or starts one) and then looks again, and is refused only
when the database's last answer said no permit frees up before a moment still to come. A
request that goes away stops waiting without cancelling the lease the others wait for.

If the database is unreachable an instance counts on its own against the full limit (it fails
open per instance, never closed) and logs it once.

Time is the injected clock's (``director.clock``), the cleanup pass's included. It must be the
wall clock: lease times are stored in the database and compared across instances, where a
monotonic clock's readings mean nothing.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from director.clock import Clock
from director.db.database import Database
from director.db.interactions import Interaction, Query

log = Logger(namespace="ratelimit")

BATCH_FRACTION = 0.05
#: How long a lease's permits may be spent, as a fraction of the window.
LEASE_LIFETIME_FRACTION = 0.1
CLEANUP_INTERVAL_SECONDS = 60.0

LeaseLog = list[tuple[float, int]]  # (granted at, permits), in any order


class Limit(NamedTuple):
    """``max_requests`` per ``window_seconds`` for one subject: ``kind`` ``key``, ``user`` or
    ``signup``, ``of`` the key's or user's id or the address; ``name`` says which limit it is
    in a 429's message. A tuple, not an attrs class, and the id not turned into text: two are
    built and looked up per authenticated request."""

    kind: str
    of: object
    max_requests: int
    window_seconds: int
    name: str

    @property
    def subject(self) -> str:
        """The database row's key, e.g. ``key:<id>:1000/60``. The numbers are part of it: a
        changed limit starts afresh, as it does in memory, rather than inheriting leases that
        were sized and spent for the old one (a lowered limit would otherwise refuse a key for
        a whole window over permits that were leased but never used)."""
        return f"{self.kind}:{self.of}:{self.max_requests}/{self.window_seconds}"

    @property
    def batch(self) -> int:
        return max(1, math.ceil(self.max_requests * BATCH_FRACTION))

    @property
    def lease_lifetime(self) -> float:
        return self.window_seconds * LEASE_LIFETIME_FRACTION

    @property
    def span(self) -> float:
        """How far back leases count: the window plus a lease's lifetime."""
        return self.window_seconds + self.lease_lifetime


@attrs.frozen
class Grant:
    """The answer to a lease request: what was granted, what counts now, and when the next
    permit frees up if none is left."""

    granted: int
    leases: LeaseLog  # every lease that still counts, the new one included
    counted: int
    oldest_at: float | None
    freed_at: float


def give_back(leases: Sequence[tuple[float, int]],
              unspent: Sequence[tuple[float, int]]) -> LeaseLog:
    """``leases`` with each expired lease of ``unspent`` (granted at, permits never spent)
    lowered to what was spent. Only permits that can no longer be spent are given back, so
    every admitted request still has a counted permit and the bound holds. A lease no longer
    in the log (it stopped counting) needs nothing."""
    if not unspent:
        return list(leases)
    kept = list(leases)
    for at, permits in unspent:
        for index, (granted_at, granted) in enumerate(kept):
            if granted_at == at and granted >= permits:
                kept[index] = (at, granted - permits)
                break
    return [(at, permits) for at, permits in kept if permits]


def lease(leases: LeaseLog, now: float, limit: Limit,
          unspent: Sequence[tuple[float, int]] = ()) -> Grant:
    """Grant up to one batch at ``now``, never letting the leases of any ``limit.span`` exceed
    ``limit.max_requests`` (see the module docstring), after giving back ``unspent``. Leases
    granted "later" than ``now`` (an instance whose clock is ahead) count too; that keeps the
    bound whatever the clocks say."""
    kept = sorted((at, permits) for at, permits in give_back(leases, unspent)
                  if at > now - limit.span)
    counted = sum(permits for _, permits in kept)
    granted = max(0, min(limit.batch, limit.max_requests - counted))
    if granted:
        kept.append((now, granted))
        kept.sort()
        counted += granted
    freed_at = now
    must_leave = counted - limit.max_requests + 1  # permits to expire before one more fits
    for at, permits in kept:
        if must_leave <= 0:
            break
        must_leave -= permits
        freed_at = at + limit.span
    return Grant(granted, kept, counted, kept[0][0] if kept else None, freed_at)


def _claim_permits(limit: Limit, now: float, unspent: LeaseLog) -> Interaction[Grant]:
    """Give back ``unspent`` and lease permits of ``limit`` from the database, under the
    subject's row lock.

    The row is created or locked, and read, in one statement (an upsert locks the row it
    returns until the transaction ends), so concurrent claims from several instances are
    serialised and each sees every lease the others were granted; a row that the cleanup
    deletes meanwhile is simply created again.
    """
    rows = yield Query("INSERT INTO rate_limits (subject) VALUES (%s) ON CONFLICT (subject) "
                       "DO UPDATE SET subject = EXCLUDED.subject "
                       "RETURNING lease_times, lease_permits", (limit.subject,))
    before = list(zip(rows[0][0], rows[0][1], strict=True))
    grant = lease(before, now, limit, unspent)
    if grant.leases != sorted(before):
        yield Query("UPDATE rate_limits SET lease_times = %s::float8[], "
                    "lease_permits = %s::integer[], expires_at = %s WHERE subject = %s",
                    ([at for at, _ in grant.leases], [n for _, n in grant.leases],
                     max((at for at, _ in grant.leases), default=now) + limit.span,
                     limit.subject))
    return grant


@attrs.frozen
class Decision:
    """One limit's verdict. ``reset_seconds``: when refused, until a permit frees up (the
    ``Retry-After``); when allowed, until the oldest permit counted stops counting.
    ``remaining`` is this instance's estimate (other instances' spending shows at its next
    lease)."""

    limit: Limit
    allowed: bool
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        headers = {"RateLimit-Limit": str(self.limit.max_requests),
                   "RateLimit-Remaining": str(self.remaining),
                   "RateLimit-Reset": str(self.reset_seconds)}
        if not self.allowed:
            headers["Retry-After"] = str(self.reset_seconds)
        return headers


@attrs.define
class _Lease:
    granted_at: float
    expires_at: float
    permits: int


@attrs.define
class _Subject:
    """What one instance knows of one subject's limit."""

    limit: Limit  # a changed limit starts a fresh state (leases were sized for the old one)
    batch: int = attrs.field(init=False)  # the limit's, computed once
    leases: deque[_Lease] = attrs.field(factory=deque)  # unspent, oldest first
    available: int = 0  # permits in ``leases``
    counted: int = 0  # permits counted against the limit, as of the last grant
    oldest_at: float | None = None
    refused_until: float = 0.0  # the database has no permit to give before then
    own: LeaseLog = attrs.field(factory=list)  # this instance's leases, for counting alone
    unspent: LeaseLog = attrs.field(factory=list)  # expired leases' permits, to give back
    claiming: defer.Deferred[None] | None = None

    def __attrs_post_init__(self) -> None:
        self.batch = self.limit.batch

    def drop_expired(self, now: float) -> None:
        while self.leases and self.leases[0].expires_at <= now:
            expired = self.leases.popleft()
            if expired.permits:
                self.available -= expired.permits
                given_back = [(expired.granted_at, expired.permits)]
                self.unspent += given_back
                self.own = give_back(self.own, given_back)

    def spend(self) -> None:
        first = self.leases[0]
        first.permits -= 1
        self.available -= 1
        if not first.permits:
            self.leases.popleft()

    @property
    def remaining(self) -> int:
        return self.limit.max_requests - self.counted + self.available

    def refusal(self, now: float) -> Decision:
        return Decision(self.limit, False, 0, max(1, math.ceil(self.refused_until - now)))

    def admission(self, now: float) -> Decision:
        limit = self.limit
        until = (self.oldest_at + limit.span if self.oldest_at is not None
                 else now + limit.window_seconds)
        return Decision(limit, True, max(0, self.remaining), max(1, math.ceil(until - now)))


def _awaiting(claims: list[defer.Deferred[None]]) -> defer.Deferred[None]:
    """One request's wait for the leases in flight, fired when all are answered. A wait of
    its own: the request may go away (its client hangs up, the wait is cancelled) without
    cancelling leases that other requests wait for too, and whose permits the database
    counts whether or not anyone hears its answer."""
    wait: defer.Deferred[None] = defer.Deferred()
    left = len(claims)

    def answered(_: object) -> None:
        nonlocal left
        left -= 1
        if not left and not wait.called:
            wait.callback(None)

    for claim in claims:
        claim.addBoth(answered)
    return wait


class RateLimiter:
    def __init__(self, database: Database, clock: Clock) -> None:
        self.database = database
        self.clock = clock
        self._subjects: dict[tuple[str, object], _Subject] = {}
        self._degraded = False
        self._cleanup: task.LoopingCall | None = None

    def start(self) -> None:
        self._cleanup = task.LoopingCall(self._forget_old_subjects)
        self._cleanup.clock = cast(IReactorTime, self.clock)
        self._cleanup.start(CLEANUP_INTERVAL_SECONDS, now=False)

    def stop(self) -> None:
        if self._cleanup is not None and self._cleanup.running:
            self._cleanup.stop()

    async def check(self, *limits: Limit) -> Decision:
        """Admit one request under every one of ``limits``, or under none: a permit is spent
        from each only when all have one. The decision of a refusing limit (the one that
        refuses longest), else of the limit closest to refusing.

        A limit without a permit in hand refuses only on the database's word (its last answer
        said no permit frees up before a moment still to come); otherwise the request waits
        for that limit's lease in flight, one per subject whoever started it, and looks
        again: a permit it saw while waiting for another limit may have expired or been
        spent by the requests that waited with it.
        """
        states = [self._state(limit) for limit in limits]
        now = self.clock.seconds()
        for state in states:
            state.drop_expired(now)
        while not all(state.available for state in states):
            refused = [state for state in states
                       if not state.available and now < state.refused_until]
            if refused:
                return max(refused, key=lambda state: state.refused_until).refusal(now)
            await _awaiting([self._claim(state) for state in states if not state.available])
            now = self.clock.seconds()
            for state in states:
                state.drop_expired(now)
        closest, fewest = states[0], None
        for state in states:
            state.spend()
            # The next batch, fetched in the background before this one runs out (batches of
            # one are not: each would be a permit counted and maybe never used).
            batch = state.batch
            if batch > 1 and state.available * 2 < batch and state.claiming is None \
                    and now >= state.refused_until:
                self._claim(state)
            remaining = state.remaining
            if fewest is None or remaining < fewest:
                closest, fewest = state, remaining
        return closest.admission(now)

    def _state(self, limit: Limit) -> _Subject:
        subject = (limit.kind, limit.of)
        state = self._subjects.get(subject)
        if state is None or state.limit != limit:
            state = self._subjects[subject] = _Subject(limit)
        return state

    def _claim(self, state: _Subject) -> defer.Deferred[None]:
        if state.claiming is not None:
            return state.claiming
        limit, now = state.limit, self.clock.seconds()
        unspent, state.unspent = state.unspent, []

        def granted(grant: Grant) -> None:
            if self._degraded:
                log.info("rate limits are shared through the database again")
                self._degraded = False
            self._record(state, now, grant)

        def failed(failure: Any) -> None:
            # Fail open, per instance: count this instance's own leases against the limit.
            if not self._degraded:
                log.warn("rate-limit permits unavailable ({reason}); counting locally",
                         reason=str(failure.value))
                self._degraded = True
            state.unspent[:0] = unspent  # for the database, once it answers again
            self._record(state, now, lease(state.own, now, limit))

        def done(_: object) -> None:
            state.claiming = None

        claimed = self.database.run(_claim_permits(limit, now, unspent))
        d: defer.Deferred[None] = claimed.addCallbacks(granted, failed)
        d.addBoth(done)
        if not d.called:
            state.claiming = d
        return d

    def _record(self, state: _Subject, granted_at: float, grant: Grant) -> None:
        limit = state.limit
        if grant.granted:
            state.leases.append(_Lease(granted_at, granted_at + limit.lease_lifetime,
                                       grant.granted))
            state.available += grant.granted
            state.own.append((granted_at, grant.granted))
        state.own = [(at, n) for at, n in state.own if at > granted_at - limit.span]
        state.counted, state.oldest_at = grant.counted, grant.oldest_at
        state.refused_until = grant.freed_at if grant.counted >= limit.max_requests else 0.0

    def _forget_old_subjects(self) -> defer.Deferred[Any]:
        now = self.clock.seconds()
        for state in self._subjects.values():
            state.drop_expired(now)
        stale = [subject for subject, state in self._subjects.items()
                 if state.claiming is None and not state.available
                 and all(at <= now - state.limit.span for at, _ in state.own)]
        for subject in stale:
            del self._subjects[subject]
        d = self.database.runOperation("DELETE FROM rate_limits WHERE expires_at < %s", (now,))
        d.addErrback(lambda failure: None)
        return d
