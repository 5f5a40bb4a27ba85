"""What every ``director`` command shares: configuration as the daemon reads it, errors, the
database connection, and output.

Configuration is read the way the daemon reads it: the process environment, on top of the
environment file (``--env-file``; by default ``/etc/director/director.env`` when it exists, the
file the systemd unit loads), so ``director db upgrade`` run as root acts on the same database as
the service. A user who cannot read that file is told so (a warning; ``config check`` and
``doctor`` fail), instead of silently getting another configuration. Commands that need the
database use ``DATABASE_URL`` or, when it is unset, the private cluster in the state directory,
started for the duration of the command unless the daemon is already running it.

Commands that work on the database open one psycopg2 connection (``connection_for``) and refuse
to work on a schema that is not at the version this code expects; every failure is one line on
standard error and a non-zero exit: 1 the operation failed, 2 invalid input or arguments
(``EX_USAGE``), 78 invalid configuration (``EX_CONFIG``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import pwd
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from director.config import ConfigError, Settings, load_settings, read_env_file

if TYPE_CHECKING:
    from director.accounts.store import User
    from director.db.interactions import Interaction

DEFAULT_ENV_FILE = "/etc/director/director.env"
EX_CONFIG = 78
EX_USAGE = 2
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


Handler = Callable[[argparse.Namespace], int]


# --- failures, the database, output ------------------------------------------------------


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def invalid(fields: dict[str, str]) -> CommandError:
    return CommandError("invalid " + "; invalid ".join(f"{name}: {problem}"
                                                       for name, problem in fields.items()),
                        EX_USAGE)


def reports_failures(handler: Handler) -> Handler:
    """Turn the exceptions of account work into one-line errors with the right exit status."""

    @functools.wraps(handler)
    def run(arguments: argparse.Namespace) -> int:
        import psycopg2

        from director.accounts.validation import ValidationFailed

        try:
            return handler(arguments)
        except ValidationFailed as error:
            raise invalid(error.fields) from None
        except UnicodeError as error:  # e.g. undecodable bytes from a terminal or environment
            raise CommandError(f"invalid input: {error}", EX_USAGE) from None
        except psycopg2.OperationalError as error:
            raise CommandError(f"cannot reach the database: {one_line(error)}") from None
        except psycopg2.Error as error:
            raise CommandError(f"database error: {one_line(error)}") from None

    return run


def _connect(dsn: str) -> Any:
    import psycopg2
    import psycopg2.extensions

    try:
        given = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        given = {}
    extra: dict[str, Any] = {}
    if "connect_timeout" not in given:
        extra["connect_timeout"] = 10
    if "application_name" not in given:
        extra["application_name"] = "director-cli"
    try:
        return psycopg2.connect(dsn, **extra)
    except psycopg2.Error as error:
        raise CommandError(f"cannot reach the database: {one_line(error)}") from None


@contextlib.contextmanager
def connection_for(arguments: argparse.Namespace) -> Iterator[Any]:
    """One psycopg2 connection to the daemon's database, whose schema is known to be current."""
    from director.db import migrate

    settings = settings_from(arguments)
    with database_dsn(settings) as dsn:
        connection = _connect(dsn)
        try:
            try:
                latest = migrate.known_migrations()[-1].version
                with connection.cursor() as cursor:
                    current = migrate.current_version(cursor)
                connection.rollback()
            except migrate.MigrationError as error:
                raise CommandError(str(error)) from None
            if current > latest:
                raise CommandError(migrate.newer_schema_message(current, latest))
            if current < latest:
                raise CommandError(migrate.outdated_schema_message(current, latest))
            yield connection
        finally:
            connection.close()


def run(connection: Any, interaction: Interaction[Any]) -> Any:
    from director.db.interactions import run_sync

    return run_sync(connection, interaction)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def when(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def normalised_email(value: str, field: str = "email") -> str:
    from director.accounts.validation import ValidationFailed, normalise_email

    try:
        return normalise_email(value)
    except ValidationFailed as error:
        raise invalid({field: error.fields["email"]}) from None


def user_of(email: str) -> Interaction[User]:
    from director.accounts import store

    user = yield from store.user_by_email(email)
    if user is None:
        raise store.NoSuchThing(email)
    return user


def no_user(email: str) -> CommandError:
    return CommandError(f"no user with email '{email}'")


def json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")

