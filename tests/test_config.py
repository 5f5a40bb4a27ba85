"""Configuration: every variable parsed, every bad value refused with one precise line."""

from __future__ import annotations

import os
import subprocess

import pytest

from director.config import (
    DANGEROUS_FLAGS,
    SERVER_FLAGS,
    VARIABLES,
    ConfigError,
    configuration_table,
    dangerous_settings,
    load_settings,
    read_env_file,
)
from tests.harness import DIRECTOR, SECRET, base_environment, make_temp_dir

PRODUCTION = {
    "NODE_ENV": "production",
    "DATABASE_URL": "postgres://director:pw@db.internal:5432/director",
    "BETTER_AUTH_SECRET": SECRET,
    "BASE_URL": "https://director.example.com",
}


def problems_for(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    return caught.value.problems


def test_defaults_match_the_deployment_guide() -> None:
    settings = load_settings({"HOME": "/home/someone"})
    assert settings.port == 3673
    assert settings.base_url == "http://localhost:3673"
    assert settings.allowed_origins == ()
    assert settings.telemetry_enabled is False
    assert settings.registry_url == "https://registry.modelcontextprotocol.io"
    assert settings.registry_trust == "none"
    assert settings.rate_limit_window_seconds == 60
    assert settings.rate_limit_max_requests == 1000
    assert settings.user_rate_limit_window_seconds == 60
    assert settings.user_rate_limit_max_requests == 5000
    assert settings.signup_rate_limit_per_hour == 10
    assert settings.trusted_proxies == ()
    assert settings.environment == "development"
    assert settings.log_level == "info"
    assert (settings.request_header_timeout_seconds, settings.request_body_timeout_seconds,
            settings.idle_connection_timeout_seconds) == (10.0, 30.0, 75.0)
    assert settings.max_connections_per_address == 64
    assert settings.database_url is None and settings.embedded_database
    assert not (settings.allow_arbitrary_stdio_servers or settings.allow_insecure_http_servers
                or settings.enable_seeding)


def test_every_variable_is_parsed() -> None:
    settings = load_settings({
        "DATABASE_URL": "postgresql://u:p@h:5433/d",
        "BETTER_AUTH_SECRET": SECRET,
        "BASE_URL": "https://director.example.com/",
        "PORT": "8080",
        "HOST": "127.0.0.1",
        "ALLOWED_ORIGINS": "https://a.example.com, http://localhost:5173/",
        "ALLOWED_HOSTS": "lb.internal,10.0.0.5",
        "TELEMETRY_ENABLED": "true",
        "REGISTRY_URL": "https://registry.example.com",
        "REGISTRY_TRUST": "allowlist",
        "REGISTRY_ALLOW": "io.github.acme/*, io.example/weather",
        "API_KEY_RATE_LIMIT_WINDOW_SECONDS": "30",
        "API_KEY_RATE_LIMIT_MAX_REQUESTS": "5",
        "USER_RATE_LIMIT_WINDOW_SECONDS": "120",
        "USER_RATE_LIMIT_MAX_REQUESTS": "50",
        "SIGNUP_RATE_LIMIT_PER_HOUR": "3",
        "TRUSTED_PROXIES": " 127.0.0.1, 10.0.0.0/8,,::1 ",
        "DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS": "TRUE",
        "DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS": "1",
        "DANGEROUSLY_ENABLE_SEEDING": "yes",
        "WAITLIST_ENABLED": "on",
        "NODE_ENV": "test",
        "LOG_LEVEL": "WARN",
        "STATE_DIRECTORY": "/srv/director:/srv/other",
        "MAX_REQUEST_BODY_BYTES": "1024",
        "REQUEST_HEADER_TIMEOUT_SECONDS": "2",
        "REQUEST_BODY_TIMEOUT_SECONDS": "0.5",
        "IDLE_CONNECTION_TIMEOUT_SECONDS": "120",
        "MAX_CONNECTIONS_PER_ADDRESS": "0",
        "SHUTDOWN_TIMEOUT_SECONDS": "2.5",
        "DATABASE_POOL_SIZE": "2",
        "STDIO_USER": "daemon",
        "STDIO_SANDBOX": "Account",
        "STDIO_MEMORY_MAX": "512M",
        "STDIO_TASKS_MAX": "64",
    })
    assert settings.database_url == "postgresql://u:p@h:5433/d"
    assert settings.base_url == "https://director.example.com"  # trailing slash dropped
    assert settings.base_origin == "https://director.example.com"
    assert settings.port == 8080 and settings.host == "127.0.0.1"
    assert settings.allowed_origins == ("https://a.example.com", "http://localhost:5173")
    assert settings.allowed_hosts == ("lb.internal", "10.0.0.5")
    assert settings.telemetry_enabled and settings.waitlist_enabled
    assert settings.rate_limit_window_seconds == 30 and settings.rate_limit_max_requests == 5
    assert settings.user_rate_limit_window_seconds == 120
    assert settings.user_rate_limit_max_requests == 50
    assert settings.signup_rate_limit_per_hour == 3
    assert [str(n) for n in settings.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    assert settings.allow_arbitrary_stdio_servers and settings.allow_insecure_http_servers
    assert settings.enable_seeding
    assert settings.environment == "test" and settings.log_level == "warn"
    assert settings.stdio_user == "daemon"
    assert (settings.stdio_sandbox, settings.stdio_memory_max, settings.stdio_tasks_max) == \
        ("account", 512 * 1024 ** 2, 64)
    assert settings.state_directory == "/srv/director"
    assert settings.max_request_body_bytes == 1024
    assert (settings.request_header_timeout_seconds, settings.request_body_timeout_seconds,
            settings.idle_connection_timeout_seconds) == (2.0, 0.5, 120.0)
    assert settings.max_connections_per_address == 0
    assert settings.shutdown_timeout_seconds == 2.5 and settings.database_pool_size == 2


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


def test_base_url_follows_port_when_unset() -> None:
    assert load_settings({"PORT": "9000"}).base_url == "http://localhost:9000"


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("PORT", "abc", "PORT='abc' is not a whole number; use a TCP port between 1 and 65535"),
    ("PORT", "0", "PORT='0' must be greater than 0"),
    ("PORT", "70000", "PORT='70000' is not a TCP port"),
    ("HOST", "example.com", "HOST='example.com' is not an IP address"),
    ("DATABASE_URL", "mysql://x",
     "DATABASE_URL=(unparseable DATABASE_URL) is not a PostgreSQL URL"),
    ("DATABASE_URL", "postgres://u@h:notaport/d",
     "DATABASE_URL=(unparseable DATABASE_URL) has an invalid port"),
    ("DATABASE_URL", "postgres://u@h:70000/d",
     "DATABASE_URL=(unparseable DATABASE_URL) has an invalid port"),
    ("DATABASE_URL", "postgres://h/d?bogus=1",
     'cannot be parsed (invalid URI query parameter: "…")'),
    ("DATABASE_URL", "postgres://u:p@[::1/d", 'looking for matching "]" in IPv6 host address'),
    ("DATABASE_URL", "postgres://u:p@w@h/d",
     "DATABASE_URL=(unparseable DATABASE_URL) holds an unencoded @ or / (in the password?)"),
    ("BETTER_AUTH_SECRET", "short", "BETTER_AUTH_SECRET=(hidden) is 5 characters long, at least "
                                    "32 are required; generate one with: openssl rand -base64 48"),
    ("BETTER_AUTH_SECRET_PREVIOUS", "old", "BETTER_AUTH_SECRET_PREVIOUS=(hidden) is 3 characters "
                                           "long, at least 32 are required"),
    ("BASE_URL", "director.example.com", "BASE_URL='director.example.com' is not an http(s) URL"),
    ("BASE_URL", "https://x.example.com/?a=1", "has a query or fragment"),
    ("ALLOWED_ORIGINS", "https://ok.example.com,ftp://bad", "contains 'ftp://bad', which is not an"
                                                            " origin"),
    ("ALLOWED_ORIGINS", "https://x.example.com/path", "which is not an origin"),
    ("ALLOWED_HOSTS", "a b", "which is not a host name"),
    ("TELEMETRY_ENABLED", "ture", "TELEMETRY_ENABLED='ture' is not a boolean; use true or false"),
    ("REGISTRY_URL", "registry", "REGISTRY_URL='registry' is not an http(s) or file URL"),
    ("REGISTRY_URL", "file:relative", "is not a file URL of an absolute path"),
    ("REGISTRY_TRUST", "some", "REGISTRY_TRUST='some' is not recognised"),
    ("REGISTRY_ALLOW", "no-slash", "is not a server name or namespace"),
    ("API_KEY_RATE_LIMIT_WINDOW_SECONDS", "-5", "must be greater than 0"),
    ("API_KEY_RATE_LIMIT_MAX_REQUESTS", "1e3", "is not a whole number"),
    ("USER_RATE_LIMIT_WINDOW_SECONDS", "0", "must be greater than 0"),
    ("USER_RATE_LIMIT_MAX_REQUESTS", "lots", "is not a whole number"),
    ("SIGNUP_RATE_LIMIT_PER_HOUR", "-1", "must be greater than 0"),
    ("TRUSTED_PROXIES", "127.0.0.1, nginx.internal",
     "TRUSTED_PROXIES='127.0.0.1, nginx.internal' contains 'nginx.internal', which is not an IP "
     "address or network; list addresses or networks such as 127.0.0.1 or 10.0.0.0/8"),
    ("DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS", "maybe", "is not a boolean"),
    ("DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS", "2", "is not a boolean"),
    ("DANGEROUSLY_ENABLE_SEEDING", "y", "is not a boolean"),
    ("WAITLIST_ENABLED", "enabled", "is not a boolean"),
    ("OAUTH_ACCESS_TOKEN_SECONDS", "0", "must be greater than 0"),
    ("OAUTH_REFRESH_TOKEN_DAYS", "a month", "is not a whole number"),
    ("OAUTH_REGISTRATIONS_PER_HOUR", "-3", "must be greater than 0"),
    ("OIDC_ISSUER", "http://idp.example.com", "OIDC_ISSUER='http://idp.example.com' is not an "
                                              "https URL; an OpenID Connect issuer is always https"),
    ("NODE_ENV", "prod", "NODE_ENV='prod' is not recognised; use one of development, production"),
    ("LOG_LEVEL", "verbose", "LOG_LEVEL='verbose' is not recognised; use one of trace"),
    ("STATE_DIRECTORY", "relative/dir", "STATE_DIRECTORY='relative/dir' is not an absolute path"),
    ("MAX_REQUEST_BODY_BYTES", "big", "is not a whole number"),
    ("REQUEST_HEADER_TIMEOUT_SECONDS", "0", "must be greater than 0"),
    ("REQUEST_BODY_TIMEOUT_SECONDS", "soon", "is not a number"),
    ("IDLE_CONNECTION_TIMEOUT_SECONDS", "-75", "must be greater than 0"),
    ("MAX_CONNECTIONS_PER_ADDRESS", "-1",
     "MAX_CONNECTIONS_PER_ADDRESS='-1' is negative; use a whole number (0 turns it off)"),
    ("MAX_CONNECTIONS_PER_ADDRESS", "lots", "is not a whole number"),
    ("SHUTDOWN_TIMEOUT_SECONDS", "0", "must be greater than 0"),
    ("DATABASE_POOL_SIZE", "x", "is not a whole number"),
    ("MCP_SESSION_IDLE_SECONDS", "-1", "must be greater than 0"),
    ("MCP_MAX_SESSIONS_PER_USER", "many", "is not a whole number"),
    ("MCP_LIST_WAIT_SECONDS", "0", "must be greater than 0"),
    ("MCP_EVENT_LOG_EVENTS", "-1", "is negative"),
    ("MCP_EVENT_LOG_SECONDS", "0", "must be greater than 0"),
    ("METRICS_LISTEN", "metrics.example.com:9464",
     "METRICS_LISTEN='metrics.example.com:9464' is not an IP address and port; use "
     "ADDRESS:PORT such as 127.0.0.1:9464"),
    ("METRICS_LISTEN", "9464", "is not ADDRESS:PORT"),
    ("METRICS_LISTEN", "127.0.0.1:99999", "is not a TCP port"),
    ("METRICS_LISTEN", "unix:metrics.sock", "is not an absolute socket path"),
    ("METRICS_LISTEN", "0.0.0.0:9464", "METRICS_LISTEN='0.0.0.0:9464' is not a loopback address"),
    ("METRICS_ALLOW_PUBLIC", "sure", "METRICS_ALLOW_PUBLIC='sure' is not a boolean"),
    ("STDIO_USER", "root", "STDIO_USER='root' is root (uid 0): stdio servers must never run as "
                           "root; use an unprivileged account of its own"),
    ("STDIO_USER", "no-such-account", "STDIO_USER='no-such-account' is not an account on this "
                                      "host"),
    ("STDIO_SANDBOX", "bwrap", "STDIO_SANDBOX='bwrap' is not auto, systemd or account; use auto"),
    ("STDIO_SANDBOX_SOCKET", "run/director-stdio.sock", "is not an absolute path"),
    ("STDIO_CACHE_DIRECTORY", "cache", "is not an absolute path"),
    ("STDIO_MEMORY_MAX", "lots", "STDIO_MEMORY_MAX='lots' is not a size; use a size in bytes"),
    ("STDIO_MEMORY_MAX", "1M", "is under 16M, too little for any runtime"),
    ("STDIO_TASKS_MAX", "0", "STDIO_TASKS_MAX='0' must be greater than 0"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318",
     "OTEL_EXPORTER_OTLP_ENDPOINT='collector:4318' is not an http(s) URL"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "grpc://c:4317", "is not an http(s) URL"),
    ("OTEL_EXPORTER_OTLP_HEADERS", "authorization Bearer s3cret",
     "OTEL_EXPORTER_OTLP_HEADERS=(hidden) is not a list of key=value pairs"),
    ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "=s3cret", "(hidden) is not a list"),
    ("OTEL_TRACES_SAMPLER", "sometimes", "OTEL_TRACES_SAMPLER='sometimes' is not recognised"),
    ("OTEL_TRACES_SAMPLER_ARG", "2", "OTEL_TRACES_SAMPLER_ARG='2' is not a ratio between 0 and 1"),
    ("OTEL_SDK_DISABLED", "nope", "OTEL_SDK_DISABLED='nope' is not a boolean"),
])
def test_invalid_values_are_named_with_their_fix(name: str, value: str, expected: str) -> None:
    problems = problems_for({name: value})
    assert len(problems) == 1
    assert expected in problems[0]
    assert problems[0].startswith(name)
    assert "\n" not in problems[0]


