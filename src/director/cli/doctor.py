"""``director doctor``: check a host's configuration end to end and say what to fix.

Each check reports ``ok``, ``warn``, ``fail`` or ``skip`` (it needs something an earlier check
found broken), a one-line summary, and for anything but ``ok`` the fix. The command exits 1
when any check failed and 0 otherwise, so it can gate a deployment; ``--json`` prints the same
for scripts.

It reads the configuration exactly as the daemon and the other commands do (the environment
file under the process environment, see ``director.cli.base.environment``) and changes nothing: it
opens two database connections of its own, binds the configured port for an instant and asks a
daemon already on it for ``/api/health``. With ``DATABASE_URL`` unset it uses the private
cluster the way ``director db status`` does (shared when the daemon runs it, otherwise started
for the duration), but never creates one.

The checks, in order: the environment file, the configuration, the secret, the database (reach,
schema, whether the stored secret values open with the secret, which stored servers the
configuration refuses to run, whether the runtimes of registry packages — npx, uvx — are
there, LISTEN/NOTIFY through the configured URL), the port,
``BASE_URL`` (its form, and that it leads to this Director as MCP clients signing in with OAuth
would reach it), the state directory, the PostgreSQL tools (server binaries for the private
cluster, ``pg_dump`` for backups) and Twisted's plugin cache.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import http.client
import ipaddress
import json
import math
import os
import pwd
import re
import secrets
import select
import shutil
import socket
import ssl
import stat
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from director.cli import base
from director.config import (
    MIN_SECRET_LENGTH,
    VARIABLES,
    ConfigError,
    Settings,
    database_target,
    load_settings,
    read_env_file,
)
from director.mcp.upstream.account import AccountError, stdio_account
from director.sandbox.launcher import SandboxError, stdio_launcher

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
#: How long a NOTIFY may take to reach the LISTEN connection (over a LAN it takes a millisecond).
NOTIFY_TIMEOUT_SECONDS = 2.0
#: libpq's connect timeout for the doctor's connections, unless PGCONNECT_TIMEOUT says otherwise.
CONNECT_TIMEOUT_SECONDS = 5
#: Below this many bits of estimated entropy a secret is called weak.
MIN_SECRET_BITS = 100
#: Variables Director reads besides the configuration table's.
OTHER_VARIABLES = ("DIRECTOR_ENV", "DIRECTOR_ENV_FILE", "DIRECTOR_PG_BINDIR",
                   # read by the OpenTelemetry SDK itself (docs/operations.rst, Tracing)
                   "OTEL_RESOURCE_ATTRIBUTES", "OTEL_BSP_MAX_QUEUE_SIZE",
                   "OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                   "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                   "OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                   "OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION")
#: Fragments of documentation examples and placeholders, compared without case or punctuation.
PLACEHOLDERS = (
    "yoursecure", "yoursecret", "randomstring", "securerandom", "secrethere", "changeme",
    "replaceme", "placeholder", "example", "opensslrand", "generateone", "insertsecret",
    "putsecret", "mysecret", "supersecret", "testsecret", "notasecret",
)
PLACEHOLDER_EXACT = ("secret", "password", "changeit", "todo", "xxx", "none", "null")

LISTEN_RULE = (
    "Director keeps one dedicated connection open with LISTEN to learn at once of every change "
    "made by another instance or the `director` command (revoked keys, disabled users, edited "
    "playbooks). A pooler in transaction mode (PgBouncer pool_mode=transaction) gives that "
    "connection's server backend to other clients after every transaction, so notifications never "
    "reach it: caches go stale and a revoked key keeps working until a restart. Point DATABASE_URL "
    "at PostgreSQL directly, or at a PgBouncer database in session mode "
    "(`director = host=... dbname=director pool_mode=session` under [databases])."
)


@attrs.frozen
class Result:
    name: str
    status: str
    summary: str
    fix: str = ""
    details: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "summary": self.summary,
                "fix": self.fix, "details": list(self.details)}


def _owner(info: os.stat_result) -> str:
    import grp

    try:
        user = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        user = str(info.st_uid)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return f"{user}:{group}"


# --- the environment file ---------------------------------------------------------------------


@attrs.define
class Environment:
    """What ``director.cli.base.environment`` would read, and what the doctor found doing so."""

    values: dict[str, str]
    result: Result
    file_values: dict[str, str] = attrs.field(factory=dict)


def check_env_file(env_file: str | None, process: Mapping[str, str]) -> Environment:
    """Resolve the environment file the way every ``director`` command does, and read it."""
    name = "env-file"
    path = env_file
    source = "--env-file"
    if path is None and "DIRECTOR_ENV_FILE" in process:
        path, source = process["DIRECTOR_ENV_FILE"], "DIRECTOR_ENV_FILE"
    merged = dict(process)
    if path is None:
        default = base.DEFAULT_ENV_FILE
        unreadable = base.unreadable_default_env_file()
        if unreadable is not None:
            # Every check below would be of the process environment, not of the service's.
            return Environment(merged, Result(
                name, FAIL,
                f"{unreadable}, so it was ignored: these checks are not of the service's "
                "configuration",
                base.READ_AS_ADMINISTRATOR.format(command="doctor")))
        if not os.path.exists(default):
            return Environment(merged, Result(
                name, OK, f"no {default}; the process environment only"))
        path, source = default, "default"
    if path == "":
        return Environment(merged, Result(name, OK, f"none ({source} is empty); "
                                                    "the process environment only"))
    try:
        info = os.stat(path)
        file_values = read_env_file(path)
    except OSError as error:
        return Environment(merged, Result(
            name, FAIL, f"cannot read {path}: {error.strerror}",
            "create it from /usr/share/director/director.env.example (mode 0640 root:director), or "
            "pass --env-file with the right path"))
    except ConfigError as error:
        # The line is not echoed: it may hold a secret.
        where = error.problems[0].split(": expected", 1)[0]
        return Environment(merged, Result(
            name, FAIL, f"{where}: not a KEY=VALUE line",
            "fix that line: one KEY=VALUE per line, # for comments, no shell syntax"))
    merged = {**file_values, **process}
    details = [f"{len(file_values)} variables, mode {stat.S_IMODE(info.st_mode):04o} "
               f"{_owner(info)}"]
    overridden = sorted(key for key in file_values if key in process
                        and process[key] != file_values[key])
    if overridden:
        details.append("overridden by the process environment: " + ", ".join(overridden))
    known = {variable.name for variable in VARIABLES} | set(OTHER_VARIABLES)
    typos = []
    for key in file_values:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if close:
            typos.append(f"{key} (did you mean {close[0]}?)")
        else:
            details.append(f"{key} is not a Director variable (stdio servers inherit it)")
    problems = []
    fixes = []
    if typos:
        problems.append("unknown variables " + ", ".join(typos))
        fixes.append("rename them; `director config docs` lists every variable")
    blanked = sorted(key for key in file_values if file_values[key] and process.get(key) == "")
    if blanked:
        problems.append(f"{', '.join(blanked)} set in the file but empty in the process "
                        "environment, which wins (empty counts as unset)")
        fixes.append("unset " + " ".join(blanked) + " in the calling environment")
    sensitive = [key for key in ("BETTER_AUTH_SECRET", "DATABASE_URL", "OIDC_CLIENT_SECRET",
                                 "OTEL_EXPORTER_OTLP_HEADERS",
                                 "OTEL_EXPORTER_OTLP_TRACES_HEADERS")
                 if file_values.get(key)]
    if info.st_mode & stat.S_IROTH and sensitive:
        problems.append(f"{path} is readable by every user and holds {', '.join(sensitive)}")
        fixes.append(f"chmod 0640 {path} (owner root, group director)")
    if problems:
        return Environment(merged, Result(name, WARN, f"{path}: " + "; ".join(problems),
                                          "; ".join(fixes), tuple(details)), file_values)
    return Environment(merged, Result(name, OK, f"{path} ({source})", "", tuple(details)),
                       file_values)


# --- configuration and secret -----------------------------------------------------------------


def check_configuration(environ: Mapping[str, str]) -> tuple[Settings | None, Result]:
    try:
        settings = load_settings(environ)
    except ConfigError as error:
        return None, Result(
            "configuration", FAIL, f"{len(error.problems)} problem(s)",
            "fix each line (the daemon refuses to start with exit 78 until then)",
            tuple(error.problems))
    database = (f"external DATABASE_URL ({database_target(settings.database_url)})"
                if settings.database_url
                else f"private cluster in {settings.state_directory}/postgres")
    details = [f"NODE_ENV={settings.environment}", f"database: {database}",
               f"listen: {settings.host}:{settings.port}", f"BASE_URL={settings.base_url}"]
    flags = [name for name, on in (
        ("DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS", settings.allow_arbitrary_stdio_servers),
        ("DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS", settings.allow_insecure_http_servers),
        ("DANGEROUSLY_ENABLE_SEEDING", settings.enable_seeding)) if on]
    if flags:
        return settings, Result(
            "configuration", WARN, f"valid, with {', '.join(flags)} on (NODE_ENV="
            f"{settings.environment})",
            "these are for single-user local development only; remove them on a shared host",
            tuple(details))
    return settings, Result("configuration", OK, f"valid ({settings.environment})", "",
                            tuple(details))


def estimate_entropy_bits(secret: str) -> float:
    """A conservative guess: the Shannon entropy of the secret's own characters, times its length.

    Random output of ``openssl rand -base64 48`` scores about 340 bits, ``openssl rand -hex 32``
    about 240; a word padded with a repeated character scores a few dozen.
    """
    if not secret:
        return 0.0
    counts = Counter(secret)
    total = len(secret)
    per_char = -sum(n / total * math.log2(n / total) for n in counts.values())
    return per_char * total


def is_placeholder(secret: str) -> bool:
    folded = re.sub(r"[^a-z0-9]", "", secret.lower())
    if folded in PLACEHOLDER_EXACT or len(set(folded)) <= 2:
        return True
    return any(fragment in folded for fragment in PLACEHOLDERS)


def judge_secret(secret: str, production: bool, where: str) -> Result:
    name = "secret"
    generate = "generate one with: openssl rand -base64 48"
    if len(secret) < MIN_SECRET_LENGTH:
        return Result(name, FAIL,
                      f"{where} is {len(secret)} characters long; at least {MIN_SECRET_LENGTH} "
                      "are required", generate)
    bits = estimate_entropy_bits(secret)
    if is_placeholder(secret):
        return Result(name, FAIL if production else WARN,
                      f"{where} looks like a placeholder or documentation example",
                      generate + " (changing it signs everyone out and makes stored upstream "
                      "secrets unreadable: re-enter them afterwards)")
    if bits < MIN_SECRET_BITS:
        return Result(name, WARN,
                      f"{where} looks weak (about {bits:.0f} bits by a character-frequency "
                      f"estimate; random secrets score well above {MIN_SECRET_BITS})", generate)
    return Result(name, OK, f"{where}: {len(secret)} characters, about {bits:.0f} bits",
                  "", ("back it up with the database: losing it makes stored secrets unreadable",))


def check_secret(environ: Mapping[str, str], settings: Settings | None) -> Result:
    raw = environ.get("BETTER_AUTH_SECRET") or ""
    production = (environ.get("NODE_ENV") or environ.get("DIRECTOR_ENV") or "").strip().lower() \
        == "production"
    if raw:
        result = judge_secret(raw, production, "BETTER_AUTH_SECRET")
        if settings is not None and result.status == OK:
            kept = Path(settings.state_directory) / "auth-secret"
            with contextlib.suppress(OSError):
                stored = kept.read_text().strip()
                if stored and not secrets.compare_digest(stored, raw):
                    return Result(
                        "secret", WARN,
                        f"BETTER_AUTH_SECRET differs from the generated secret in {kept}",
                        "secrets stored while the generated one was in use cannot be decrypted "
                        f"with the variable: if there are any, set BETTER_AUTH_SECRET to the "
                        f"content of {kept}; otherwise remove the file")
        return result
    if production:
        return Result("secret", FAIL, "BETTER_AUTH_SECRET is not set (required in production)",
                      "set it in the environment file: openssl rand -base64 48")
    if settings is None:
        return Result("secret", SKIP, "BETTER_AUTH_SECRET is unset and the configuration is "
                                      "invalid (the state directory is unknown)")
    kept = Path(settings.state_directory) / "auth-secret"
    try:
        info = kept.stat()
        stored = kept.read_text().strip()
    except FileNotFoundError:
        return Result("secret", OK, f"BETTER_AUTH_SECRET unset: one is generated at the first "
                                    f"start into {kept}", "",
                      ("back that file up with the database",))
    except OSError as error:
        return Result("secret", FAIL, f"cannot read {kept}: {error.strerror}",
                      "run as the service's user or root, or set BETTER_AUTH_SECRET")
    result = judge_secret(stored, production, str(kept))
    if result.status == OK and stat.S_IMODE(info.st_mode) & 0o077:
        return Result("secret", WARN, f"{kept} is mode {stat.S_IMODE(info.st_mode):04o}",
                      f"chmod 0600 {kept}")
    return result


# --- the database -----------------------------------------------------------------------------


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


def _bind_error(host: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's listenTCP
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError as error:
            return error
    return None


def _health(host: str, port: int) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=3)
    try:
        connection.request("GET", "/api/health")
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read(4096))
    finally:
        connection.close()


def _ephemeral_ports() -> tuple[int, int] | None:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def check_port(settings: Settings) -> Result:
    name = "port"
    host = "127.0.0.1" if settings.host == "localhost" else settings.host
    address = f"{settings.host}:{settings.port}"
    error = _bind_error(host, settings.port)
    if error is None:
        return Result(name, OK, f"{address} is free")
    if error.errno == errno.EACCES:
        return Result(name, FAIL, f"{address}: permission denied",
                      "ports below 1024 need privileges; keep PORT above 1024 and let the reverse "
                      "proxy listen on 443")
    if error.errno == errno.EADDRNOTAVAIL:
        return Result(name, FAIL, f"{address}: no such address on this host",
                      "set HOST to an address of this host, 127.0.0.1 or 0.0.0.0")
    if error.errno != errno.EADDRINUSE:
        return Result(name, FAIL, f"cannot listen on {address}: {error.strerror}", "")
    probe_host = host
    if ipaddress.ip_address(host).is_unspecified:
        probe_host = "::1" if ":" in host else "127.0.0.1"
    try:
        status, headers, body = _health(probe_host, settings.port)
    except ConnectionRefusedError:
        ephemeral = _ephemeral_ports()
        hint = ""
        if ephemeral and ephemeral[0] <= settings.port <= ephemeral[1]:
            hint = (f"; PORT is inside net.ipv4.ip_local_port_range ({ephemeral[0]}-"
                    f"{ephemeral[1]}), where the kernel picks outgoing connections' local ports: "
                    f"choose a port below {ephemeral[0]} (the default 3673 is)")
        return Result(name, FAIL, f"{address} is held by a socket that is not listening (an "
                                  "outgoing connection's local port, or one closing in TIME_WAIT)",
                      f"see it with: ss -tanp 'sport = :{settings.port}'{hint}")
    except (OSError, http.client.HTTPException) as failure:
        return Result(name, FAIL, f"{address} is in use, and /api/health does not answer "
                                  f"({base.one_line(failure)})",
                      f"find the process: ss -ltnp 'sport = :{settings.port}'; stop it or set "
                      "PORT to another port")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "x-trace-id" not in headers:
        return Result(name, FAIL, f"{address} is in use by something that is not Director "
                                  f"(/api/health answered {status})",
                      f"find the process: ss -ltnp 'sport = :{settings.port}'; stop it or set "
                      "PORT to another port")
    if status == 200 and answer.get("status") == "ok":
        return Result(name, OK, f"{address} is served by a running Director (healthy)")
    return Result(name, WARN, f"{address} is served by a running Director that is not healthy: "
                              f"{answer.get('reason') or answer.get('status')}",
                  "journalctl -u director -n 50 tells why; the database checks above may too")


def check_metrics_port(settings: Settings) -> Result | None:
    if settings.metrics_listen is None or settings.metrics_listen.startswith("unix:"):
        return None
    host, _, port_text = settings.metrics_listen.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    error = _bind_error(host, port)
    if error is None:
        return Result("metrics-port", OK, f"{settings.metrics_listen} is free")
    if error.errno == errno.EADDRINUSE:
        probe = "127.0.0.1" if ipaddress.ip_address(host).is_unspecified else host
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection = http.client.HTTPConnection(probe, port, timeout=3)
            try:
                connection.request("GET", "/metrics")
                if b"director_build_info" in connection.getresponse().read():
                    return Result("metrics-port", OK,
                                  f"{settings.metrics_listen} is served by a running Director")
            finally:
                connection.close()
    return Result("metrics-port", FAIL, f"cannot listen on {settings.metrics_listen}: "
                                        f"{error.strerror}",
                  "choose a free port for METRICS_LISTEN (each instance needs its own)")


# --- OpenTelemetry collector ------------------------------------------------------------------


def check_tracing(settings: Settings) -> Result | None:
    """When tracing is on: the collector answers an empty OTLP/HTTP export (protobuf) with
    2xx. An empty ``ExportTraceServiceRequest`` is zero bytes of protobuf: nothing is stored."""
    endpoint = settings.tracing_endpoint
    if endpoint is None:
        return None
    name = "tracing"
    headers = {"content-type": "application/x-protobuf",
               **dict(settings.otel_headers), **dict(settings.otel_traces_headers)}
    try:
        status, answered, _ = _fetch(endpoint, "POST", b"", headers)
    except (OSError, http.client.HTTPException) as failure:
        return Result(name, FAIL, f"the OTLP collector at {endpoint} cannot be reached: "
                                  f"{failure}",
                      "start the collector (docs/operations.rst, Tracing), or correct "
                      "OTEL_EXPORTER_OTLP_ENDPOINT; meanwhile spans are dropped (clients are "
                      "not affected)")
    if 200 <= status < 300:
        content_type = answered.get("content-type") or "no content type"
        return Result(name, OK, f"the OTLP collector at {endpoint} takes spans "
                                f"({status}, {content_type})")
    fix = ("check OTEL_EXPORTER_OTLP_HEADERS (the collector's credentials)" if status in (401, 403)
           else "point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's OTLP/HTTP receiver "
                "(port 4318 by default; spans go to /v1/traces)")
    return Result(name, FAIL, f"{endpoint} answered an OTLP export with HTTP {status}", fix)


# --- BASE_URL ---------------------------------------------------------------------------------


def check_base_url(settings: Settings) -> Result:
    name = "base-url"
    parts = urlsplit(settings.base_url)
    host = parts.hostname or ""
    try:
        literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    details = []
    if settings.host in ("0.0.0.0", "::") and settings.production:  # noqa: S104
        details.append("HOST listens on every interface: if the reverse proxy runs on this "
                       "host, HOST=127.0.0.1 keeps the plain-HTTP port off the network")
    if not settings.production:
        return Result(name, OK, f"{settings.base_url} (not production: not checked further)",
                      "", tuple(details))
    if parts.scheme != "https":
        return Result(name, FAIL, f"{settings.base_url} is not https in production",
                      "terminate TLS at the reverse proxy and set BASE_URL=https://your.host "
                      "(session cookies are only Secure, and API keys only encrypted, over https)",
                      tuple(details))
    if literal is not None or host == "localhost" or host.endswith(".localhost"):
        return Result(name, WARN,
                      f"{settings.base_url}: the host is "
                      f"{'an IP address' if literal is not None else 'loopback'}",
                      "use the public DNS name clients use (certificates, the Host check and the "
                      "URLs handed out to MCP clients derive from it)", tuple(details))
    return Result(name, OK, settings.base_url, "", tuple(details))


#: How long the doctor waits for BASE_URL to answer.
REACH_TIMEOUT_SECONDS = 5.0
#: What MCP clients fetch first when they sign in with OAuth (the issuer's metadata).
DISCOVERY_PATH = "/.well-known/oauth-authorization-server"


def _fetch(url: str, method: str = "GET", body: bytes | None = None,
           headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                                 timeout=REACH_TIMEOUT_SECONDS)
    else:
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port,
                                                timeout=REACH_TIMEOUT_SECONDS)
    try:
        connection.request(method, parts.path or "/", body=body,
                           headers=headers or {"accept": "application/json"})
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read(65536))
    finally:
        connection.close()


def check_base_url_reach(settings: Settings) -> Result:
    """BASE_URL is what MCP clients reach: they are sent to it to sign in (it is the OAuth
    issuer, and every URL of the metadata derives from it). The doctor fetches the issuer's
    metadata through BASE_URL as a client would (through the proxy, TLS verified) and checks
    that a Director answers and names BASE_URL as its issuer. What this host cannot reach
    (DNS, a firewall, TLS it does not trust) is a warning: clients may see it otherwise."""
    name = "base-url-reach"
    url = settings.base_url + DISCOVERY_PATH
    try:
        status, headers, body = _fetch(url)
    except ssl.SSLError as failure:
        # A warning: this host's view (its trust store, split DNS) may not be the clients'.
        return Result(name, WARN, f"{settings.base_url}: TLS fails from this host "
                                  f"({base.one_line(failure)})",
                      "if clients see the same, they refuse it: install a certificate valid for "
                      "this name (chain included) at the reverse proxy")
    except (OSError, http.client.HTTPException) as failure:
        return Result(name, WARN, f"{settings.base_url} cannot be reached from this host "
                                  f"({base.one_line(failure)})",
                      "MCP clients signing in with OAuth are sent there: check DNS and the "
                      "reverse proxy (if the daemon is not started yet, run the doctor again "
                      "once it is)")
    if 300 <= status < 400:
        return Result(name, FAIL, f"{url} redirects ({status}) to "
                                  f"{headers.get('location', '?')}",
                      "set BASE_URL to the URL clients end up at (https, the public name, no "
                      "path); OAuth metadata and redirects must not be redirected")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status != 200 or "x-trace-id" not in headers or not isinstance(answer, dict):
        return Result(name, FAIL, f"{url} answered {status}, not from Director",
                      "the reverse proxy must pass every path to Director, /.well-known/ and "
                      "/oauth/ included (docs/manual.rst, nginx and Cloudflare)")
    issuer = answer.get("issuer")
    if issuer != settings.base_url:
        return Result(name, FAIL, f"the Director at {settings.base_url} says its issuer is "
                                  f"{issuer!r}",
                      "every instance behind this URL needs the same BASE_URL, the one clients "
                      "reach; OAuth clients refuse metadata whose issuer differs")
    cached = headers.get("age") or headers.get("x-cache", "").lower().startswith("hit")
    details = (("a cache answered (Age or X-Cache): make sure /oauth/ is never cached",)
               if cached else ())
    return Result(name, OK, f"{settings.base_url} reaches Director (its OAuth issuer)", "",
                  details)


# --- the state directory ----------------------------------------------------------------------


def check_state_directory(settings: Settings) -> Result:
    name = "state-directory"
    path = Path(settings.state_directory)
    needed = settings.embedded_database or settings.auth_secret is None
    why = "it holds " + " and ".join(
        what for what, on in (("the private database", settings.embedded_database),
                              ("the generated secret", settings.auth_secret is None)) if on)
    if settings.embedded_database:
        socket_path = path / "postgres" / "run" / ".s.PGSQL.5432"
        if len(str(socket_path)) > 107:
            return Result(name, FAIL, f"{path} is too long for the cluster's socket path",
                          "set STATE_DIRECTORY to a shorter directory")
    if not path.exists():
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not needed:
            return Result(name, OK, f"{path} does not exist (not needed: DATABASE_URL and "
                                    "BETTER_AUTH_SECRET are set)")
        if os.access(parent, os.W_OK | os.X_OK):
            return Result(name, OK, f"{path} does not exist yet; it is created at the first "
                                    f"start ({why})")
        return Result(name, FAIL, f"{path} does not exist and {base.user_name()} cannot create it in "
                                  f"{parent}", f"create it: install -d -m 0700 -o director "
                                               f"-g director {path} (systemd's StateDirectory= "
                                               "does this for the service)")
    if not path.is_dir():
        return Result(name, FAIL, f"{path} is not a directory", "remove it or set STATE_DIRECTORY")
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    shown = f"{path} (mode {mode:04o} {_owner(info)})"
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return Result(name, FAIL if needed else WARN, f"{shown} is not writable by {base.user_name()}",
                      f"run as its owner or root, or chown it to the service's user ({why})"
                      if needed else "only needed without DATABASE_URL or BETTER_AUTH_SECRET")
    if mode & 0o066:
        return Result(name, WARN, f"{shown} is readable or writable by others",
                      f"chmod 0700 {path} (0711 when root runs the private cluster as another "
                      "user)")
    return Result(name, OK, shown)


def check_stdio_sandbox(settings: Settings) -> Result:
    """How this account's daemon would box stdio servers (``director.sandbox``)."""
    name = "stdio-sandbox"
    try:
        launcher = stdio_launcher(settings, stdio_account(settings.stdio_user), "")
    except (SandboxError, KeyError, AccountError) as refused:
        return Result(name, FAIL, str(refused), "see docs/operations.rst, \"The stdio sandbox\"")
    if launcher.mode == "systemd":
        root = Path(settings.stdio_cache_directory)
        info = root.stat()
        if stat.S_IMODE(info.st_mode) & 0o007 or not info.st_mode & stat.S_ISGID:
            return Result(name, WARN, f"{root} (mode {stat.S_IMODE(info.st_mode):04o} "
                                      f"{_owner(info)}) lets others in, or lacks the setgid bit",
                          f"chmod 2710 {root} (systemd-tmpfiles --create director.conf)")
        return Result(name, OK, launcher.describe())
    fix = ("install the director package's director-stdio.socket and `systemctl enable --now "
           "director-stdio.socket`: each server then gets a sandbox of its own")
    if launcher.mode == "account":
        return Result(name, WARN, launcher.describe(), fix)
    return Result(name, FAIL if settings.production else WARN, launcher.describe(), fix)


