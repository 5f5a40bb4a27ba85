"""systemd/director.service under a real systemd (PID 1 of fresh namespaces, see systemd_boot).

The unit file is installed verbatim: the namespace supplies what it expects instead of the
unit being edited. ``/usr/bin/director`` is added to the namespace's ``/usr`` overlay (a copy of
the checkout's entry point using a namespace-visible interpreter), the ``director`` account is
written to its ``/etc/passwd``, and ``/etc/director/director.env`` to its ``/etc``.

Skips with the reason when this machine cannot boot systemd that way (not root, no systemd, no
writable cgroup2, ...). ``DIRECTOR_REQUIRE_SYSTEMD_BOOT=1`` turns that skip into a failure.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from tests.harness import SECRET, PostgresServer, free_port
from tests.systemd_boot import CannotBoot, SystemdNamespace, check_capability

CHECKOUT = Path(__file__).resolve().parents[1]
UNIT = CHECKOUT / "systemd" / "director.service"
TEMPLATE = CHECKOUT / "systemd" / "director@.service"
SANDBOX_SOCKET = CHECKOUT / "systemd" / "director-stdio.socket"
SANDBOX_UNIT = CHECKOUT / "systemd" / "director-stdio@.service"
SANDBOX_TMPFILES = CHECKOUT / "packaging" / "debian" / "director.tmpfiles"
SUPERVISOR = CHECKOUT / "src" / "director" / "sandbox" / "supervisor.py"
HOSTILE = CHECKOUT / "tests" / "fixtures" / "hostile_server.py"
REFERENCE = CHECKOUT / "tests" / "fixtures" / "reference_server.py"
PYTHON_INSIDE = "/opt/director-python"  # sys.base_prefix, when outside /usr
VENV_INSIDE = "/usr/lib/director/venv"
# The checkout (and the virtualenv, if elsewhere) where the service can see them: the unit's
# PrivateTmp= and ProtectHome= hide /tmp, /root and /home, where a clone may well live.
CHECKOUT_INSIDE = Path("/opt/director-checkout")
VENV_ELSEWHERE_INSIDE = Path("/opt/director-venv")
REFERENCE_INSIDE = CHECKOUT_INSIDE / REFERENCE.relative_to(CHECKOUT)
HOSTILE_INSIDE = CHECKOUT_INSIDE / HOSTILE.relative_to(CHECKOUT)
POSTGRES_INSIDE = "/run/director-test-postgres"
ACCEPT = "application/json, text/event-stream"
START_TIMES: list[float] = []


def unit_setting(name: str) -> str:
    """The last value of ``name=`` in the shipped unit."""
    values = [line.split("=", 1)[1].strip() for line in UNIT.read_text().splitlines()
              if line.startswith(name + "=")]
    assert values, name
    return values[-1]


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


# --- the namespace ------------------------------------------------------------------------


def python_layout(ns: SystemdNamespace) -> str:
    """Make this interpreter and virtualenv usable by the ``director`` account despite
    ProtectHome= (pyenv lives in /root here); return the interpreter's path inside."""
    base = Path(sys.base_prefix).resolve()
    real = Path(sys.executable).resolve()
    if base.parts[1] == "usr":
        inner_base = base
    else:
        ns.bind_read_only(str(base), PYTHON_INSIDE)
        inner_base = Path(PYTHON_INSIDE)
    interpreter = inner_base / real.relative_to(base)
    # A shared libpython's RUNPATH points into the hidden home directory: put the library
    # where the dynamic loader looks next, inside the namespace's /usr overlay.
    soname = sysconfig.get_config_var("INSTSONAME")
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and soname and libdir.is_relative_to(base) \
            and base.parts[1] != "usr":
        target = str(inner_base / libdir.relative_to(base) / soname)
        places = {f"/usr/lib/{sysconfig.get_config_var('MULTIARCH') or ''}".rstrip("/")}
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            if line.strip().startswith(soname + " ") and "=>" in line:
                place = os.path.realpath(os.path.dirname(line.split("=>")[1].strip()))
                if place.startswith("/usr/"):
                    places.add(place)
        for place in places:
            ns.add_symlink(f"{place}/{soname}", target)
    venv = Path(sys.prefix)
    if venv.is_relative_to(CHECKOUT):
        venv_inside = CHECKOUT_INSIDE / venv.relative_to(CHECKOUT)
    else:
        ns.bind_read_only(str(venv), str(VENV_ELSEWHERE_INSIDE))
        venv_inside = VENV_ELSEWHERE_INSIDE
    ns.add_file(f"{VENV_INSIDE}/pyvenv.cfg",
                f"home = {interpreter.parent}\ninclude-system-site-packages = false\n"
                f"version = {sys.version.split()[0]}\n")
    ns.add_symlink(f"{VENV_INSIDE}/bin/python3", str(interpreter))
    # The shim's site-packages holds one .pth: the real one (and its .pth files, whose editable
    # install names the checkout's outside path) where it is visible, then the checkout's src.
    site = Path(sysconfig.get_path("purelib"))
    ns.add_file(f"{VENV_INSIDE}/{site.relative_to(venv)}/director-test.pth",
                f"import site; site.addsitedir({str(venv_inside / site.relative_to(venv))!r})\n"
                f"{CHECKOUT_INSIDE / 'src'}\n")
    entry = (venv / "bin" / "director").read_text().split("\n", 1)[1]
    ns.add_file("/usr/bin/director", f"#!{VENV_INSIDE}/bin/python3\n{entry}", 0o755)
    return f"{VENV_INSIDE}/bin/python3"


