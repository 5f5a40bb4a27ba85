"""The ``director`` command: serve, database and configuration chores for operators.

Configuration is read the way the daemon reads it: the process environment, on top of the
environment file (``--env-file``; by default ``/etc/director/director.env`` when it exists, the
file the systemd unit loads), so ``director db upgrade`` run as root acts on the same database as
the service. A user who cannot read that file is told so (a warning; ``config check`` and
``doctor`` fail), instead of silently getting another configuration. Commands that need the
database use ``DATABASE_URL`` or, when it is unset, the private cluster in the state directory,
started for the duration of the command unless the daemon is already running it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from director import __version__
from director.config import (
    ConfigError,
    Settings,
    dangerous_settings,
    database_target,
    load_settings,
    read_env_file,
)

DEFAULT_ENV_FILE = "/etc/director/director.env"
EX_CONFIG = 78
#: What a user who cannot read the environment file does instead, for ``director COMMAND``.
READ_AS_ADMINISTRATOR = ("run it as root, or as user director or a member of the director "
                         "group (runuser -u director -- director {command})")


class CommandError(Exception):
    """A failure to report on one line with a non-zero exit."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def unreadable_default_env_file() -> str | None:
    """Why this user cannot read the default environment file, which is there (or may be: its
    directory cannot be entered); None when it is readable or absent."""
    try:
        with open(DEFAULT_ENV_FILE, "rb"):
            return None
    except PermissionError:
        pass
    except OSError:
        return None  # absent (or not a file: reading it reports that)
    directory = os.path.dirname(DEFAULT_ENV_FILE)
    try:
        os.stat(DEFAULT_ENV_FILE)
    except PermissionError:
        return (f"{DEFAULT_ENV_FILE} cannot be read by user {user_name()}: {directory} cannot "
                "be entered (permission denied)")
    except OSError:
        return None
    return f"{DEFAULT_ENV_FILE} exists but user {user_name()} cannot read it"


def default_env_file() -> str | None:
    """The default environment file when this user can read it; a warning on stderr when it is
    there but unreadable, since the command then runs on the process environment alone."""
    problem = unreadable_default_env_file()
    if problem is not None:
        print(f"director: warning: {problem}; using the process environment only. To use the "
              f"service's configuration, {READ_AS_ADMINISTRATOR.format(command='...')}",
              file=sys.stderr)
        return None
    return DEFAULT_ENV_FILE if os.path.exists(DEFAULT_ENV_FILE) else None


def environment(env_file: str | None) -> dict[str, str]:
    """The process environment over the env file's values (explicit beats file)."""
    path = env_file
    if path is None:
        path = os.environ.get("DIRECTOR_ENV_FILE")
    if path is None:
        path = default_env_file()
    merged: dict[str, str] = {}
    if path:
        try:
            merged.update(read_env_file(path))
        except ConfigError as error:
            raise CommandError("\n".join(error.problems), EX_CONFIG) from None
        except OSError as error:
            raise CommandError(f"cannot read the environment file {path}: {error.strerror}",
                               EX_CONFIG) from None
    merged.update(os.environ)
    return merged


def settings_from(arguments: argparse.Namespace) -> Settings:
    environ = environment(arguments.env_file)
    try:
        return load_settings(environ)
    except ConfigError as error:
        raise CommandError("\n".join(error.problems), EX_CONFIG) from None


@contextlib.contextmanager
def database_dsn(settings: Settings) -> Iterator[str]:
    """The DSN the daemon would use, starting the private cluster for the duration if needed."""
    if settings.database_url is not None:
        yield settings.database_url
        return
    from director.db.embedded import EmbeddedDatabaseError, EmbeddedPostgres

    embedded = EmbeddedPostgres(Path(settings.state_directory))
    try:
        embedded.start()
    except EmbeddedDatabaseError as error:
        raise CommandError(str(error)) from None
    try:
        yield embedded.dsn()
    finally:
        embedded.stop()


# --- subcommands -------------------------------------------------------------------------


def cmd_serve(arguments: argparse.Namespace) -> int:
    """``twistd -n director``, except that a drained stop exits 0.

    Plain twistd re-raises the stop signal on itself at exit (systemd counts that as clean
    too); a shell, ``make run`` and supervisors other than systemd read it as a crash.
    """
    from twisted.python.usage import UsageError
    from twisted.scripts import twistd

    os.environ.update(environment(arguments.env_file))
    argv = ["--nodaemon", "--pidfile=", "--logger=director.logs.observer", "director"]
    if arguments.listen:
        argv += ["--listen", arguments.listen]
    config = twistd.ServerOptions()
    try:
        config.parseOptions(argv)
    except UsageError as error:
        raise CommandError(str(error), 2) from None
    twistd._SomeApplicationRunner(config).run()
    return 0


