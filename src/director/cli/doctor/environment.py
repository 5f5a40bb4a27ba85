"""Checks of ``director doctor`` on the environment file, the configuration and the secret."""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import pwd
import re
import secrets
import stat
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import attrs

from director.cli import base
from director.cli.doctor.result import FAIL, OK, SKIP, WARN, Result
from director.config import (
    MIN_SECRET_LENGTH,
    VARIABLES,
    ConfigError,
    Settings,
    database_target,
    load_settings,
    read_env_file,
)

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


def owner_name(info: os.stat_result) -> str:
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
               f"{owner_name(info)}"]
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
