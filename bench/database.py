"""The "external" PostgreSQL: one private cluster started by the bench, migrated, shared by runs.

It is Director's own ``EmbeddedPostgres`` started outside the daemon, so the daemon sees it as
an external ``DATABASE_URL`` (unix socket, trust authentication) and only checks its schema.
Figures that must not leave rows behind for the others (10,000 playbooks) get a database of
their own in the same cluster (``extra_database``).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import psycopg2

from bench.reaper import Reaper
from director.db import migrate
from director.db.embedded import EmbeddedPostgres


@attrs.frozen
class ExternalDatabase:
    url: str
    postmaster_pid: int
    cluster: EmbeddedPostgres

    def extra_database(self, name: str) -> tuple[str, str]:
        """Create and migrate database ``name`` in the same cluster: (its URL, its DSN)."""
        connection = psycopg2.connect(self.cluster.dsn("postgres"))
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        dsn = self.cluster.dsn(name)
        migrate.upgrade(dsn)
        return self.cluster.url(name), dsn


def start_external_database(reaper: Reaper, directory: Path) -> ExternalDatabase:
    """Start and migrate the cluster under ``directory``; the reaper stops it at exit."""
    cluster = EmbeddedPostgres(directory, fast_and_unsafe=False)
    reaper.push("stop the external PostgreSQL", cluster.stop)
    cluster.start()
    migrate.upgrade(cluster.dsn())
    pid = cluster.running_postmaster()
    assert pid is not None, "the external PostgreSQL is not running after start"
    return ExternalDatabase(cluster.url(), pid, cluster)
