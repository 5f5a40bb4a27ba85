"""Checks of ``director doctor`` on the database: reach, schema, stored secrets and servers,
LISTEN/NOTIFY.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import select
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from director.cli import base
from director.cli.doctor.result import FAIL, OK, SKIP, WARN, Result
from director.config import (
    MIN_SECRET_LENGTH,
    Settings,
    database_target,
)

#: How long a NOTIFY may take to reach the LISTEN connection (over a LAN it takes a millisecond).
NOTIFY_TIMEOUT_SECONDS = 2.0
#: libpq's connect timeout for the doctor's connections, unless PGCONNECT_TIMEOUT says otherwise.
CONNECT_TIMEOUT_SECONDS = 5

LISTEN_RULE = (
    "Director keeps one dedicated connection open with LISTEN to learn at once of every change "
    "made by another instance or the `director` command (revoked keys, disabled users, edited "
    "playbooks). A pooler in transaction mode (PgBouncer pool_mode=transaction) gives that "
    "connection's server backend to other clients after every transaction, so notifications never "
    "reach it: caches go stale and a revoked key keeps working until a restart. Point DATABASE_URL "
    "at PostgreSQL directly, or at a PgBouncer database in session mode "
    "(`director = host=... dbname=director pool_mode=session` under [databases])."
)


def _connect(dsn: str) -> Any:
    import psycopg2

    connection = psycopg2.connect(dsn, application_name="director doctor")
    connection.autocommit = True
    return connection


def _scalar(connection: Any, sql: str, *args: Any) -> Any:
    with connection.cursor() as cursor:
        cursor.execute(sql, args or None)
        return cursor.fetchone()[0]


def check_reach(dsn: str, embedded: bool) -> tuple[Result, int | None]:
    name = "database"
    try:
        connection = _connect(dsn)
    except Exception as error:
        if embedded:
            fix = "see the cluster's postgres.log in the state directory"
        else:
            fix = ("check DATABASE_URL's form (postgres://user:password@host:5432/dbname), that "
                   "PostgreSQL runs and listens on that address (listen_addresses, pg_hba.conf), "
                   "and firewalls between this host and it; `pg_isready -d \"$DATABASE_URL\"` "
                   "says whether the server answers at all (it does not check the password)")
        return Result(name, FAIL,
                      f"cannot connect as {database_target(dsn)}: {base.one_line(error)}", fix), None
    try:
        version = int(_scalar(connection, "SHOW server_version_num"))
        database = _scalar(connection, "SELECT current_database()")
        role = _scalar(connection, "SELECT current_user")
    finally:
        connection.close()
    shown = f"PostgreSQL {version // 10000}.{version % 10000}, database {database} as {role}"
    if version < 140000:
        return Result(name, WARN, shown + ": older than 14",
                      "Director is tested with PostgreSQL 15; upgrade the server"), version
    return Result(name, OK, shown), version


def check_schema(dsn: str, embedded: bool) -> Result:
    from director.db import migrate

    name = "schema"
    try:
        state = migrate.status(dsn)
    except Exception as error:
        return Result(name, FAIL, f"cannot read the schema version: {base.one_line(error)}",
                      "check the role's privileges on the database")
    if state.newer_than_code:
        return Result(name, FAIL, migrate.newer_schema_message(state.current, state.latest),
                      "install the Director version that migrated it, or restore a backup")
    if state.pending:
        pending = ", ".join(f"{m.version:04d}_{m.name}" for m in state.pending)
        summary = f"at version {state.current} of {state.latest}; pending: {pending}"
        if embedded:
            return Result(name, WARN, summary,
                          "the daemon migrates its private cluster at start; `director db "
                          "upgrade` does it now")
        return Result(name, FAIL, summary,
                      "back up the database, then run `director db upgrade` (the daemon refuses "
                      "to serve a schema that is behind)")
    return Result(name, OK, f"up to date (version {state.current})")


def _backend_shared(listener: Any, sender: Any) -> bool:
    """True when two client connections are served by one backend, which a pooler in
    transaction or statement mode does; PostgreSQL itself gives each connection its own."""
    first = _scalar(listener, "SELECT pg_backend_pid()")
    with sender.cursor() as cursor:
        cursor.execute("BEGIN")
        try:
            cursor.execute("SELECT pg_backend_pid()")
            other = cursor.fetchone()[0]
            if other == first:
                return True
            again = _scalar(listener, "SELECT pg_backend_pid()")
        finally:
            cursor.execute("COMMIT")
    return bool(again != first)


def check_listen_notify(dsn: str, timeout: float = NOTIFY_TIMEOUT_SECONDS) -> Result:
    """LISTEN on one connection, NOTIFY from another: it must arrive within ``timeout``."""
    name = "listen-notify"
    channel = "director_doctor_" + secrets.token_hex(6)
    payload = secrets.token_hex(8)
    try:
        listener = _connect(dsn)
        sender = _connect(dsn)
    except Exception as error:
        return Result(name, FAIL, f"cannot open two connections: {base.one_line(error)}",
                      "Director needs DATABASE_POOL_SIZE + 1 connections per instance; raise "
                      "max_connections or the pooler's limits")
    try:
        shared = _backend_shared(listener, sender)
        with listener.cursor() as cursor:
            cursor.execute(f'LISTEN "{channel}"')
        started = time.monotonic()
        with sender.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        arrived = None
        while arrived is None and time.monotonic() - started < timeout:
            remaining = max(0.0, timeout - (time.monotonic() - started))
            if select.select([listener], [], [], min(remaining, 0.1))[0]:
                listener.poll()
            for notify in listener.notifies:
                if notify.channel == channel and notify.payload == payload:
                    arrived = time.monotonic() - started
        sender.poll()
        misdelivered = any(n.channel == channel for n in sender.notifies)
    except Exception as error:
        return Result(name, FAIL, f"LISTEN/NOTIFY failed: {base.one_line(error)}", LISTEN_RULE)
    finally:
        listener.close()
        sender.close()
    if arrived is not None:
        if shared:
            return Result(name, WARN,
                          f"a notification arrived in {arrived * 1000:.0f} ms, but the two "
                          "connections share server backends (a pooler in transaction mode?)",
                          LISTEN_RULE)
        return Result(name, OK, f"a notification arrived in {arrived * 1000:.1f} ms")
    if misdelivered or shared:
        why = ("the notification arrived on the sending connection instead"
               if misdelivered else "the connections share server backends")
        return Result(name, FAIL,
                      f"a notification was not delivered within {timeout:.0f} s: {why}, the "
                      "mark of a pooler in transaction mode (PgBouncer pool_mode=transaction)",
                      LISTEN_RULE)
    return Result(name, FAIL,
                  f"a notification was not delivered within {timeout:.0f} s",
                  "something between Director and PostgreSQL does not forward asynchronous "
                  "notifications. " + LISTEN_RULE)


def _secret_in_use(settings: Settings) -> str | None:
    """The secret the daemon would seal and open stored values with, if it exists yet."""
    if settings.auth_secret is not None:
        return settings.auth_secret
    with contextlib.suppress(OSError):
        stored = (Path(settings.state_directory) / "auth-secret").read_text().strip()
        if len(stored) >= MIN_SECRET_LENGTH:
            return stored
    return None


def _stored_servers(dsn: str) -> list[tuple[Any, ...]]:
    """Every stored server: owner's email, playbook id, name, type, config, disabled."""
    connection = _connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT u.email, p.id, s.name, s.type, s.config, s.disabled "
                           "FROM playbook_servers s JOIN playbooks p ON p.pk = s.playbook_pk "
                           "JOIN users u ON u.id = p.user_id ORDER BY u.email, p.id, s.name")
            return list(cursor.fetchall())
    finally:
        connection.close()