def test_every_variable_has_a_bad_value_test() -> None:
    tested = {"PORT", "HOST", "DATABASE_URL", "BETTER_AUTH_SECRET", "BETTER_AUTH_SECRET_PREVIOUS",
              "BASE_URL", "ALLOWED_ORIGINS",
              "ALLOWED_HOSTS", "TELEMETRY_ENABLED", "REGISTRY_URL", "REGISTRY_TRUST",
              "REGISTRY_ALLOW", "API_KEY_RATE_LIMIT_WINDOW_SECONDS", "API_KEY_RATE_LIMIT_MAX_REQUESTS",
              "USER_RATE_LIMIT_WINDOW_SECONDS", "USER_RATE_LIMIT_MAX_REQUESTS",
              "SIGNUP_RATE_LIMIT_PER_HOUR", "TRUSTED_PROXIES",
              *DANGEROUS_FLAGS, "WAITLIST_ENABLED", "OAUTH_ACCESS_TOKEN_SECONDS",
              "OAUTH_REFRESH_TOKEN_DAYS", "OAUTH_REGISTRATIONS_PER_HOUR", "OIDC_ISSUER",
              "OIDC_CLIENT_ID", "OIDC_CLIENT_SECRET", "OIDC_NAME", "NODE_ENV",
              "LOG_LEVEL", "STATE_DIRECTORY",
              "MAX_REQUEST_BODY_BYTES", "REQUEST_HEADER_TIMEOUT_SECONDS",
              "REQUEST_BODY_TIMEOUT_SECONDS", "IDLE_CONNECTION_TIMEOUT_SECONDS",
              "MAX_CONNECTIONS_PER_ADDRESS", "SHUTDOWN_TIMEOUT_SECONDS", "DATABASE_POOL_SIZE",
              "TELEMETRY_URL", "SEED_USER_EMAIL", "SEED_USER_PASSWORD",
              "MCP_SESSION_IDLE_SECONDS", "MCP_MAX_SESSIONS_PER_USER", "MCP_LIST_WAIT_SECONDS",
              "MCP_EVENT_LOG_EVENTS", "MCP_EVENT_LOG_SECONDS",
              "METRICS_LISTEN", "METRICS_ALLOW_PUBLIC", "STDIO_USER", "STDIO_SANDBOX",
              "STDIO_SANDBOX_SOCKET", "STDIO_CACHE_DIRECTORY", "STDIO_MEMORY_MAX",
              "STDIO_TASKS_MAX", "OTEL_EXPORTER_OTLP_ENDPOINT",
              "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_HEADERS",
              "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER",
              "OTEL_TRACES_SAMPLER_ARG", "OTEL_SDK_DISABLED"}
    assert {variable.name for variable in VARIABLES} <= tested


