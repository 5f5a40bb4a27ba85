"""Time-dependent code reads the clock it is given (``director.clock``), never the time itself:
a cookie session's renewal, the OAuth token cache, the login throttle and the registry client's
cache, each on a ``task.Clock`` the test moves (in process, on the real database where one is
read); and a scan of the daemon's source for code that reads the time itself again.
"""

from __future__ import annotations

import ast
import datetime
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyRequest

import director
from director.accounts import store
from director.accounts.cache import AccountCache
from director.accounts.credentials import hash_token
from director.accounts.ratelimit import RateLimiter
from director.accounts.throttle import (
    ADDRESS_FAILURES,
    FREE_FAILURES,
    WINDOW_SECONDS,
    LoginThrottle,
)
from director.clock import utc_now
from director.config import Settings
from director.db.database import Database
from director.oauth.server.grants import ACCESS_PREFIX, new_secret
from director.oauth.server.tokens import UNKNOWN_TOKEN_SECONDS, TokenCache
from director.registry.client import RegistryClient
from director.web.auth import Authenticator, cookie_name
from tests.test_account_cache import new_session, new_user

#: Just short of a limit: a binary fraction, so that the clock's sums stay exact (epoch seconds
#: included: their floats' steps are finer) and the next step lands on the limit itself.
EPSILON = 2.0 ** -10


def clock_at(seconds: float) -> task.Clock:
    clock = task.Clock()
    clock.advance(seconds)
    return clock


# --- cookie sessions -------------------------------------------------------------------------


def authenticator_on(database: Database, clock: task.Clock) -> Authenticator:
    return Authenticator(Settings(), database, AccountCache(database, clock),
                         RateLimiter(database, clock), clock)


def cookie_request(token: str) -> DummyRequest:
    request = DummyRequest([b"api", b"v1", b"me"])
    request.requestHeaders.addRawHeader(b"cookie", f"{cookie_name(Settings())}={token}".encode())
    return request


async def renewed_at(database: Database, session_id: UUID) -> datetime.datetime:
    rows = await database.runQuery("SELECT renewed_at FROM sessions WHERE id = %s",
                                   (str(session_id),))
    return rows[0][0]


@pytest_twisted.ensureDeferred
async def test_a_cookie_session_is_renewed_once_a_day_old_and_not_before(
        database: Database) -> None:
    token, session = await new_session(database, "renewal@example.com")
    due = session.renewed_at + store.SESSION_RENEW_AFTER
    clock = clock_at(due.timestamp() - EPSILON)
    auth = authenticator_on(database, clock)

    early = cookie_request(token)
    await auth.authenticate(early)
    assert early.responseHeaders.getRawHeaders(b"set-cookie") is None
    assert await renewed_at(database, session.id) == session.renewed_at

    clock.advance(EPSILON)  # exactly SESSION_RENEW_AFTER old by the injected clock
    due_request = cookie_request(token)
    await auth.authenticate(due_request)
    [cookie] = due_request.responseHeaders.getRawHeaders(b"set-cookie")
    rows = await database.runQuery("SELECT expires_at FROM sessions WHERE id = %s",
                                   (str(session.id),))
    # Max-Age counts from the clock's now to the expiry the database set.
    max_age = int((rows[0][0] - utc_now(clock)).total_seconds())
    assert f"Max-Age={max_age};" in cookie.decode()
    assert await renewed_at(database, session.id) > session.renewed_at

    again = cookie_request(token)  # the cached session was renewed at the clock's now
    await auth.authenticate(again)
    assert again.responseHeaders.getRawHeaders(b"set-cookie") is None


# --- OAuth access tokens ---------------------------------------------------------------------


