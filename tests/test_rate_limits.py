"""Rate limits: the sliding window's exact bound, per user and per key, across instances,
cookie sessions included, and sign-up per client address.

The window's arithmetic runs in process against the real PostgreSQL with a clock the test
moves (two limiters on one database are two instances), so that bursts land exactly where a
fixed window would have admitted twice the limit; the rest runs against real daemons.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, task

from director.accounts.ratelimit import Limit, RateLimiter, lease
from director.db.database import Database
from tests.accounts_helpers import (
    PASSWORD,
    Account,
    call,
    error_code,
    eventually,
    sign_up,
    until_available,
)
from tests.harness import Daemon, query

StartDaemon = Callable[..., Daemon]
ACCEPT = "application/json, text/event-stream"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "rate-limit-test", "version": "1"}}}


def most_in_any_window(times: list[float], window: float) -> int:
    """The most admissions in any closed span of ``window`` seconds (it is reached by a span
    that ends at an admission)."""
    ordered = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(ordered):
        while ordered[first] < at - window:
            first += 1
        most = max(most, last - first + 1)
    return most


# --- the arithmetic, alone --------------------------------------------------------------------


@settings(max_examples=300, derandomize=True)
@given(st.lists(st.tuples(st.floats(0, 60), st.integers(0, 1)), max_size=300),
       st.integers(1, 40))
def test_leases_spent_within_their_lifetime_never_exceed_the_limit_in_any_window(
        requests: list[tuple[float, int]], maximum: int) -> None:
    """Two instances, one shared lease log, requests at arbitrary times (clocks may go back
    between instances), expired leases' unspent permits given back: the admissions of any
    window number at most N."""
    limit = Limit("test", "s", maximum, 10, "test")
    log: list[tuple[float, int]] = []
    held: list[list[list[float]]] = [[], []]  # per instance: [granted at, expires at, permits]
    unspent: list[list[tuple[float, int]]] = [[], []]
    admitted: list[float] = []
    for at, instance in sorted(requests):
        for granted_at, expiry, n in held[instance]:
            if expiry <= at and n:
                unspent[instance].append((granted_at, int(n)))
        mine = [entry for entry in held[instance] if entry[1] > at and entry[2]]
        if not mine:
            grant = lease(log, at, limit, unspent[instance])
            unspent[instance] = []
            log = grant.leases
            if grant.granted:
                mine = [[at, at + limit.lease_lifetime, grant.granted]]
        if mine:
            mine[0][2] -= 1
            admitted.append(at)
        held[instance] = mine
    assert most_in_any_window(admitted, limit.window_seconds) <= maximum


def test_an_expired_lease_gives_back_what_it_did_not_spend() -> None:
    limit = Limit("test", "s", 100, 10, "test")  # batches of 5, leases count for 11 s
    first = lease([], 0.0, limit)
    assert first.granted == 5
    # One permit spent; at 1.5 the lease has expired with four unspent.
    second = lease(first.leases, 1.5, limit, [(0.0, 4)])
    assert second.leases == [(0.0, 1), (1.5, 5)] and second.counted == 6
    # Nothing spent: the lease leaves the log; a lease no longer logged needs nothing.
    assert lease(second.leases, 3.0, limit, [(1.5, 5), (-50.0, 3)]).leases == [(0.0, 1),
                                                                              (3.0, 5)]


def test_a_refusal_says_when_the_next_permit_frees_up() -> None:
    limit = Limit("test", "s", 3, 10, "test")  # batch 1, leases count for 11 s
    log: list[tuple[float, int]] = []
    for at in (0.0, 1.0, 2.0):
        grant = lease(log, at, limit)
        assert grant.granted == 1
        log = grant.leases
    refused = lease(log, 5.0, limit)
    assert refused.granted == 0 and refused.counted == 3
    assert refused.freed_at == 11.0  # the lease of t=0 stops counting at 0 + 10 + 1
    assert lease(log, 10.99, limit).granted == 0
    assert lease(log, 11.0, limit).granted == 1


# --- the limiter, in process, on the real database --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_instances_admit_at_most_the_limit_in_any_window(
        database: Database, migrated_url: str) -> None:
    await until_available(database)
    clock = task.Clock()
    instances = [RateLimiter(database, clock) for _ in range(2)]
    limit = Limit("key", uuid.uuid4(), 100, 10, "this API key")  # batches of 5, E = 1 s
    admitted: list[float] = []

    async def burst(at: float, count: int) -> int:
        clock.advance(at - clock.seconds())
        before = len(admitted)
        for number in range(count):
            decision = await instances[number % 2].check(limit)
            if decision.allowed:
                admitted.append(at)
        return len(admitted) - before

    # A burst at the end of one fixed window and another at the start of the next: a fixed
    # window admitted 100 + 100 here.
    first = await burst(1_000_009.5, 150)
    second = await burst(1_000_010.2, 150)
    assert 90 <= first <= 100 and first + second <= 100, (first, second)

    # Refused, with the moment a permit frees up; at that moment one is admitted.
    clock.advance(1_000_010.3 - clock.seconds())
    refused = await instances[0].check(limit)
    assert not refused.allowed and refused.remaining == 0
    assert refused.headers()["Retry-After"] == str(refused.reset_seconds)
    assert refused.reset_seconds == 11  # the first burst's leases count until 1_000_020.5
    clock.advance(refused.reset_seconds)
    assert (await instances[1].check(limit)).allowed

    # Then steady traffic at twice the limit's rate, alternating instances, for 40 s.
    steady = 0
    for step in range(800):
        steady += await burst(1_000_021.5 + step * 0.05, 1)
    assert most_in_any_window(admitted, 10) <= 100
    # Each 11 s (the window plus a lease's lifetime) give N permits, less what leases still
    # held when they expired: at least 3 x 100 x 0.9 over 40 s.
    assert steady >= 270, steady
    rows = query(migrated_url, "SELECT cardinality(lease_times) FROM rate_limits "
                               "WHERE subject = %s", limit.subject)
    assert rows and rows[0][0] <= 2 * (limit.max_requests // limit.batch) + 2  # pruned as it goes


@pytest_twisted.ensureDeferred
async def test_slow_clients_on_several_instances_are_not_refused(database: Database) -> None:
    """Three instances each serving one request of a key per lease lifetime: every lease
    expires nearly unspent. Without giving back, each would count a whole batch per second,
    165% of the limit per window, and the key would be refused after 27 requests."""
    await until_available(database)
    clock = task.Clock()
    clock.advance(2_000_000.0)
    instances = [RateLimiter(database, clock) for _ in range(3)]
    limit = Limit("key", uuid.uuid4(), 100, 10, "this API key")  # batches of 5, E = 1 s
    refused = 0
    for _ in range(90):  # 3 requests every 1.1 s for 99 s: about 27 per window
        clock.advance(1.1)
        for instance in instances:
            refused += not (await instance.check(limit)).allowed
    assert refused == 0


@pytest_twisted.ensureDeferred
async def test_a_request_is_admitted_under_every_limit_or_spends_none(database: Database) -> None:
    await until_available(database)
    clock = task.Clock()
    clock.advance(5_000_000.0)
    limiter = RateLimiter(database, clock)
    user = Limit("user", uuid.uuid4(), 4, 60, "this user")
    keys = [Limit("key", uuid.uuid4(), 3, 60, "this API key") for _ in range(2)]
    decisions = [await limiter.check(keys[n % 2], user) for n in range(6)]
    assert [d.allowed for d in decisions] == [True] * 4 + [False] * 2
    # Headers follow the limit closest to refusing; a refusal names the limit that refused.
    assert [(d.limit.name, d.remaining) for d in decisions[:4]] == [
        ("this API key", 2), ("this API key", 2), ("this API key", 1), ("this user", 0)]
    assert decisions[4].limit.name == "this user"
    # The key still has permits: the user's refusals spent none of them.
    fresh_user = Limit("user", uuid.uuid4(), 10, 60, "this user")
    assert (await limiter.check(keys[0], fresh_user)).remaining == 0
    assert not (await limiter.check(keys[0], fresh_user)).allowed


def leases_of(url: str, limit: Limit) -> list[tuple[float, int]]:
    """The lease log the database holds for ``limit``'s subject."""
    rows = query(url, "SELECT lease_times, lease_permits FROM rate_limits WHERE subject = %s",
                 limit.subject)
    return list(zip(rows[0][0], rows[0][1], strict=True)) if rows else []