#: Database URLs whose password is hard to keep out of messages, each with the fragments of it
#: that must never be shown, and whether the configuration accepts it (libpq reads it as meant).
TRICKY_DATABASE_URLS = [
    # An unencoded @: libpq reads "Xv9q@127.0.0.1" as the host.
    pytest.param("postgres://app:Zq7k@Xv9q@127.0.0.1:{port}/director", ("Zq7k", "Xv9q"), False,
                 id="at"),
    # An unencoded /: libpq reads "app" as the host, "Zq7k" as the port, the rest as the database.
    pytest.param("postgres://app:Zq7k/Xv9q@127.0.0.1:{port}/director", ("Zq7k", "Xv9q"), False,
                 id="slash"),
    pytest.param("postgres://app:Zq7k@Xv9q/Kw3m@127.0.0.1:{port}/director",
                 ("Zq7k", "Xv9q", "Kw3m"), False, id="at-and-slash"),
    # Unencoded : ? # are read as meant (the password is "Zq7k:Xv9q#Kw3m?Jd5r").
    pytest.param("postgres://app:Zq7k:Xv9q#Kw3m?Jd5r@127.0.0.1:{port}/director",
                 ("Zq7k", "Xv9q", "Kw3m", "Jd5r"), True, id="colon-hash-question"),
    pytest.param("postgres://app@127.0.0.1:{port}/director?password=Zq7kXv9q",
                 ("Zq7k", "Xv9q"), True, id="query-password"),
    pytest.param("postgres://app:Zq7k%40Xv9q@127.0.0.1:{port}/director", ("Zq7k", "Xv9q"), True,
                 id="encoded-at"),
    # libpq's own error quotes the token it cannot decode.
    pytest.param("postgres://app:Zq7k%zzXv9q@127.0.0.1:{port}/director", ("Zq7k", "Xv9q"),
                 False, id="bad-percent-encoding"),
]


