"""``director db upgrade|status``: the database schema, migrated or checked."""

from __future__ import annotations

import argparse
import json
from typing import Any

from director.cli.base import CommandError, database_dsn, json_flag, settings_from


def _schema_work(arguments: argparse.Namespace, upgrade: bool) -> tuple[list[Any], Any]:
    """(migrations applied, the schema status afterwards) on the daemon's database."""
    from director.db import migrate

    settings = settings_from(arguments)
    with database_dsn(settings) as dsn:
        try:
            applied = migrate.upgrade(dsn) if upgrade else []
            return applied, migrate.status(dsn)
        except migrate.MigrationError as error:
            raise CommandError(str(error)) from None
        except Exception as error:
            raise CommandError(f"cannot reach the database: {' '.join(str(error).split())}") \
                from None


def cmd_db_upgrade(arguments: argparse.Namespace) -> int:
    applied, state = _schema_work(arguments, upgrade=True)
    if arguments.json:
        print(json.dumps({"applied": [f"{m.version:04d}_{m.name}" for m in applied],
                          "version": state.current}))
    elif applied:
        for migration in applied:
            print(f"applied {migration.version:04d}_{migration.name}")
        print(f"schema is at version {state.current}")
    else:
        print(f"schema is up to date (version {state.current})")
    return 0


def cmd_db_status(arguments: argparse.Namespace) -> int:
    from director.db import migrate

    _, state = _schema_work(arguments, upgrade=False)
    pending = [f"{m.version:04d}_{m.name}" for m in state.pending]
    if arguments.json:
        print(json.dumps({"version": state.current, "latest": state.latest, "pending": pending}))
    elif state.newer_than_code:
        print(migrate.newer_schema_message(state.current, state.latest))
    elif pending:
        print(f"schema is at version {state.current} of {state.latest}; pending: "
              + ", ".join(pending) + "\nrun `director db upgrade`")
    else:
        print(f"schema is up to date (version {state.current})")
    return 0 if state.up_to_date else 1


def add_commands(commands: Any) -> None:
    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = db_commands.add_parser(
        "upgrade", help="apply pending migrations (safe to run from several hosts at once)")
    json_flag(upgrade)
    upgrade.set_defaults(handler=cmd_db_upgrade)
    status = db_commands.add_parser(
        "status", help="show the schema version; exit 1 when migrations are pending")
    json_flag(status)
    status.set_defaults(handler=cmd_db_status)