@pytest_twisted.ensureDeferred
async def test_a_lease_is_spent_for_its_lifetime_then_gives_back_what_it_did_not_spend(
        database: Database, migrated_url: str) -> None:
    await until_available(database)
    clock = task.Clock()
    clock.advance(3_000_000.0)
    limiter = RateLimiter(database, clock)
    limit = Limit("key", uuid.uuid4(), 100, 10, "this API key")  # batches of 5, E = 1 s
    assert (await limiter.check(limit)).remaining == 99  # 5 counted, 4 of them in hand
    clock.advance(0.999)
    assert (await limiter.check(limit)).remaining == 98  # from the same lease: no claim
    assert leases_of(migrated_url, limit) == [(3_000_000.0, 5)]
    # At 1 s the lease has expired with 3 permits unspent: the next request claims a new
    # lease and gives them back, so that only the 2 spent still count (2 + 5, 4 in hand).
    clock.advance(0.001)
    assert (await limiter.check(limit)).remaining == 97
    assert leases_of(migrated_url, limit) == [(3_000_000.0, 2), (3_000_001.0, 5)]


@pytest_twisted.ensureDeferred
async def test_a_refused_subject_is_admitted_again_when_the_oldest_lease_stops_counting(
        database: Database) -> None:
    await until_available(database)
    clock = task.Clock()
    clock.advance(4_000_000.0)
    limiter = RateLimiter(database, clock)
    limit = Limit("key", uuid.uuid4(), 3, 10, "this API key")  # batches of 1, E = 1 s
    for _ in range(3):
        assert (await limiter.check(limit)).allowed
        clock.advance(2.0)
    refused = await limiter.check(limit)  # at +6 s: the lease of +0 counts until +11 s
    assert not refused.allowed and refused.reset_seconds == 5
    clock.advance(4.999)
    assert not (await limiter.check(limit)).allowed
    clock.advance(0.001)
    assert (await limiter.check(limit)).allowed


