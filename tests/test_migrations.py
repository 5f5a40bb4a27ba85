"""Schema migrations against real PostgreSQL: idempotent, transactional, concurrent-safe."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import attrs
import pytest

from director.db import migrate
from tests.harness import DIRECTOR, base_environment, query


def test_upgrade_applies_everything_once(database_url: str) -> None:
    before = migrate.status(database_url)
    assert before.current == 0 and not before.up_to_date
    assert [m.version for m in before.pending] == list(range(1, before.latest + 1))

    applied = migrate.upgrade(database_url)
    assert [m.version for m in applied] == list(range(1, before.latest + 1))
    after = migrate.status(database_url)
    assert after.up_to_date and after.pending == ()
    recorded = query(database_url, "SELECT version, name FROM director_schema ORDER BY version")
    assert recorded == [(m.version, m.name) for m in migrate.known_migrations()]

    assert migrate.upgrade(database_url) == []  # idempotent
    assert query(database_url, "SELECT count(*) FROM deployment") == [(1,)]


def test_concurrent_upgrades_apply_each_migration_once(database_url: str) -> None:
    results: list[list[migrate.Migration]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate.upgrade(database_url))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(len(applied) for applied in results) == [0, 0, 0, len(migrate.known_migrations())]
    assert query(database_url, "SELECT count(*) FROM deployment") == [(1,)]


def test_newer_schema_is_refused_and_left_alone(migrated_url: str) -> None:
    latest = migrate.known_migrations()[-1].version
    query(migrated_url, "INSERT INTO director_schema (version, name) VALUES (%s, 'future')",
          latest + 5)
    with pytest.raises(migrate.MigrationError, match=r"newer than this Director knows"):
        migrate.upgrade(migrated_url)
    assert migrate.status(migrated_url).newer_than_code
    assert query(migrated_url, "SELECT max(version) FROM director_schema") == [(latest + 5,)]


@pytest.fixture
def broken_migration(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A real extra migration whose second statement fails, appended to the real ones."""
    real = migrate.known_migrations()
    broken = migrate.Migration(
        len(real) + 1, "broken",
        "CREATE TABLE half_done (id int); INSERT INTO no_such_table VALUES (1);",
    )
    monkeypatch.setattr(migrate, "known_migrations", lambda: (*real, broken))
    yield


def test_failed_migration_rolls_back_entirely(database_url: str, broken_migration: None) -> None:
    real = len(migrate.known_migrations()) - 1
    with pytest.raises(migrate.MigrationError,
                       match=rf"{real + 1:04d}_broken failed and was rolled back"):
        migrate.upgrade(database_url)
    # Earlier migrations committed; the broken one left nothing behind.
    assert query(database_url, "SELECT max(version) FROM director_schema") == [(real,)]
    assert query(database_url, "SELECT to_regclass('half_done')") == [(None,)]
    # The advisory lock was released: another upgrader is not blocked.
    assert query(database_url, "SELECT pg_try_advisory_lock(%s)", migrate.ADVISORY_LOCK_KEY) == \
        [(True,)]


def test_migration_files_are_well_formed() -> None:
    migrations = migrate.known_migrations()
    assert migrations and all(attrs.has(type(m)) and m.sql.strip() for m in migrations)


def test_db_commands_against_an_external_database(database_url: str) -> None:
    import subprocess

    def director(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DIRECTOR, *args], env=base_environment(DATABASE_URL=database_url),
                              capture_output=True, text=True, timeout=60, check=False)

    pending = director("db", "status")
    assert pending.returncode == 1
    assert "pending: 0001_deployment" in pending.stdout and "director db upgrade" in pending.stdout
    upgraded = director("db", "upgrade")
    assert upgraded.returncode == 0 and "applied 0001_deployment" in upgraded.stdout
    again = director("db", "upgrade", "--json")
    assert again.returncode == 0 and '"applied": []' in again.stdout
    status = director("db", "status", "--json")
    assert status.returncode == 0 and '"pending": []' in status.stdout


def test_db_command_reports_an_unreachable_database() -> None:
    import subprocess

    result = subprocess.run(
        [DIRECTOR, "db", "status"],
        env=base_environment(DATABASE_URL="postgres://nobody@127.0.0.1:1/none"),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("director: cannot reach the database:")
    assert "Traceback" not in result.stderr
