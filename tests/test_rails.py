"""The security rails hold at every start, and the DANGEROUSLY_* flags cannot turn a daemon
that anyone can sign up to into remote code execution.

* A server stored while a flag was on does not run once a restarted daemon is without it: it
  is never spawned or connected to, its tools are absent, its refusal is logged once, the API
  shows it as refused and ``director doctor`` lists it.
* The server flags need a daemon reachable from this host only, or a closed sign-up; every
  dangerous setting is logged at start; a root daemon runs stdio servers as ``STDIO_USER``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.accounts_helpers import Account, call, sign_up
from tests.harness import (
    DIRECTOR,
    Daemon,
    base_environment,
    free_port,
    local_servers,
    make_temp_dir,
)
from tests.test_mcp_gateway import HTTP_REFERENCE, RAW, Gateway, parse_response
from tests.test_mcp_modern import Instance

StartDaemon = Callable[..., Daemon]
STDIO_FLAG = "DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS"
INSECURE_FLAG = "DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS"
OWNER = "rails@example.com"
REFUSED = "not started: refused by configuration"


@attrs.frozen
class Stored:
    """A server stored under ``flag``, and how to tell whether it ever ran."""

    flag: str
    server: dict[str, Any]
    reason: str
    ran: Callable[[], bool]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """Where a stdio server (nobody, when the suite runs as root) may write."""
    directory = make_temp_dir("director-test-rails-", 0o777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def stdio_shell(shared_dir: Path) -> Stored:
    """``/bin/sh -c`` that leaves a marker, then runs a real MCP server: what the issue saw."""
    marker = shared_dir / "ran"
    return Stored(STDIO_FLAG, {
        "name": "shell", "type": "stdio", "command": "/bin/sh",
        "args": ["-c", 'touch "$0" && exec "$1" "$2"', str(marker), sys.executable, RAW]},
        f"refused by configuration: stdio servers need {STDIO_FLAG}=true", marker.exists)


@pytest.fixture
def plain_http() -> Iterator[Stored]:
    """The SDK's reference server on http://127.0.0.1, which logs every request it gets."""
    port = free_port()
    with local_servers([[sys.executable, HTTP_REFERENCE, "--transport", "streamable-http",
                         "--port", str(port)]], [port]):
        def requested() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/log",
                                        timeout=5) as answer:
                return any(entry["path"] != "/debug/log" for entry in json.load(answer))

        yield Stored(INSECURE_FLAG, {"name": "plain", "type": "http",
                                     "url": f"http://127.0.0.1:{port}/mcp"},
                     f"refused by configuration: plain-http servers need {INSECURE_FLAG}=true",
                     requested)


def store(daemon: Daemon, server: dict[str, Any]) -> Account:
    """A playbook ``ref`` with a prompt of its own and ``server``."""
    daemon.wait_healthy()
    owner = sign_up(daemon, OWNER)
    assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Ref"}, key=owner.key)[0] == 201
    assert call(daemon, "POST", "/api/v1/playbooks/ref/prompts",
                {"name": "hello", "body": "Hello."}, key=owner.key)[0] == 201
    status, _, body = call(daemon, "POST", "/api/v1/playbooks/ref/servers", server,
                           key=owner.key)
    assert status == 201, body
    assert body["status"] == {"state": "allowed"}
    return owner


def listed(daemon: Daemon, owner: Account) -> dict[str, list[str]]:
    """What a handshake-era session and a stateless (2026-07-28) request are offered."""
    gateway = Gateway(daemon, owner, Path("/nonexistent"))
    session = gateway.open_session()
    found: dict[str, list[str]] = {}
    for request_id, (method, key) in enumerate((("tools/list", "tools"),
                                                ("prompts/list", "prompts"),
                                                ("resources/list", "resources")), 2):
        status, _, body = gateway.post({"jsonrpc": "2.0", "id": request_id, "method": method},
                                       session)
        assert status == 200, body
        found[method] = [entry.get("name", "") for entry in parse_response(body)["result"][key]]
    _, _, body = gateway.post({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                               "params": {"name": "echo", "arguments": {"text": "x"}}}, session)
    error = parse_response(body).get("error")
    found["tools/call echo"] = [] if error is None else [error["message"]]
    status, _, answer = Instance(daemon, owner).post("tools/list")
    assert status == 200, answer
    found["modern tools/list"] = [tool["name"] for tool in answer["result"]["tools"]]
    return found


def refused_servers(**env: str) -> dict[str, Any]:
    result = subprocess.run([DIRECTOR, "doctor", "--json"], env=base_environment(**env),
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=90, check=False)
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    return dict(checks["refused-servers"])


