"""The stdio sandbox (``director.sandbox``) outside systemd.

* The systemd mode's two ends, ``client.py`` and ``supervisor.py``, with a plain unix socket
  standing in for ``director-stdio.socket`` (a thread accepts each connection and runs the
  supervisor on it, as systemd's ``Accept=yes`` does): the pipes reach the server, its exit
  and signals come back, the daemon's signals go to it, and it dies with its client.
* The account mode (a daemon started as root without the socket): a hostile server's attempts,
  what they are refused and what this mode does not promise (docs/operations.rst, "The stdio
  sandbox"). The same hostile server under the real units: tests/test_systemd_boot.py.
* ``director doctor``'s stdio-sandbox check.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from director.mcp.upstream.base import UpstreamError
from director.mcp.upstream.stdio import StdioUpstream
from director.sandbox import launcher as launcher_module
from director.sandbox.launcher import Command, Limits, SandboxError, SystemdBox, Unboxed
from tests.harness import Daemon, make_temp_dir
from tests.test_doctor import PRODUCTION, report
from tests.test_rails import fatal_start
from tests.test_systemd_boot import Client

FIXTURES = Path(__file__).parent / "fixtures"
RAW = FIXTURES / "raw_server.py"
HOSTILE = FIXTURES / "hostile_server.py"
SUPERVISOR = Path(launcher_module.__file__).with_name("supervisor.py")
LIMITS = Limits(1024 ** 3, 512)
STDIO_FLAG = {"NODE_ENV": "development", "DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS": "true"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


def eventually_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class FakeSocketUnit:
    """A listening unix socket whose every connection runs ``supervisor.py`` on it."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "stdio.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self.supervisors: list[subprocess.Popen[bytes]] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                self.supervisors.append(subprocess.Popen(
                    [sys.executable, "-I", "-S", str(SUPERVISOR)], stdin=connection.fileno()))

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for supervisor in self.supervisors:
            with contextlib.suppress(subprocess.TimeoutExpired):
                supervisor.wait(10)


@pytest.fixture
def box_dir() -> Iterator[Path]:
    directory = make_temp_dir("director-test-sandbox-", 0o755)
    (directory / "cache").mkdir(mode=0o710)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sandboxed(box_dir: Path) -> Iterator[Callable[..., StdioUpstream]]:
    """``make(args, **options)``: a raw server through a SystemdBox on a fake socket unit."""
    unit = FakeSocketUnit(box_dir)
    box = SystemdBox(unit.path, str(box_dir / "cache"), LIMITS, b"k" * 32)
    made: list[StdioUpstream] = []

    def make(args: list[str] | None = None, **options: Any) -> StdioUpstream:
        options.setdefault("launcher", box)
        upstream = StdioUpstream("raw", sys.executable, [str(RAW), *(args or [])], {}, None,
                                 reactor, **options)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        pytest_twisted.blockon(defer.ensureDeferred(upstream.close()))
    unit.close()


async def tool(upstream: StdioUpstream, name: str, **arguments: Any) -> str:
    result = await upstream.request("tools/call", {"name": name, "arguments": arguments})
    return str(result["content"][0]["text"])


@pytest_twisted.ensureDeferred
async def test_the_server_speaks_on_the_daemons_pipes_in_a_process_of_its_own(
        sandboxed: Callable[..., StdioUpstream], box_dir: Path) -> None:
    upstream = sandboxed()
    await upstream.start()
    assert await tool(upstream, "echo", text="through the sandbox") == "through the sandbox"
    server = int(await tool(upstream, "pid"))
    assert upstream.pid is not None and server != upstream.pid  # the client is not the server
    environment = json.loads(await tool(upstream, "env"))
    home = Path(environment["HOME"])
    assert home.parent == box_dir / "cache" and stat.S_IMODE(home.stat().st_mode) == 0o770
    assert environment["XDG_CACHE_HOME"] == f"{home}/.cache"
    assert "DIRECTOR_STDIO_REQUEST" not in environment


def test_cache_directories_are_one_per_server_and_owner(box_dir: Path) -> None:
    box = SystemdBox("/nonexistent", str(box_dir / "cache"), LIMITS, b"k" * 32)
    home = box.cache_directory(Command("github", "npx", (), {}, None, "playbook-a"))
    assert home == box.cache_directory(Command("github", "other", (), {}, None, "playbook-a"))
    assert home != box.cache_directory(Command("github", "npx", (), {}, None, "playbook-b"))
    assert home != box.cache_directory(Command("gitlab", "npx", (), {}, None, "playbook-a"))
    other_key = SystemdBox("/nonexistent", str(box_dir / "cache"), LIMITS, b"j" * 32)
    assert home != other_key.cache_directory(Command("github", "npx", (), {}, None,
                                                     "playbook-a"))
    # Replaced by a symlink (someone's trick): refused, nothing followed.
    os.rmdir(home)
    os.symlink("/etc", home)
    with pytest.raises(SandboxError, match="as its cache directory: it is a symlink"):
        box.cache_directory(Command("github", "npx", (), {}, None, "playbook-a"))