def check_stored_secrets(dsn: str, settings: Settings) -> Result:
    """Open every sealed value (never shown) with the configured secret, as the daemon does at
    start: one that does not open stops the daemon with ``SecretUnreadable``."""
    from director.crypto import SecretBox, SecretUnreadable

    name = "stored-secrets"
    sealed = [(f"{email} {playbook}/{server} {key}", item["sealed"], key)
              for email, playbook, server, _, config, _ in _stored_servers(dsn)
              for field in ("env", "headers", "inputs")  # inputs: of a registry server
              for key, item in (config.get(field) or {}).items()
              if isinstance(item, dict) and "sealed" in item]
    if not sealed:
        return Result(name, OK, "no secret values stored")
    secret = _secret_in_use(settings)
    where = ("BETTER_AUTH_SECRET" if settings.auth_secret is not None
             else f"{settings.state_directory}/auth-secret")
    restore = ("put back the secret they were stored with (your backup of the environment file "
               "or of $STATE_DIRECTORY/auth-secret); if it is lost, so are they: docs/manual.rst, "
               "\"A lost secret\", removes them so the daemon starts and their owners re-enter them")
    if secret is None:
        return Result(name, FAIL, f"{len(sealed)} secret values are stored, but there is no "
                                  f"secret: BETTER_AUTH_SECRET is unset and {where} is missing "
                                  "(the daemon would generate a new one and refuse to start)",
                      restore)
    box = SecretBox(secret, settings.auth_secret_previous)
    unreadable = []
    for label, value, key in sealed:
        try:
            box.open(value, key)
        except SecretUnreadable:
            unreadable.append(label)
    if unreadable:
        return Result(name, FAIL, f"{len(unreadable)} of {len(sealed)} stored secret values do "
                                  f"not decrypt with {where}: the daemon stops at start "
                                  "(SecretUnreadable)", restore, tuple(unreadable[:5]))
    return Result(name, OK, f"{len(sealed)} stored secret values decrypt with {where}")


