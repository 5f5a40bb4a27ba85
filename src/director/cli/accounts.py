"""``director users …``, ``director keys …`` and ``director seed``: accounts, administered.

They act on the database directly, through the same interactions the daemon runs
(``director.accounts.store``), one transaction per change. Every change ends with a NOTIFY, so
running daemons see it within milliseconds: a revoked key or a disabled user stops working at
once, without a restart.

Each command opens one psycopg2 connection to the database the daemon uses (``DATABASE_URL``, or
the private cluster, see ``director.cli.base.database_dsn``) and refuses to work on a schema that is
not at the version this code expects. Output is aligned columns for people and ``--json`` for
scripts; every failure is one line on standard error and a non-zero exit:

* 1: the operation failed (no such user or key, already exists, database unreachable, outdated
  schema, seeding disabled);
* 2: invalid input (the message names the field) or invalid arguments;
* 78: invalid configuration.

Secrets: passwords are only ever read from standard input (``--password-stdin``; one trailing
newline is removed) or, when standard input is a terminal, from a prompt. A new API key's value
is printed once, when ``keys create`` makes it; the ``default`` key every user starts with is
printed only when ``--show-key`` asks for it (otherwise it is lost, and ``keys create`` makes
another).
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import sys
from typing import TYPE_CHECKING, Any
from uuid import UUID

from director.cli.base import (
    EX_USAGE,
    CommandError,
    Handler,
    connection_for,
    invalid,
    json_flag,
    no_user,
    normalised_email,
    print_json,
    reports_failures,
    run,
    settings_from,
    table,
    user_of,
    when,
)
from director.config import VARIABLES

if TYPE_CHECKING:
    from director.accounts.store import ApiKey, User
    from director.db.interactions import Interaction

PAGE_SIZE = 500


# --- input ----------------------------------------------------------------------------------


def _read_password(arguments: argparse.Namespace) -> str:
    """The new password: standard input (one trailing newline removed), or a prompt on a tty."""
    from director.accounts.validation import check_password

    if arguments.password_stdin:
        raw = sys.stdin.buffer.read()
        try:
            password = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid({"password": "is not valid UTF-8"}) from None
        if password.endswith("\r\n"):
            password = password[:-2]
        elif password.endswith("\n"):
            password = password[:-1]
    elif sys.stdin.isatty():
        password = getpass.getpass("New password: ")
        check_password(password)
        if getpass.getpass("Repeat it: ") != password:
            raise invalid({"password": "the two entries differ"})
    else:
        raise CommandError("a password is needed: pass --password-stdin and write it to "
                           "standard input", EX_USAGE)
    return check_password(password)


# --- users --------------------------------------------------------------------------------


@reports_failures
def cmd_users_create(arguments: argparse.Namespace) -> int:
    from director.accounts import store
    from director.accounts.credentials import hash_password

    email = normalised_email(arguments.email)
    password_hash = hash_password(_read_password(arguments))
    status = "pending" if arguments.pending else "active"
    with connection_for(arguments) as connection:
        try:
            user, key = run(connection, store.create_user(email, password_hash, status))
        except store.EmailTaken:
            raise CommandError(f"a user with email '{email}' already exists") from None
    _report_new_user(arguments, user, key)
    return 0


def _report_new_user(arguments: argparse.Namespace, user: User, key: Any,
                     verb: str = "created") -> None:
    key_body = None
    if key is not None:
        key_body = key.public() if arguments.show_key else key.record.public()
    if arguments.json:
        print_json({**user.public(), "api_key": key_body})
        return
    print(f"{verb} user {user.email} ({user.status})")
    print(f"  id: {user.id}")
    if key is not None:
        if arguments.show_key:
            print(f"  API key '{key.record.name}': {key.value}")
        else:
            print(f"  API key '{key.record.name}': {key.record.prefix}... (not shown: use "
                  "--show-key at creation, or `director keys create`)")


@reports_failures
def cmd_users_list(arguments: argparse.Namespace) -> int:
    from director.accounts import store

    users: list[User] = []
    with connection_for(arguments) as connection:
        after: str | None = None
        while True:
            page = run(connection, store.list_users(PAGE_SIZE, after))
            users.extend(page)
            if len(page) < PAGE_SIZE:
                break
            after = page[-1].email
    if arguments.json:
        print_json({"users": [user.public() for user in users]})
    elif not users:
        print("no users")
    else:
        table(("EMAIL", "STATUS", "CREATED", "ID"),
               [(u.email, u.status, when(u.created_at), str(u.id)) for u in users])
    return 0


def _set_status(email: str, status: str) -> Interaction[tuple[User, User]]:
    from director.accounts import store

    before = yield from user_of(email)
    after = yield from store.set_status(email, status)
    return before, after


def _status_command(status: str, done: str) -> Handler:
    @reports_failures
    def command(arguments: argparse.Namespace) -> int:
        from director.accounts import store

        email = normalised_email(arguments.email)
        with connection_for(arguments) as connection:
            try:
                before, after = run(connection, _set_status(email, status))
            except store.NoSuchThing:
                raise no_user(email) from None
        if arguments.json:
            print_json({**after.public(), "previous_status": before.status})
        elif before.status == status:
            print(f"{after.email} was already {status}")
        else:
            print(f"{after.email} is now {status} (was {before.status}){done}")
        return 0

    command.__name__ = f"cmd_users_{status}"
    return command


cmd_users_activate = _status_command("active", "")
cmd_users_disable = _status_command(
    "disabled", "; its sessions were signed out and its API keys stop working")


def _change_password(email: str, password_hash: str) -> Interaction[User]:
    from director.accounts import store

    user = yield from user_of(email)
    yield from store.set_password(user.id, password_hash)
    return user


@reports_failures
def cmd_users_set_password(arguments: argparse.Namespace) -> int:
    from director.accounts import store
    from director.accounts.credentials import hash_password

    email = normalised_email(arguments.email)
    password_hash = hash_password(_read_password(arguments))
    with connection_for(arguments) as connection:
        try:
            user = run(connection, _change_password(email, password_hash))
        except store.NoSuchThing:
            raise no_user(email) from None
    if arguments.json:
        print_json({**user.public(), "sessions_revoked": True})
    else:
        print(f"password of {user.email} changed; its sessions were signed out")
    return 0


# --- API keys -----------------------------------------------------------------------------


def _all_keys(user_id: UUID) -> Interaction[list[ApiKey]]:
    from director.accounts import store

    keys: list[ApiKey] = []
    after: tuple[str, str] | None = None
    while True:
        page = yield from store.keys_of(user_id, PAGE_SIZE, after)
        keys.extend(page)
        if len(page) < PAGE_SIZE:
            return keys
        after = (page[-1].created_at.isoformat(), str(page[-1].id))


def _user_and_keys(email: str) -> Interaction[tuple[User, list[ApiKey]]]:
    user = yield from user_of(email)
    keys = yield from _all_keys(user.id)
    return user, keys


def _default_key_name(attempt: int) -> str:
    name = "cli-" + datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return name if attempt == 0 else f"{name}-{attempt + 1}"


def _create_key(email: str, name: str) -> Interaction[tuple[User, Any]]:
    from director.accounts import store

    user = yield from user_of(email)
    key = yield from store.create_key(user.id, name)
    return user, key


@reports_failures
def cmd_keys_create(arguments: argparse.Namespace) -> int:
    from director.accounts import store
    from director.accounts.validation import check_name

    email = normalised_email(arguments.user, "user")
    chosen = None if arguments.name is None else check_name(arguments.name)
    with connection_for(arguments) as connection:
        for attempt in range(20):
            name = chosen if chosen is not None else _default_key_name(attempt)
            try:
                user, key = run(connection, _create_key(email, name))
                break
            except store.NoSuchThing:
                raise no_user(email) from None
            except store.NameTaken:
                if chosen is not None:
                    raise CommandError(f"{email} already has a live API key named '{name}'; "
                                       "choose another --name or revoke that key") from None
        else:
            raise CommandError("could not find a free default key name; pass --name")
    if arguments.json:
        print_json({**key.public(), "user": {"id": str(user.id), "email": user.email}})
    else:
        # The key alone on standard output, so that `KEY=$(director keys create …)` works.
        print(key.value)
        print(f"created API key '{key.record.name}' (id {key.record.id}) for {user.email}; "
              "it is shown only this once", file=sys.stderr)
    return 0


def _limit_text(key: ApiKey) -> str:
    if key.rate_limit_window_seconds is None and key.rate_limit_max_requests is None:
        return "default"
    return f"{key.rate_limit_max_requests or 'default'}/{key.rate_limit_window_seconds or '?'}s"


@reports_failures
def cmd_keys_list(arguments: argparse.Namespace) -> int:
    from director.accounts import store

    email = normalised_email(arguments.user, "user")
    with connection_for(arguments) as connection:
        try:
            user, keys = run(connection, _user_and_keys(email))
        except store.NoSuchThing:
            raise no_user(email) from None
    if arguments.json:
        print_json({"user": {"id": str(user.id), "email": user.email},
                     "keys": [key.public() for key in keys]})
    elif not keys:
        print(f"{user.email} has no live API keys")
    else:
        table(("ID", "NAME", "PREFIX", "CREATED", "RATE LIMIT"),
               [(str(k.id), k.name, k.prefix + "...", when(k.created_at), _limit_text(k))
                for k in keys])
    return 0


class _NoSuchKey(Exception):
    pass


def _revoke(email: str, reference: str) -> Interaction[tuple[User, ApiKey]]:
    """Revoke a live key of the user given by id, by name, or by its full value."""
    from director.accounts import store
    from director.accounts.credentials import hash_token, looks_like_api_key
    from director.accounts.validation import ValidationFailed, check_name

    user = yield from user_of(email)
    keys = yield from _all_keys(user.id)
    try:
        key_id: UUID | None = UUID(reference)
    except ValueError:
        key_id = None
    try:
        name = check_name(reference)
    except ValidationFailed:
        name = None
    digest = hash_token(reference) if looks_like_api_key(reference) else None
    found = (next((k for k in keys if k.id == key_id), None)
             or next((k for k in keys if k.name == name), None)
             or next((k for k in keys if digest is not None and k.key_hash == digest), None))
    if found is None:
        raise _NoSuchKey(reference)
    revoked = yield from store.revoke_key(user.id, found.id)
    return user, revoked


@reports_failures
def cmd_keys_revoke(arguments: argparse.Namespace) -> int:
    from director.accounts import store

    email = normalised_email(arguments.user, "user")
    with connection_for(arguments) as connection:
        try:
            user, key = run(connection, _revoke(email, arguments.key))
        except store.NoSuchThing:
            raise no_user(email) from None
        except _NoSuchKey:
            raise CommandError(f"{email} has no live API key with id or name "
                               f"'{arguments.key}'") from None
    if arguments.json:
        print_json({**key.public(), "revoked": True})
    else:
        print(f"revoked API key '{key.name}' (id {key.id}) of {user.email}")
    return 0


# --- seed ---------------------------------------------------------------------------------


@reports_failures
def cmd_seed(arguments: argparse.Namespace) -> int:
    from director.accounts import store
    from director.accounts.credentials import hash_password
    from director.accounts.validation import ValidationFailed, check_password

    settings = settings_from(arguments)  # refuses DANGEROUSLY_ENABLE_SEEDING in production
    if not settings.enable_seeding:
        raise CommandError("seeding is disabled: set DANGEROUSLY_ENABLE_SEEDING=true to seed "
                           "(development only; it is refused in production)")
    email = normalised_email(settings.seed_user_email, "SEED_USER_EMAIL")
    try:
        password = check_password(settings.seed_user_password, "SEED_USER_PASSWORD")
    except ValidationFailed as error:
        raise invalid(error.fields) from None
    with connection_for(arguments) as connection:
        existing = run(connection, store.user_by_email(email))
        key = None
        if existing is None:
            try:
                user, key = run(connection, store.create_user(email, hash_password(password),
                                                              "active"))
            except store.EmailTaken:  # seeded concurrently
                user = run(connection, user_of(email))
        else:
            user = existing
    if key is not None:
        _report_new_user(arguments, user, key, verb="seeded")
    elif arguments.json:
        print_json({**user.public(), "api_key": None, "already_existed": True})
    else:
        print(f"user {user.email} already exists ({user.status}); left unchanged")
    return 0


def _default(name: str) -> str | None:
    return next(variable.default for variable in VARIABLES if variable.name == name)


# --- parsers ------------------------------------------------------------------------------


def _password_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-stdin", action="store_true",
        help="read the password from standard input (one trailing newline is removed); "
             "without it, the password is prompted for when standard input is a terminal")


def add_commands(commands: Any) -> None:
    """Register ``users``, ``keys`` and ``seed`` on the ``director`` command's subparsers."""
    formatter = argparse.RawDescriptionHelpFormatter

    users = commands.add_parser(
        "users", help="create, list, activate and disable user accounts",
        description="User accounts, acted on in the database directly; running daemons see "
                    "each change within milliseconds.")
    user_commands = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)

    create = user_commands.add_parser(
        "create", help="create a user (active unless --pending) with its 'default' API key",
        formatter_class=formatter,
        description="Create a user with its 'default' API key.\n\n"
                    "The key's value is printed only with --show-key; otherwise it is never\n"
                    "shown (`director keys create` makes another). Example:\n\n"
                    "  printf '%s' \"$PASSWORD\" |\n"
                    "    director users create --email a@example.com --password-stdin")
    create.add_argument("--email", required=True)
    _password_flag(create)
    create.add_argument("--pending", action="store_true",
                        help="create the account pending (waiting for `users activate`)")
    create.add_argument("--show-key", action="store_true",
                        help="print the value of the new 'default' API key")
    json_flag(create)
    create.set_defaults(handler=cmd_users_create)

    listing = user_commands.add_parser("list", help="list every user")
    json_flag(listing)
    listing.set_defaults(handler=cmd_users_list)

    for name, handler, text in (
        ("activate", cmd_users_activate, "make a pending or disabled user active"),
        ("disable", cmd_users_disable,
         "disable a user: its sessions are signed out and its API keys stop working"),
    ):
        action = user_commands.add_parser(name, help=text)
        action.add_argument("email", metavar="EMAIL")
        json_flag(action)
        action.set_defaults(handler=handler)

    password = user_commands.add_parser(
        "set-password", help="set a user's password; its sessions are signed out")
    password.add_argument("email", metavar="EMAIL")
    _password_flag(password)
    json_flag(password)
    password.set_defaults(handler=cmd_users_set_password)

    keys = commands.add_parser("keys", help="create, list and revoke users' API keys")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    key_create = key_commands.add_parser(
        "create", help="create an API key and print it (only this once)",
        formatter_class=formatter,
        description="Create an API key. Its value alone is printed on standard output, so\n"
                    "that KEY=$(director keys create --user a@example.com) works; a note goes\n"
                    "to standard error. With --json: an object with key, id, name, prefix.")
    key_create.add_argument("--user", required=True, metavar="EMAIL")
    key_create.add_argument("--name", help="unique among the user's live keys "
                                           "(default: cli-YYYYMMDD-HHMMSS, in UTC)")
    json_flag(key_create)
    key_create.set_defaults(handler=cmd_keys_create)

    key_list = key_commands.add_parser("list", help="list a user's live API keys")
    key_list.add_argument("--user", required=True, metavar="EMAIL")
    json_flag(key_list)
    key_list.set_defaults(handler=cmd_keys_list)

    revoke = key_commands.add_parser(
        "revoke", help="revoke a user's API key, given by id or name; it stops working at once")
    revoke.add_argument("--user", required=True, metavar="EMAIL")
    revoke.add_argument("key", metavar="KEY", help="the key's id, its name, or its full value")
    json_flag(revoke)
    revoke.set_defaults(handler=cmd_keys_revoke)

    seed = commands.add_parser(
        "seed", help="create development data (needs DANGEROUSLY_ENABLE_SEEDING=true)",
        formatter_class=formatter,
        description="Create development data; running it again changes nothing.\n\n"
                    "Needs DANGEROUSLY_ENABLE_SEEDING=true, which is refused in production.\n"
                    "Today it creates one active user, SEED_USER_EMAIL (default\n"
                    f"{_default('SEED_USER_EMAIL')}) with the password SEED_USER_PASSWORD (default\n"
                    f"'{_default('SEED_USER_PASSWORD')}'), unless it exists already: an existing user is\n"
                    "left unchanged. Seeding will grow with playbooks.")
    seed.add_argument("--show-key", action="store_true",
                      help="print the value of the seeded user's 'default' API key")
    json_flag(seed)
    seed.set_defaults(handler=cmd_seed)

