"""The "external" PostgreSQL: one private cluster started by the bench, migrated, shared by runs.

It is Director's own ``EmbeddedPostgres`` started outside the daemon, so the daemon sees it as
an external ``DATABASE_URL`` (unix socket, trust authentication) and only checks its schema.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from bench.reaper import Reaper
from director.db import migrate
from director.db.embedded import EmbeddedPostgres


@attrs.frozen
class ExternalDatabase:
    url: str
    postmaster_pid: int


def start_external_database(reaper: Reaper, directory: Path) -> ExternalDatabase:
    """Start and migrate the cluster under ``directory``; the reaper stops it at exit."""
    cluster = EmbeddedPostgres(directory, fast_and_unsafe=False)
    reaper.push("stop the external PostgreSQL", cluster.stop)
    cluster.start()
    migrate.upgrade(cluster.dsn())
    pid = cluster.running_postmaster()
    assert pid is not None, "the external PostgreSQL is not running after start"
    return ExternalDatabase(cluster.url(), pid)
