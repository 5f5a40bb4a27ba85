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
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from director.cli import base
from director.cli.doctor.database import CONNECT_TIMEOUT_SECONDS, check_database
from director.cli.doctor.environment import check_configuration, check_env_file, check_secret
from director.cli.doctor.host import (
    check_pg_dump,
    check_plugin_cache,
    check_server_binaries,
    check_state_directory,
    check_stdio_sandbox,
)
from director.cli.doctor.network import (
    check_base_url,
    check_base_url_reach,
    check_metrics_port,
    check_port,
    check_tracing,
)
from director.cli.doctor.result import FAIL, OK, SKIP, WARN, Result


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
