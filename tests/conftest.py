"""Fixtures: one PostgreSQL server per test session, a fresh database per test, daemons."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from director.db import migrate
from director.db.database import Database
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


# --- coverage: daemons and commands, not every child ----------------------------------------
# `make test` sets COVERAGE_PROCESS_START so that pytest-xdist's workers measure themselves.
# A process that runs tests hands it on only to the `director` daemons and commands it starts
# (harness.coverage_environment): the fixture servers and tools it runs stay unmeasured, as
# quick to start as before, and write no data files of their own.


def pytest_configure(config: pytest.Config) -> None:
    spawns_workers = bool(getattr(config.option, "numprocesses", None)) and not hasattr(
        config, "workerinput")
    if not spawns_workers:
        os.environ.pop("COVERAGE_PROCESS_START", None)


# --- root: stdio servers run as nobody ---------------------------------------------------
#: The account a root daemon runs stdio servers as (the default STDIO_USER).
STDIO_USER = "nobody"


def _blocking_path(path: Path, uid: int, gid: int) -> Path | None:
    """The first of ``path`` and its parents that the account cannot enter or read."""
    for current in [*reversed(path.parents), path]:
        info = current.stat()
        shift = 6 if info.st_uid == uid else 3 if info.st_gid == gid else 0
        needed = (stat.S_IXOTH if stat.S_ISDIR(info.st_mode) else stat.S_IROTH) << shift
        if not info.st_mode & needed:
            return current
    return None


@pytest.fixture(scope="session", autouse=True)
def stdio_servers_can_run() -> None:
    """Run as root, the daemons start every stdio server as nobody, which must then be able
    to run this virtualenv's python with the mcp SDK (the fixture servers use it). Say what
    blocks it at once rather than through a hundred failing tests."""
    if os.geteuid() != 0:
        return
    account = pwd.getpwnam(STDIO_USER)
    try:
        probe = subprocess.run([sys.executable, "-c", "import mcp"], user=account.pw_uid,
                               group=account.pw_gid, extra_groups=[], capture_output=True,
                               text=True, check=False)
        if probe.returncode == 0:
            return
        error = (probe.stderr.strip().splitlines() or ["?"])[-1]
    except OSError as failure:  # the exec itself was refused
        error = str(failure)
    import mcp

    blocked = None
    for target in (Path(sys.executable), Path(sys.executable).resolve(), Path(mcp.__file__)):
        blocked = blocked or _blocking_path(target, account.pw_uid, account.pw_gid)
    pytest.exit(
        f"the suite runs as root, so its stdio servers run as {STDIO_USER}, who cannot run "
        f"{sys.executable} -c 'import mcp' ({error}); "
        f"blocked at {blocked or 'an unknown path'}. Recreate the virtualenv on an interpreter "
        "every account can run: rm -rf .venv && make .venv/.installed (the Makefile prefers "
        "/usr/bin/python3), and keep the checkout in a directory others may enter",
        returncode=3)


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
def database(migrated_url: str) -> Iterator[Database]:
    """A ``Database`` (two connections) on this test's migrated database, started; in-process
    tests wait for it with ``accounts_helpers.until_available``."""
    from twisted.internet import reactor  # not at import: pytest-twisted installs the reactor

    database = Database(migrated_url, 2, reactor)
    database.start()
    yield database
    database.stop()


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


@pytest.fixture
def logged_failures() -> Iterator[list[str]]:
    """The failures logged (``log.failure``) during the test, as text."""
    logged: list[str] = []

    def observe(event: LogEvent) -> None:
        if "log_failure" in event:
            logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield logged
    globalLogPublisher.removeObserver(observe)
