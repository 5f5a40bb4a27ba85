"""The rate limiter under concurrent requests: many checks of one subject in flight while its
lease round trips are pending, answered when and in the order the test says.

The database is the ``rate_limits`` table in memory (``HeldDatabase``): a transaction is the
limiter's own interaction (``_claim_permits``, the real lease arithmetic), run when the test
answers it, so that the test decides what is in flight, what arrives late and what arrives
first. Time is a ``task.Clock``; nothing here waits on the reactor.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task

from director.accounts.ratelimit import Decision, Grant, Limit, RateLimiter
from director.db.interactions import Interaction, Query
from tests.test_rate_limits import most_in_any_window

HUGE = 1_000_000_000
START = 1_000_000.0


class HeldDatabase:
    """One instance's connection to a shared in-memory ``rate_limits`` table; its transactions
    wait in ``pending`` until ``answer`` runs one. ``said`` is the last grant each subject's
    lease answer carried to this instance: what a refusal must rest on."""

    def __init__(self, rows: dict[str, tuple[list[float], list[int]]]) -> None:
        self.rows = rows
        self.pending: list[tuple[Interaction[Grant], defer.Deferred[Grant]]] = []
        self.said: dict[str, Grant] = {}

    def run(self, interaction: Interaction[Grant]) -> defer.Deferred[Grant]:
        answer: defer.Deferred[Grant] = defer.Deferred()
        self.pending.append((interaction, answer))
        return answer

    def answer(self, index: int = 0) -> None:
        interaction, answer = self.pending.pop(index)
        subject = ""
        try:
            query = next(interaction)
            while True:
                subject = subject or query.parameters[0]  # type: ignore[index]
                query = interaction.send(self._execute(query))
        except StopIteration as done:
            self.said[subject] = done.value
            answer.callback(done.value)

    def _execute(self, query: Query) -> list[tuple[Any, ...]]:
        parameters: Any = query.parameters
        if query.sql.startswith("INSERT"):
            times, permits = self.rows.setdefault(parameters[0], ([], []))
            return [(list(times), list(permits))]
        times, permits, _expires_at, subject = parameters
        self.rows[subject] = (list(times), list(permits))
        return []


class Requests:
    """Checks started and not awaited: ``decisions[n]`` is None while request n waits."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.decisions: list[Decision | None] = []
        self.deferreds: list[defer.Deferred[Decision]] = []

    def start(self, *limits: Limit, count: int = 1) -> None:
        for _ in range(count):
            number = len(self.decisions)
            self.decisions.append(None)
            d = defer.ensureDeferred(self.limiter.check(*limits))
            d.addCallback(self._decided, number)
            d.addErrback(lambda failure: failure.trap(defer.CancelledError))
            self.deferreds.append(d)

    def _decided(self, decision: Decision, number: int) -> Decision:
        self.decisions[number] = decision
        return decision

    def allowed(self) -> list[bool | None]:
        return [None if d is None else d.allowed for d in self.decisions]


def limiter_on_held_database() -> tuple[task.Clock, HeldDatabase, Requests]:
    clock = task.Clock()
    clock.advance(START)
    database = HeldDatabase({})
    return clock, database, Requests(RateLimiter(database, clock))  # type: ignore[arg-type]


def key_and_user(maximum: int = HUGE, window: int = 60) -> tuple[Limit, Limit]:
    return (Limit("key", uuid.uuid4(), maximum, window, "this API key"),
            Limit("user", uuid.uuid4(), HUGE, window, "this user"))


def test_concurrent_requests_wait_for_the_one_lease_in_flight() -> None:
    _, database, requests = limiter_on_held_database()
    key, user = key_and_user()
    requests.start(key, user, count=50)
    assert len(database.pending) == 2  # one lease round trip per limit, not one per request
    database.answer()
    assert requests.allowed() == [None] * 50  # the user's lease is still on its way
    database.answer()
    assert requests.allowed() == [True] * 50 and not database.pending


def test_a_permit_that_expires_while_another_limit_is_leased_is_leased_again() -> None:
    """The key's lease was granted just after the user's: it expires while the user's next
    lease is in flight. The requests waiting for it were refused (Retry-After 1) though the
    database had said nothing of the kind."""
    clock, database, requests = limiter_on_held_database()
    key, user = key_and_user()  # a lease lasts 6 s
    requests.start(user)  # a cookie session: the user's lease is claimed at +0
    clock.advance(0.01)
    requests.start(key, user)  # an API key: its lease is claimed at +0.01
    database.answer()
    database.answer()
    assert requests.allowed() == [True, True]
    clock.advance(5.99)  # +6: the user's lease has expired, the key's has 0.01 s to go
    requests.start(key, user, count=20)
    assert len(database.pending) == 1
    clock.advance(0.02)  # the key's lease expires while the user's is on its way
    database.answer()
    assert requests.allowed()[2:] == [None] * 20  # waiting for the key's next lease
    assert len(database.pending) == 1
    database.answer()
    assert requests.allowed() == [True] * 22 and not database.pending