@pytest_twisted.ensureDeferred
async def test_the_servers_exit_and_stderr_come_back(
        sandboxed: Callable[..., StdioUpstream]) -> None:
    upstream = sandboxed(restart=False)
    await upstream.start()
    with pytest.raises(UpstreamError):
        await tool(upstream, "crash", code=7)
    assert upstream.state == "failed"
    with pytest.raises(UpstreamError,
                       match="process exited unexpectedly: exit 7: crashing on purpose"):
        await tool(upstream, "echo", text="gone")


@pytest_twisted.ensureDeferred
async def test_a_signal_that_kills_the_server_is_reported_as_such(
        sandboxed: Callable[..., StdioUpstream]) -> None:
    upstream = sandboxed(restart=False)
    await upstream.start()
    server = int(await tool(upstream, "pid"))
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while upstream.state != "failed" and time.monotonic() < deadline:
        await deferLater(0.02)
    with pytest.raises(UpstreamError, match=r"killed by signal 9 \(SIGKILL\)"):
        await tool(upstream, "echo", text="gone")


@pytest_twisted.ensureDeferred
async def test_close_reaches_a_server_that_ignores_the_end_of_its_input(
        sandboxed: Callable[..., StdioUpstream]) -> None:
    upstream = sandboxed(["--ignore-eof"])
    await upstream.start()
    server = int(await tool(upstream, "pid"))
    await upstream.close()  # stdin closed, then SIGTERM to the client, forwarded to the server
    assert eventually_gone(server)


@pytest_twisted.ensureDeferred
async def test_the_server_dies_with_its_client(sandboxed: Callable[..., StdioUpstream]) -> None:
    upstream = sandboxed(["--ignore-eof", "--ignore-term"], restart=False)
    await upstream.start()
    server = int(await tool(upstream, "pid"))
    assert upstream.pid is not None
    os.kill(upstream.pid, signal.SIGKILL)  # as when the daemon itself is SIGKILLed
    assert eventually_gone(server), "the server outlived its client"


@pytest_twisted.ensureDeferred
async def test_an_unreachable_socket_fails_the_start_with_the_fix(box_dir: Path) -> None:
    box = SystemdBox(str(box_dir / "missing.sock"), str(box_dir / "cache"), LIMITS, b"k" * 32)
    upstream = StdioUpstream("raw", sys.executable, [str(RAW)], {}, None, reactor,
                             launcher=box, restart=False)
    with pytest.raises(UpstreamError, match=r"cannot reach the stdio sandbox at .*missing\.sock"):
        await upstream.start()
    await upstream.close()


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


# --- the account mode: a daemon started as root, no socket -------------------------------------


def database_socket(url: str) -> str | None:
    parts = urlsplit(url)
    host = dict(parse_qsl(parts.query)).get("host", "")
    return f"{host}/.s.PGSQL.{parts.port or 5432}" if host.startswith("/") else None


@pytest.mark.skipif(os.geteuid() != 0, reason="the account mode needs a daemon started as root")
def test_a_hostile_server_as_the_stdio_account(start_daemon: Callable[..., Daemon],
                                               migrated_url: str) -> None:
    secrets = make_temp_dir("director-test-secrets-", 0o700)
    env_file = secrets / "director.env"
    env_file.write_text("LOG_LEVEL=debug\n")
    env_file.chmod(0o600)
    daemon = start_daemon(DATABASE_URL=migrated_url, STATE_DIRECTORY=str(secrets / "state"),
                          DIRECTOR_ENV_FILE=str(env_file), STDIO_MEMORY_MAX="512M",
                          **STDIO_FLAG)
    try:
        daemon.wait_for_log("director is healthy")
        record = daemon.wait_for_log("stdio sandbox:")
        assert record["msg"].startswith("stdio sandbox: account: stdio servers run as nobody")
        hostile = {"type": "stdio", "command": sys.executable, "args": [str(HOSTILE)]}
        client = Client(daemon.port, [
            {"name": "hostile", "prefix": "h1_", **hostile},
            {"name": "neighbour", "prefix": "h2_", **hostile},
            {"name": "raw", "type": "stdio", "command": sys.executable, "args": [str(RAW)]}],
            daemon.output)
        (secrets / "state").mkdir(mode=0o700, exist_ok=True)
        reads = [str(env_file), str(secrets / "state"), "/etc/shadow"]
        connects = [path for path in [database_socket(migrated_url)] if path]
        writes = ["/etc", str(secrets / "state"), str(FIXTURES), "/tmp", "$HOME"]
        probe = client.outcome("h1_probe", {"targets": {
            "reads": reads, "connects": connects, "writes": writes,
            "pid": daemon.process.pid}})
        print(f"\nhostile probe (account mode): {json.dumps(probe, indent=1)}")
        assert all(value.startswith("denied") for value in probe["reads"].values()), probe
        assert all(value.startswith("denied") for value in probe["connects"].values()), probe
        assert probe["daemon_environ"].startswith("denied"), probe
        allowed = {path for path, value in probe["writes"].items() if value == "ALLOWED"}
        # What this mode does not promise (documented): /tmp is the host's, HOME is shared.
        assert allowed == {"/tmp", "$HOME"}, probe
        assert probe["home"] == f"/var/tmp/director-stdio-{probe['uid']}", probe

        forked = client.outcome("h1_fork", {"limit": 100000})
        print(f"fork: {forked}")
        assert forked["error"] is not None and forked["forked"] < 512, forked
        allocated = client.outcome("h1_allocate", {"mebibytes": 4096})
        print(f"allocate: {allocated}")
        assert allocated["error"] == "MemoryError" and allocated["allocated_mib"] < 512, \
            allocated

        echo = client.call("echo", {"text": "still here"})
        assert echo["result"]["content"][0]["text"] == "still here", echo
        assert client.outcome("h2_fork", {"limit": 10}) == {"forked": 10, "error": None}
        assert daemon.health()[0] == 200
        logged = {str(line.get("msg")) for line in daemon.records()}
        for tool_name in ("probe", "fork", "allocate"):
            assert any(line.startswith(f"[hostile] hostile {tool_name}:") for line in logged), \
                logged
    finally:
        shutil.rmtree(secrets, ignore_errors=True)