def database_layout(ns: SystemdNamespace, postgres: PostgresServer) -> tuple[int, int]:
    """The account's uid/gid: the socket directory's owner when PostgreSQL is reached through
    a unix socket (the embedded test cluster allows only its own account there)."""
    host = dict(parse_qsl(urlsplit(postgres.admin_url).query)).get("host", "")
    if host.startswith("/"):
        ns.bind_in_run(host, POSTGRES_INSIDE)
        owner = os.stat(host)
        return owner.st_uid, owner.st_gid
    return 990, 990


def inside_url(url: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if query.get("host", "").startswith("/"):
        query["host"] = POSTGRES_INSIDE
    return urlunsplit(parts._replace(query=urlencode(query)))


class Box:
    """The booted namespace, with the paths the tests need."""

    def __init__(self, ns: SystemdNamespace, python: str) -> None:
        self.ns = ns
        self.python = python
        self.port = 0
        self.database_url = ""

    def systemctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.ns.run(["systemctl", "--no-pager", *args], timeout=timeout)

    def show(self, *properties: str, unit: str = "director.service") -> dict[str, str]:
        out = self.systemctl("show", unit, *[f"--property={name}" for name in properties]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def cursor(self) -> str:
        """The journal's current end, for :meth:`journal` (each test reads its own entries)."""
        out = self.ns.run(["journalctl", "--no-pager", "-n", "1", "--show-cursor"]).stdout
        return out.strip().splitlines()[-1].removeprefix("-- cursor: ")

    def journal(self, cursor: str, unit: str = "director.service",
                max_priority: int = 7) -> str:
        """The unit's messages since ``cursor``, one a line, up to a syslog priority.
        (Filtered here: journalctl's --priority with --after-cursor returns nothing.)"""
        out = self.ns.run(["journalctl", "--no-pager", "-o", "json", "-u", unit,
                           f"--after-cursor={cursor}"]).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return "".join(f"{entry['MESSAGE']}\n" for entry in entries
                       if isinstance(entry.get("MESSAGE"), str)
                       and int(entry.get("PRIORITY", 6)) <= max_priority)

    def wait_journal(self, cursor: str, fragment: str, unit: str = "director.service",
                     timeout: float = 5.0) -> str:
        """The unit's journal since ``cursor`` once it holds ``fragment`` (journald is async)."""
        deadline = time.monotonic() + timeout
        while True:
            journal = self.journal(cursor, unit=unit)
            if fragment in journal or time.monotonic() > deadline:
                return journal
            time.sleep(0.05)

    def write_env(self, values: dict[str, str], name: str = "director") -> None:
        inside = f"/etc/director/{name}.env"
        path = self.ns.path(inside)
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
        self.ns.run(["chown", "root:director", inside], check=True)
        path.chmod(0o640)

    def processes_of(self, unit: str = "director.service",
                     slice_: str = "system.slice") -> list[tuple[int, str]]:
        """Processes left in the unit's cgroup: (host pid, command line)."""
        group = self.ns.cgroup / slice_ / unit
        found = []
        for procs in group.rglob("cgroup.procs") if group.exists() else []:
            for pid in procs.read_text().split():
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                found.append((int(pid), cmdline.replace(b"\0", b" ").decode()))
        return found

    def sandboxed(self, fragment: str) -> list[tuple[int, str]]:
        """Processes of director-stdio@ units whose command line holds ``fragment``: (host
        pid, unit)."""
        found = []
        for procs in (self.ns.cgroup / "system.slice").glob(
                "system-director*stdio.slice/director-stdio@*.service/**/cgroup.procs"):
            unit = next(part for part in procs.parts if part.startswith("director-stdio@"))
            for pid in procs.read_text().split():
                with contextlib.suppress(OSError):
                    if fragment.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                        found.append((int(pid), unit))
        return found

    def status_of(self, host_pid: int) -> dict[str, str]:
        """/proc/PID/status of a process of the namespace, as a dict."""
        lines = Path(f"/proc/{host_pid}/status").read_text().splitlines()
        return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def host_layout(ns: SystemdNamespace, uid: int, gid: int) -> str:
    """The namespace as a Debian host with the package installed: this interpreter and
    virtualenv, the checkout, the accounts (``director`` as ``uid``:``gid``), the units
    verbatim, the stdio sandbox set up; the interpreter's path inside."""
    python = python_layout(ns)
    ns.bind_read_only(str(CHECKOUT), str(CHECKOUT_INSIDE))
    ns.add_file("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
                f"director:x:{uid}:{gid}:Director:/var/lib/director:/usr/sbin/nologin\n"
                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    ns.add_file("/etc/group", f"root:x:0:\ndirector:x:{gid}:\nnogroup:x:65534:\n"
                "director-stdio:x:989:\n")
    ns.add_file("/etc/nsswitch.conf", "passwd: files\ngroup: files\nshadow: files\n"
                "hosts: files dns\n")
    ns.add_file("/etc/machine-id", os.urandom(16).hex() + "\n", 0o444)
    ns.add_file("/etc/hostname", "director-test\n")
    ns.add_file("/etc/hosts", "127.0.0.1 localhost director-test\n::1 localhost\n")
    for name in ("resolv.conf", "ld.so.cache"):
        if Path("/etc", name).exists():
            shutil.copyfile(Path("/etc", name), ns.workdir / "etc" / name)
    ns.add_symlink("/etc/os-release", "../usr/lib/os-release")
    # Boot no further than basic.target: director.service needs nothing more.
    ns.add_symlink("/etc/systemd/system/default.target", "/lib/systemd/system/basic.target")
    for unit in (UNIT, TEMPLATE, SANDBOX_SOCKET, SANDBOX_UNIT):  # verbatim
        ns.add_file(f"/etc/systemd/system/{unit.name}", unit.read_text())
    # The stdio sandbox as the package installs it: the socket enabled, the supervisor where
    # the unit runs it, the cache directory made by systemd-tmpfiles at boot.
    ns.add_symlink(f"/etc/systemd/system/sockets.target.wants/{SANDBOX_SOCKET.name}",
                   f"/etc/systemd/system/{SANDBOX_SOCKET.name}")
    ns.add_symlink("/usr/lib/director/stdio-supervisor",
                   str(CHECKOUT_INSIDE / SUPERVISOR.relative_to(CHECKOUT)))
    ns.add_file("/usr/lib/tmpfiles.d/director.conf", SANDBOX_TMPFILES.read_text())
    return python


@pytest.fixture(scope="module")
def box(postgres: PostgresServer) -> Iterator[Box]:
    try:
        check_capability()
        ns = SystemdNamespace()
    except CannotBoot as reason:
        skip_or_fail(str(reason))
    try:
        uid, gid = database_layout(ns, postgres)
        python = host_layout(ns, uid, gid)
        boot_seconds = ns.boot()
        print(f"\nsystemd booted to basic.target in {boot_seconds:.2f} s")
    except CannotBoot as reason:
        ns.destroy()
        skip_or_fail(str(reason))
    except BaseException:
        ns.destroy()
        raise
    try:
        yield Box(ns, python)
    finally:
        ns.destroy()
        if START_TIMES:
            print(f"\nsystemctl start -> active: {', '.join(f'{t:.2f}' for t in START_TIMES)} s "
                  f"(median {statistics.median(START_TIMES):.2f} s)")


def skip_or_fail(reason: str) -> NoReturn:
    message = f"cannot boot systemd in namespaces here: {reason}"
    if os.environ.get("DIRECTOR_REQUIRE_SYSTEMD_BOOT") == "1":
        pytest.fail(message)
    pytest.skip(message)


INSTANCE = "director@second.service"


@pytest.fixture
def director(box: Box, migrated_url: str) -> Iterator[Box]:
    """This test's port and database; the units are stopped and reset afterwards."""
    box.port = free_port()
    box.database_url = inside_url(migrated_url)
    yield box
    for unit in ("director.service", INSTANCE):
        box.systemctl("stop", unit)
        box.systemctl("reset-failed", unit)


def production_env(box: Box, **extra: str) -> dict[str, str]:
    return {"NODE_ENV": "production", "DATABASE_URL": box.database_url,
            "BETTER_AUTH_SECRET": SECRET, "PORT": str(box.port), "HOST": "127.0.0.1",
            "BASE_URL": f"http://127.0.0.1:{box.port}", "SHUTDOWN_TIMEOUT_SECONDS": "5",
            **extra}


def start(box: Box, unit: str = "director.service"
          ) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = box.systemctl("start", unit, timeout=seconds(unit_setting("TimeoutStartSec")) + 30)
    return result, time.monotonic() - started


def stop(box: Box, unit: str = "director.service") -> float:
    timeout_stop = seconds(unit_setting("TimeoutStopSec"))
    started = time.monotonic()
    result = box.systemctl("stop", unit, timeout=timeout_stop + 30)
    assert result.returncode == 0, result.stderr
    return time.monotonic() - started


def request(port: int, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        sent = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("content-type", "application/json")
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        connection.close()


def rpc_result(body: bytes) -> dict[str, Any]:
    """A JSON body, or the last ``data:`` event of an SSE body."""
    text = body.decode()
    if text.lstrip().startswith("{"):
        return dict(json.loads(text))
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    return dict(json.loads(events[-1]))


def wait_healthy(box: Box, timeout: float = 20.0) -> float:
    """Seconds until /api/health answers 200 through the port."""
    started = time.monotonic()
    body = b""
    while time.monotonic() - started < timeout:
        try:
            status, _, body = request(box.port, "GET", "/api/health")
        except OSError as error:
            status, body = 0, str(error).encode()
        if status == 200:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"health never became 200 (last {body!r})" + diagnostics(box))


def diagnostics(box: Box, unit: str = "director.service") -> str:
    status = box.systemctl("status", unit).stdout
    journal = box.ns.run(["journalctl", "--no-pager", "-n", "60", "-u", unit]).stdout
    return f"\n--- systemctl status\n{status}\n--- journal\n{journal}"


def assert_hardened(box: Box, host_pid: int) -> None:
    """The unit's sandbox is really in force on that process (not silently unsupported)."""
    status = box.status_of(host_pid)
    assert status["NoNewPrivs"] == "1", status
    assert status["Seccomp"] == "2", status  # filter mode: SystemCallFilter=
    assert int(status["CapBnd"], 16) == 0 and int(status["CapEff"], 16) == 0, status
    assert status["Uid"].split()[0] != "0", status


# --- the tests ----------------------------------------------------------------------------


def test_unit_verifies(box: Box) -> None:
    for unit in (UNIT, TEMPLATE, SANDBOX_SOCKET):
        result = box.ns.run(["systemd-analyze", "verify", f"/etc/systemd/system/{unit.name}"])
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result
    result = box.ns.run(["systemd-analyze", "security", "--no-pager", "director-stdio@0.service"])
    print("\n" + result.stdout.strip().splitlines()[-1])
    result = box.ns.run(["systemd-analyze", "security", "--no-pager", "director.service"])
    print("\n" + result.stdout.strip().splitlines()[-1])


def test_start_waits_for_ready_then_health_and_clean_stop(director: Box) -> None:
    box = director
    box.write_env(production_env(box))
    cursor = box.cursor()
    result, elapsed = start(box)
    assert result.returncode == 0, result.stderr + diagnostics(box)
    # Type=notify: `systemctl start` returned because READY=1 arrived, which the daemon sends
    # once the port listens (before the database is up: health may still say 503 with why).
    status, _, body = request(box.port, "GET", "/api/health")
    assert status in (200, 503), body
    healthy = wait_healthy(box) + elapsed
    state = box.show("ActiveState", "SubState", "StatusText", "NRestarts", "MainPID",
                     "WatchdogTimestampMonotonic", "ActiveEnterTimestampMonotonic",
                     "InactiveExitTimestampMonotonic")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    # STATUS=serving follows once everything has started, a moment after health says 200.
    assert wait_for(lambda: box.show("StatusText")["StatusText"] == "serving"), \
        box.show("StatusText")
    assert int(state["WatchdogTimestampMonotonic"]) > 0, "no WATCHDOG=1 received"
    assert state["NRestarts"] == "0"
    in_systemd = (int(state["ActiveEnterTimestampMonotonic"])
                  - int(state["InactiveExitTimestampMonotonic"])) / 1e6
    START_TIMES.append(elapsed)
    print(f"\nsystemctl start -> active: {elapsed:.2f} s (systemd's own timestamps: "
          f"{in_systemd:.2f} s); -> /api/health 200: {healthy:.2f} s")
    # The daemon runs as the unit's account, sandboxed, with its state directory.
    [(main_pid, command)] = [(pid, cmd) for pid, cmd in box.processes_of()]
    assert "/usr/bin/director serve" in command
    assert_hardened(box, main_pid)
    owner = box.ns.run(["stat", "-c", "%U %a", "/var/lib/director"]).stdout.split()
    assert owner == ["director", "700"], owner

    stop_seconds = stop(box)
    print(f"systemctl stop: {stop_seconds:.2f} s")
    assert stop_seconds < seconds(unit_setting("TimeoutStopSec")) / 2, diagnostics(box)
    after = box.show("ActiveState", "Result")
    assert after == {"ActiveState": "inactive", "Result": "success"}, str(after) + diagnostics(box)
    assert box.processes_of() == []
    journal = box.wait_journal(cursor, "Stopped director.service")
    assert "stopped" in journal.splitlines(), journal  # the daemon's drained exit, logged


def test_start_is_repeatable_for_timing(director: Box) -> None:
    """Two more start/stop cycles, for the start -> active median."""
    box = director
    box.write_env(production_env(box))
    for _ in range(2):
        result, elapsed = start(box)
        assert result.returncode == 0, result.stderr + diagnostics(box)
        START_TIMES.append(elapsed)
        wait_healthy(box)
        stop(box)


def start_with_stdio(box: Box) -> str:
    """Start the daemon with stdio servers allowed; the journal's cursor before the start.
    Stdio servers are refused in production (the rails); development allows them on request."""
    box.write_env(production_env(box, NODE_ENV="development",
                                 DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true"))
    cursor = box.cursor()
    result, _ = start(box)
    assert result.returncode == 0, result.stderr + diagnostics(box)
    wait_healthy(box)
    return cursor


def test_stdio_upstream_runs_under_the_hardening_and_dies_with_the_unit(director: Box) -> None:
    box = director
    cursor = start_with_stdio(box)
    client = Client(box.port, [{"name": "reference", "type": "stdio", "command": box.python,
                                "args": [str(REFERENCE_INSIDE)]}])
    answer = client.call("echo", {"text": "hardened"})
    assert answer.get("result", {}).get("content", [{}])[0].get("text") == "hardened", \
        str(answer) + diagnostics(box)
    # In a director-stdio@ unit of its own (director-stdio.socket is enabled), as its user.
    assert not [pid for pid, cmd in box.processes_of() if str(REFERENCE_INSIDE) in cmd]
    children = box.sandboxed(str(REFERENCE_INSIDE))
    assert len(children) == 1, box.processes_of()
    assert_hardened(box, children[0][0])

    stop_seconds = stop(box)
    print(f"\nsystemctl stop with a stdio upstream running: {stop_seconds:.2f} s")
    assert stop_seconds < seconds(unit_setting("TimeoutStopSec")) / 2, diagnostics(box)
    assert box.processes_of() == []
    assert wait_for(lambda: not box.sandboxed(str(REFERENCE_INSIDE))), "the sandbox outlived it"
    after = box.show("ActiveState", "Result")
    assert after == {"ActiveState": "inactive", "Result": "success"}, str(after) + diagnostics(box)
    journal = box.wait_journal(cursor, "Stopped director.service")
    # KillMode=mixed: the daemon stopped its child itself; systemd's final SIGKILL found none.
    assert "[reference] pid" in journal and "Killing process" not in journal, journal


def wait_for(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Client:
    """A signed-up user's playbook and one MCP session on it (raw HTTP to ``port``);
    ``diagnose()`` says what the daemon did when an answer is not the one expected."""

    def __init__(self, port: int, servers: list[dict[str, Any]],
                 diagnose: Callable[[], str] = str) -> None:
        self.port = port
        self.diagnose = diagnose
        status, _, body = request(port, "POST", "/api/v1/auth/signup",
                                  {"email": "ops@example.com",
                                   "password": "correct horse battery"})
        assert status == 201, body
        key = json.loads(body)["api_key"]["key"]
        auth = {"x-api-key": key}
        assert request(port, "POST", "/api/v1/playbooks", {"name": "Box"}, auth)[0] == 201
        for server in servers:
            status, _, body = request(port, "POST", "/api/v1/playbooks/box/servers",
                                      server, auth)
            assert status == 201, body
        self.headers = {"accept": ACCEPT, "x-api-key": key}
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "raw", "version": "1"}}}
        status, headers, body = request(port, "POST", "/playbooks/box/mcp", init, self.headers)
        assert status == 200, body
        self.headers["mcp-session-id"] = headers["mcp-session-id"]
        request(port, "POST", "/playbooks/box/mcp",
                {"jsonrpc": "2.0", "method": "notifications/initialized"}, self.headers)

    def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        status, _, body = request(self.port, "POST", "/playbooks/box/mcp",
                                  {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                   "params": {"name": tool, "arguments": arguments}},
                                  self.headers)
        assert status == 200, body
        return rpc_result(body)

    def outcome(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        answer = self.call(tool, arguments)
        assert "result" in answer, str(answer) + self.diagnose()
        return dict(json.loads(answer["result"]["content"][0]["text"]))


def test_a_hostile_stdio_server_stays_in_its_sandbox(director: Box) -> None:
    """Under the packaged units, a stdio server that tries to read the daemon's secrets, reach
    its database, write outside its directory, fork without limit and allocate gigabytes is
    refused every time; the daemon and the other servers go on; the journal says so."""
    box = director
    cursor = start_with_stdio(box)
    hostile = {"type": "stdio", "command": "/usr/bin/python3", "args": [str(HOSTILE_INSIDE)]}
    client = Client(box.port, [{"name": "hostile", "prefix": "h1_", **hostile},
                               {"name": "neighbour", "prefix": "h2_", **hostile},
                               {"name": "reference", "type": "stdio", "command": box.python,
                                "args": [str(REFERENCE_INSIDE)]}], lambda: diagnostics(box))
    daemon_pid = box.show("MainPID")["MainPID"]
    socket_path = f"{POSTGRES_INSIDE}/.s.PGSQL.{urlsplit(box.database_url).port or 5432}"
    targets = {"reads": ["/etc/director/director.env", "/var/lib/director", "/etc/shadow",
                         "/var/cache/director-stdio"],
               "connects": [socket_path, "/run/director-stdio.sock", "/run/systemd/private"],
               "writes": ["/etc", "/var/lib/director", str(CHECKOUT_INSIDE), "/usr/lib",
                          "/var/cache/director-stdio", "/tmp", "$HOME"],
               "pid": daemon_pid}
    probe = client.outcome("h1_probe", {"targets": targets})
    print(f"\nhostile probe: {json.dumps(probe, indent=1)}")
    assert all(value.startswith("denied") for value in probe["reads"].values()), probe
    assert all(value.startswith("denied") for value in probe["connects"].values()), probe
    allowed = {path for path, value in probe["writes"].items() if value == "ALLOWED"}
    assert allowed == {"/tmp", "$HOME"}, probe  # its private /tmp and its own directory
    assert probe["home"].startswith("/var/cache/director-stdio/"), probe
    assert probe["daemon_environ"].startswith("denied"), probe
    assert probe["foreign_processes"] == 0 and probe["signalable"] <= 1, probe  # +supervisor
    assert not list(box.ns.path("/tmp").glob("hostile-*")), "its /tmp is the host's"
    neighbour = client.outcome("h2_probe", {})
    assert neighbour["uid"] != probe["uid"] and neighbour["home"] != probe["home"], neighbour

    forked = client.outcome("h1_fork", {"limit": 100000})
    print(f"fork: {forked}")
    assert forked["error"] is not None and forked["forked"] < 512, forked
    allocated = client.outcome("h1_allocate", {"mebibytes": 4096})
    print(f"allocate: {allocated}")
    assert allocated["error"] == "MemoryError" and allocated["allocated_mib"] < 1024, allocated

    # The daemon and the other servers are unaffected.
    echo = client.call("echo", {"text": "still here"})
    assert echo["result"]["content"][0]["text"] == "still here", echo
    assert client.outcome("h2_fork", {"limit": 10}) == {"forked": 10, "error": None}
    assert box.show("MainPID", "NRestarts") == {"MainPID": daemon_pid, "NRestarts": "0"}
    wait_healthy(box)
    journal = box.wait_journal(cursor, "hostile allocate")
    assert "stdio sandbox: systemd" in journal, journal
    assert "[hostile] hostile probe:" in journal and "[hostile] hostile fork:" in journal, journal
    assert "[hostile] hostile allocate:" in journal, journal


def test_the_sandbox_units_limits(director: Box) -> None:
    """The unit's cgroup limits are set on each server's unit. Where the kernel's cgroup2
    hierarchy has the memory controller (a Debian 12 host: unified), an allocation past
    MemoryMax= (STDIO_MEMORY_MAX set above it) gets the server killed, the call fails saying
    so, the log says why, and the server is restarted. This machine's hierarchy may lack it
    (a hybrid cgroup v1 host, as in some containers): then only the rlimits hold, tested above."""
    box = director
    box.write_env(production_env(box, NODE_ENV="development", STDIO_MEMORY_MAX="4G",
                                 DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true"))
    cursor = box.cursor()
    result, _ = start(box)
    assert result.returncode == 0, result.stderr + diagnostics(box)
    wait_healthy(box)
    client = Client(box.port, [{"name": "hostile", "type": "stdio", "command": "/usr/bin/python3",
                                "args": [str(HOSTILE_INSIDE)]}], lambda: diagnostics(box))
    assert "result" in client.call("probe", {})
    [(_, unit)] = box.sandboxed(str(HOSTILE_INSIDE))
    limits = box.show("MemoryMax", "MemorySwapMax", "TasksMax", "CPUQuotaPerSecUSec",
                      "DynamicUser", "User", unit=unit.replace("\\x2d", "-"))
    assert limits == {"MemoryMax": str(1024 ** 3), "MemorySwapMax": "0", "TasksMax": "512",
                      "CPUQuotaPerSecUSec": "1s", "DynamicUser": "yes",
                      "User": f"director-stdio-{unit.split('@')[1].removesuffix('.service')}"}, \
        limits
    controllers = (box.ns.cgroup / "cgroup.controllers").read_text().split()
    print(f"\ncgroup controllers available to the sandbox: {controllers or 'none'}")
    if "memory" not in controllers:
        return
    answer = client.call("allocate", {"mebibytes": 4096})
    assert "killed by signal 9 (SIGKILL)" in json.dumps(answer), answer
    journal = box.wait_journal(cursor, "out-of-memory killer")
    assert "[hostile] director-stdio: killed by the out-of-memory killer" in journal, journal
    assert wait_for(lambda: "result" in client.call("probe", {})), "not restarted"


EVERYTHING = CHECKOUT / "tests" / "npm" / "node_modules" / "@modelcontextprotocol" / \
    "server-everything" / "dist" / "index.js"


def test_a_node_stdio_server_runs_in_the_sandbox(director: Box) -> None:
    """node (V8: large reservations, JIT, threads) under the sandbox's seccomp filter, rlimits
    and cgroup limits: the reference server-everything lists and calls its tools."""
    box = director
    start_with_stdio(box)
    inside = CHECKOUT_INSIDE / EVERYTHING.relative_to(CHECKOUT)
    client = Client(box.port, [{"name": "everything", "type": "stdio", "command": "node",
                                "args": [str(inside), "stdio"]}], lambda: diagnostics(box))
    answer = client.call("echo", {"message": "from node"})
    assert "from node" in json.dumps(answer.get("result")), str(answer) + diagnostics(box)
    assert box.sandboxed(str(inside)), "server-everything is not in a director-stdio@ unit"


def broken_start(box: Box) -> tuple[subprocess.CompletedProcess[str], float, str]:
    box.write_env(production_env(box, DANGEROUSLY_ENABLE_SEEDING="true"))
    cursor = box.cursor()
    result, elapsed = start(box)
    return result, elapsed, cursor


def test_configuration_error_fails_the_start_without_restarts(director: Box) -> None:
    box = director
    result, elapsed, cursor = broken_start(box)
    assert result.returncode != 0, "systemctl start succeeded with a refused configuration"
    print(f"\nsystemctl start failed after {elapsed:.2f} s: {result.stderr.strip()}")
    state = box.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert state == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "78",
                     "NRestarts": "0"}, str(state) + diagnostics(box)
    # RestartPreventExitStatus=78: nothing happens after RestartSec.
    time.sleep(seconds(unit_setting("RestartSec")) + 1)
    state = box.show("ActiveState", "NRestarts", "ExecMainStatus")
    assert state == {"ActiveState": "failed", "NRestarts": "0", "ExecMainStatus": "78"}, state
    journal = box.wait_journal(cursor, "Failed to start")
    fatal = [line for line in journal.splitlines() if "FATAL" in line]
    assert fatal == ["FATAL: DANGEROUSLY_ENABLE_SEEDING cannot be enabled in production. Remove "
                     "it from the environment, or set NODE_ENV=development for single-user "
                     "local development."], journal
    assert journal.count("Started director.service") == 0, journal


def test_configuration_error_is_logged_at_error_priority(director: Box) -> None:
    box = director
    result, _, cursor = broken_start(box)
    assert result.returncode != 0
    assert "FATAL" in box.wait_journal(cursor, "Failed to start")
    errors = box.journal(cursor, max_priority=3)  # journalctl -p err
    assert "Failed to start director.service" in errors  # systemd's own line, at priority 3
    assert "FATAL" in errors, errors


def test_template_instance(director: Box) -> None:
    box = director
    box.ns.path("/etc/director/director.env").unlink(missing_ok=True)
    box.write_env(production_env(box), name="second")
    result, _ = start(box, INSTANCE)
    assert result.returncode == 0, result.stderr + diagnostics(box, INSTANCE)
    wait_healthy(box)
    owner = box.ns.run(["stat", "-c", "%U %a", "/var/lib/director-second"]).stdout.split()
    assert owner == ["director", "700"], owner
    stop(box, INSTANCE)
    assert box.processes_of(INSTANCE, "system.slice/system-director.slice") == []


def test_template_instance_ignores_the_default_instance_env_file(director: Box) -> None:
    box = director
    box.write_env(production_env(box, DANGEROUSLY_ENABLE_SEEDING="true"))  # director.env
    box.write_env(production_env(box), name="second")
    result, _ = start(box, INSTANCE)
    assert result.returncode == 0, result.stderr + diagnostics(box, INSTANCE)


def test_template_instance_logs_under_its_syslog_identifier(director: Box) -> None:
    box = director
    box.ns.path("/etc/director/director.env").unlink(missing_ok=True)
    box.write_env(production_env(box), name="second")
    cursor = box.cursor()
    result, _ = start(box, INSTANCE)
    assert result.returncode == 0, result.stderr + diagnostics(box, INSTANCE)
    wait_healthy(box)
    stop(box, INSTANCE)
    box.wait_journal(cursor, "Stopped director@second.service", unit=INSTANCE)
    out = box.ns.run(["journalctl", "--no-pager", "-o", "json", "-u", INSTANCE,
                      f"--after-cursor={cursor}"]).stdout
    healthy = [entry for entry in map(json.loads, out.splitlines())
               if "director is healthy" in str(entry.get("MESSAGE"))]
    assert healthy, out
    # what `journalctl -t director-second` selects on
    assert healthy[0].get("SYSLOG_IDENTIFIER") == "director-second", healthy[0]
