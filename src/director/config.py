"""Settings from the environment: parse once, validate everything, guard production.

Every variable the daemon reads is declared in ``VARIABLES`` (``director.config_variables``),
next to its default and its documentation; README.rst's configuration table is generated from
the same list (``director config docs``) so the two cannot drift apart.

Parsing never touches the network, and of the disk reads only the account database
(``STDIO_USER``, the default state directory): ``load_settings(environ)`` returns a frozen
``Settings`` or raises ``ConfigError`` with one line per problem, each naming the variable,
what is wrong with its value, and how to fix it.

The DANGEROUSLY_* flags are guarded twice here (``FLAG_ENVIRONMENTS``, ``exposure_problem``)
and once more wherever a server starts (``director.playbooks.rails``); every dangerous
setting in force is listed by ``dangerous_settings`` at each start.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from director.config_variables import (
    MIN_SECRET_LENGTH as MIN_SECRET_LENGTH,
)
from director.config_variables import (
    VARIABLES,
    Invalid,
    host_is_loopback,
    metrics_listen_is_loopback,
    origin_of,
    shown_database_url,
)
from director.config_variables import (
    database_target as database_target,
)

DANGEROUS_FLAGS = (
    "DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS",
    "DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS",
    "DANGEROUSLY_ENABLE_SEEDING",
)
#: The flags that let any account act on the host or its network (run commands, reach
#: loopback and private addresses); ``exposure_problem`` says when they are refused.
SERVER_FLAGS = DANGEROUS_FLAGS[:2]
#: The only environments where the DANGEROUSLY_* flags may be set. Any other NODE_ENV
#: ("staging", "preprod", …) names a deployment that other people use: the flags exist for one
#: developer on a laptop, so everything but these two counts as production for them.
FLAG_ENVIRONMENTS = ("development", "test")


class ConfigError(Exception):
    """The environment does not describe a runnable daemon; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@attrs.frozen
class Settings:
    """The daemon's whole configuration. Frozen: built once at start, shared read-only."""

    environment: str = "development"
    database_url: str | None = None
    auth_secret: str | None = None
    #: The secret BETTER_AUTH_SECRET replaces, during a rotation (opens old sealed values).
    auth_secret_previous: str | None = None
    base_url: str = "http://localhost:3673"
    host: str = "0.0.0.0"  # noqa: S104 - a gateway listens on all interfaces unless told
    port: int = 3673
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    telemetry_enabled: bool = False
    telemetry_url: str = "https://telemetry.director.run/v1/events"
    registry_url: str = "https://registry.modelcontextprotocol.io"
    registry_trust: str = "none"
    #: Server names (``io.github.acme/weather``) and namespaces (``io.github.acme/*``).
    registry_allow: tuple[str, ...] = ()
    rate_limit_window_seconds: int = 60
    rate_limit_max_requests: int = 1000
    user_rate_limit_window_seconds: int = 60
    user_rate_limit_max_requests: int = 5000
    signup_rate_limit_per_hour: int = 10
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allow_arbitrary_stdio_servers: bool = False
    allow_insecure_http_servers: bool = False
    enable_seeding: bool = False
    waitlist_enabled: bool = False
    oauth_access_token_seconds: int = 3600
    oauth_refresh_token_days: int = 30
    oauth_registrations_per_hour: int = 20
    #: An external OpenID Connect provider people may sign in with (all three, or none).
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = attrs.field(default=None, repr=False)
    oidc_name: str = "your organisation"
    seed_user_email: str = "user@director.run"
    seed_user_password: str = "password"  # noqa: S105 - the original's documented dev default
    log_level: str = "info"
    state_directory: str = ""
    max_request_body_bytes: int = 4 * 1024 * 1024
    request_header_timeout_seconds: float = 10.0
    request_body_timeout_seconds: float = 30.0
    idle_connection_timeout_seconds: float = 75.0
    max_connections_per_address: int = 64  # 0: no cap
    shutdown_timeout_seconds: float = 10.0
    database_pool_size: int = 4
    mcp_session_idle_seconds: float = 1800.0
    mcp_max_sessions_per_user: int = 100
    mcp_list_wait_seconds: float = 3.0
    mcp_event_log_events: int = 100_000  # 0: no shared event log
    mcp_event_log_seconds: float = 300.0
    #: ``host:port`` (IPv6 as ``[::1]:port``) or ``unix:/path``; None: no metrics listener.
    metrics_listen: str | None = None
    metrics_allow_public: bool = False
    #: OpenTelemetry (director.tracing): on when either endpoint is set.
    otel_endpoint: str | None = None
    otel_traces_endpoint: str | None = None
    otel_headers: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)
    otel_traces_headers: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)
    otel_service_name: str = "director"
    otel_traces_sampler: str = "parentbased_always_on"
    otel_traces_sampler_arg: float | None = None
    otel_sdk_disabled: bool = False
    #: The account stdio servers run as when the daemon runs as root.
    stdio_user: str = "nobody"
    #: How stdio servers are boxed ("auto", "systemd", "account"): director.sandbox.
    stdio_sandbox: str = "auto"
    stdio_sandbox_socket: str = "/run/director-stdio.sock"
    stdio_cache_directory: str = "/var/cache/director-stdio"
    stdio_memory_max: int = 1024 ** 3
    stdio_tasks_max: int = 512

    @property
    def production(self) -> bool:
        return self.environment == "production"

    @property
    def base_origin(self) -> str:
        return origin_of(self.base_url)

    @property
    def tracing_endpoint(self) -> str | None:
        """Where spans go (OTLP/HTTP), or None: tracing off."""
        if self.otel_sdk_disabled:
            return None
        if self.otel_traces_endpoint is not None:
            return self.otel_traces_endpoint
        if self.otel_endpoint is not None:
            return self.otel_endpoint.rstrip("/") + "/v1/traces"
        return None

    @property
    def embedded_database(self) -> bool:
        """True when the daemon runs its own private PostgreSQL under the state directory."""
        return self.database_url is None