@pytest_twisted.ensureDeferred
async def test_the_cleanup_runs_on_the_limiters_clock_and_deletes_only_expired_rows(
        migrated_url: str) -> None:
    # One connection: the cleanup's DELETE is done before the test's next query runs.
    database = Database(migrated_url, 1, reactor)
    database.start()
    try:
        await until_available(database)
        clock = task.Clock()
        clock.advance(6_000_000.0)
        limiter = RateLimiter(database, clock)
        limiter.start()
        done, live = (Limit("key", uuid.uuid4(), 100, 10, "k") for _ in range(2))
        await limiter.check(done)  # its leases count until +11 s
        clock.advance(55.0)
        await limiter.check(live)  # until +66 s
        clock.advance(4.999)  # the first pass is due at +60 s
        assert await database.runQuery("SELECT count(*) FROM rate_limits WHERE subject IN "
                                       "(%s, %s)", (done.subject, live.subject)) == [(2,)]
        clock.advance(0.001)
        rows = await database.runQuery("SELECT subject FROM rate_limits WHERE subject IN "
                                       "(%s, %s)", (done.subject, live.subject))
        assert rows == [(live.subject,)]
        limiter.stop()
    finally:
        database.stop()


# --- real daemons -----------------------------------------------------------------------------


def limited_daemons(start_daemon: StartDaemon, migrated_url: str, count: int,
                    **env: str) -> list[Daemon]:
    daemons = [start_daemon(DATABASE_URL=migrated_url, **env) for _ in range(count)]
    for daemon in daemons:
        daemon.wait_healthy()
    return daemons


