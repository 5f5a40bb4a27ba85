"""The variables the daemon reads, each with its default, its documentation and its parser.

``VARIABLES`` is the one list of them: ``director.config.load_settings`` parses the
environment with it and README.rst's configuration table is generated from it. A parser
returns the parsed value or raises ``Invalid(problem, fix)``; the variable's name is added by
``load_settings``. Nothing here imports ``director.config``.
"""

from __future__ import annotations

import ipaddress
import pwd
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs

ENVIRONMENTS = ("development", "production", "test", "staging")
LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal", "silent")

#: Host names that only ever mean this host (RFC 6761 reserves localhost and its subdomains;
#: the other two are Debian's /etc/hosts names for ::1).
LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")
MIN_SECRET_LENGTH = 32
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class Invalid(Exception):
    """Raised by a parser: the value's problem and the fix, without the variable's name."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


@attrs.frozen
class Variable:
    name: str
    default: str | None
    description: str
    parse: Callable[[str], Any]
    field: str



# --- value parsers: each returns the parsed value or raises Invalid(problem, fix) ---------


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise Invalid("is not a boolean", "use true or false")


def _positive_int(raw: str) -> int:
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise Invalid("is not a whole number", "use a whole number greater than 0") from None
    if value <= 0:
        raise Invalid("must be greater than 0", "use a whole number greater than 0")
    return value


def _count_or_zero(raw: str) -> int:
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise Invalid("is not a whole number", "use a whole number (0 turns it off)") from None
    if value < 0:
        raise Invalid("is negative", "use a whole number (0 turns it off)")
    return value


def _positive_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise Invalid("is not a number", "use a number of seconds greater than 0") from None
    if not value > 0:
        raise Invalid("must be greater than 0", "use a number of seconds greater than 0")
    return value


def _port(raw: str) -> int:
    try:
        value = _positive_int(raw)
    except Invalid as invalid:
        raise Invalid(invalid.problem, "use a TCP port between 1 and 65535") from None
    if value > 65535:
        raise Invalid("is not a TCP port", "use a port between 1 and 65535")
    return value


def _listen_host(raw: str) -> str:
    value = raw.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if value not in ("localhost",):
            raise Invalid(
                "is not an IP address", "use an address to listen on, e.g. 127.0.0.1 or 0.0.0.0"
            ) from None
    return value


def _http_url(raw: str) -> str:
    value = raw.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid("is not an http(s) URL", "use a URL such as https://director.example.com")
    if parts.query or parts.fragment:
        raise Invalid("has a query or fragment", "remove everything after ? or #")
    return value.rstrip("/")


def _registry_url(raw: str) -> str:
    value = raw.strip()
    if value.startswith("file:"):
        parts = urlsplit(value)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/") or \
                parts.query or parts.fragment:
            raise Invalid("is not a file URL of an absolute path",
                          "use file:///etc/director/catalogue.json")
        return f"file://{parts.path}"
    try:
        return _http_url(value)
    except Invalid:
        raise Invalid("is not an http(s) or file URL",
                      "use https://registry.modelcontextprotocol.io or "
                      "file:///etc/director/catalogue.json") from None


def _comma_items(raw: str) -> list[str]:
    """The items of a comma-separated list, stripped; empty ones (``a,,b``, a trailing comma)
    are left out."""
    return [item for part in raw.split(",") if (item := part.strip())]


_REGISTRY_NAME = re.compile(r"[a-zA-Z0-9.-]+/(\*|[a-zA-Z0-9._-]+)")


def _registry_names(raw: str) -> tuple[str, ...]:
    names = []
    for item in _comma_items(raw):
        if not _REGISTRY_NAME.fullmatch(item):
            raise Invalid(f"contains {item!r}, which is not a server name or namespace",
                          "list names such as io.github.acme/weather or namespaces such as "
                          "io.github.acme/*, separated by commas")
        names.append(item)
    return tuple(names)


def _database_url(raw: str) -> str:
    value = raw.strip()
    scheme, separator, _ = value.partition("://")
    if not separator or scheme.lower() not in ("postgres", "postgresql"):
        raise Invalid(
            "is not a PostgreSQL URL",
            "use postgres://user:password@host:5432/dbname, or unset it for the embedded database",
        )
    reading = _libpq_reading(value)
    if _misread(value, reading):
        raise Invalid(
            "holds an unencoded @ or / (in the password?): libpq would read part of it as the "
            "host, port or database name",
            "percent-encode the user name's and password's special characters "
            "(@ %40, / %2F, : %3A, # %23, ? %3F, % %25)",
        )
    if not _ports_valid(reading):
        raise Invalid("has an invalid port", "use a port number such as 5432")
    return value


#: Shown instead of a database URL that libpq cannot read, or reads as something not meant.
UNPARSEABLE_DATABASE_URL = "(unparseable DATABASE_URL)"


_QUOTED = re.compile(r'"([^"]*)"')


def _unquoted(quoted: re.Match[str]) -> str:
    """A quote from libpq's message, unless it may be part of a secret (one punctuation mark,
    such as the ``"="`` it expected, is kept)."""
    text = quoted[1]
    return quoted[0] if len(text) == 1 and not text.isalnum() else '"…"'


def _libpq_reading(dsn: str) -> dict[str, str]:
    """The DSN's parameters as libpq itself reads them. Its error messages quote the text they
    stumbled on (which may be the password), so the quotes are left out of the problem."""
    from psycopg2.extensions import parse_dsn

    try:
        return dict(parse_dsn(dsn))
    except Exception as error:  # psycopg2.ProgrammingError, but keep the import local
        reason = _QUOTED.sub(_unquoted, " ".join(str(error).split()))
        reason = reason.removeprefix("invalid dsn: ")
        raise Invalid(f"cannot be parsed ({reason})",
                      "use postgres://user:password@host:5432/dbname") from None


def _misread(dsn: str, reading: Mapping[str, str]) -> bool:
    """True when libpq's reading of a URL cannot be what was meant: an unencoded ``@`` or ``/``
    in the password moves part of it into the host, the port or the database name."""
    if "://" not in dsn:
        return False
    return any("@" in reading.get(key, "") for key in ("host", "port", "dbname")) or \
        "/" in reading.get("dbname", "")


def _ports_valid(reading: Mapping[str, str]) -> bool:
    """Every port libpq read (one per host) is empty (the default) or a TCP port number."""
    ports = [port.strip() for port in reading.get("port", "").split(",")]
    return all(not port or (port.isdigit() and 0 < int(port) < 65536) for port in ports)


def database_target(dsn: str) -> str:
    """Where a DSN or database URL connects, fit for any message: the user, host, port and
    database as libpq reads them and nothing else (never the password, nor any other
    parameter), or ``(unparseable DATABASE_URL)``."""
    try:
        reading = _libpq_reading(dsn)
    except Invalid:
        return UNPARSEABLE_DATABASE_URL
    if _misread(dsn, reading) or not _ports_valid(reading):
        return UNPARSEABLE_DATABASE_URL
    user = reading.get("user") or "(default user)"
    host = reading.get("host") or reading.get("hostaddr") or "the default socket"
    database = reading.get("dbname") or reading.get("user") or "(default database)"
    return f"{user} at {host} port {reading.get('port') or 5432}, database {database}"


def shown_database_url(raw: str) -> str:
    target = database_target(raw)
    return target if target == UNPARSEABLE_DATABASE_URL else f"({target})"


def _secret(raw: str) -> str:
    if len(raw) < MIN_SECRET_LENGTH:
        raise Invalid(
            f"is {len(raw)} characters long, at least {MIN_SECRET_LENGTH} are required",
            "generate one with: openssl rand -base64 48",
        )
    return raw


def _origin_list(raw: str) -> tuple[str, ...]:
    origins = []
    for item in _comma_items(raw):
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise Invalid(
                f"contains {item!r}, which is not an origin",
                "list origins as scheme://host[:port], separated by commas",
            )
        origins.append(origin_of(item))
    return tuple(origins)


def _host_list(raw: str) -> tuple[str, ...]:
    hosts = []
    for item in _comma_items(raw.lower()):
        if "/" in item or " " in item:
            raise Invalid(
                f"contains {item!r}, which is not a host name",
                "list host names (optionally with :port), separated by commas",
            )
        hosts.append(item)
    return tuple(hosts)


def _network_list(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in _comma_items(raw):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise Invalid(
                f"contains {item!r}, which is not an IP address or network",
                "list addresses or networks such as 127.0.0.1 or 10.0.0.0/8, separated by commas",
            ) from None
    return tuple(networks)


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise Invalid("is not recognised", "use one of " + ", ".join(choices))
        return value

    return parse


def _directory(raw: str) -> str:
    # systemd passes several directories separated by colons when StateDirectory= lists several.
    first = raw.split(":")[0].strip()
    if not first.startswith("/"):
        raise Invalid("is not an absolute path", "use an absolute directory path")
    return first


def _text(raw: str) -> str:
    return raw


def _https_url(raw: str) -> str:
    value = _http_url(raw)
    if urlsplit(value).scheme != "https":
        raise Invalid("is not an https URL", "an OpenID Connect issuer is always https")
    return value


def _stdio_user(raw: str) -> str:
    """An existing account other than root (read from the host's account database)."""
    name = raw.strip()
    fix = ("use an unprivileged account of its own (adduser --system --group mcp-stdio) or "
           "nobody")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise Invalid("is not an account on this host", fix) from None
    if entry.pw_uid == 0:
        raise Invalid("is root (uid 0): stdio servers must never run as root", fix)
    return entry.pw_name


def _stdio_sandbox(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("auto", "systemd", "account"):
        raise Invalid("is not auto, systemd or account", "use auto (the default), systemd or "
                      "account")
    return value


def _absolute_path(raw: str) -> str:
    value = raw.strip()
    if not value.startswith("/"):
        raise Invalid("is not an absolute path", "use an absolute path")
    return value


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def _size(raw: str) -> int:
    """Bytes, with an optional K, M, G or T suffix (powers of 1024), as systemd writes them."""
    value = raw.strip().upper().removesuffix("B")
    fix = "use a size in bytes such as 1G, 512M or 1073741824"
    number, unit = (value[:-1], value[-1]) if value[-1:] in _SIZE_UNITS else (value, "")
    try:
        size = int(number, 10) * _SIZE_UNITS[unit]
    except ValueError:
        raise Invalid("is not a size", fix) from None
    if size < 16 * 1024 ** 2:
        raise Invalid("is under 16M, too little for any runtime", fix)
    return size


SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
            "parentbased_always_off", "parentbased_traceidratio")


def _otlp_url(raw: str) -> str:
    url = raw.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid("is not an http(s) URL",
                      "give the collector's OTLP/HTTP address, e.g. http://127.0.0.1:4318")
    return url


def _otlp_headers(raw: str) -> tuple[tuple[str, str], ...]:
    """W3C baggage-like ``key=value,key2=value2`` (values percent-encoded), as the
    OpenTelemetry SDKs read ``OTEL_EXPORTER_OTLP_HEADERS``."""
    headers = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise Invalid("is not a list of key=value pairs",
                          "write it as name=value,name2=value2 (values percent-encoded)")
        headers[key.strip().lower()] = unquote(value.strip())
    return tuple(headers.items())


def _sampler_ratio(raw: str) -> float:
    try:
        ratio = float(raw.strip())
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise Invalid("is not a ratio between 0 and 1", "give e.g. 0.01 to keep 1 trace in 100")
    return ratio


def _metrics_listen(raw: str) -> str:
    """``ADDRESS:PORT`` or ``unix:/absolute/path``, normalised (``localhost`` → 127.0.0.1)."""
    value = raw.strip()
    fix = "use ADDRESS:PORT such as 127.0.0.1:9464, or unix:/absolute/path.sock"
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not path.startswith("/") or ":" in path:
            raise Invalid("is not an absolute socket path without colons", fix)
        return value
    host, sep, port = value.rpartition(":")
    if not sep:
        raise Invalid("is not ADDRESS:PORT", fix)
    port_number = _port(port)
    host = host.strip("[]") if host.startswith("[") and host.endswith("]") else host
    if host in ("", "localhost"):
        host = "0.0.0.0" if host == "" else "127.0.0.1"  # noqa: S104 - ":9464" means all
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise Invalid("is not an IP address and port", fix) from None
    return f"[{address}]:{port_number}" if address.version == 6 else f"{address}:{port_number}"


def names_this_host(host: str) -> bool:
    """True for a name (not an address) that only ever means this host: ``localhost``,
    ``localhost.``, ``*.localhost`` and the ``LOOPBACK_NAMES``."""
    name = host.lower().rstrip(".")
    return name in LOOPBACK_NAMES or name.endswith(".localhost")


def host_is_loopback(host: str) -> bool:
    """True when ``host`` (a name or an address, IPv6 with or without brackets) is this host
    only: a loopback name, 127.0.0.0/8 or ::1."""
    bare = host.strip("[]")
    if names_this_host(bare):
        return True
    try:
        return ipaddress.ip_address(bare.split("%")[0]).is_loopback
    except ValueError:
        return False


def metrics_listen_is_loopback(value: str) -> bool:
    """True for a unix socket or a loopback address: reachable from this host only."""
    if value.startswith("unix:"):
        return True
    host = value.rpartition(":")[0].strip("[]")
    return ipaddress.ip_address(host).is_loopback


VARIABLES: tuple[Variable, ...] = (
    Variable("DATABASE_URL", None,
             "PostgreSQL connection URL. Unset outside production: a private PostgreSQL cluster is "
             "started under the state directory. Required in production.",
             _database_url, "database_url"),
    Variable("BETTER_AUTH_SECRET", None,
             f"Secret (at least {MIN_SECRET_LENGTH} characters) from which the key that encrypts "
             "secrets at rest (secret env values and headers of upstream servers, their OAuth "
             "tokens) is derived; "
             "lose it and they cannot be read. Sessions and API keys are random tokens stored "
             "hashed and do not depend on it. Required in production; elsewhere one is generated "
             "once and kept in the state directory.",
             _secret, "auth_secret"),
    Variable("BETTER_AUTH_SECRET_PREVIOUS", None,
             "Only while changing BETTER_AUTH_SECRET: the secret it replaces. Values sealed with "
             "it (secret env values and headers, upstream OAuth tokens) still open and are sealed "
             "again with the new one when used; run `director secrets rotate` to re-seal all of "
             "them at once, then remove this variable.",
             _secret, "auth_secret_previous"),
    Variable("BASE_URL", "http://localhost:3673",
             "Public URL where Director is reached; the CORS origin, Host check and the URLs it "
             "hands out derive from it. Required in production.",
             _http_url, "base_url"),
    Variable("PORT", "3673", "HTTP port for the gateway.", _port, "port"),
    Variable("HOST", "0.0.0.0",  # noqa: S104
             "Address to listen on (127.0.0.1 when behind a local proxy).",
             _listen_host, "host"),
    Variable("ALLOWED_ORIGINS", "",
             "Comma-separated extra origins allowed for CORS and the Origin check.",
             _origin_list, "allowed_origins"),
    Variable("ALLOWED_HOSTS", "",
             "Comma-separated extra Host header values accepted besides BASE_URL's host and "
             "loopback (e.g. an internal load balancer name).",
             _host_list, "allowed_hosts"),
    Variable("TELEMETRY_ENABLED", "false",
             "Send an anonymous usage report at start and about once a day; README.rst, "
             "Telemetry, lists every field sent.", _boolean, "telemetry_enabled"),
    Variable("TELEMETRY_URL", "https://telemetry.director.run/v1/events",
             "Where anonymous telemetry is sent when enabled.", _http_url, "telemetry_url"),
    Variable("REGISTRY_URL", "https://registry.modelcontextprotocol.io",
             "The MCP Registry servers are found and installed from: an http(s) URL speaking "
             "the MCP Registry API v0.1 (the official registry by default; the original's "
             "registry.director.run does not speak it), or file:///path of a catalogue (a JSON "
             "file shaped like a /v0.1/servers answer, or a directory of server.json files) "
             "for hosts without internet access or an operator's curated list.",
             _registry_url, "registry_url"),
    Variable("REGISTRY_TRUST", "none",
             "Which registry packages (npm, PyPI: code run on this host) may be installed and "
             "started without DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS: none, allowlist "
             "(the names in REGISTRY_ALLOW) or any (every package entry of REGISTRY_URL). "
             "Remote (https) entries are allowed like any https server.",
             _one_of(("none", "allowlist", "any")), "registry_trust"),
    Variable("REGISTRY_ALLOW", "",
             "With REGISTRY_TRUST=allowlist: comma-separated server names "
             "(io.github.acme/weather) or namespaces (io.github.acme/*) whose packages may "
             "run.", _registry_names, "registry_allow"),
    Variable("API_KEY_RATE_LIMIT_WINDOW_SECONDS", "60", "Rate-limit window per API key.",
             _positive_int, "rate_limit_window_seconds"),
    Variable("API_KEY_RATE_LIMIT_MAX_REQUESTS", "1000", "Requests allowed per key per window.",
             _positive_int, "rate_limit_max_requests"),
    Variable("USER_RATE_LIMIT_WINDOW_SECONDS", "60",
             "Rate-limit window per user: all of a user's keys and cookie sessions together.",
             _positive_int, "user_rate_limit_window_seconds"),
    Variable("USER_RATE_LIMIT_MAX_REQUESTS", "5000",
             "Requests allowed per user per window, whatever the credential (a key's own limit "
             "applies too).", _positive_int, "user_rate_limit_max_requests"),
    Variable("SIGNUP_RATE_LIMIT_PER_HOUR", "10",
             "Sign-ups allowed per client address per hour, across instances (see "
             "TRUSTED_PROXIES behind a proxy).", _positive_int, "signup_rate_limit_per_hour"),
    Variable("TRUSTED_PROXIES", "",
             "Comma-separated addresses or networks of proxies (e.g. 127.0.0.1 for a local "
             "nginx) whose X-Forwarded-For names the client's address, for the sign-up limit, "
             "login throttling and session records; they are also exempt from "
             "MAX_CONNECTIONS_PER_ADDRESS. Empty: the peer's address.",
             _network_list, "trusted_proxies"),
    Variable("DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS", "false",
             "Allow users to add and run stdio servers (arbitrary command execution on this "
             "host). Only with NODE_ENV development or test, and only when the daemon is "
             "reachable from this host alone (loopback HOST and BASE_URL) or sign-up is closed "
             "(WAITLIST_ENABLED=true). Checked again whenever a server starts: stored stdio "
             "servers do not run without it.", _boolean, "allow_arbitrary_stdio_servers"),
    Variable("DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS", "false",
             "Allow plain-http, IP-literal, localhost and private-address upstream servers. "
             "Same conditions as the stdio flag; checked again whenever a server connects.",
             _boolean, "allow_insecure_http_servers"),
    Variable("DANGEROUSLY_ENABLE_SEEDING", "false",
             "Enable `director seed`. Only with NODE_ENV development or test.", _boolean,
             "enable_seeding"),
    Variable("STDIO_USER", "nobody",
             "When the daemon runs as root, the account stdio servers run as (no supplementary "
             "groups, HOME in /var/tmp/director-stdio-UID). Must exist and not be root, and "
             "must not be the private PostgreSQL's account (which may use that cluster's "
             "socket without a password). A daemon not run as root runs them as itself.",
             _stdio_user, "stdio_user"),
    Variable("STDIO_SANDBOX", "auto",
             "How stdio servers are boxed (docs/operations.rst, \"The stdio sandbox\"). "
             "systemd: each server in a unit of its own through STDIO_SANDBOX_SOCKET "
             "(director-stdio.socket: its own dynamic user, private /tmp, the daemon's files "
             "hidden, cgroup limits); account: as STDIO_USER with resource limits (the daemon "
             "must be root); auto: systemd when the socket is there, else account when the "
             "daemon is root, else unboxed as the daemon's own account (logged at start). An "
             "explicit mode that cannot work stops the start.", _stdio_sandbox, "stdio_sandbox"),
    Variable("STDIO_SANDBOX_SOCKET", "/run/director-stdio.sock",
             "The socket of director-stdio.socket, through which systemd starts each stdio "
             "server in its own sandboxed unit.", _absolute_path, "stdio_sandbox_socket"),
    Variable("STDIO_CACHE_DIRECTORY", "/var/cache/director-stdio",
             "In the systemd mode, where each stdio server gets a cache and HOME directory of "
             "its own (npm, uv): a directory the package creates, mode 2710 director:director-"
             "stdio, whose subdirectories have names only their server and the daemon know.",
             _absolute_path, "stdio_cache_directory"),
    Variable("STDIO_MEMORY_MAX", "1G",
             "Memory one stdio server process may allocate (RLIMIT_DATA: an allocation beyond "
             "it fails). The systemd mode also caps each server's whole unit (MemoryMax= in "
             "director-stdio@.service).", _size, "stdio_memory_max"),
    Variable("STDIO_TASKS_MAX", "512",
             "Processes and threads a stdio server may have (RLIMIT_NPROC: per server in the "
             "systemd mode, shared by every server running as STDIO_USER in the account mode). "
             "The systemd mode also caps the unit (TasksMax=).", _positive_int,
             "stdio_tasks_max"),
    Variable("SEED_USER_EMAIL", "user@director.run",
             "Account `director seed` creates (development only).", _text, "seed_user_email"),
    Variable("SEED_USER_PASSWORD", "password",
             "Its password (development only).", _text, "seed_user_password"),
    Variable("WAITLIST_ENABLED", "false",
             "New users start pending until an administrator activates them.", _boolean,
             "waitlist_enabled"),
    Variable("OAUTH_ACCESS_TOKEN_SECONDS", "3600",
             "Lifetime of the access tokens MCP clients get by signing in with OAuth; clients "
             "refresh them without asking the user. Shorter limits what a leaked token can do.",
             _positive_int, "oauth_access_token_seconds"),
    Variable("OAUTH_REFRESH_TOKEN_DAYS", "30",
             "An app connected with OAuth that has not refreshed its access for this many days "
             "must ask the user again; each refresh starts the period anew.", _positive_int,
             "oauth_refresh_token_days"),
    Variable("OAUTH_REGISTRATIONS_PER_HOUR", "20",
             "OAuth clients one address may register per hour (Dynamic Client Registration), "
             "across instances; registrations never used are deleted after a day.",
             _positive_int, "oauth_registrations_per_hour"),
    Variable("OIDC_ISSUER", None,
             "Issuer URL (https) of your organisation's OpenID Connect provider. With "
             "OIDC_CLIENT_ID and OIDC_CLIENT_SECRET, the login page offers to sign in with it: "
             "people are matched to accounts by verified email (new ones get an account). "
             "Register <BASE_URL>/studio/login/oidc/callback as the redirect URI there.",
             _https_url, "oidc_issuer"),
    Variable("OIDC_CLIENT_ID", None, "Director's client id at the OpenID Connect provider.",
             _text, "oidc_client_id"),
    Variable("OIDC_CLIENT_SECRET", None,
             "Director's client secret at the OpenID Connect provider.", _text,
             "oidc_client_secret"),
    Variable("OIDC_NAME", "your organisation",
             "What the login page's button names the provider: \"Sign in with OIDC_NAME\".",
             _text, "oidc_name"),
    Variable("NODE_ENV", "development",
             "production, development, test or staging. `DIRECTOR_ENV` is an alias; kept so "
             "existing env files work.", _one_of(ENVIRONMENTS), "environment"),
    Variable("LOG_LEVEL", "info", "trace, debug, info, warn, error, fatal or silent.",
             _one_of(LOG_LEVELS), "log_level"),
    Variable("STATE_DIRECTORY", None,
             "Where the embedded database and generated secret live. systemd sets it from "
             "StateDirectory=; otherwise /var/lib/director for root and "
             "$XDG_STATE_HOME/director (~/.local/state/director) for other users.",
             _directory, "state_directory"),
    Variable("MAX_REQUEST_BODY_BYTES", "4194304",
             "Largest request body accepted; larger ones get 413.", _positive_int,
             "max_request_body_bytes"),
    Variable("REQUEST_HEADER_TIMEOUT_SECONDS", "10",
             "A request's line and headers must arrive within this many seconds of its first "
             "byte (of the connection, for its first request), however they trickle in; "
             "otherwise 408 and the connection is closed.", _positive_float,
             "request_header_timeout_seconds"),
    Variable("REQUEST_BODY_TIMEOUT_SECONDS", "30",
             "A request's body must arrive within this many seconds of the end of its headers "
             "(so the largest body, MAX_REQUEST_BODY_BYTES, needs MAX_REQUEST_BODY_BYTES / this "
             "bytes per second: 140 kB/s by default); otherwise 408 and the connection is "
             "closed.", _positive_float, "request_body_timeout_seconds"),
    Variable("IDLE_CONNECTION_TIMEOUT_SECONDS", "75",
             "A kept-alive connection with no request for this long is closed. Keep it above "
             "the keep-alive timeout of a proxy or load balancer in front (nginx: 60 s).",
             _positive_float, "idle_connection_timeout_seconds"),
    Variable("MAX_CONNECTIONS_PER_ADDRESS", "64",
             "Connections one client address (IPv6: one /64) may hold open at once, not "
             "counting those that became event streams; past it new ones are closed at once. "
             "Addresses in TRUSTED_PROXIES are not capped: a proxy speaks for all its clients "
             "(limit them in the proxy, nginx: limit_conn). 0: no cap.",
             _count_or_zero, "max_connections_per_address"),
    Variable("SHUTDOWN_TIMEOUT_SECONDS", "10",
             "How long a stop may drain streams and children before they are cut.",
             _positive_float, "shutdown_timeout_seconds"),
    Variable("DATABASE_POOL_SIZE", "4", "Connections in the query pool (plus one for LISTEN).",
             _positive_int, "database_pool_size"),
    Variable("MCP_SESSION_IDLE_SECONDS", "1800",
             "A handshake-era MCP session with no request and no open stream for this long "
             "ends (the client re-initialises).", _positive_float, "mcp_session_idle_seconds"),
    Variable("MCP_MAX_SESSIONS_PER_USER", "100",
             "Open MCP sessions per user (handshake era and /sse), counted across instances "
             "when each starts; past it the least recently used one ends.", _positive_int,
             "mcp_max_sessions_per_user"),
    Variable("MCP_EVENT_LOG_EVENTS", "100000",
             "Events of handshake-era GET streams kept in the database, in total, so that a "
             "client resuming with Last-Event-ID on another instance gets what it missed "
             "(docs/manual.rst, Several instances behind a load balancer). 0: none kept; an "
             "instance then replays only what it sent itself.", _count_or_zero,
             "mcp_event_log_events"),
    Variable("MCP_EVENT_LOG_SECONDS", "300",
             "Events older than this are dropped from that log.", _positive_float,
             "mcp_event_log_seconds"),
    Variable("MCP_LIST_WAIT_SECONDS", "3",
             "How long an MCP list (tools/list, prompts/list, resources/list) waits for upstream "
             "servers still starting; it then answers without them, names them in its _meta "
             "(director/pending), and they follow with list_changed. Raise it for clients that "
             "ignore list_changed: their first list then waits longer for slow servers (each "
             "at most its timeout_seconds).", _positive_float, "mcp_list_wait_seconds"),
    Variable("METRICS_LISTEN", None,
             "Serve Prometheus metrics at /metrics on this separate listener: ADDRESS:PORT "
             "(e.g. 127.0.0.1:9464) or unix:/path. Unset: no metrics endpoint. Never on PORT.",
             _metrics_listen, "metrics_listen"),
    Variable("METRICS_ALLOW_PUBLIC", "false",
             "Allow METRICS_LISTEN on a non-loopback address (metrics are unauthenticated).",
             _boolean, "metrics_allow_public"),
    Variable("OTEL_EXPORTER_OTLP_ENDPOINT", None,
             "OpenTelemetry tracing: the collector's OTLP/HTTP base URL (spans go to its "
             "/v1/traces, protobuf), e.g. http://127.0.0.1:4318. Unset (and "
             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT unset): tracing is off and costs nothing.",
             _otlp_url, "otel_endpoint"),
    Variable("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None,
             "The full URL spans are posted to, instead of OTEL_EXPORTER_OTLP_ENDPOINT's "
             "/v1/traces.", _otlp_url, "otel_traces_endpoint"),
    Variable("OTEL_EXPORTER_OTLP_HEADERS", None,
             "Headers sent to the collector, key=value,key2=value2 (values percent-encoded), "
             "e.g. a tenant or an authorization; never logged.", _otlp_headers, "otel_headers"),
    Variable("OTEL_EXPORTER_OTLP_TRACES_HEADERS", None,
             "Headers for the traces endpoint only (over OTEL_EXPORTER_OTLP_HEADERS).",
             _otlp_headers, "otel_traces_headers"),
    Variable("OTEL_SERVICE_NAME", "director",
             "service.name of the spans (OTEL_RESOURCE_ATTRIBUTES adds other resource "
             "attributes, e.g. deployment.environment.name=prod).", _text, "otel_service_name"),
    Variable("OTEL_TRACES_SAMPLER", "parentbased_always_on",
             f"Which traces are kept: {', '.join(SAMPLERS)}. The parentbased ones follow the "
             "client's traceparent flag when there is one.",
             _one_of(SAMPLERS), "otel_traces_sampler"),
    Variable("OTEL_TRACES_SAMPLER_ARG", None,
             "The ratio of the traceidratio and parentbased_traceidratio samplers (0 to 1; "
             "default 1), e.g. 0.01.",
             _sampler_ratio, "otel_traces_sampler_arg"),
    Variable("OTEL_SDK_DISABLED", "false", "true: tracing off, whatever the endpoints say.",
             _boolean, "otel_sdk_disabled"),
)


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, lower-cased, default ports dropped."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"
