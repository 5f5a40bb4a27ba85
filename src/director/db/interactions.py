"""Database work written once, run by the daemon (txpostgres) and the CLI (psycopg2) alike.

An *interaction* is a generator that yields ``Query`` objects and receives each query's rows
back; its return value is the result. It runs inside one transaction either way::

    def rename(key_id, name) -> Interaction[int]:
        rows = yield Query("UPDATE api_keys SET name = %s WHERE id = %s RETURNING id", (name, key_id))
        return len(rows)

so the SQL, the order of statements and the NOTIFY that follows a change are shared by the
daemon, the admin commands and the tests, with no second copy to drift.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, TypeVar

import attrs

T = TypeVar("T")
Rows = list[tuple[Any, ...]]
Interaction = Generator["Query", Rows, T]

#: The one channel every instance listens on; payloads are ``<kind>:<key>`` (ids only).
CHANGES_CHANNEL = "director_changes"


@attrs.frozen
class Query:
    sql: str
    parameters: Sequence[Any] | dict[str, Any] | None = None


def notify_change(kind: str, key: object) -> Query:
    """Announce a committed change to every instance (delivered at commit, lost on rollback)."""
    return Query("SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, f"{kind}:{key}"))


def run_sync(connection: Any, interaction: Interaction[T]) -> T:
    """Run an interaction in one transaction on a psycopg2 connection."""
    try:
        with connection.cursor() as cursor:
            try:
                query = next(interaction)
                while True:
                    try:
                        cursor.execute(query.sql, query.parameters)
                    except Exception as error:
                        # The interaction may translate it (e.g. UniqueViolation -> NameTaken).
                        query = interaction.throw(error)
                        continue
                    rows = cursor.fetchall() if cursor.description else []
                    query = interaction.send(rows)
            except StopIteration as done:
                connection.commit()
                return done.value
    except BaseException:
        connection.rollback()
        raise


async def run_in_cursor(cursor: Any, interaction: Interaction[T]) -> T:
    """Drive an interaction on a txpostgres cursor (inside ``Database.runInteraction``)."""
    try:
        query = next(interaction)
        while True:
            try:
                await cursor.execute(query.sql, query.parameters)
            except Exception as error:
                query = interaction.throw(error)
                continue
            rows = cursor.fetchall() if cursor.description else []
            query = interaction.send(rows)
    except StopIteration as done:
        return done.value