def limited_user(start_daemon: StartDaemon, migrated_url: str, maximum: int, email: str,
                 instances: int = 1) -> tuple[list[Daemon], Account]:
    """Instances allowing a user ``maximum`` requests an hour, and a user signed up."""
    daemons = limited_daemons(start_daemon, migrated_url, instances,
                              USER_RATE_LIMIT_MAX_REQUESTS=str(maximum),
                              USER_RATE_LIMIT_WINDOW_SECONDS="3600")
    return daemons, sign_up(daemons[0], email)


def second_key(daemon: Daemon, account: Account) -> str:
    status, _, body = call(daemon, "POST", "/api/v1/api-keys", {"name": "second"},
                           key=account.key)
    assert status == 201, body
    return str(body["key"])


def test_the_user_limit_counts_every_key_and_cookie_session(start_daemon: StartDaemon,
                                                            migrated_url: str) -> None:
    (daemon,), account = limited_user(start_daemon, migrated_url, 12, "many-keys@example.com")
    other = second_key(daemon, account)  # one of the user's requests
    credentials = [{"key": account.key}, {"key": other}, {"cookie": account.cookie}]
    statuses = []
    for number in range(20):
        status, headers, body = call(daemon, "GET", "/api/v1/me", **credentials[number % 3])
        statuses.append(status)
    # Batches of one (5% of 12): exact on one instance.
    assert statuses == [200] * 11 + [429] * 9, statuses
    assert error_code(body) == "rate_limited" and body["error"]["details"]["limit"] == "this user"
    assert "for this user" in body["error"]["message"]
    assert headers["ratelimit-limit"] == "12" and headers["ratelimit-remaining"] == "0"
    assert 3600 <= int(headers["retry-after"]) <= 3960


def test_cookie_sessions_are_limited_on_the_mcp_routes(start_daemon: StartDaemon,
                                                       migrated_url: str) -> None:
    (daemon,), account = limited_user(start_daemon, migrated_url, 5, "cookie-mcp@example.com")
    status, _, _ = call(daemon, "POST", "/api/v1/playbooks", {"name": "Mine"},
                        cookie=account.cookie)
    assert status == 201
    statuses = []
    for _ in range(6):
        status, headers, raw = daemon.request(
            "POST", "/playbooks/mine/mcp", json.dumps(INIT).encode(),
            {"accept": ACCEPT, "content-type": "application/json", "cookie": account.cookie})
        statuses.append(status)
    assert statuses == [200] * 4 + [429] * 2, statuses
    error = json.loads(raw)["error"]
    assert error["data"]["code"] == "rate_limited" and error["data"]["limit"] == "this user"
    assert int(headers["retry-after"]) >= 3600 and headers["ratelimit-limit"] == "5"


def test_the_user_limit_is_shared_by_two_instances(start_daemon: StartDaemon,
                                                   migrated_url: str) -> None:
    daemons, account = limited_user(start_daemon, migrated_url, 40,
                                    "two-instances@example.com", instances=2)
    other = second_key(daemons[0], account)
    credentials = [{"key": account.key}, {"key": other}, {"cookie": account.cookie}]
    admitted = 0
    for number in range(120):
        status, _, _ = call(daemons[number % 2], "GET", "/api/v1/me", **credentials[number % 3])
        assert status in (200, 429)
        admitted += status == 200
    # 40 in all, with the key's creation; batches of two, at most one unspent per instance.
    assert 36 <= admitted + 1 <= 40, admitted