@pytest.mark.parametrize("kind", ["stdio_shell", "plain_http"])
def test_a_server_stored_under_a_flag_does_not_run_once_it_is_off(
        kind: str, request: pytest.FixtureRequest, start_daemon: StartDaemon,
        migrated_url: str) -> None:
    stored: Stored = request.getfixturevalue(kind)
    name = stored.server["name"]
    flagged = start_daemon(DATABASE_URL=migrated_url, **{stored.flag: "true"})
    owner = store(flagged, stored.server)
    assert flagged.terminate() == 0

    daemon = start_daemon(DATABASE_URL=migrated_url)
    daemon.wait_healthy()
    for _ in range(3):  # several sessions of both eras: still nothing started, one log line
        assert listed(daemon, owner) == {
            "tools/list": [], "prompts/list": ["hello"], "resources/list": [],
            "tools/call echo": ["unknown tool: echo"], "modern tools/list": []}
    assert not stored.ran()
    refusals = [record for record in daemon.records() if REFUSED in record.get("msg", "")]
    assert len(refusals) == 1, refusals
    assert refusals[0]["level"] == 40 and refusals[0]["server"] == name
    assert stored.reason in refusals[0]["msg"] and stored.flag in refusals[0]["msg"]

    refused = {"state": "refused", "reason": stored.reason}
    _, _, playbook = call(daemon, "GET", "/api/v1/playbooks/ref", key=owner.key)
    assert [server["status"] for server in playbook["servers"]] == [refused]
    _, _, server = call(daemon, "GET", f"/api/v1/playbooks/ref/servers/{name}", key=owner.key)
    assert server["status"] == refused

    check = refused_servers(DATABASE_URL=migrated_url, PORT=str(free_port()))
    assert check["status"] == "warn", check
    assert check["details"] == [f"playbook ref ({OWNER}) server {name}: {stored.reason}"]
    assert stored.flag in check["details"][0] and check["fix"]

    # The same server with the flag back on does run: what the test looks for is real.
    assert daemon.terminate() == 0
    again = start_daemon(DATABASE_URL=migrated_url, **{stored.flag: "true"})
    again.wait_healthy()
    assert "echo" in listed(again, owner)["tools/list"]
    assert stored.ran()
    assert refused_servers(DATABASE_URL=migrated_url, PORT=str(free_port()),
                           **{stored.flag: "true"})["status"] == "ok"
    assert again.terminate() == 0  # before the upstream it holds a stream to stops


# --- who may turn the flags on ------------------------------------------------------------------


def fatal_start(start_daemon: StartDaemon, argv: list[str] | None = None, **env: str) -> str:
    """The daemon's output after it refused to start with status 78."""
    daemon = start_daemon(argv, **env)
    assert daemon.wait_exit() == 78, daemon.output()
    return daemon.output()


@pytest.mark.parametrize(("env", "shown"), [
    ({"HOST": "0.0.0.0"}, "HOST=0.0.0.0, BASE_URL host localhost"),  # noqa: S104
    ({"BASE_URL": "https://director.example.com"}, "BASE_URL host director.example.com"),
])
def test_server_flags_need_a_daemon_only_this_host_can_use(
        start_daemon: StartDaemon, migrated_url: str, env: dict[str, str], shown: str) -> None:
    for flag in (STDIO_FLAG, INSECURE_FLAG):
        output = fatal_start(start_daemon, DATABASE_URL=migrated_url, **{flag: "true"}, **env)
        fatal = [line for line in output.splitlines() if line.startswith("FATAL:")]
        assert len(fatal) == 1, output
        assert fatal[0].startswith(f"FATAL: {flag} cannot be enabled on a daemon that anyone "
                                   "can sign up to") and shown in fatal[0]
        assert "HOST=127.0.0.1 and a loopback BASE_URL" in fatal[0]
        assert "WAITLIST_ENABLED=true" in fatal[0]


def test_server_flags_with_a_closed_signup_or_a_loopback_daemon(
        start_daemon: StartDaemon, migrated_url: str) -> None:
    flags = {STDIO_FLAG: "true", INSECURE_FLAG: "true", "DATABASE_URL": migrated_url}
    start_daemon(BASE_URL="https://director.example.com", WAITLIST_ENABLED="true",
                 **flags).wait_healthy()
    start_daemon(BASE_URL="http://127.0.0.1:3673", **flags).wait_healthy()