def check_upstream_oauth(dsn: str, settings: Settings) -> Result:
    """Upstream OAuth credentials that no configured secret opens: their servers are
    unauthorized until their users authorize again (the daemon does not stop for them)."""
    from director.crypto import SecretBox
    from director.oauth.client.maintenance import unreadable_credentials

    name = "upstream-oauth"
    secret = _secret_in_use(settings)
    connection = _connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM upstream_oauth_credentials")
            stored = int(cursor.fetchone()[0])
        if not stored:
            return Result(name, OK, "no upstream OAuth tokens stored")
        if secret is None:
            return Result(name, WARN, f"{stored} upstream OAuth credentials are stored, but "
                                      "there is no secret to open them",
                          "their users must authorize those servers again")
        unreadable = unreadable_credentials(connection, SecretBox(
            secret, settings.auth_secret_previous))
    finally:
        connection.close()
    if unreadable:
        return Result(name, WARN, f"{len(unreadable)} stored upstream OAuth credential(s) or "
                                  "client registration(s) do not open with the configured "
                                  "secret (their servers show unauthorized)",
                      "put back the secret they were sealed with (or set it as "
                      "BETTER_AUTH_SECRET_PREVIOUS); otherwise their users authorize again",
                      tuple(unreadable[:5]))
    return Result(name, OK, f"{stored} upstream OAuth credentials open with the configured "
                            "secret")


def _servers_check(name: str, check: Any, dsn: str, settings: Settings) -> Result:
    """A check that reads the stored servers, as a FAIL naming the cause when it cannot."""
    try:
        result: Result = check(dsn, settings)
    except Exception as error:
        return Result(name, FAIL, f"cannot read the servers: {base.one_line(error)}",
                      "check the role's privileges on the database")
    return result


def check_refused_servers(dsn: str, settings: Settings) -> Result:
    """Stored servers that the current configuration refuses to run (the security rails,
    applied when an upstream starts): typically stdio or http:// servers added while a
    DANGEROUSLY_* flag was on. The daemon leaves them out; their owners should know."""
    from director.playbooks.rails import refusal

    name = "refused-servers"
    rows = _stored_servers(dsn)
    refused = []
    for email, playbook, server, kind, config, disabled in rows:
        why = refusal(settings, _server_of(server, kind, config))
        if why is not None:
            refused.append(f"playbook {playbook} ({email}) server {server}"
                           f"{' (disabled)' if disabled else ''}: {why.reason}")
    if not refused:
        return Result(name, OK, f"the configuration refuses none of the {len(rows)} stored "
                                "servers")
    return Result(name, WARN, f"{len(refused)} stored servers are refused by the configuration "
                              "and never start (their tools are missing from their playbooks)",
                  "tell their owners to remove them or change them to pass the rules (https, "
                  "a public host name); set the flag named again only on a daemon reachable "
                  "from this host alone or with sign-up closed (README.rst, Security rails)",
                  tuple(refused))