async def new_access_token(database: Database, expires_at: float) -> str:
    """An access token of a new grant, expiring at ``expires_at`` (epoch seconds)."""
    user_id = await new_user(database, f"oauth-{new_secret()[:8].lower()}@example.com")
    rows = await database.runQuery(
        "INSERT INTO playbooks (user_id, id, name) VALUES (%s, 'clocked', 'Clocked') "
        "RETURNING pk", (str(user_id),))
    playbook_pk = rows[0][0]
    client_id = "dc_" + new_secret()[:12]
    await database.runOperation(
        "INSERT INTO oauth_clients (client_id, kind, redirect_uris, metadata) "
        "VALUES (%s, 'registered', %s, '{}')", (client_id, ["http://127.0.0.1:1/cb"]))
    rows = await database.runQuery(
        "INSERT INTO oauth_grants (user_id, client_id, playbook_pk, resource, scope) "
        "VALUES (%s, %s, %s, 'r', 'mcp:read') RETURNING id",
        (str(user_id), client_id, str(playbook_pk)))
    token = new_secret(ACCESS_PREFIX)
    await store_access_token(database, token, rows[0][0], expires_at)
    return token


async def store_access_token(database: Database, token: str, grant_id: Any,
                             expires_at: float) -> None:
    await database.runOperation(
        "INSERT INTO oauth_tokens (token_hash, grant_id, kind, scope, expires_at) "
        "VALUES (%s, %s, 'access', 'mcp:read', to_timestamp(%s))",
        (hash_token(token), str(grant_id), expires_at))


@pytest_twisted.ensureDeferred
async def test_a_cached_access_token_expires_exactly_at_its_expiry(database: Database) -> None:
    start = float(int(time.time()))  # the database's now(): it reads only unexpired tokens
    expires_at = start + 100
    token = await new_access_token(database, expires_at)
    clock = clock_at(start)
    tokens = TokenCache(database, clock)
    found = await tokens.grant(token)
    assert found is not None and found.expires_at == expires_at
    clock.advance(expires_at - start - EPSILON)
    assert await tokens.grant(token) == found
    clock.advance(EPSILON)
    # Still valid by the database's clock: refused by the injected one.
    assert await tokens.grant(token) is None and len(tokens) == 0


@pytest_twisted.ensureDeferred
async def test_an_unknown_access_token_is_remembered_for_its_seconds(database: Database) -> None:
    start = float(int(time.time()))
    known = await new_access_token(database, start + 3600)
    clock = clock_at(start)
    tokens = TokenCache(database, clock)
    grant = await tokens.grant(known)
    assert grant is not None
    late = new_secret(ACCESS_PREFIX)
    assert await tokens.grant(late) is None
    await store_access_token(database, late, grant.id, start + 3600)  # issued meanwhile
    clock.advance(UNKNOWN_TOKEN_SECONDS - EPSILON)
    assert await tokens.grant(late) is None  # the remembered answer: no query
    clock.advance(EPSILON)
    found = await tokens.grant(late)
    assert found is not None and found.id == grant.id


# --- the login throttle ----------------------------------------------------------------------


def test_a_throttled_email_waits_exactly_its_delay() -> None:
    clock = task.Clock()
    throttle = LoginThrottle(clock)
    for _ in range(FREE_FAILURES):
        assert throttle.retry_after("a@example.com", "192.0.2.1") == 0
        throttle.failed("a@example.com", "192.0.2.1")
    assert throttle.retry_after("a@example.com", "192.0.2.1") == 1
    clock.advance(1 - EPSILON)
    assert throttle.retry_after("a@example.com", "192.0.2.1") == 1  # rounded up
    clock.advance(EPSILON)
    assert throttle.retry_after("a@example.com", "192.0.2.1") == 0
    throttle.failed("a@example.com", "192.0.2.1")
    assert throttle.retry_after("a@example.com", "192.0.2.1") == 2  # doubled


