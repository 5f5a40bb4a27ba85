"""Numbered SQL migrations: discover, apply in order, report.

Each ``migrations/NNNN_name.sql`` file runs in its own transaction together with the row that
records it in ``director_schema``; a session-level advisory lock serialises concurrent upgraders
(two instances started at once, or an operator's ``director db upgrade`` racing a daemon), and
the version is re-read after the lock is taken so the loser simply finds nothing left to do.

This module is synchronous (plain psycopg2): it runs from the CLI, from the test harness, and
from the daemon in a worker thread before it serves.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import attrs
import psycopg2

#: Arbitrary but fixed: the advisory lock key every Director instance agrees on.
ADVISORY_LOCK_KEY = 0x0D12EC7012

_FILE_PATTERN = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS director_schema (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The schema cannot be brought to (or used at) the version this code knows."""


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


@attrs.frozen
class SchemaStatus:
    current: int
    latest: int
    pending: tuple[Migration, ...]

    @property
    def up_to_date(self) -> bool:
        return self.current == self.latest

    @property
    def newer_than_code(self) -> bool:
        return self.current > self.latest


def known_migrations() -> tuple[Migration, ...]:
    found = []
    folder = resources.files("director.db") / "migrations"
    for entry in folder.iterdir():
        match = _FILE_PATTERN.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration files are not numbered 1..N without gaps: {versions}")
    return tuple(found)


def current_version(cursor: Any) -> int:
    cursor.execute("SELECT to_regclass('director_schema') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return 0
    cursor.execute("SELECT coalesce(max(version), 0) FROM director_schema")
    return int(cursor.fetchone()[0])


def status(dsn: str) -> SchemaStatus:
    migrations = known_migrations()
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            version = current_version(cursor)
        connection.rollback()
    finally:
        connection.close()
    latest = migrations[-1].version if migrations else 0
    return SchemaStatus(version, latest, tuple(m for m in migrations if m.version > version))


def upgrade(dsn: str) -> list[Migration]:
    """Apply every pending migration; return the ones this call applied."""
    migrations = known_migrations()
    latest = migrations[-1].version if migrations else 0
    connection = psycopg2.connect(dsn)
    applied: list[Migration] = []
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
            try:
                cursor.execute(_VERSION_TABLE)
                version = current_version(cursor)
                if version > latest:
                    raise MigrationError(newer_schema_message(version, latest))
                for migration in migrations:
                    if migration.version <= version:
                        continue
                    cursor.execute("BEGIN")
                    try:
                        cursor.execute(migration.sql)
                        cursor.execute(
                            "INSERT INTO director_schema (version, name) VALUES (%s, %s)",
                            (migration.version, migration.name),
                        )
                        cursor.execute("COMMIT")
                    except Exception as error:
                        cursor.execute("ROLLBACK")
                        raise MigrationError(
                            f"migration {migration.version:04d}_{migration.name} failed and was "
                            f"rolled back: {str(error).strip()}"
                        ) from error
                    applied.append(migration)
            finally:
                cursor.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    finally:
        connection.close()
    return applied


def newer_schema_message(current: int, latest: int) -> str:
    return (
        f"the database schema is at version {current}, newer than this Director knows "
        f"(up to {latest}); upgrade Director, or point DATABASE_URL at another database"
    )


def outdated_schema_message(current: int, latest: int) -> str:
    return (
        f"the database schema is at version {current}, this Director needs {latest}; "
        "run `director db upgrade` (back up the database first)"
    )
