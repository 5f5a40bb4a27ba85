"""The daemon's database layer against a real PostgreSQL that goes away and comes back."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from director.db.database import Database, DatabaseUnavailable
from director.db.embedded import EmbeddedPostgres
from tests.harness import make_temp_dir


@pytest.fixture
def cluster() -> Iterator[EmbeddedPostgres]:
    """A private cluster of this test's own, so that it may be stopped and started."""
    cluster = EmbeddedPostgres(make_temp_dir("director-test-restart-"), fast_and_unsafe=True)
    cluster.initialise()
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.state_directory, ignore_errors=True)


async def eventually(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await task.deferLater(reactor, 0.02, lambda: None)


def notify(dsn: str, channel: str, payload: str) -> None:
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", (channel, payload))
    connection.close()


async def restart(cluster: EmbeddedPostgres) -> None:
    await threads.deferToThread(cluster.stop)
    # launch() must run in the reactor thread (parent-death signal); waiting may not block it.
    cluster.launch()
    await eventually(cluster.poll_ready)


@pytest_twisted.ensureDeferred
async def test_database_down_at_start_then_restarted_recovers_queries_and_listen(
    cluster: EmbeddedPostgres,
) -> None:
    dsn = cluster.dsn("postgres")
    database = Database(dsn, 2, reactor)
    received: list[str] = []
    reloads: list[float] = []
    database.on_reconnect(lambda: reloads.append(time.monotonic()))
    await database.listen("director_test", lambda channel, payload: received.append(payload))
    try:
        # 1. PostgreSQL is not running yet: the database is unavailable, with a reason.
        database.start()
        await task.deferLater(reactor, 0.5, lambda: None)
        assert not database.available
        assert "No such file or directory" in database.unavailable_reason or \
            "connection" in database.unavailable_reason
        with pytest.raises(DatabaseUnavailable):
            await database.ping()

        # 2. It comes up: everything connects without any help.
        cluster.launch()
        await eventually(lambda: database.available)
        assert await database.runQuery("SELECT 41 + 1") == [(42,)]
        await threads.deferToThread(notify, dsn, "director_test", "first")
        await eventually(lambda: received == ["first"])

        # 3. A restart while running: queries fail fast while it is down, then resume; LISTEN
        #    is re-issued and the reload hook runs, because NOTIFYs sent meanwhile are lost.
        reloads_before = len(reloads)
        await restart(cluster)
        await eventually(lambda: database.available and len(reloads) > reloads_before)
        assert await database.runQuery("SELECT 1") == [(1,)]
        await threads.deferToThread(notify, dsn, "director_test", "after restart")
        await eventually(lambda: received == ["first", "after restart"])

        # 4. Transactions roll back on error and commit otherwise.
        await database.runOperation("CREATE TABLE t (v int UNIQUE)")

        async def insert_twice(cursor: object, value: int) -> None:
            await cursor.execute("INSERT INTO t VALUES (%s)", (value,))  # type: ignore[attr-defined]
            await cursor.execute("INSERT INTO t VALUES (%s)", (value,))  # type: ignore[attr-defined]

        with pytest.raises(psycopg2.IntegrityError):
            await database.runInteraction(insert_twice, 7)
        assert await database.runQuery("SELECT count(*) FROM t") == [(0,)]
    finally:
        database.stop()


@pytest_twisted.ensureDeferred
async def test_queries_fail_fast_with_the_reason_while_down(cluster: EmbeddedPostgres) -> None:
    cluster.launch()
    await eventually(cluster.poll_ready)
    database = Database(cluster.dsn("postgres"), 1, reactor)
    try:
        database.start()
        await eventually(lambda: database.available)
        await threads.deferToThread(cluster.stop)
        await eventually(lambda: not database.available)
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await database.runQuery("SELECT 1")
        assert time.monotonic() - started < 1.0
        assert database.unavailable_reason
    finally:
        database.stop()