# --- tools --------------------------------------------------------------------------------------


def _major(version_output: str) -> int | None:
    match = re.search(r"(\d+)(?:\.\d+)?", version_output)
    return int(match[1]) if match else None


def check_server_binaries(settings: Settings) -> Result:
    name = "postgres-binaries"
    if not settings.embedded_database:
        return Result(name, OK, "not needed (DATABASE_URL is set)")
    from director.db.embedded import EmbeddedDatabaseError, find_server_binaries

    try:
        bindir = find_server_binaries()
    except EmbeddedDatabaseError as error:
        return Result(name, FAIL, "no PostgreSQL server binaries for the private cluster",
                      str(error))
    try:
        version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                                 text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        return Result(name, FAIL, f"{bindir}/postgres does not run: {base.one_line(error)}",
                      "reinstall the server package (apt-get install --reinstall postgresql-15)")
    return Result(name, OK, f"{bindir} ({version})")


def check_pg_dump(server_version: int | None) -> Result:
    name = "pg-dump"
    found = shutil.which("pg_dump")
    if found is None:
        return Result(name, WARN, "pg_dump is not installed: no backups from this host",
                      "apt-get install postgresql-client")
    try:
        output = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=10,
                                check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        return Result(name, WARN, f"{found} does not run: {base.one_line(error)}", "")
    major = _major(output.rsplit(")", 1)[-1]) or _major(output)
    if server_version is not None and major is not None and major < server_version // 10000:
        return Result(name, WARN, f"pg_dump {major} is older than the server "
                                  f"({server_version // 10000}) and refuses to dump it",
                      f"install postgresql-client-{server_version // 10000} (PostgreSQL's apt "
                      "repository has every version)")
    return Result(name, OK, f"{found} ({output.strip()})")