def assert_no_fragment(text: str, fragments: tuple[str, ...]) -> None:
    shown = [fragment for fragment in fragments if fragment in text]
    assert not shown, f"password fragments {shown} shown in:\n{text}"


@pytest.mark.parametrize(("url", "fragments", "accepted"), TRICKY_DATABASE_URLS)
def test_database_passwords_stay_out_of_messages(url: str, fragments: tuple[str, ...],
                                                 accepted: bool) -> None:
    url = url.format(port=5432)
    result = run_director("config", "check", **{**PRODUCTION, "DATABASE_URL": url})
    assert_no_fragment(result.stdout + result.stderr, fragments)
    if accepted:
        assert result.returncode == 0, result.stderr
        assert "database: external (app at 127.0.0.1 port 5432, database director)" in \
            result.stdout
    else:
        assert result.returncode == 78
        assert result.stderr.startswith("DATABASE_URL=(unparseable DATABASE_URL) ")
        assert "percent-encode" in result.stderr or "cannot be parsed" in result.stderr


def test_all_problems_are_reported_at_once() -> None:
    problems = problems_for({"PORT": "x", "LOG_LEVEL": "loud", "TELEMETRY_ENABLED": "?"})
    assert [p.split("=")[0] for p in problems] == ["PORT", "TELEMETRY_ENABLED", "LOG_LEVEL"]