def test_permits_taken_meanwhile_by_other_requests_are_leased_again() -> None:
    """Batches of one: two requests wait for the same two leases; the first takes the key's
    only permit. The second was refused; the database grants it one more."""
    _, database, requests = limiter_on_held_database()
    key, user = key_and_user(maximum=3, window=10)
    requests.start(key, user, count=2)
    database.answer()  # the key: one permit of 3
    database.answer()  # the user
    assert requests.allowed() == [True, None]
    database.answer()  # the key's second permit, for the second request
    assert requests.allowed() == [True, True]
    # The third permit fills the limit: the database says so, and only then is one refused.
    requests.start(key, user, count=2)
    database.answer()
    assert requests.allowed() == [True, True, True, False]
    assert len(database.pending) == 0  # no round trip: the database named when one frees up
    refused = requests.decisions[3]
    assert refused is not None and not refused.allowed and refused.limit == key
    assert refused.reset_seconds == 11  # the first lease stops counting at +0 + 10 + 1


def test_an_answer_that_arrives_after_its_refusal_ran_out_is_not_a_refusal() -> None:
    clock, database, requests = limiter_on_held_database()
    other = Requests(RateLimiter(database, clock))  # type: ignore[arg-type]
    limit = Limit("key", uuid.uuid4(), 1, 10, "this API key")  # batch 1, counted for 11 s
    other.start(limit)
    database.answer()  # the other instance spent the only permit at +0
    assert other.allowed() == [True]
    clock.advance(10.95)
    requests.start(limit)
    clock.advance(0.1)  # the refusal ("no permit before +11") arrives at +11.05
    database.answer()
    assert database.said[limit.subject].granted == 0
    assert requests.allowed() == [None] and len(database.pending) == 1
    database.answer()
    assert requests.allowed() == [True]


def test_a_request_that_goes_away_does_not_cancel_the_lease_others_wait_for() -> None:
    _, database, requests = limiter_on_held_database()
    key, user = key_and_user()
    requests.start(key, user, count=3)
    requests.deferreds[0].cancel()  # its client hung up
    assert requests.allowed() == [None] * 3 and len(database.pending) == 2
    database.answer()
    database.answer()
    assert requests.allowed() == [None, True, True]
    # The instance spends the lease the database granted (none lost, none doubled).
    assert requests.decisions[2] is not None
    assert requests.decisions[2].remaining == HUGE - 2
    assert database.rows[key.subject][1] == [key.batch]


# --- the bound and the refusals, over arbitrary interleavings ------------------------------

OPERATIONS = st.one_of(
    st.tuples(st.just("check"), st.integers(0, 1), st.integers(0, 2)),
    st.tuples(st.just("answer"), st.integers(0, 1), st.integers(0, 7)),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.01, 0.3, 0.9, 1.0, 2.5]),
              st.just(0)),
    st.tuples(st.just("cancel"), st.integers(0, 300), st.just(0)),
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(OPERATIONS, max_size=120),
       st.sampled_from([1, 2, 3, 7, 20, 40, HUGE]), st.sampled_from([2, 5, 30, HUGE]))
def test_concurrent_checks_on_two_instances_keep_the_bound_and_refuse_only_on_the_databases_word(
        operations: list[tuple[str, Any, int]], key_maximum: int, user_maximum: int) -> None:
    """Two instances, two keys of one user and cookie sessions, requests started while leases
    are in flight, answers in any order and late (a lease lives 1 s), clients that hang up:
    no span of the window admits more than a limit's N; a request is refused only by the
    limit whose database answer to that instance said it had no permit before a moment
    still to come (and Retry-After is that moment); nothing waits once the database has
    answered everything."""
    clock = task.Clock()
    clock.advance(START)
    rows: dict[str, tuple[list[float], list[int]]] = {}
    databases = [HeldDatabase(rows), HeldDatabase(rows)]
    instances = [Requests(RateLimiter(database, clock))  # type: ignore[arg-type]
                 for database in databases]
    user = Limit("user", uuid.uuid4(), user_maximum, 10, "this user")
    keys = [Limit("key", uuid.uuid4(), key_maximum, 10, "this API key") for _ in range(2)]
    shapes = [(keys[0], user), (keys[1], user), (user,)]
    admitted: dict[Limit, list[float]] = {user: [], keys[0]: [], keys[1]: []}
    refusals: list[tuple[Decision, float, Grant | None]] = []

    def judge(decision: Decision, database: HeldDatabase, limits: tuple[Limit, ...]) -> None:
        now = clock.seconds()
        if decision.allowed:
            for limit in limits:
                admitted[limit].append(now)
        else:
            refusals.append((decision, now, database.said.get(decision.limit.subject)))

    def start(instance: int, shape: int) -> None:
        requests, limits = instances[instance], shapes[shape]
        requests.start(*limits)
        requests.deferreds[-1].addCallback(
            lambda decision: judge(decision, databases[instance], limits) if decision else None)

    for operation, argument, other in operations:
        if operation == "check":
            start(argument, other)
        elif operation == "answer" and databases[argument].pending:
            databases[argument].answer(other % len(databases[argument].pending))
        elif operation == "advance":
            clock.advance(argument)
        elif operation == "cancel":
            waiting = [d for requests in instances for d in requests.deferreds if not d.called]
            if waiting:
                waiting[argument % len(waiting)].cancel()
    for _ in range(10_000):  # the database answers everything still in flight, in order
        database = next((database for database in databases if database.pending), None)
        if database is None:
            break
        database.answer()

    for requests in instances:
        assert all(d.called for d in requests.deferreds)
    for limit, times in admitted.items():
        assert most_in_any_window(times, limit.window_seconds) <= limit.max_requests
    for decision, at, said in refusals:
        assert said is not None and said.counted >= decision.limit.max_requests
        assert said.freed_at > at
        assert decision.reset_seconds == max(1, math.ceil(said.freed_at - at))
    if key_maximum == user_maximum == HUGE:
        assert not refusals