def test_an_address_is_refused_until_its_window_has_passed_exactly() -> None:
    clock = task.Clock()
    throttle = LoginThrottle(clock)
    for n in range(ADDRESS_FAILURES):  # one failure each: only the address's count is high
        throttle.failed(f"user{n}@example.com", "192.0.2.2")
    assert throttle.retry_after("new@example.com", "192.0.2.2") == WINDOW_SECONDS + 1
    clock.advance(WINDOW_SECONDS - EPSILON)
    assert throttle.retry_after("new@example.com", "192.0.2.2") == 1
    clock.advance(EPSILON)
    assert throttle.retry_after("new@example.com", "192.0.2.2") == 0


# --- the registry client's cache -------------------------------------------------------------


class CountingRegistry(Resource):
    """An empty registry whose answers may be reused for ``max_age`` seconds."""

    isLeaf = True

    def __init__(self, max_age: int) -> None:
        super().__init__()
        self.max_age = max_age
        self.requests = 0

    def render_GET(self, request: Request) -> bytes:
        self.requests += 1
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", f"max-age={self.max_age}".encode())
        return json.dumps({"servers": [], "metadata": {}}).encode()


@pytest.fixture
def counting_registry() -> Iterator[tuple[str, CountingRegistry]]:
    registry = CountingRegistry(max_age=60)
    port: Any = reactor.listenTCP(0, Site(registry), interface="127.0.0.1")  # type: ignore[attr-defined]
    yield f"http://127.0.0.1:{port.getHost().port}", registry
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_registry_answer_is_reused_until_its_max_age_exactly(
        counting_registry: tuple[str, CountingRegistry]) -> None:
    url, registry = counting_registry
    clock = clock_at(1_800_000_000)
    client = RegistryClient(url, reactor, clock=clock)
    try:
        await client.search("x")
        assert registry.requests == 1
        clock.advance(60 - EPSILON)
        await client.search("x")
        assert registry.requests == 1  # from the cache
        clock.advance(EPSILON)
        await client.search("x")
        assert registry.requests == 2  # expired: fetched again
    finally:
        await client.close()


# --- no reading the time behind the clock's back ---------------------------------------------

SOURCE = Path(director.__file__).parent
#: Where reading the time itself is right: the CLI, the embedded database's start-up polling of
#: its child process, log records' timestamps, and the clocks themselves.
EXEMPT = ("cli/", "db/embedded.py", "logs.py", "clock.py", "mcp/clock.py")
TIME_READERS = {
    "time.time", "time.time_ns", "time.monotonic", "time.monotonic_ns", "time.perf_counter",
    "datetime.now", "datetime.utcnow", "datetime.today", "date.today",
    "datetime.datetime.now", "datetime.datetime.utcnow", "datetime.datetime.today",
    "datetime.date.today",
}


def dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def time_readers(source: str) -> list[tuple[int, str]]:
    """(line, name) of each reference to a function that reads the time: called, passed, or
    a default argument; and of each such function imported by name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and dotted(node) in TIME_READERS:
            found.append((node.lineno, str(dotted(node))))
        elif isinstance(node, ast.ImportFrom) and node.module in ("time", "datetime"):
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if f"{node.module}.{alias.name}" in TIME_READERS]
    return found


def test_the_scan_finds_each_way_of_reading_the_time() -> None:
    source = ("import time, datetime\nfrom time import monotonic\n"
              "def f(clock=time.monotonic):\n    return datetime.datetime.now(datetime.UTC)\n"
              "g = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)\n")
    assert sorted(time_readers(source)) == [(2, "time.monotonic"), (3, "time.monotonic"),
                                            (4, "datetime.datetime.now")]


def test_the_daemon_reads_the_time_only_from_its_clock() -> None:
    offenders = []
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE).as_posix()
        if relative.startswith(EXEMPT[0]) or relative in EXEMPT[1:]:
            continue
        offenders += [f"src/director/{relative}:{line}: {name}"
                      for line, name in time_readers(path.read_text())]
    assert not offenders, ("read the time from the injected clock (director.clock: utc_now, "
                           "clock.seconds()) instead of:\n" + "\n".join(offenders))
