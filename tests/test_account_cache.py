"""The account cache's expiries, in process on the real database with a clock the test moves:
an unknown key is remembered for ``UNKNOWN_KEY_CACHE_SECONDS``, a cookie session for
``SESSION_CACHE_SECONDS`` and never past its own expiry.

The caches are not started (no LISTEN): a change made in the database meanwhile reaches them
only when an entry expires, which is what is under test.
"""

from __future__ import annotations

import datetime
import time
from uuid import UUID

import pytest_twisted
from twisted.internet import task

from director.accounts import store
from director.accounts.cache import (
    SESSION_CACHE_SECONDS,
    UNKNOWN_KEY_CACHE_SECONDS,
    AccountCache,
)
from director.accounts.credentials import KEY_VISIBLE_LENGTH, generate_api_key, hash_token
from director.accounts.usage import KeyUsage
from director.db.database import Database
from tests.accounts_helpers import until_available


async def cache_on_wall_clock(database: Database) -> tuple[task.Clock, AccountCache]:
    """A cache on a clock the test moves, starting at the wall clock's time (PostgreSQL's
    ``now()`` sets the sessions' expiry)."""
    await until_available(database)
    clock = task.Clock()
    clock.advance(time.time())
    return clock, AccountCache(database, clock)


async def new_user(database: Database, email: str) -> UUID:
    await until_available(database)
    user, _ = await database.run(store.create_user(email, "", "active", with_default_key=False))
    return user.id


async def new_key(database: Database, email: str) -> str:
    """A new user's key, written as another instance would (this cache hears nothing)."""
    user_id = await new_user(database, email)
    value = generate_api_key()
    await database.runOperation(
        "INSERT INTO api_keys (user_id, name, prefix, key_hash) VALUES (%s, %s, %s, %s)",
        (str(user_id), "key", value[:KEY_VISIBLE_LENGTH], hash_token(value)))
    return value


async def new_session(database: Database, email: str) -> tuple[str, store.Session]:
    token = generate_api_key()
    user_id = await new_user(database, email)
    return token, await database.run(store.create_session(user_id, token, None, None))


@pytest_twisted.ensureDeferred
async def test_an_unknown_key_is_remembered_for_a_few_seconds(database: Database) -> None:
    clock, cache = await cache_on_wall_clock(database)
    user_id = await new_user(database, "keys@example.com")
    value = generate_api_key()
    assert await cache.key(value) is None
    # Created now, as on another instance whose notification this one has not had.
    await database.runOperation(
        "INSERT INTO api_keys (user_id, name, prefix, key_hash) VALUES (%s, %s, %s, %s)",
        (str(user_id), "late", value[:KEY_VISIBLE_LENGTH], hash_token(value)))
    clock.advance(UNKNOWN_KEY_CACHE_SECONDS - 0.001)
    assert await cache.key(value) is None  # still the remembered answer: no query
    clock.advance(0.001)
    found = await cache.key(value)
    assert found is not None and found.user_id == user_id and found.name == "late"


@pytest_twisted.ensureDeferred
async def test_a_session_is_cached_for_a_minute(database: Database) -> None:
    clock, cache = await cache_on_wall_clock(database)
    token, created = await new_session(database, "sessions@example.com")
    assert await cache.session(token) == created
    await database.runOperation("DELETE FROM sessions WHERE id = %s", (str(created.id),))
    clock.advance(SESSION_CACHE_SECONDS - 0.001)
    assert await cache.session(token) == created
    clock.advance(0.001)
    assert await cache.session(token) is None  # read again: gone


@pytest_twisted.ensureDeferred
async def test_a_cached_session_is_not_served_past_its_expiry(database: Database) -> None:
    token, created = await new_session(database, "expiry@example.com")
    await database.runOperation(
        "UPDATE sessions SET expires_at = now() + interval '30 seconds' WHERE id = %s",
        (str(created.id),))
    # The clock starts at or after that now(): the session ends before +30 s by it.
    clock, cache = await cache_on_wall_clock(database)
    session = await cache.session(token)
    assert session is not None and session.expires_at.timestamp() <= clock.seconds() + 30
    await database.runOperation("DELETE FROM sessions WHERE id = %s", (str(created.id),))
    clock.advance(29.0)  # well inside SESSION_CACHE_SECONDS, and before the expiry
    assert await cache.session(token) == session
    clock.advance(1.0)
    assert await cache.session(token) is None  # expired by the clock: read again, and gone


@pytest_twisted.ensureDeferred
async def test_a_found_key_remembered_by_its_value_is_still_refused_once_revoked(
        database: Database) -> None:
    _, cache = await cache_on_wall_clock(database)
    value = await new_key(database, "memo@example.com")
    found = await cache.key(value)
    assert found is not None and await cache.key(value) == found  # the second by its value
    await database.runOperation("UPDATE api_keys SET revoked_at = now() WHERE id = %s",
                                (str(found.id),))
    cache.key_revoked(found.id)
    assert await cache.key(value) is None
    assert cache.refusal(value) == "revoked"
    # A made-up key is never remembered by its value, however often it is tried.
    for _ in range(3):
        assert await cache.key(generate_api_key()) is None
    assert list(cache._digests) == [value]


@pytest_twisted.ensureDeferred
async def test_a_keys_last_use_is_the_clocks_time_read_before_and_after_it_is_written(
        database: Database) -> None:
    clock, cache = await cache_on_wall_clock(database)
    key = await cache.key(await new_key(database, "usage@example.com"))
    assert key is not None
    user_id = key.user_id
    usage = KeyUsage(database, clock)
    clock.advance(0.25)
    usage.used(key)
    expected = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)
    assert await usage.last_used(user_id) == {key.id: expected}  # noted, not written yet
    await usage.flush()
    assert await usage.last_used(user_id) == {key.id: expected}  # read back from the row
    rows = await database.runQuery("SELECT last_used_at FROM api_keys WHERE id = %s",
                                   (str(key.id),))
    assert rows[0][0] == expected