def test_a_burst_across_a_window_boundary_is_admitted_once(start_daemon: StartDaemon,
                                                           migrated_url: str) -> None:
    """A fixed window of 4 s admitted 10 at the end of one window and 10 more at the start of
    the next; any 4 s now admit at most 10."""
    (daemon,) = limited_daemons(start_daemon, migrated_url, 1,
                                API_KEY_RATE_LIMIT_MAX_REQUESTS="10",
                                API_KEY_RATE_LIMIT_WINDOW_SECONDS="4")
    account = sign_up(daemon, "boundary@example.com")
    eventually(lambda: 2.8 <= time.time() % 4 <= 3.2, timeout=5, interval=0.005)
    sent: list[tuple[float, float, int]] = []  # (sent, answered, status)

    def burst() -> None:
        for _ in range(15):
            started = time.time()
            status = call(daemon, "GET", "/api/v1/me", key=account.key)[0]
            sent.append((started, time.time(), status))

    burst()
    eventually(lambda: 0.1 <= time.time() % 4 <= 1.0, timeout=5, interval=0.005)
    burst()
    # Requests surely admitted within 4 s of the first one: sent after it, answered before.
    start = sent[0][0]
    inside = [s for s in sent if s[2] == 200 and s[1] <= start + 4]
    assert {s[2] for s in sent} <= {200, 429}
    assert len(inside) <= 10, sent


# --- sign-up per address ----------------------------------------------------------------------


def test_signups_are_limited_per_client_address_across_instances(start_daemon: StartDaemon,
                                                                  migrated_url: str) -> None:
    direct, proxied = (start_daemon(DATABASE_URL=migrated_url, SIGNUP_RATE_LIMIT_PER_HOUR="3"),
                       start_daemon(DATABASE_URL=migrated_url, SIGNUP_RATE_LIMIT_PER_HOUR="3",
                                    TRUSTED_PROXIES="127.0.0.0/8, ::1"))
    direct.wait_healthy()
    proxied.wait_healthy()

    def signup(daemon: Daemon, email: str, forwarded: str | None = None,
               body: object = None) -> tuple[int, dict[str, str], object]:
        headers = {"x-forwarded-for": forwarded} if forwarded else {}
        return call(daemon, "POST", "/api/v1/auth/signup",
                    body if body is not None else {"email": email, "password": PASSWORD},
                    headers=headers)

    # Bad requests cost nothing; then three sign-ups from 127.0.0.1 on either instance (a
    # forwarded address from an untrusted peer is ignored), and the fourth is refused.
    for _ in range(5):
        assert signup(direct, "", body={"email": "x"})[0] == 400
    assert signup(direct, "a1@example.com", forwarded="203.0.113.9")[0] == 201
    assert signup(proxied, "a2@example.com")[0] == 201
    assert signup(direct, "a3@example.com")[0] == 201
    status, headers, body = signup(proxied, "a4@example.com", forwarded="127.0.0.1")
    assert status == 429, body
    assert error_code(body) == "rate_limited"  # type: ignore[arg-type]
    assert body["error"]["details"]["limit"] == "sign-ups from this address"  # type: ignore[index]
    assert 3600 <= int(headers["retry-after"]) <= 3960
    assert query(migrated_url, "SELECT count(*) FROM users") == [(3,)]

    # Behind a trusted proxy, the client is the address the proxy saw: the right-most entry
    # that is not itself a trusted proxy. What the client wrote to the left is not believed.
    assert signup(proxied, "b1@example.com", forwarded="203.0.113.7")[0] == 201
    assert signup(proxied, "b2@example.com", forwarded="10.9.9.9, 203.0.113.7")[0] == 201
    assert signup(proxied, "b3@example.com", forwarded="203.0.113.7, 127.0.0.1")[0] == 201
    assert signup(proxied, "b4@example.com", forwarded="198.51.100.1, 203.0.113.7")[0] == 429
    assert signup(direct, "b5@example.com", forwarded="192.0.2.1")[0] == 429  # not trusted
    assert signup(proxied, "c1@example.com", forwarded="garbage, 192.0.2.1")[0] == 201
    assert query(migrated_url, "SELECT address FROM sessions s JOIN users u ON u.id = s.user_id "
                               "WHERE u.email = 'c1@example.com'") == [("192.0.2.1",)]
