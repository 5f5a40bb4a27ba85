"""``/api/health``'s answer through the start, on a stand-in for the service's state: 503 until
the whole start has finished (not only the caches), then 200 while the database answers.

A balancer or a test that takes the first 200 as "started" must not reach a daemon still
starting its shared sessions, Studio and OAuth: a database lost in that window was reported
as an unexpected start error, not as the database's exit (``tests/test_daemon.py``). And a
start that fails because its private database died meanwhile names that exit, on a stand-in
whose cluster has exited."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest_twisted
from psycopg2 import OperationalError
from twisted.internet import defer
from twisted.python.failure import Failure

from director.service import DirectorService


class Database:
    def __init__(self) -> None:
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1


def service_state() -> Any:
    return SimpleNamespace(
        database_lost=None, stopping=False, schema_ready=False,
        accounts=SimpleNamespace(loaded=False), playbooks=SimpleNamespace(loaded=False),
        ready=defer.Deferred(), database=Database())


@pytest_twisted.ensureDeferred
async def test_health_waits_for_the_whole_start() -> None:
    state = service_state()
    assert await DirectorService.health_reason(state) == "database: not connected yet"
    state.schema_ready = state.accounts.loaded = state.playbooks.loaded = True
    assert await DirectorService.health_reason(state) == "starting"
    assert state.database.pings == 0
    state.ready.callback(None)
    assert await DirectorService.health_reason(state) is None
    assert state.database.pings == 1


@pytest_twisted.ensureDeferred
async def test_stopping_and_a_lost_database_still_come_first() -> None:
    state = service_state()
    state.stopping = True
    assert await DirectorService.health_reason(state) == "shutting down"
    state.database_lost = "the private PostgreSQL exited"
    assert await DirectorService.health_reason(state) == "database: the private PostgreSQL exited"


class ExitedCluster:
    """A private cluster whose postmaster has exited (killed during the start)."""

    log_file = "/var/lib/director/postgres/log"

    def __init__(self) -> None:
        self.reaped = 0

    def owned_postmaster(self) -> int | None:
        return None

    def reap(self) -> str:
        self.reaped += 1
        return "killed by SIGKILL"


class Watch:
    stopped = False

    def stop(self) -> None:
        self.stopped = True


def starting_service(embedded: Any) -> Any:
    exits: list[tuple[str | None, int]] = []
    state = SimpleNamespace(stopping=False, exit_code=0, embedded=embedded,
                            postmaster_watch=Watch(), database_lost=None, exits=exits)

    def record_exit(reason: str | None, code: int) -> None:
        exits.append((reason, code))
        state.exit_code = code

    state._exit = record_exit
    state._private_database_died = lambda: DirectorService._private_database_died(state)
    state._postmaster_exited = lambda: DirectorService._postmaster_exited(state)
    return state


def test_a_start_that_fails_because_its_private_database_died_names_the_exit() -> None:
    cluster = ExitedCluster()
    state = starting_service(cluster)
    # What the start saw: its next query failed, before the watch on the postmaster fired.
    DirectorService._fatal(state, Failure(OperationalError("server closed the connection")))
    [(reason, code)] = state.exits
    assert code == 1 and reason is not None
    assert reason.startswith("the private PostgreSQL exited (killed by SIGKILL)")
    assert "stop Director, not its database" in reason
    assert state.postmaster_watch.stopped and cluster.reaped == 1
    DirectorService._postmaster_exited(state)  # the watch, late: nothing more is reported
    assert len(state.exits) == 1


def test_an_unexpected_start_error_with_the_database_running_is_reported_as_such() -> None:
    running = SimpleNamespace(owned_postmaster=lambda: 4242)
    state = starting_service(running)
    DirectorService._fatal(state, Failure(RuntimeError("a bug")))
    assert state.exits == [(None, 1)]  # logged with its traceback, as unexpected
