"""``director doctor``: the real command against real PostgreSQL, a real daemon and PgBouncer.

PgBouncer comes from Debian (``apt-get install pgbouncer``); without the binary the two tests
that need it skip and say so. Everything else needs only what the rest of the suite needs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg2.extensions import parse_dsn

from director.cli.doctor.environment import estimate_entropy_bits, is_placeholder
from tests.harness import (
    DIRECTOR,
    Daemon,
    PostgresServer,
    base_environment,
    free_port,
    make_temp_dir,
    query,
)
from tests.test_config import TRICKY_DATABASE_URLS, assert_no_fragment

STRONG = secrets.token_urlsafe(48)
PRODUCTION = {"NODE_ENV": "production", "BASE_URL": "https://director.example.com",
              "BETTER_AUTH_SECRET": STRONG}


def doctor(*args: str, env_file: str | None = None, unset: tuple[str, ...] = (),
           **env: str) -> subprocess.CompletedProcess[str]:
    argv = [DIRECTOR] + (["--env-file", env_file] if env_file is not None else [])
    environ = base_environment(**env)
    for name in unset:
        environ.pop(name, None)
    return subprocess.run([*argv, "doctor", *args], env=environ,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=90,
                          check=False)


def report(**env: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """Exit status and the checks by name, from ``--json``."""
    result = doctor("--json", **env)
    assert result.stderr == "", result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is (result.returncode == 0)
    return result.returncode, {check["name"]: check for check in data["checks"]}


def statuses(checks: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: check["status"] for name, check in checks.items()}


@pytest.fixture
def state(tmp_path: Path) -> str:
    return str(tmp_path / "state")


# --- a healthy host, and each failure on its own ---------------------------------------------


def test_healthy_production_configuration(migrated_url: str, state: str) -> None:
    code, checks = report(DATABASE_URL=migrated_url, STATE_DIRECTORY=state,
                          PORT=str(free_port()), HOST="127.0.0.1", **PRODUCTION)
    assert code == 0, checks
    found = statuses(checks)
    for name in ("env-file", "configuration", "secret", "database", "schema", "listen-notify",
                 "port", "base-url", "state-directory", "postgres-binaries"):
        assert found[name] == "ok", checks[name]
    assert "notification arrived" in checks["listen-notify"]["summary"]


def test_human_output_names_each_check_and_the_fix(database_url: str, state: str) -> None:
    result = doctor(DATABASE_URL=database_url, STATE_DIRECTORY=state, PORT=str(free_port()),
                    **PRODUCTION)
    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    assert any(line.startswith("OK    database ") for line in lines), result.stdout
    assert any(line.startswith("FAIL  schema ") for line in lines), result.stdout
    assert "fix: back up the database, then run `director db upgrade`" in result.stdout
    assert lines[-1].startswith("1 failed,"), lines[-1]


def test_unmigrated_database_fails_naming_db_upgrade(database_url: str, state: str) -> None:
    code, checks = report(DATABASE_URL=database_url, STATE_DIRECTORY=state,
                          PORT=str(free_port()), **PRODUCTION)
    assert code == 1
    assert checks["schema"]["status"] == "fail"
    assert "at version 0 of" in checks["schema"]["summary"]
    assert "director db upgrade" in checks["schema"]["fix"]
    # The rest still ran: LISTEN/NOTIFY needs no schema.
    assert checks["listen-notify"]["status"] == "ok"


def test_unreachable_database_fails(state: str) -> None:
    url = f"postgres://director:hunter2hunter2@127.0.0.1:{free_port()}/director"
    code, checks = report(DATABASE_URL=url, STATE_DIRECTORY=state, PORT=str(free_port()),
                          **PRODUCTION)
    assert code == 1
    assert checks["database"]["status"] == "fail"
    assert "Connection refused" in checks["database"]["summary"]
    assert "hunter2" not in json.dumps(checks), "the password is shown"
    assert "DATABASE_URL" in checks["database"]["fix"]
    assert checks["schema"]["status"] == checks["listen-notify"]["status"] == "skip"



@pytest.mark.parametrize(("url", "fragments", "accepted"), TRICKY_DATABASE_URLS)
def test_database_passwords_are_never_shown(state: str, url: str, fragments: tuple[str, ...],
                                            accepted: bool) -> None:
    result = doctor(DATABASE_URL=url.format(port=free_port()), STATE_DIRECTORY=state,
                    PORT=str(free_port()), **PRODUCTION)
    assert result.returncode == 1
    assert_no_fragment(result.stdout + result.stderr, fragments)
    lines = result.stdout.splitlines()
    if accepted:  # read as meant: where it connects is shown, and why it could not
        assert any(line.startswith("FAIL  database") and "cannot connect as app at 127.0.0.1 "
                   "port" in line and "Connection refused" in line for line in lines), lines
    else:  # refused by the configuration, naming the fix
        assert any(line.startswith("FAIL  configuration") for line in lines), lines
        assert any("DATABASE_URL=(unparseable DATABASE_URL)" in line for line in lines), lines


def test_short_secret_fails(migrated_url: str, state: str) -> None:
    code, checks = report(DATABASE_URL=migrated_url, STATE_DIRECTORY=state,
                          PORT=str(free_port()), **{**PRODUCTION, "BETTER_AUTH_SECRET": "short"})
    assert code == 1
    assert checks["secret"]["status"] == "fail"
    assert "5 characters long" in checks["secret"]["summary"]
    assert "openssl rand" in checks["secret"]["fix"]
    assert checks["configuration"]["status"] == "fail"  # the daemon would refuse it too
    assert "short" not in json.dumps(checks["configuration"])


@pytest.mark.parametrize("placeholder", [
    "your-secure-random-string-of-at-least-32-chars",  # the guide's example, padded to length
    "your-secret-here-your-secret-here-your-secret-here",
    "changeme" * 5,
])
def test_placeholder_secret_fails_in_production_and_warns_elsewhere(
        migrated_url: str, state: str, placeholder: str) -> None:
    environment = {"DATABASE_URL": migrated_url, "STATE_DIRECTORY": state,
                   "PORT": str(free_port())}
    code, checks = report(**environment, **{**PRODUCTION, "BETTER_AUTH_SECRET": placeholder})
    assert code == 1
    assert checks["secret"]["status"] == "fail"
    assert "placeholder" in checks["secret"]["summary"]
    code, checks = report(**environment, NODE_ENV="development", BETTER_AUTH_SECRET=placeholder)
    assert checks["secret"]["status"] == "warn"
    assert code == 0, checks


def test_low_entropy_secret_warns(migrated_url: str, state: str) -> None:
    weak = "Abc1" + "q" * 40
    code, checks = report(DATABASE_URL=migrated_url, STATE_DIRECTORY=state,
                          PORT=str(free_port()), **{**PRODUCTION, "BETTER_AUTH_SECRET": weak})
    assert code == 0
    assert checks["secret"]["status"] == "warn"
    assert "weak" in checks["secret"]["summary"]


def test_entropy_estimate_and_placeholders() -> None:
    assert estimate_entropy_bits(secrets.token_urlsafe(48)) > 250
    assert estimate_entropy_bits(secrets.token_hex(32)) > 200
    assert estimate_entropy_bits("a" * 64) == 0
    assert is_placeholder("your-secure-random-string")
    assert is_placeholder("CHANGE_ME_CHANGE_ME_CHANGE_ME_CHANGE_ME")
    assert not is_placeholder(secrets.token_urlsafe(48))


# --- PgBouncer --------------------------------------------------------------------------------


class PgBouncer:
    """A PgBouncer on loopback in front of the test server, in the given pool mode."""

    def __init__(self, postgres: PostgresServer, mode: str) -> None:
        self.binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        target = parse_dsn(postgres.admin_url)
        self.work = make_temp_dir("director-test-pgbouncer-")
        # PgBouncer refuses to run as root: run it as the account that can reach the server's
        # socket (the private cluster's owner), or as nobody for a TCP server.
        user: int | None = None
        if os.geteuid() == 0:
            host = target.get("host", "")
            user = os.stat(host).st_uid if host.startswith("/") else 65534
            os.chown(self.work, user, -1)
        self.port = free_port()
        server = " ".join(f"{key}={target[key]}" for key in ("host", "port", "user", "password")
                          if target.get(key))
        config = self.work / "pgbouncer.ini"
        config.write_text(
            f"[databases]\n* = {server}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"unix_socket_dir =\nauth_type = any\npool_mode = {mode}\n"
            f"logfile = {self.work}/pgbouncer.log\npidfile = {self.work}/pgbouncer.pid\n")
        self.process = subprocess.Popen([self.binary, str(config)], user=user,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"pgbouncer did not start: {self.log()}")
            time.sleep(0.05)

    def url(self, database_url: str) -> str:
        database = parse_dsn(database_url)["dbname"]
        password = parse_dsn(database_url).get("password")
        user = parse_dsn(database_url).get("user", "director")
        credentials = f"{user}:{password}" if password else user
        return f"postgresql://{credentials}@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        try:
            return (self.work / "pgbouncer.log").read_text()
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture
def pgbouncer(postgres: PostgresServer) -> Iterator[Callable[[str], PgBouncer]]:
    if shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer); the "
                    "transaction-mode detection is untested here")
    started: list[PgBouncer] = []

    def start(mode: str) -> PgBouncer:
        bouncer = PgBouncer(postgres, mode)
        started.append(bouncer)
        return bouncer

    yield start
    for bouncer in started:
        bouncer.stop()


def test_pgbouncer_transaction_mode_fails_listen_notify(
        pgbouncer: Callable[[str], PgBouncer], migrated_url: str, state: str) -> None:
    bouncer = pgbouncer("transaction")
    code, checks = report(DATABASE_URL=bouncer.url(migrated_url), STATE_DIRECTORY=state,
                          PORT=str(free_port()), **PRODUCTION)
    assert code == 1, checks
    # Queries work through it; only notifications are lost.
    assert checks["database"]["status"] == checks["schema"]["status"] == "ok", checks
    listen = checks["listen-notify"]
    assert listen["status"] == "fail", listen
    assert "not delivered" in listen["summary"] and "transaction mode" in listen["summary"]
    assert "dedicated connection" in listen["fix"] and "pool_mode=session" in listen["fix"]


def test_pgbouncer_session_mode_passes(pgbouncer: Callable[[str], PgBouncer],
                                       migrated_url: str, state: str) -> None:
    bouncer = pgbouncer("session")
    code, checks = report(DATABASE_URL=bouncer.url(migrated_url), STATE_DIRECTORY=state,
                          PORT=str(free_port()), **PRODUCTION)
    assert code == 0, checks
    assert checks["listen-notify"]["status"] == "ok"


# --- port, BASE_URL, environment file, the private cluster ------------------------------------


def test_port_taken_by_something_else_fails(migrated_url: str, state: str) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        code, checks = report(DATABASE_URL=migrated_url, STATE_DIRECTORY=state, PORT=str(port),
                              HOST="127.0.0.1", **PRODUCTION)
    assert code == 1
    assert checks["port"]["status"] == "fail"
    assert "in use" in checks["port"]["summary"]
    assert f"sport = :{port}" in checks["port"]["fix"]


def test_port_served_by_a_running_director_is_ok(
        start_daemon: Callable[..., Daemon], migrated_url: str, state: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url)
    daemon.wait_healthy()
    code, checks = report(DATABASE_URL=migrated_url, STATE_DIRECTORY=state,
                          PORT=str(daemon.port), **PRODUCTION)
    assert code == 0, checks
    assert checks["port"]["status"] == "ok"
    assert "running Director (healthy)" in checks["port"]["summary"]


def test_base_url_in_production(migrated_url: str, state: str) -> None:
    common = {"DATABASE_URL": migrated_url, "STATE_DIRECTORY": state, "PORT": str(free_port())}
    code, checks = report(**common, **{**PRODUCTION, "BASE_URL": "http://director.example.com"})
    assert code == 1
    assert checks["base-url"]["status"] == "fail"
    assert "https" in checks["base-url"]["fix"]
    code, checks = report(**common, **{**PRODUCTION, "BASE_URL": "https://203.0.113.7"})
    assert code == 0
    assert checks["base-url"]["status"] == "warn"
    assert "IP address" in checks["base-url"]["summary"]
    code, checks = report(**common, NODE_ENV="development", BASE_URL="http://10.0.0.1:3673",
                          BETTER_AUTH_SECRET=STRONG)
    assert checks["base-url"]["status"] == "ok"


def test_environment_file(migrated_url: str, state: str, tmp_path: Path) -> None:
    env_file = tmp_path / "director.env"
    env_file.write_text(f"NODE_ENV=production\nDATABASE_URL={migrated_url}\n"
                        f"BASE_URL=https://director.example.com\nBETTER_AUTH_SECRET={STRONG}\n"
                        f"STATE_DIRECTORY={state}\nPORT={free_port()}\n")
    env_file.chmod(0o640)
    # Only the file sets the secret (an empty variable in the process environment would win).
    clean: dict[str, Any] = {"unset": ("BETTER_AUTH_SECRET",)}
    result = doctor("--json", env_file=str(env_file), **clean)
    assert result.returncode == 0, result.stdout
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["env-file"]["status"] == "ok"
    assert checks["schema"]["status"] == "ok"

    # A typo of a variable's name, and the file readable by everyone while holding the secret.
    env_file.write_text(env_file.read_text() + "DATABASE_URI=postgres://x\n")
    env_file.chmod(0o644)
    result = doctor("--json", env_file=str(env_file), **clean)
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["env-file"]["status"] == "warn"
    assert "DATABASE_URI (did you mean DATABASE_URL?)" in checks["env-file"]["summary"]
    assert "chmod 0640" in checks["env-file"]["fix"]

    # An empty variable in the calling environment blanks the file's value.
    result = doctor("--json", env_file=str(env_file), DATABASE_URL="")
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert "DATABASE_URL set in the file but empty" in checks["env-file"]["summary"]
    assert checks["configuration"]["status"] == "fail"  # production needs DATABASE_URL

    # A line that is not KEY=VALUE: named by number, its content (maybe a secret) not shown.
    env_file.write_text(env_file.read_text() + f"{STRONG}\n")
    result = doctor("--json", env_file=str(env_file), **clean)
    assert result.returncode == 1
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["env-file"]["status"] == "fail"
    assert f"{env_file}:8" in checks["env-file"]["summary"]
    assert STRONG not in result.stdout

    result = doctor("--json", env_file=str(tmp_path / "missing.env"), **clean)
    assert result.returncode == 1
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["env-file"]["status"] == "fail"
    assert "No such file" in checks["env-file"]["summary"]


def test_private_cluster_not_created_yet() -> None:
    state = make_temp_dir("director-test-doctor-")
    try:
        code, checks = report(STATE_DIRECTORY=str(state), PORT=str(free_port()),
                              BETTER_AUTH_SECRET="")
        assert code == 0, checks
        assert "created in" in checks["database"]["summary"]
        assert checks["secret"]["status"] == "ok"
        assert "generated at the first start" in checks["secret"]["summary"]
        assert checks["postgres-binaries"]["status"] == "ok"
        assert not (state / "postgres").exists(), "the doctor created the cluster"
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_private_cluster_is_checked_through_its_socket() -> None:
    state = make_temp_dir("director-test-doctor-")
    state.chmod(0o711)  # traversable by the cluster's account when the suite runs as root
    environment = {"STATE_DIRECTORY": str(state), "BETTER_AUTH_SECRET": ""}
    try:
        upgraded = subprocess.run([DIRECTOR, "db", "upgrade"], env=base_environment(**environment),
                                  capture_output=True, text=True, timeout=120, check=False)
        assert upgraded.returncode == 0, upgraded.stderr
        code, checks = report(PORT=str(free_port()), **environment)
        assert code == 0, checks
        for name in ("database", "schema", "listen-notify", "state-directory"):
            assert checks[name]["status"] == "ok", checks[name]
        assert checks["secret"]["status"] == "ok"
    finally:
        shutil.rmtree(state, ignore_errors=True)


# --- stored secrets against the configured secret ----------------------------------------------


def test_stored_secrets_must_open_with_the_secret(
        start_daemon: Callable[..., Daemon], migrated_url: str, state: str) -> None:
    from tests.accounts_helpers import call, sign_up
    from tests.harness import SECRET

    daemon = start_daemon(DATABASE_URL=migrated_url)
    daemon.wait_healthy()
    owner = sign_up(daemon, "sealed@example.com")
    assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Sealed"}, key=owner.key)[0] == 201
    status, _, body = call(daemon, "POST", "/api/v1/playbooks/sealed/servers", {
        "name": "remote", "type": "http", "url": "https://mcp.example.com/mcp",
        "headers": {"Authorization": {"value": "Bearer upstream-token", "secret": True},
                    "X-Plain": "kept"}},
        key=owner.key)
    assert status == 201, body
    daemon.terminate()

    common = {"DATABASE_URL": migrated_url, "STATE_DIRECTORY": state, "PORT": str(free_port())}
    code, checks = report(**common, BETTER_AUTH_SECRET=SECRET)
    assert checks["stored-secrets"]["status"] == "ok", checks["stored-secrets"]
    assert "1 stored secret values decrypt" in checks["stored-secrets"]["summary"]

    # Another secret: the daemon would stop at start; the doctor says so, and which value.
    code, checks = report(**common, BETTER_AUTH_SECRET=STRONG)
    assert code == 1
    stored = checks["stored-secrets"]
    assert stored["status"] == "fail" and "SecretUnreadable" in stored["summary"], stored
    assert stored["details"] == ["sealed@example.com sealed/remote Authorization"]
    assert "upstream-token" not in json.dumps(checks)
    restarted = start_daemon(DATABASE_URL=migrated_url, BETTER_AUTH_SECRET=STRONG)
    assert restarted.wait_exit() == 78  # EX_CONFIG: not restarted by systemd in a loop
    assert "FATAL: SecretUnreadable" in restarted.output()

    # docs/manual.rst, "A lost secret": its SQL removes the sealed values, keeps the plain ones,
    # and the daemon starts with the new secret.
    manual = (Path(__file__).parent.parent / "docs" / "manual.rst").read_text()
    section = manual[manual.index("A lost secret\n~~~"):]
    sql = textwrap.dedent(section[section.index("<<'SQL'\n") + 7:section.index("\n   SQL\n")])
    query(migrated_url, sql)
    config = query(migrated_url, "SELECT config FROM playbook_servers")[0][0]
    assert config["headers"] == {"X-Plain": {"value": "kept"}}, config
    code, checks = report(**common, BETTER_AUTH_SECRET=STRONG)
    assert checks["stored-secrets"]["summary"] == "no secret values stored"
    start_daemon(DATABASE_URL=migrated_url, BETTER_AUTH_SECRET=STRONG).wait_healthy()


#: Run first by :func:`as_nobody`'s probe: records where every module the script imports lives.
RECORD_MODULES = """
import atexit, json, os, sys
def _record():
    places = {}
    for name, module in list(sys.modules.items()):
        if "." in name or name in sys.stdlib_module_names or name == "__main__":
            continue
        paths = list(getattr(module, "__path__", []))
        if not paths and getattr(module, "__file__", None):
            paths = [module.__file__]
        places[name] = paths
    with open(os.environ["RECORD_MODULES"], "w") as out:
        json.dump(places, out)