def test_empty_values_mean_unset() -> None:
    settings = load_settings({"PORT": "", "DATABASE_URL": "", "BETTER_AUTH_SECRET": ""})
    assert settings.port == 3673 and settings.database_url is None


@pytest.mark.parametrize("flag", DANGEROUS_FLAGS)
def test_each_dangerous_flag_is_fatal_in_production(flag: str) -> None:
    problems = problems_for({**PRODUCTION, flag: "true"})
    assert problems == [
        f"FATAL: {flag} cannot be enabled in production. Remove it from the environment, or set "
        "NODE_ENV=development for single-user local development."
    ]


@pytest.mark.parametrize("flag", DANGEROUS_FLAGS)
def test_every_other_environment_counts_as_production_for_the_flags(flag: str) -> None:
    """staging is a deployment other people use: the flags are for one developer's laptop."""
    problems = problems_for({"NODE_ENV": "staging", "HOST": "127.0.0.1", flag: "true"})
    assert problems == [
        f"FATAL: {flag} cannot be enabled with NODE_ENV=staging (only development and test "
        "allow it). Remove it from the environment, or set NODE_ENV=development for "
        "single-user local development."
    ]


@pytest.mark.parametrize("environment", ["development", "test"])
def test_dangerous_flags_are_allowed_in_development_and_test(environment: str) -> None:
    settings = load_settings({**PRODUCTION, "NODE_ENV": environment, "HOST": "127.0.0.1",
                              "BASE_URL": "http://localhost:3673",
                              **{flag: "true" for flag in DANGEROUS_FLAGS}})
    assert settings.allow_arbitrary_stdio_servers and settings.enable_seeding


