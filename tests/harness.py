"""Test harness: throwaway PostgreSQL databases and real daemon processes.

PostgreSQL is the project's own embedded-default code (a private cluster with fsync off in a
temporary directory) unless ``TEST_DATABASE_URL`` names a server whose role may CREATE DATABASE;
each test then gets a database of its own. Daemons are real ``director serve`` processes,
talked to over loopback HTTP.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2

from director.db.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
DIRECTOR = str(Path(sys.executable).with_name("director"))
TWISTD = str(Path(sys.executable).with_name("twistd"))
SECRET = "test-secret-" + "x" * 40
#: How long a daemon measured by coverage is given to stop (SHUTDOWN_TIMEOUT_SECONDS is 3).
MEASURED_STOP_SECONDS = 10.0


def make_temp_dir(prefix: str, mode: int = 0o755) -> Path:
    """A temporary directory the embedded cluster's account and stdio servers (``nobody`` when
    the suite runs as root) can traverse; ``mode=0o777`` for one they must write in."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(mode)
    return path


def free_port() -> int:
    """A loopback port no one listens on, for a daemon or server the test starts next."""
    if _WORKER_PORTS is not None:
        return next(_WORKER_PORTS)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker_ports(worker: str, workers: int) -> Iterator[int]:
    """Under pytest-xdist, each worker's ports from a range of its own below the kernel's
    ephemeral ones: two workers asking the kernel for a free port could both be told the same
    one before either listens on it. In turn, so that a port is not handed out twice in a row."""
    span = PORT_RANGE_SIZE // workers
    first = PORT_RANGE_START + int(worker.removeprefix("gw")) * span
    offset = uuid.uuid4().int % span  # a rerun does not start on ports the last one left
    while True:
        offset = (offset + 1) % span
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", first + offset))
            except OSError:
                continue
        yield first + offset


#: The ports handed to pytest-xdist's workers: under Linux's ephemeral range (32768 on).
PORT_RANGE_START, PORT_RANGE_SIZE = 12000, 20000
_WORKER_PORTS = (_worker_ports(os.environ["PYTEST_XDIST_WORKER"],
                               int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
                 if "PYTEST_XDIST_WORKER" in os.environ else None)


class PostgresServer:
    """One PostgreSQL server that hands out fresh databases."""

    def __init__(self, admin_url: str, cluster: EmbeddedPostgres | None = None) -> None:
        self.admin_url = admin_url
        self.cluster = cluster

    @classmethod
    def start_private(cls) -> PostgresServer:
        cluster = EmbeddedPostgres(make_temp_dir("director-test-pg-"), fast_and_unsafe=True)
        cluster.start()
        return cls(cluster.url("postgres"), cluster)

    def url_for(self, database: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path="/" + database))

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin(self, statement: str) -> None:
        connection = psycopg2.connect(self.admin_url)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            shutil.rmtree(self.cluster.state_directory, ignore_errors=True)


def query(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    connection = psycopg2.connect(url)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql, args or None)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def base_environment(**overrides: str) -> dict[str, str]:
    environ = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("DANGEROUSLY_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM",
                               "LISTEN_"))
        and key not in ("DATABASE_URL", "BASE_URL", "PORT", "NODE_ENV", "DIRECTOR_ENV",
                        "STATE_DIRECTORY", "ALLOWED_ORIGINS", "ALLOWED_HOSTS", "LOG_LEVEL",
                        "WAITLIST_ENABLED", "STDIO_USER")
    }
    # Every test client signs up from 127.0.0.1, many per database; tests of the per-address
    # sign-up limit set it themselves. Loopback only: test daemons have no business on other
    # interfaces, and the DANGEROUSLY_* server flags need it (or a closed sign-up).
    environ.update({"BETTER_AUTH_SECRET": SECRET, "LOG_LEVEL": "debug", "HOST": "127.0.0.1",
                    "DIRECTOR_ENV_FILE": "", "SHUTDOWN_TIMEOUT_SECONDS": "3",
                    "SIGNUP_RATE_LIMIT_PER_HOUR": "100000"})
    # A first list waits for servers that start slowly on a busy test machine (the fixture
    # servers import the mcp SDK); tests/test_slow_upstreams.py runs with the default.
    environ["MCP_LIST_WAIT_SECONDS"] = "10"
    environ.update(coverage_environment())
    environ.update(overrides)
    return environ


def coverage_environment() -> dict[str, str]:
    """Under ``coverage run`` (``make test``), what makes a ``director`` command or daemon
    measure itself into the same data: the configuration coverage's .pth file starts it with,
    and the data file by absolute path (a daemon runs in a directory of its own)."""
    try:
        import coverage
    except ImportError:
        return {}
    measuring = coverage.Coverage.current()
    if measuring is None:
        return {}
    return {"COVERAGE_PROCESS_START": str(ROOT / "setup.cfg"),
            "COVERAGE_FILE": os.path.abspath(measuring.config.data_file)}


class Daemon:
    """A running ``director serve``; its output goes to a file the test can read."""

    def __init__(self, environ: Mapping[str, str], argv: list[str] | None = None,
                 stdout_path: Path | None = None) -> None:
        self.port = int(environ["PORT"])
        self.base = f"http://127.0.0.1:{self.port}"
        self.workdir = make_temp_dir("director-test-daemon-")
        self.log_path = stdout_path or self.workdir / "stdout.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv or [DIRECTOR, "serve"], env=dict(environ), stdout=self._log,
            stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        self.measured = "COVERAGE_PROCESS_START" in environ

    # --- output -------------------------------------------------------------------------

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        found = []
        for line in self.output().splitlines():
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def wait_for_log(self, fragment: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if fragment in record.get("msg", ""):
                    return record
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no log line containing {fragment!r}; output:\n{self.output()}")

    # --- HTTP ---------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=dict(headers or {}))
            response = connection.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read())
        finally:
            connection.close()

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            status, _, body = self.request("GET", "/api/health")
        except OSError:
            return 0, {}
        return status, json.loads(body)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        self.wait_for_health(200, timeout)

    def wait_for_health(self, wanted: int, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, body = self.health()
            if status == wanted:
                return body
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"health never became {wanted} (last {body}):\n{self.output()}")

    # --- lifecycle ----------------------------------------------------------------------

    def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"daemon did not exit:\n{self.output()}") from None

    def terminate(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def stop(self) -> None:
        if self.process.poll() is None and self.measured:
            # It writes its coverage data when it exits: stop it the way systemd does.
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(MEASURED_STOP_SECONDS)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def local_servers(commands: list[list[str]], ports: list[int],
                  env: Mapping[str, str] | None = None) -> Iterator[None]:
    """Run ``commands`` (servers of the tests' own, on loopback) until each port listens;
    stop them when the block ends."""
    processes = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=dict(env) if env is not None else None)
                 for argv in commands]
    try:
        deadline = time.monotonic() + 30
        for port in ports:
            while True:
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")
                time.sleep(0.1)
        yield
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