def check_plugin_cache() -> Result:
    import importlib.util

    name = "plugin-cache"
    regenerate = ("regenerate it as the installing user: python -c 'from twisted.plugin import "
                  "IPlugin, getPlugins; list(getPlugins(IPlugin))' with the virtualenv's python")
    spec = importlib.util.find_spec("twisted.plugins.director_plugin")
    if spec is None or spec.origin is None:
        return Result(name, FAIL, "twisted/plugins/director_plugin.py is not installed: "
                                  "`twistd director` and `director serve` cannot start",
                      "reinstall Director")
    folder = Path(spec.origin).parent
    cache = folder / "dropin.cache"
    newest = max(p.stat().st_mtime for p in folder.glob("*.py"))
    writable = os.access(folder, os.W_OK)
    if cache.exists() and cache.stat().st_mtime >= newest:
        return Result(name, OK, f"{cache} is current")
    state = "is stale" if cache.exists() else "is missing"
    if writable:
        return Result(name, OK, f"{cache} {state}; twistd rewrites it at the next start",
                      "", (f"unless the service's user cannot write {folder}: then {regenerate}",))
    return Result(name, WARN, f"{cache} {state} and {base.user_name()} cannot write {folder}: twistd "
                              "rescans the plugins at every start", regenerate)


# --- running them -------------------------------------------------------------------------------


