"""Fixtures: one PostgreSQL server per test session, a fresh database per test, daemons."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from director.db import migrate
from tests.harness import Daemon, PostgresServer, base_environment, free_port

# --- CI: a skipped test is a failure ------------------------------------------------------
# `.ci/run` installs everything the suite needs, then sets DIRECTOR_CI=1: there, a test that
# skips (a missing tool, a fixture that cannot run) did not run when it should have, so it
# fails with the skip's reason. Expected failures (xfail) are not skips.


def _fail_skips() -> bool:
    return os.environ.get("DIRECTOR_CI") == "1"


def _skip_as_failure(report: pytest.TestReport | pytest.CollectReport) -> None:
    if _fail_skips() and report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under DIRECTOR_CI=1, where every test must run: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[pytest.TestReport]:
    report: pytest.TestReport = yield
    _skip_as_failure(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[pytest.CollectReport]:
    report: pytest.CollectReport = yield  # a module-level skip or importorskip
    _skip_as_failure(report)
    return report


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