def test_an_explicit_mode_that_cannot_work_stops_the_start(
        start_daemon: Callable[..., Daemon], migrated_url: str, box_dir: Path) -> None:
    output = fatal_start(start_daemon, DATABASE_URL=migrated_url, STDIO_SANDBOX="systemd",
                         STDIO_SANDBOX_SOCKET=str(box_dir / "none.sock"))
    assert f"FATAL: STDIO_SANDBOX=systemd but {box_dir / 'none.sock'} is not a socket: start " \
           "it with `systemctl enable --now director-stdio.socket`" in output, output


@pytest_twisted.ensureDeferred
async def test_production_refuses_a_server_without_a_sandbox() -> None:
    upstream = StdioUpstream("raw", sys.executable, [str(RAW)], {}, None, reactor,
                             launcher=Unboxed(production=True), restart=False)
    with pytest.raises(UpstreamError, match=r"^\[raw\] stdio servers run only sandboxed in "
                                            r"production, and this daemon has no sandbox"):
        await upstream.start()
    await upstream.close()


# --- director doctor -------------------------------------------------------------------------


def test_doctor_names_the_sandbox_mode_and_its_fix(migrated_url: str, box_dir: Path) -> None:
    base = {"DATABASE_URL": migrated_url, "STATE_DIRECTORY": str(box_dir / "state"),
            **PRODUCTION}
    # No socket: the account mode as root, none otherwise (refused in production).
    _, checks = report(**base, STDIO_SANDBOX_SOCKET=str(box_dir / "none.sock"))
    check = checks["stdio-sandbox"]
    if os.geteuid() == 0:
        assert (check["status"], check["summary"].split(":")[0]) == ("warn", "account"), check
    else:
        assert check["status"] == "fail" and "run only sandboxed in production" in \
            check["summary"], check
    assert "systemctl enable --now director-stdio.socket" in check["fix"], check
    # An explicit mode that cannot work.
    _, checks = report(**base, STDIO_SANDBOX="systemd",
                       STDIO_SANDBOX_SOCKET=str(box_dir / "none.sock"))
    assert checks["stdio-sandbox"]["status"] == "fail", checks["stdio-sandbox"]
    assert "is not a socket" in checks["stdio-sandbox"]["summary"]
    # The socket and the cache directory as the package makes them.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(box_dir / "stdio.sock"))
        (box_dir / "cache").chmod(0o2710)
        _, checks = report(**base, STDIO_SANDBOX_SOCKET=str(box_dir / "stdio.sock"),
                           STDIO_CACHE_DIRECTORY=str(box_dir / "cache"))
        assert checks["stdio-sandbox"]["status"] == "ok", checks["stdio-sandbox"]
        assert checks["stdio-sandbox"]["summary"].startswith("systemd: each stdio server")
        (box_dir / "cache").chmod(0o755)
        _, checks = report(**base, STDIO_SANDBOX_SOCKET=str(box_dir / "stdio.sock"),
                           STDIO_CACHE_DIRECTORY=str(box_dir / "cache"))
        assert checks["stdio-sandbox"]["status"] == "warn", checks["stdio-sandbox"]
        assert checks["stdio-sandbox"]["fix"].startswith("chmod 2710 ")