@pytest.mark.parametrize("exposed", [
    {},  # HOST=0.0.0.0, the default
    {"HOST": "192.0.2.7"},
    {"HOST": "127.0.0.1", "BASE_URL": "https://director.example.com"},  # behind a proxy
    {"HOST": "::", "BASE_URL": "http://[::1]:3673"},
])
@pytest.mark.parametrize("flag", SERVER_FLAGS)
def test_server_flags_are_refused_where_anyone_can_sign_up(
        flag: str, exposed: dict[str, str]) -> None:
    problems = problems_for({flag: "true", **exposed})
    assert len(problems) == 1
    assert problems[0].startswith(f"FATAL: {flag} cannot be enabled on a daemon that anyone "
                                  "can sign up to")
    assert problems[0].endswith(
        "Either keep it to this host (HOST=127.0.0.1 and a loopback BASE_URL such as "
        "http://localhost:3673), or set WAITLIST_ENABLED=true so that new accounts wait for an "
        "administrator.")
    assert load_settings({flag: "true", "WAITLIST_ENABLED": "true", **exposed})


@pytest.mark.parametrize(("host", "base_url"), [
    ("127.0.0.1", None), ("127.8.9.10", "http://127.0.0.1:3673"), ("::1", "http://[::1]:8080"),
    ("localhost", "http://localhost:3673"), ("127.0.0.1", "http://director.localhost"),
])
def test_server_flags_are_allowed_on_a_daemon_only_this_host_reaches(
        host: str, base_url: str | None) -> None:
    environ = {"HOST": host, **({"BASE_URL": base_url} if base_url else {})}
    settings = load_settings({**environ, **{flag: "true" for flag in SERVER_FLAGS}})
    assert settings.allow_arbitrary_stdio_servers and settings.allow_insecure_http_servers


def test_seeding_alone_needs_no_loopback() -> None:
    assert load_settings({"DANGEROUSLY_ENABLE_SEEDING": "true"}).enable_seeding


def test_dangerous_settings_say_what_each_allows() -> None:
    settings = load_settings({"HOST": "127.0.0.1", **{flag: "true" for flag in DANGEROUS_FLAGS},
                              "METRICS_LISTEN": "0.0.0.0:9464", "METRICS_ALLOW_PUBLIC": "true"})
    as_root = dangerous_settings(settings, euid=0)
    assert [line.split(" ")[0] for line in as_root] == [*DANGEROUS_FLAGS, "METRICS_ALLOW_PUBLIC"]
    assert "run any command on this host" in as_root[0]
    as_someone = dangerous_settings(settings, euid=os.geteuid() or 65534)
    assert as_someone[1].startswith("stdio servers run as the daemon's own account")
    assert dangerous_settings(load_settings({}), euid=0) == []
    private_metrics = load_settings({"METRICS_LISTEN": "127.0.0.1:9464",
                                     "METRICS_ALLOW_PUBLIC": "true"})
    assert dangerous_settings(private_metrics, euid=0) == []


def test_false_dangerous_flags_are_fine_in_production() -> None:
    assert load_settings({**PRODUCTION, DANGEROUS_FLAGS[0]: "false"}).production