atexit.register(_record)
"""


def as_nobody(script: str) -> subprocess.CompletedProcess[str]:
    """Run a python ``script`` as nobody on a copy of the modules it imports.

    This checkout, its virtualenv and the interpreter may all be where nobody cannot go (under
    /root): the script runs once as root to record its imports, which are copied to a directory
    nobody can read, then runs on Debian's /usr/bin/python3 (or this interpreter, when nobody
    can run it) with that directory first on its path.
    """
    assert os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv (util-linux)"
    work = make_temp_dir("director-test-nobody-")
    try:
        record = work / "modules.json"
        subprocess.run([sys.executable, "-c", RECORD_MODULES + script], check=False,
                       capture_output=True, timeout=60, env={**os.environ,
                                                             "RECORD_MODULES": str(record)})
        lib = work / "lib"
        lib.mkdir()
        for paths in json.loads(record.read_text()).values():
            for path in map(Path, paths):
                if path.is_dir():
                    shutil.copytree(path, lib / path.name, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                elif path.is_file():
                    shutil.copy(path, lib / path.name)
        for path in [work, *work.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        for python in ("/usr/bin/python3", os.path.realpath(sys.executable)):
            probe = subprocess.run([*nobody, python, "-c", "import sys; print("
                                    "'%d.%d' % sys.version_info[:2])"],
                                   capture_output=True, text=True, check=False, cwd="/")
            if probe.stdout.strip() == version:
                break
        else:
            raise AssertionError(f"nobody can run no python {version} here (tried "
                                 f"/usr/bin/python3 and {sys.executable})")
        return subprocess.run([*nobody, python, "-I", "-c",
                               f"import sys; sys.path.insert(0, {str(lib)!r})\n{script}"],
                              capture_output=True, text=True, timeout=60, check=False, cwd="/")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("where", ["file", "directory"])
def test_default_env_file_unreadable_by_this_user_fails(where: str) -> None:
    """A non-root user cannot read /etc/director/director.env (0640 root:director in a 0750
    root:director directory): ``doctor`` fails and ``config check`` exits 78, both saying so and
    what to do, and every other command warns, instead of checking or using the process
    environment as if it were the service's configuration. Run as nobody against a stand-in for
    the default file: unreadable itself, or in a directory nobody cannot enter."""
    folder = make_temp_dir("director-test-doctor-")  # traversable by nobody
    try:
        if where == "directory":
            (folder / "director").mkdir(mode=0o750)
            env_file = folder / "director" / "director.env"
            expected = (f"{env_file} cannot be read by user nobody: {env_file.parent} cannot be "
                        "entered (permission denied)")
        else:
            env_file = folder / "director.env"
            expected = f"{env_file} exists but user nobody cannot read it"
        env_file.write_text("NODE_ENV=production\n")
        env_file.chmod(0o640)
        script = textwrap.dedent(f"""
            import contextlib, io, json
            import director.cli as cli, director.cli.base as base, director.cli.doctor.environment as doctor
            base.DEFAULT_ENV_FILE = {str(env_file)!r}
            check = doctor.check_env_file(None, {{}}).result.as_json()
            errors = io.StringIO()
            with contextlib.redirect_stderr(errors):
                status = cli.main(["config", "check"])
            with contextlib.redirect_stderr(io.StringIO()) as warning:
                values = base.environment(None)
            print(json.dumps({{"doctor": check, "config_check": [status, errors.getvalue()],
                              "warning": warning.getvalue(), "read": "NODE_ENV" in values}}))
            """)
        result = as_nobody(script)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    check = outcome["doctor"]
    assert check["status"] == "fail", check
    assert check["summary"] == (f"{expected}, so it was ignored: these checks are not of the "
                                "service's configuration"), check
    assert "runuser -u director -- director doctor" in check["fix"]
    status, errors = outcome["config_check"]
    assert status == 78, errors
    assert f"{expected}, so the service's configuration cannot be checked" in errors, errors
    assert "runuser -u director -- director config check" in errors
    assert "configuration OK" not in result.stdout
    assert outcome["warning"].startswith(f"director: warning: {expected}; using the process "
                                         "environment only."), outcome["warning"]
    assert outcome["read"] is False