def default_state_directory(environ: Mapping[str, str]) -> str:
    if os.geteuid() == 0:
        return "/var/lib/director"
    xdg = environ.get("XDG_STATE_HOME", "").strip()
    if xdg.startswith("/"):
        return str(Path(xdg) / "director")
    home = environ.get("HOME") or pwd.getpwuid(os.geteuid()).pw_dir
    return str(Path(home) / ".local" / "state" / "director")


def _lookup(environ: Mapping[str, str], name: str) -> str | None:
    """An unset variable and an empty one are the same, as in the original's env files."""
    value = environ.get(name)
    if value is None or value == "":
        return None
    return value


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Parse and validate the environment; raise ``ConfigError`` listing every problem."""
    problems: list[str] = []
    environ = dict(environ)
    problems += _apply_alias(environ)
    values = _parsed_variables(environ, problems)
    _add_derived_defaults(environ, values)
    for check in _CROSS_CHECKS:
        problems += check(environ, values)
    if problems:
        raise ConfigError(problems)
    return Settings(**values)


def _apply_alias(environ: dict[str, str]) -> list[str]:
    """DIRECTOR_ENV stands for NODE_ENV; both set and different is a problem."""
    alias = _lookup(environ, "DIRECTOR_ENV")
    node_env = _lookup(environ, "NODE_ENV")
    if alias is not None and node_env is not None and alias.strip() != node_env.strip():
        return [f"NODE_ENV={node_env!r} and DIRECTOR_ENV={alias!r} disagree; "
                "set only one of them (DIRECTOR_ENV is an alias of NODE_ENV)"]
    if alias is not None:
        environ["NODE_ENV"] = alias
    return []


def _parsed_variables(environ: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    """Each variable's value (given, else its default), by ``Settings`` field; a value its
    parser rejects is left out and its problem appended to ``problems``."""
    values: dict[str, Any] = {}
    for variable in VARIABLES:
        raw = _lookup(environ, variable.name) or variable.default
        if raw is None:
            continue
        try:
            values[variable.field] = variable.parse(raw)
        except Invalid as invalid:
            problems.append(
                f"{variable.name}={_shown(variable.name, raw)} {invalid.problem}; {invalid.fix}"
            )
    return values


def _shown(name: str, raw: str) -> str:
    """A rejected value as its problem quotes it: never a secret nor a database password."""
    if name.startswith("BETTER_AUTH_SECRET") or name.endswith("_HEADERS") or \
            name == "OIDC_CLIENT_SECRET":
        return "(hidden)"
    if name == "DATABASE_URL":
        return shown_database_url(raw)
    return repr(raw)


def _add_derived_defaults(environ: Mapping[str, str], values: dict[str, Any]) -> None:
    if "port" in values and _lookup(environ, "BASE_URL") is None:
        values["base_url"] = f"http://localhost:{values['port']}"
    if "state_directory" not in values:
        values["state_directory"] = default_state_directory(environ)


def _public_metrics_problems(environ: Mapping[str, str], values: Mapping[str, Any]) -> list[str]:
    listen = values.get("metrics_listen")
    if listen is None or values.get("metrics_allow_public") or \
            metrics_listen_is_loopback(listen):
        return []
    return [
        f"METRICS_LISTEN={_lookup(environ, 'METRICS_LISTEN')!r} is not a loopback address and "
        "/metrics has no authentication; use 127.0.0.1:PORT (scrape through a proxy or "
        "tunnel), or set METRICS_ALLOW_PUBLIC=true if a firewall guards it"
    ]


def _registry_allowlist_problems(_environ: Mapping[str, str], values: Mapping[str, Any]
                                 ) -> list[str]:
    if values.get("registry_trust") != "allowlist" or values.get("registry_allow"):
        return []
    return ["REGISTRY_TRUST=allowlist needs REGISTRY_ALLOW: list the server names "
            "or namespaces (io.github.acme/*) whose packages may run, or set "
            "REGISTRY_TRUST=none"]


def _dangerous_flag_problems(_environ: Mapping[str, str], values: Mapping[str, Any]
                             ) -> list[str]:
    environment = values.get("environment", "development")
    if environment in FLAG_ENVIRONMENTS:
        exposed = exposure_problem(values)
        return [] if exposed is None else [exposed]
    where = "in production" if environment == "production" else \
        f"with NODE_ENV={environment} (only development and test allow it)"
    return [f"FATAL: {name} cannot be enabled {where}. Remove it from the environment, or "
            "set NODE_ENV=development for single-user local development."
            for name in _flags_on(values, DANGEROUS_FLAGS)]


def _oidc_problems(environ: Mapping[str, str], values: Mapping[str, Any]) -> list[str]:
    oidc = ("OIDC_ISSUER", "OIDC_CLIENT_ID", "OIDC_CLIENT_SECRET")
    given = [name for name in oidc if name.lower() in values]  # (an invalid one is reported)
    if not given or len(given) == len(oidc) or len(given) != sum(
            _lookup(environ, name) is not None for name in oidc):
        return []
    missing = [name for name in oidc if name not in given]
    return [f"{', '.join(missing)} missing: signing in with an OpenID Connect "
            f"provider needs all of {', '.join(oidc)} (set {', '.join(given)} "
            "only with the others, or remove it)"]


def _production_problems(environ: Mapping[str, str], values: Mapping[str, Any]) -> list[str]:
    if values.get("environment") != "production":
        return []
    return [f"{name} is required when NODE_ENV=production; set it in the environment "
            "file (see README.rst, Configuration)"
            for name in ("DATABASE_URL", "BETTER_AUTH_SECRET", "BASE_URL")
            if _lookup(environ, name) is None]


#: The checks across variables, in the order their problems are listed.
_CROSS_CHECKS: tuple[Callable[[Mapping[str, str], Mapping[str, Any]], list[str]], ...] = (
    _public_metrics_problems, _registry_allowlist_problems, _dangerous_flag_problems,
    _oidc_problems, _production_problems)


def _flags_on(values: Mapping[str, Any], names: tuple[str, ...]) -> list[str]:
    fields = {variable.name: variable.field for variable in VARIABLES}
    return [name for name in names if values.get(fields[name])]


def exposure_problem(values: Mapping[str, Any]) -> str | None:
    """The FATAL line when a server flag is on in a daemon that anyone may use, else None.

    With sign-up open (the default) anyone who reaches the daemon can create an account, add
    a stdio server and run ``/bin/sh -c …`` on this host, or point an http server at this
    host's and its network's private services. So the flags need one of two things: the
    daemon is reachable from this host only (HOST loopback *and* BASE_URL's host loopback —
    a loopback HOST behind a public proxy is still reachable from the network), or new
    accounts cannot act until an administrator activates them (WAITLIST_ENABLED=true).
    """
    flags = _flags_on(values, SERVER_FLAGS)
    if not flags or values.get("waitlist_enabled") or "host" not in values or \
            "base_url" not in values:  # an invalid HOST or BASE_URL is reported already
        return None
    host = values["host"]
    base_host = urlsplit(values["base_url"]).hostname or ""
    if host_is_loopback(host) and host_is_loopback(base_host):
        return None
    harm = " and ".join(consequence for flag, consequence in (
        (SERVER_FLAGS[0], "run commands on this host"),
        (SERVER_FLAGS[1], "reach this host's and its network's private services"),
    ) if flag in flags)
    return (
        f"FATAL: {' and '.join(flags)} cannot be enabled on a daemon that anyone can sign up "
        f"to (HOST={host}, BASE_URL host {base_host}, WAITLIST_ENABLED=false): any network "
        f"client could create an account and {harm}. Either keep it to "
        "this host (HOST=127.0.0.1 and a loopback BASE_URL such as http://localhost:3673), or "
        "set WAITLIST_ENABLED=true so that new accounts wait for an administrator."
    )


def _stdio_sandbox_socket_in_use(settings: Settings) -> bool:
    """Whether stdio servers go to the systemd sandbox (``director.sandbox.launcher``)."""
    from director.sandbox.launcher import usable_socket

    return settings.stdio_sandbox != "account" and usable_socket(settings.stdio_sandbox_socket)


def dangerous_settings(settings: Settings, euid: int | None = None) -> list[str]:
    """One line per dangerous setting in force, saying what it allows (logged at every start
    and printed by ``director config check``)."""
    euid = os.geteuid() if euid is None else euid
    lines = []
    if settings.allow_arbitrary_stdio_servers:
        lines.append("DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS is on: every account can run "
                     "any command on this host through a stdio server")
        if euid != 0 and not _stdio_sandbox_socket_in_use(settings):
            try:
                user = pwd.getpwuid(euid).pw_name
            except KeyError:
                user = f"uid {euid}"
            lines.append(f"stdio servers run as the daemon's own account ({user}), not "
                         "STDIO_USER: they can read and write whatever the daemon can, "
                         "including its state directory, its secret and a private cluster's "
                         "database (director-stdio.socket would give each a sandbox of its "
                         "own; a daemon started as root runs them as STDIO_USER)")
    if settings.allow_insecure_http_servers:
        lines.append("DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS is on: every account can make "
                     "the daemon connect over plain http and to loopback, link-local and "
                     "private addresses (this host's and its network's services)")
    if settings.registry_trust == "any":
        lines.append(f"REGISTRY_TRUST=any: every account can install and run on this host any "
                     f"package that {settings.registry_url} lists")
    if settings.enable_seeding:
        lines.append(f"DANGEROUSLY_ENABLE_SEEDING is on: `director seed` creates "
                     f"{settings.seed_user_email} with a known password")
    listen = settings.metrics_listen
    if listen is not None and settings.metrics_allow_public and \
            not metrics_listen_is_loopback(listen):
        lines.append(f"METRICS_ALLOW_PUBLIC is on and METRICS_LISTEN={listen} is not loopback: "
                     "anyone who reaches it reads the unauthenticated /metrics")
    return lines


def configuration_table() -> str:
    """The README's configuration table, as reStructuredText."""
    rows = [("Variable", "Default", "Meaning")]
    for variable in VARIABLES:
        default = "(unset)" if variable.default is None else f"``{variable.default}``"
        if variable.default == "":
            default = "(empty)"
        # A description's asterisks are text ("io.github.acme/*"), not emphasis.
        rows.append((f"``{variable.name}``", default, variable.description.replace("*", r"\*")))
    # A simple table's last column may run past its rule, so it stays as wide as its title.
    widths = [max(len(row[i]) for row in rows) for i in range(2)] + [len(rows[0][2])]
    rule = " ".join("=" * width for width in widths)
    lines = [rule, " ".join(cell.ljust(w) for cell, w in zip(rows[0], widths, strict=True)).rstrip(),
             rule]
    for row in rows[1:]:
        lines.append(" ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    lines.append(rule)
    return "\n".join(lines)


def read_env_file(path: str) -> dict[str, str]:
    """Read a systemd ``EnvironmentFile=``: KEY=VALUE lines, # comments, optional quotes."""
    values: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", ";")):
                continue
            if stripped.startswith("export "):
                stripped = stripped[len("export "):].lstrip()
            key, sep, value = stripped.partition("=")
            if not sep or not key.strip().replace("_", "").isalnum():
                # The line itself is not echoed: it may hold a secret.
                raise ConfigError([f"{path}:{number}: expected KEY=VALUE (a variable name, '=', "
                                   "then the value)"])
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key.strip()] = value
    return values