@pytest.mark.parametrize("name", ["DATABASE_URL", "BETTER_AUTH_SECRET", "BASE_URL"])
def test_production_requires_the_guides_required_variables(name: str) -> None:
    environ = dict(PRODUCTION)
    del environ[name]
    assert problems_for(environ) == [
        f"{name} is required when NODE_ENV=production; set it in the environment file "
        "(see README.rst, Configuration)"
    ]


def test_director_env_is_an_alias_of_node_env() -> None:
    assert load_settings({**PRODUCTION, "NODE_ENV": "", "DIRECTOR_ENV": "production"}).production
    problems = problems_for({"NODE_ENV": "production", "DIRECTOR_ENV": "development"})
    assert "disagree" in problems[0]
    flagged = problems_for({**PRODUCTION, "NODE_ENV": "", "DIRECTOR_ENV": "production",
                            "DANGEROUSLY_ENABLE_SEEDING": "true"})
    assert flagged[0].startswith("FATAL: DANGEROUSLY_ENABLE_SEEDING")


def test_state_directory_defaults() -> None:
    settings = load_settings({"XDG_STATE_HOME": "/xdg", "HOME": "/home/u"})
    expected = "/var/lib/director" if os.geteuid() == 0 else "/xdg/director"
    assert settings.state_directory == expected


def test_env_file_parsing(tmp_path: object) -> None:
    directory = make_temp_dir("director-env-")
    path = directory / "director.env"
    path.write_text("# comment\n\nPORT=4000\nexport LOG_LEVEL=warn\nBASE_URL=\"https://x.example.com\"\n"
                    "ALLOWED_ORIGINS='https://a.example.com'\n")
    assert read_env_file(str(path)) == {"PORT": "4000", "LOG_LEVEL": "warn",
                                        "BASE_URL": "https://x.example.com",
                                        "ALLOWED_ORIGINS": "https://a.example.com"}
    path.write_text("this is not an assignment\n")
    with pytest.raises(ConfigError, match=r"director.env:1: expected KEY=VALUE") as caught:
        read_env_file(str(path))
    assert "assignment" not in str(caught.value)  # the line (maybe a secret) is not echoed


def test_configuration_table_lists_every_variable() -> None:
    table = configuration_table()
    for variable in VARIABLES:
        assert f"``{variable.name}``" in table


def run_director(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DIRECTOR, *args], env=base_environment(**env), capture_output=True,
                          text=True, timeout=60, check=False)


def test_config_check_accepts_a_valid_environment() -> None:
    result = run_director("config", "check", "--json", **PRODUCTION)
    assert result.returncode == 0, result.stderr
    assert '"ok": true' in result.stdout and '"environment": "production"' in result.stdout


def test_config_check_refuses_with_one_line_per_problem_and_exit_78() -> None:
    result = run_director("config", "check", **PRODUCTION, DANGEROUSLY_ENABLE_SEEDING="true",
                          PORT="http")
    assert result.returncode == 78
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "PORT='http' is not a whole number; use a TCP port between 1 and 65535",
        "FATAL: DANGEROUSLY_ENABLE_SEEDING cannot be enabled in production. Remove it from the "
        "environment, or set NODE_ENV=development for single-user local development.",
    ]


def test_config_check_reads_an_env_file_under_the_process_environment() -> None:
    directory = make_temp_dir("director-env-")
    path = directory / "director.env"
    path.write_text("PORT=4123\nLOG_LEVEL=error\n")
    result = run_director("--env-file", str(path), "config", "check", LOG_LEVEL="debug")
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1:4123" in result.stdout
    missing = run_director("--env-file", str(directory / "absent.env"), "config", "check")
    assert missing.returncode == 78
    assert "cannot read the environment file" in missing.stderr