def run_checks(env_file: str | None, process: Mapping[str, str] | None = None) -> list[Result]:
    process = dict(os.environ if process is None else process)
    environment = check_env_file(env_file, process)
    results = [environment.result]
    settings, configured = check_configuration(environment.values)
    results.append(configured)
    results.append(check_secret(environment.values, settings))
    server_version: int | None = None
    if settings is None:
        skipped = ("database", "schema", "stored-secrets", "refused-servers",
                   "registry-runtimes", "listen-notify", "port", "base-url", "base-url-reach",
                   "state-directory", "stdio-sandbox", "postgres-binaries")
        results += [Result(name, SKIP, "the configuration is invalid") for name in skipped]
    else:
        database, server_version = check_database(settings)
        results += database
        results.append(check_port(settings))
        metrics = check_metrics_port(settings)
        if metrics is not None:
            results.append(metrics)
        tracing = check_tracing(settings)
        if tracing is not None:
            results.append(tracing)
        results.append(check_base_url(settings))
        results.append(check_base_url_reach(settings))
        results.append(check_state_directory(settings))
        results.append(check_stdio_sandbox(settings))
        results.append(check_server_binaries(settings))
    results.append(check_pg_dump(server_version))
    results.append(check_plugin_cache())
    return results


@contextlib.contextmanager
def _connect_timeout() -> Iterator[None]:
    previous = os.environ.get("PGCONNECT_TIMEOUT")
    if previous is None:
        os.environ["PGCONNECT_TIMEOUT"] = str(CONNECT_TIMEOUT_SECONDS)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PGCONNECT_TIMEOUT", None)