def test_a_listener_given_on_the_command_line_is_checked_too(
        start_daemon: StartDaemon, migrated_url: str) -> None:
    port = free_port()
    output = fatal_start(start_daemon, [DIRECTOR, "serve", "--listen",
                                        f"tcp:{port}:interface=0.0.0.0"],
                         PORT=str(port), DATABASE_URL=migrated_url, **{STDIO_FLAG: "true"})
    assert "cannot be enabled on a listener that anyone can sign up through" in output
    assert "bound to 0.0.0.0" in output


def test_every_dangerous_setting_is_logged_at_start_and_by_config_check(
        start_daemon: StartDaemon, migrated_url: str) -> None:
    env = {STDIO_FLAG: "true", INSECURE_FLAG: "true", "DANGEROUSLY_ENABLE_SEEDING": "true",
           "METRICS_LISTEN": f"0.0.0.0:{free_port()}", "METRICS_ALLOW_PUBLIC": "true",
           "DATABASE_URL": migrated_url}
    daemon = start_daemon(**env)
    daemon.wait_healthy()
    warned = [record for record in daemon.records()
              if record.get("msg", "").startswith("dangerous setting: ")]
    assert all(record["level"] == 40 for record in warned)
    expected = [STDIO_FLAG, INSECURE_FLAG, "DANGEROUSLY_ENABLE_SEEDING", "METRICS_ALLOW_PUBLIC"]
    if os.geteuid() != 0:
        expected.insert(1, "stdio servers run as the daemon's own account")
    logged = [record["msg"] for record in warned]
    assert len(logged) == len(expected), logged
    for line, what in zip(logged, expected, strict=True):
        assert line.startswith(f"dangerous setting: {what}"), (line, what)
    checked = subprocess.run([DIRECTOR, "config", "check"], env=base_environment(**env),
                             capture_output=True, text=True, timeout=60, check=True)
    assert [line.removeprefix("WARNING: ") for line in checked.stdout.splitlines()
            if line.startswith("WARNING: ")] == logged


# --- who stdio servers run as -------------------------------------------------------------------


def test_a_root_daemon_runs_stdio_servers_as_nobody_without_groups(
        start_daemon: StartDaemon, migrated_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url, **{STDIO_FLAG: "true"})
    owner = store(daemon, {"name": "raw", "type": "stdio", "command": sys.executable,
                           "args": [RAW]})
    gateway = Gateway(daemon, owner, Path("/nonexistent"))
    session = gateway.open_session()

    def tool(name: str) -> str:
        _, _, body = gateway.post({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                   "params": {"name": name, "arguments": {}}}, session)
        return str(parse_response(body)["result"]["content"][0]["text"])

    pid = int(tool("pid"))
    environment = json.loads(tool("env"))
    status = {key: value.split() for key, _, value in
              (line.partition(":") for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines()) if key in ("Uid", "Gid", "Groups")}
    if os.geteuid() != 0:  # a daemon that is not root runs them as itself
        assert status["Uid"] == [str(os.geteuid())] * 4
        return
    nobody = pwd.getpwnam("nobody")
    assert status == {"Uid": [str(nobody.pw_uid)] * 4, "Gid": [str(nobody.pw_gid)] * 4,
                      "Groups": []}
    home = f"/var/tmp/director-stdio-{nobody.pw_uid}"
    assert environment["HOME"] == home and environment["USER"] == "nobody"
    info = os.lstat(home)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == nobody.pw_uid
    assert stat.S_IMODE(info.st_mode) == 0o700


def test_stdio_user_root_is_refused(start_daemon: StartDaemon, migrated_url: str) -> None:
    output = fatal_start(start_daemon, DATABASE_URL=migrated_url, STDIO_USER="root")
    assert "STDIO_USER='root' is root (uid 0): stdio servers must never run as root" in output


def test_stdio_user_may_not_be_the_private_clusters_account(start_daemon: StartDaemon) -> None:
    """That cluster trusts its socket: a stdio server as its account would own the database."""
    state = make_temp_dir("director-test-rails-state-")
    try:
        from director.db.embedded import EmbeddedPostgres

        account = EmbeddedPostgres(state).server_account()
        if account is None:  # not root: no STDIO_USER in play, children run as the daemon
            assert os.geteuid() != 0
            return
        output = fatal_start(start_daemon, STATE_DIRECTORY=str(state),
                             STDIO_USER=account.pw_name, **{STDIO_FLAG: "true"})
        assert f"FATAL: STDIO_USER={account.pw_name} is also the account of the private " \
               "PostgreSQL cluster" in output
        assert not (state / "postgres" / "data").exists()  # refused before anything started
    finally:
        shutil.rmtree(state, ignore_errors=True)
