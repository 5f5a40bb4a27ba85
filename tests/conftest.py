"""Fixtures: one PostgreSQL server per test session, a fresh database per test, daemons."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from director.db import migrate
from tests.harness import Daemon, PostgresServer, base_environment, free_port


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    url = os.environ.get("TEST_DATABASE_URL")
    server = PostgresServer(url) if url else PostgresServer.start_private()
    yield server
    server.stop()


@pytest.fixture
def database_url(postgres: PostgresServer) -> Iterator[str]:
    """An empty database of this test's own."""
    name = postgres.create_database()
    yield postgres.url_for(name)
    postgres.drop_database(name)


@pytest.fixture
def migrated_url(database_url: str) -> str:
    migrate.upgrade(database_url)
    return database_url


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., Daemon]]:
    """``start_daemon(**env)`` runs ``director serve`` on a free port; all are killed at the end."""
    daemons: list[Daemon] = []

    def start(argv: list[str] | None = None, **overrides: Any) -> Daemon:
        overrides.setdefault("PORT", str(free_port()))
        daemon = Daemon(base_environment(**overrides), argv=argv)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()