def render(results: list[Result]) -> str:
    width = max(len(result.name) for result in results)
    lines = []
    for result in results:
        lines.append(f"{result.status.upper():<5} {result.name:<{width}}  {result.summary}")
        indent = " " * (width + 8)
        for detail in result.details:
            lines.append(f"{indent}{detail}")
        if result.fix and result.status != OK:
            lines.append(f"{indent}fix: {result.fix}")
    counts = Counter(result.status for result in results)
    lines.append(", ".join(f"{counts[status]} {label}" for status, label in (
        (FAIL, "failed"), (WARN, "warnings"), (OK, "ok"), (SKIP, "skipped"))))
    return "\n".join(lines)


def cmd_doctor(arguments: argparse.Namespace) -> int:
    with _connect_timeout():
        results = run_checks(arguments.env_file)
    failed = any(result.status == FAIL for result in results)
    if arguments.json:
        print(json.dumps({"ok": not failed, "user": base.user_name(),
                          "checks": [result.as_json() for result in results]}, indent=2))
    else:
        print(render(results))
    return 1 if failed else 0


def add_commands(commands: Any) -> None:
    """Register ``doctor`` on the ``director`` command's subparsers."""
    doctor = commands.add_parser(
        "doctor", help="check this host's configuration end to end; exit 1 on any failure",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check the environment file, the configuration, the secret, the database "
                    "(reach,\nschema, LISTEN/NOTIFY through DATABASE_URL), the port, BASE_URL, the "
                    "state directory,\nthe PostgreSQL tools and the plugin cache. Each check says "
                    "OK, WARN or FAIL and\nwhat to fix; the exit status is 1 when any failed.\n\n"
                    "Run it as root (or as user director: runuser -u director -- director "
                    "doctor), so\nthat it reads /etc/director/director.env like the service does.")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(handler=cmd_doctor)