def test_daemon_refuses_to_start_on_invalid_configuration() -> None:
    for argv in ([DIRECTOR, "serve"], [DIRECTOR.replace("director", "twistd"), "-n", "director"]):
        result = subprocess.run(argv, env=base_environment(**PRODUCTION,
                                DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS="true"),
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 78, (argv, result.stdout, result.stderr)
        assert ("FATAL: DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS cannot be enabled in production."
                in result.stderr)


def test_version() -> None:
    from director import __version__

    result = run_director("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"director {__version__}"


def test_auth_secret_is_generated_once_outside_production() -> None:
    from director.state import auth_secret

    directory = make_temp_dir("director-secret-")
    settings = load_settings({"STATE_DIRECTORY": str(directory)})
    first = auth_secret(settings)
    assert len(first) >= 32
    assert auth_secret(settings) == first
    assert oct((directory / "auth-secret").stat().st_mode & 0o777) == "0o600"
    explicit = load_settings({"STATE_DIRECTORY": str(directory), "BETTER_AUTH_SECRET": SECRET})
    assert auth_secret(explicit) == SECRET


def test_readme_opens_with_the_two_commands_and_documents_every_variable() -> None:
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.rst").read_text()
    code = readme.split(".. code-block:: sh", 1)[1].split("\n\n")[1]
    assert [line.strip() for line in code.splitlines()] == ["make run", "make test"]
    assert configuration_table() in readme


def test_a_broken_env_file_is_one_line_and_exit_78() -> None:
    directory = make_temp_dir("director-env-")
    path = directory / "director.env"
    path.write_text("PORT=4000\nthis line holds s3cret stuff\n")
    result = run_director("--env-file", str(path), "config", "check")
    assert result.returncode == 78
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr
    assert result.stderr.strip().endswith("then the value)")


def test_an_allowlist_needs_names() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({"REGISTRY_TRUST": "allowlist"})
    assert error.value.problems == [
        "REGISTRY_TRUST=allowlist needs REGISTRY_ALLOW: list the server names or namespaces "
        "(io.github.acme/*) whose packages may run, or set REGISTRY_TRUST=none"]
    settings = load_settings({"REGISTRY_TRUST": "allowlist", "REGISTRY_ALLOW": "io.x/*",
                              "REGISTRY_URL": "file:///etc/director/catalogue.json"})
    assert settings.registry_allow == ("io.x/*",)
    assert settings.registry_url == "file:///etc/director/catalogue.json"


def test_an_openid_connect_provider_needs_all_three_variables() -> None:
    problems = problems_for({"OIDC_ISSUER": "https://idp.example.com",
                             "OIDC_CLIENT_SECRET": "s" * 20})
    assert problems == ["OIDC_CLIENT_ID missing: signing in with an OpenID Connect provider "
                        "needs all of OIDC_ISSUER, OIDC_CLIENT_ID, OIDC_CLIENT_SECRET (set "
                        "OIDC_ISSUER, OIDC_CLIENT_SECRET only with the others, or remove it)"]
    settings = load_settings({"OIDC_ISSUER": "https://idp.example.com", "OIDC_CLIENT_ID": "d",
                              "OIDC_CLIENT_SECRET": "s" * 20})
    assert settings.oidc_issuer == "https://idp.example.com"
    assert "s" * 20 not in repr(settings)


def test_tracing_is_on_only_with_an_endpoint() -> None:
    assert load_settings({}).tracing_endpoint is None
    settings = load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318/",
                              "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=a%20b,authorization=k"})
    assert settings.tracing_endpoint == "http://127.0.0.1:4318/v1/traces"
    assert dict(settings.otel_headers) == {"x-tenant": "a b", "authorization": "k"}
    assert "authorization=k" not in repr(settings)
    assert load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
                          "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://b/traces"}
                         ).tracing_endpoint == "https://b/traces"
    assert load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
                          "OTEL_SDK_DISABLED": "true"}).tracing_endpoint is None


def test_every_problem_is_listed_in_a_fixed_order() -> None:
    """A value its parser rejects first, then the checks across variables, in one order."""
    problems = problems_for({"NODE_ENV": "production", "PORT": "0",
                             "METRICS_LISTEN": "0.0.0.0:9464", "REGISTRY_TRUST": "allowlist",
                             "DANGEROUSLY_ENABLE_SEEDING": "true", "OIDC_ISSUER":
                             "https://issuer.example.com"})
    assert [problem.split(" ", 1)[0] for problem in problems] == [
        "PORT='0'", "METRICS_LISTEN='0.0.0.0:9464'", "REGISTRY_TRUST=allowlist", "FATAL:",
        "OIDC_CLIENT_ID,", "DATABASE_URL", "BETTER_AUTH_SECRET", "BASE_URL"]