def cmd_config_check(arguments: argparse.Namespace) -> int:
    if arguments.env_file is None and "DIRECTOR_ENV_FILE" not in os.environ:
        # Checking the process environment alone would pass off another configuration as the
        # service's: say why, and how to check the real one (--env-file '' checks the process
        # environment alone, on purpose).
        problem = unreadable_default_env_file()
        if problem is not None:
            raise CommandError(
                f"{problem}, so the service's configuration cannot be checked: "
                f"{READ_AS_ADMINISTRATOR.format(command='config check')}; or pass --env-file "
                "'' to check the process environment alone", EX_CONFIG)
    settings = settings_from(arguments)
    summary = {
        "environment": settings.environment,
        "database": f"external ({database_target(settings.database_url)})"
        if settings.database_url else f"embedded in {settings.state_directory}/postgres",
        "listen": f"{settings.host}:{settings.port}",
        "base_url": settings.base_url,
        "dangerous_flags": [name for name, on in (
            ("DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS", settings.allow_arbitrary_stdio_servers),
            ("DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS", settings.allow_insecure_http_servers),
            ("DANGEROUSLY_ENABLE_SEEDING", settings.enable_seeding),
        ) if on],
    }
    # The same lines the daemon logs at each start.
    warnings = dangerous_settings(settings)
    if arguments.json:
        print(json.dumps({"ok": True, **summary, "warnings": warnings}))
    else:
        print("configuration OK")
        for key, value in summary.items():
            print(f"  {key}: {', '.join(value) if isinstance(value, list) else value or '-'}")
        for warning in warnings:
            print(f"WARNING: dangerous setting: {warning}")
    return 0


def cmd_config_docs(arguments: argparse.Namespace) -> int:
    from director.config import configuration_table

    print(configuration_table())
    return 0


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


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="director",
        description="Director, the MCP gateway: run it, look after its database and its accounts.",
    )
    parser.add_argument("--version", action="version", version=f"director {__version__}")
    parser.add_argument(
        "--env-file", metavar="PATH", default=None,
        help=f"environment file to read under the process environment (default: "
             f"{DEFAULT_ENV_FILE} when readable; '' for none)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the gateway in the foreground "
                                "(the same as `twistd -n director`)")
    serve.add_argument("--listen", metavar="ENDPOINT",
                       help="Twisted endpoint, e.g. systemd:domain=INET:name=director-http")
    serve.set_defaults(handler=cmd_serve)

    config = commands.add_parser("config", help="validate or document the configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_commands.add_parser(
        "check", help="validate the environment without starting; exit 78 when invalid")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=cmd_config_check)
    docs = config_commands.add_parser("docs", help="print the table of every variable")
    docs.set_defaults(handler=cmd_config_docs)

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = db_commands.add_parser(
        "upgrade", help="apply pending migrations (safe to run from several hosts at once)")
    upgrade.add_argument("--json", action="store_true", help="machine-readable output")
    upgrade.set_defaults(handler=cmd_db_upgrade)
    status = db_commands.add_parser(
        "status", help="show the schema version; exit 1 when migrations are pending")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_db_status)

    from director import admin  # imports this module: registered once both are loaded

    admin.add_commands(commands)
    from director import playbooks_cli  # likewise

    playbooks_cli.add_commands(commands)
    from director import registry_cli  # likewise

    registry_cli.add_registry_commands(commands)
    from director import doctor  # likewise

    doctor.add_commands(commands)
    from director.studio import cli as studio_cli  # likewise

    studio_cli.add_commands(commands)
    from director.oauth.client import cli as oauth_client_cli  # likewise
    from director.oauth.server import cli as oauth_server_cli  # likewise

    oauth_server_cli.add_commands(commands)
    oauth_client_cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        return int(arguments.handler(arguments))
    except CommandError as error:
        # Configuration problems are printed as they are: one self-explaining line each.
        from director.logs import print_problems

        prefix = "" if error.code == EX_CONFIG else "director: "
        print_problems(prefix + line for line in str(error).splitlines())
        return error.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # `python -m director.cli`: run the copy imported as director.cli, the one whose
    # CommandError the admin commands (director.admin) raise.
    from director.cli import main as imported_main

    sys.exit(imported_main())