def _server_of(name: str, kind: str, config: dict[str, Any]) -> Any:
    """What the rails need of a stored server, without opening its secrets: a registry
    server's provenance, and its URL made from the inputs that are not secret."""
    from director.playbooks.model import RegistrySource, SecretValue, Server
    from director.registry.install import materialize

    stored = config.get("registry")
    if stored is None:
        return Server(name, kind, url=config.get("url"))
    plain = tuple((key, SecretValue(item["value"]))
                  for key, item in (config.get("inputs") or {}).items() if "value" in item)
    source = RegistrySource(stored["registry"], stored["name"], stored["version"],
                            stored["recipe"], plain)
    derived = materialize(json.loads(source.recipe), plain)
    return Server(name, kind, url=derived.get("url"), registry=source)


def check_registry_runtimes(dsn: str, settings: Settings) -> Result:
    """npx and uvx, which registry packages run with: present where stored servers (or the
    trust setting) need them."""
    from director.registry.install import RUNTIMES

    name = "registry-runtimes"
    needed: Counter[str] = Counter()
    for _, _, _, _, config, _ in _stored_servers(dsn):
        recipe = json.loads((config.get("registry") or {}).get("recipe") or "{}")
        if recipe.get("kind") in RUNTIMES:
            needed[RUNTIMES[recipe["kind"]]] += 1
    found = {runtime: shutil.which(runtime) for runtime in RUNTIMES.values()}
    said = "; ".join(f"{runtime}: {path or 'not found'}" for runtime, path in found.items())
    packages_allowed = settings.registry_trust != "none" or \
        settings.allow_arbitrary_stdio_servers
    missing_stored = [f"{count} stored servers need {runtime}, which is not on PATH"
                      for runtime, count in needed.items() if found[runtime] is None]
    if missing_stored:
        return Result(name, FAIL, "; ".join(missing_stored) + " (they fail at every start)",
                      "install Node.js (npx: apt install npm) or uv (uvx: pipx install uv) "
                      "where the daemon's PATH finds it", (said,))
    missing = [runtime for runtime, path in found.items() if path is None]
    if packages_allowed and missing:
        return Result(name, WARN, f"{said}: registry packages run with "
                                  f"{' and '.join(missing)} cannot start",
                      "install Node.js (npx: apt install npm) or uv (uvx: pipx install uv) if "
                      "the registry's npm or PyPI servers are to run here")
    return Result(name, OK, said)


def check_database(settings: Settings) -> tuple[list[Result], int | None]:
    """Reach, schema and LISTEN/NOTIFY, and the server's version (``server_version_num``)."""
    names = ("database", "schema", "stored-secrets", "refused-servers", "registry-runtimes", "upstream-oauth",
             "listen-notify")
    if settings.embedded_database:
        from director.db.embedded import EmbeddedPostgres

        cluster = EmbeddedPostgres(Path(settings.state_directory))
        if not (cluster.data_directory / "PG_VERSION").exists():
            return [Result("database", OK, f"DATABASE_URL unset: the private cluster is created "
                                           f"in {cluster.root} at the first start"),
                    Result("schema", SKIP, "no private cluster yet (it is migrated at start)"),
                    *(Result(n, SKIP, "no private cluster yet") for n in names[2:])], None
    try:
        with base.database_dsn(settings) as dsn:
            reach, version = check_reach(dsn, settings.embedded_database)
            if reach.status == FAIL:
                return [reach, *(Result(n, SKIP, "the database is unreachable")
                                 for n in names[1:])], None
            schema = check_schema(dsn, settings.embedded_database)
            servers = [_servers_check(name, check, dsn, settings) if schema.status == OK
                       else Result(name, SKIP, "the schema is not current")
                       for name, check in (("stored-secrets", check_stored_secrets),
                                           ("refused-servers", check_refused_servers),
                                           ("registry-runtimes", check_registry_runtimes),
                                           ("upstream-oauth", check_upstream_oauth))]
            return [reach, schema, *servers, check_listen_notify(dsn)], version
    except base.CommandError as error:
        return [Result("database", FAIL, f"the private cluster did not start: {error}",
                       "see postgres.log in the state directory's postgres/ folder"),
                *(Result(n, SKIP, "the database is unreachable") for n in names[1:])], None


# --- the port ---------------------------------------------------------------------------------
