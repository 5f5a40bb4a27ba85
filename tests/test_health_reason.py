"""``/api/health``'s answer through the start, on a stand-in for the service's state: 503 until
the whole start has finished (not only the caches), then 200 while the database answers.

A balancer or a test that takes the first 200 as "started" must not reach a daemon still
starting its shared sessions, Studio and OAuth: a database lost in that window was reported
as an unexpected start error, not as the database's exit (``tests/test_daemon.py``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest_twisted
from twisted.internet import defer

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
