"""The daemon as operators run it: a real ``director serve`` process over real PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from director.db import migrate
from director.db.embedded import EmbeddedPostgres, find_server_binaries
from tests.harness import TWISTD, Daemon, free_port, make_temp_dir, query
from tests.test_config import TRICKY_DATABASE_URLS, assert_no_fragment

StartDaemon = Callable[..., Daemon]


@pytest.fixture
def state_directory() -> Iterator[Path]:
    path = make_temp_dir("director-test-state-")
    yield path
    cluster = EmbeddedPostgres(path)
    pid = cluster.running_postmaster()
    if pid is not None:
        os.kill(pid, signal.SIGQUIT)
        time.sleep(0.2)
    shutil.rmtree(path, ignore_errors=True)


# --- start, health, logs --------------------------------------------------------------------


def test_serves_health_with_an_external_database(start_daemon: StartDaemon,
                                                 migrated_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url)
    daemon.wait_healthy()
    status, headers, body = daemon.request("GET", "/api/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"

    running = daemon.wait_for_log("director gateway running on port")
    assert running["msg"] == f"director gateway running on port {daemon.port}"
    assert running["level"] == 30 and running["name"] == "gateway"
    assert abs(running["time"] - time.time() * 1000) < 120_000
    assert daemon.terminate() == 0
    daemon.wait_for_log("stopped")


def test_plain_twistd_plugin_serves_with_json_logs(start_daemon: StartDaemon,
                                                  migrated_url: str) -> None:
    daemon = start_daemon([TWISTD, "-n", "--pidfile=", "director"], DATABASE_URL=migrated_url)
    daemon.wait_healthy()
    assert daemon.wait_for_log("director gateway running on port")["level"] == 30
    # twistd's convention: exit by the stop signal itself (systemd counts SIGTERM as clean).
    assert daemon.terminate() in (0, -signal.SIGTERM)
    daemon.wait_for_log("stopped")


def test_refuses_an_unmigrated_database_naming_the_command(start_daemon: StartDaemon,
                                                          database_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=database_url)
    assert daemon.wait_exit() == 78  # EX_CONFIG: systemd does not restart it in a loop
    fatal = daemon.wait_for_log("FATAL")
    assert fatal["level"] == 60
    assert "run `director db upgrade`" in fatal["msg"]
    assert query(database_url, "SELECT to_regclass('director_schema')") == [(None,)]


def test_refuses_a_newer_schema(start_daemon: StartDaemon, migrated_url: str) -> None:
    query(migrated_url, "INSERT INTO director_schema VALUES (999, 'future')")
    daemon = start_daemon(DATABASE_URL=migrated_url)
    assert daemon.wait_exit() == 78
    assert "newer than this Director knows" in daemon.wait_for_log("FATAL")["msg"]


def test_database_down_at_start_then_recovers_without_restart(start_daemon: StartDaemon) -> None:
    cluster = EmbeddedPostgres(make_temp_dir("director-test-late-"), fast_and_unsafe=True)
    try:
        cluster.start()
        migrate.upgrade(cluster.dsn())
        cluster.stop()
        daemon = start_daemon(DATABASE_URL=cluster.url())
        body = daemon.wait_for_health(503)
        assert body["status"] == "unavailable" and body["reason"].startswith("database:")
        assert "retrying" in daemon.wait_for_log("database unreachable")["msg"]
        cluster.start()
        daemon.wait_healthy()

        # And a restart while serving: 503 while down, 200 again afterwards, same process.
        cluster.stop()
        assert daemon.wait_for_health(503)["reason"].startswith("database:")
        cluster.start()
        daemon.wait_healthy()
        assert daemon.process.poll() is None
        assert daemon.terminate() == 0
    finally:
        cluster.stop()
        shutil.rmtree(cluster.state_directory, ignore_errors=True)


@pytest.mark.parametrize(("url", "fragments", "accepted"), TRICKY_DATABASE_URLS)
def test_database_passwords_never_reach_the_log(start_daemon: StartDaemon, url: str,
                                                fragments: tuple[str, ...], accepted: bool) -> None:
    daemon = start_daemon(DATABASE_URL=url.format(port=free_port()))
    if accepted:
        assert "Connection refused" in daemon.wait_for_log("database unreachable")["msg"]
        assert daemon.terminate() == 0
    else:
        assert daemon.wait_exit() == 78
        assert "DATABASE_URL=(unparseable DATABASE_URL)" in daemon.output()
    assert_no_fragment(daemon.output(), fragments)


# --- the embedded default -------------------------------------------------------------------


def test_embedded_default_first_and_later_starts(start_daemon: StartDaemon,
                                                 state_directory: Path) -> None:
    daemon = start_daemon(STATE_DIRECTORY=str(state_directory))
    daemon.wait_healthy()
    assert daemon.wait_for_log("created the private PostgreSQL cluster")
    assert daemon.wait_for_log("applied migration 0001_deployment")
    cluster = EmbeddedPostgres(state_directory)
    assert cluster.running_postmaster() is not None
    socket_directory = state_directory / "postgres" / "run"
    assert oct(socket_directory.stat().st_mode & 0o777) == "0o700"
    assert "listen_addresses" not in (state_directory / "postgres" / "data" /
                                      "postgresql.auto.conf").read_text()
    assert daemon.terminate() == 0
    assert cluster.running_postmaster() is None, "the private cluster outlived the daemon"

    again = start_daemon(STATE_DIRECTORY=str(state_directory))
    again.wait_healthy()
    assert "started" in again.wait_for_log("private PostgreSQL")["msg"]
    assert not any("created the private" in r.get("msg", "") for r in again.records())
    assert again.terminate() == 0


def test_killed_daemon_leaves_no_database_behind_and_restarts(start_daemon: StartDaemon,
                                                              state_directory: Path) -> None:
    daemon = start_daemon(STATE_DIRECTORY=str(state_directory))
    daemon.wait_healthy()
    cluster = EmbeddedPostgres(state_directory)
    postmaster = cluster.running_postmaster()
    assert postmaster is not None
    daemon.process.send_signal(signal.SIGKILL)
    daemon.wait_exit()
    deadline = time.monotonic() + 10
    while cluster.running_postmaster() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.running_postmaster() is None, "postgres survived the daemon's SIGKILL"

    again = start_daemon(STATE_DIRECTORY=str(state_directory))
    again.wait_healthy()
    assert again.terminate() == 0


def test_orphaned_database_is_adopted_and_stopped(start_daemon: StartDaemon,
                                                  state_directory: Path) -> None:
    # An orphan: a postmaster whose recorded owner is dead (its parent-death signal never came).
    orphan = EmbeddedPostgres(state_directory)
    orphan.start()
    orphan.owner_file.write_text("999999")
    pid = orphan.running_postmaster()

    daemon = start_daemon(STATE_DIRECTORY=str(state_directory))
    daemon.wait_healthy()
    assert "adopted" in daemon.wait_for_log("private PostgreSQL")["msg"]
    assert orphan.running_postmaster() == pid
    assert daemon.terminate() == 0
    deadline = time.monotonic() + 10
    while orphan.running_postmaster() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert orphan.running_postmaster() is None


def zombie_children(pid: int) -> list[int]:
    """Defunct children of ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if state == "Z" and int(parent) == pid:
            found.append(int(entry.name))
    return found


def stop_from_outside(cluster: EmbeddedPostgres, pid: int, how: str) -> None:
    if how == "pg_ctl":  # as the cluster's owner: pg_ctl refuses root
        owner = cluster.data_directory.stat().st_uid
        bindir = find_server_binaries()
        subprocess.run(["setpriv", f"--reuid={owner}", f"--regid={owner}", "--clear-groups",
                        str(bindir / "pg_ctl"), "stop", "-m", "fast", "-D",
                        str(cluster.data_directory)], check=True, capture_output=True, timeout=30)
    else:
        os.kill(pid, signal.Signals[how])


# (SIGTERM is PostgreSQL's "smart" shutdown: it waits for the daemon's connections to close.)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGQUIT", "pg_ctl"])
def test_a_database_stopped_from_outside_is_reaped_and_the_daemon_exits(
        start_daemon: StartDaemon, state_directory: Path, how: str) -> None:
    daemon = start_daemon(STATE_DIRECTORY=str(state_directory))
    daemon.wait_healthy()
    cluster = EmbeddedPostgres(state_directory)
    postmaster = cluster.running_postmaster()
    assert postmaster is not None
    stop_from_outside(cluster, postmaster, how)
    fatal = daemon.wait_for_log("the private PostgreSQL exited")
    assert fatal["level"] == 60 and "stop Director, not its database" in fatal["msg"]
    if how == "SIGKILL":
        assert "(killed by SIGKILL)" in fatal["msg"]
    # Logged once the exit was collected: no defunct postmaster, even while the daemon drains.
    assert postmaster not in zombie_children(daemon.process.pid)
    assert daemon.wait_exit() == 1  # systemd's Restart=on-failure starts both afresh
    assert sum("private PostgreSQL exited" in r.get("msg", "") for r in daemon.records()) == 1

    again = start_daemon(STATE_DIRECTORY=str(state_directory))
    again.wait_healthy()
    assert again.terminate() == 0


def test_cli_shares_the_running_daemons_database(start_daemon: StartDaemon,
                                                 state_directory: Path) -> None:
    import subprocess

    from tests.harness import DIRECTOR, base_environment

    environ = base_environment(STATE_DIRECTORY=str(state_directory))
    alone = subprocess.run([DIRECTOR, "db", "status"], env=environ, capture_output=True,
                           text=True, timeout=60, check=False)
    assert alone.returncode == 1 and "pending: 0001_deployment" in alone.stdout
    cluster = EmbeddedPostgres(state_directory)
    assert cluster.running_postmaster() is None, "the command left its database running"

    daemon = start_daemon(STATE_DIRECTORY=str(state_directory))
    daemon.wait_healthy()
    status = subprocess.run([DIRECTOR, "db", "status"], env=environ, capture_output=True,
                            text=True, timeout=60, check=False)
    assert status.returncode == 0 and "up to date" in status.stdout
    assert cluster.running_postmaster() is not None, "the command stopped the daemon's database"
    daemon.wait_healthy()
    assert daemon.terminate() == 0


# --- edge policy ----------------------------------------------------------------------------


@pytest.fixture
def daemon(start_daemon: StartDaemon, migrated_url: str) -> Daemon:
    started = start_daemon(DATABASE_URL=migrated_url, MAX_REQUEST_BODY_BYTES="1000",
                           BASE_URL="https://director.example.com",
                           ALLOWED_ORIGINS="https://app.example.com",
                           ALLOWED_HOSTS="lb.internal")
    started.wait_healthy()
    return started


def test_json_errors_for_unknown_routes_and_methods(daemon: Daemon) -> None:
    status, headers, body = daemon.request("GET", "/no/such/thing")
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": {"code": "not_found",
                                          "message": "no route for GET /no/such/thing",
                                          "details": {}}}
    status, headers, body = daemon.request("DELETE", "/api/health")
    assert status == 405
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    assert "GET" in headers["allow"]


def test_security_headers_and_trace_ids(daemon: Daemon) -> None:
    _, headers, _ = daemon.request("GET", "/api/health")
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-xss-protection"] == "0"
    assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
    assert "camera=()" in headers["permissions-policy"]
    assert len(headers["x-trace-id"]) == 32
    _, again, _ = daemon.request("GET", "/api/health")
    assert again["x-trace-id"] != headers["x-trace-id"]

    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    _, traced, _ = daemon.request("GET", "/api/health", headers={"traceparent": parent})
    assert traced["x-trace-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    _, bogus, _ = daemon.request("GET", "/api/health", headers={"traceparent": "00-zz-yy-01"})
    assert len(bogus["x-trace-id"]) == 32 and bogus["x-trace-id"] != "zz"


def test_oversized_bodies_are_refused_with_413(daemon: Daemon) -> None:
    status, headers, body = daemon.request("POST", "/api/health", body=b"x" * 5000,
                                           headers={"content-type": "application/json"})
    assert status == 413
    assert json.loads(body)["error"] == {"code": "payload_too_large",
                                         "message": "request body exceeds the limit of 1000 bytes",
                                         "details": {"limit": 1000}}
    assert headers["connection"] == "close"

    # Chunked: no Content-Length to check up front; refused once it crosses the limit.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(b"POST /api/health HTTP/1.1\r\nHost: localhost\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            sock.sendall(b"1f4\r\n" + b"y" * 500 + b"\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert daemon.health()[0] == 200  # the daemon is unharmed


def test_malformed_http_gets_400_and_changes_nothing(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nContent-Length: -4\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400")
    assert daemon.health()[0] == 200


#: Requests malformed by the client, as raw bytes ({auth}: an API key header line or nothing;
#: {playbook}: a playbook of that key's user), with the status anonymous / authenticated.
MALFORMED_REQUESTS = [
    # Paths that are not UTF-8 once percent-decoded (Klein logged each one as critical).
    (b"GET /playbooks/%ff/mcp HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n", 400, 400),
    (b"POST /playbooks/%ff/mcp HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/"
     b"json\r\nContent-Length: 2\r\n\r\n{}", 400, 400),
    (b"GET /playbooks/%ed%a0%80/sse HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n", 400, 400),
    (b"GET /playbooks/\xff/mcp HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n", 400, 400),
    (b"GET /api/v1/playbooks/%ff/servers HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n", 400, 400),
    (b"GET /%c3%28 HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n", 400, 400),
    # A Host that is not UTF-8 (health is exempt from the Host check), or not ours.
    (b"GET /api/health HTTP/1.1\r\nHost: \xff\r\n{auth}\r\n", 400, 400),
    (b"GET /api/v1/me HTTP/1.1\r\nHost: \xff\xfe\r\n{auth}\r\n", 403, 403),
    (b"GET /api/v1/me HTTP/1.1\r\nHost: evil.example\r\n{auth}\r\n", 403, 403),
    # Paths werkzeug would redirect (a doubled slash, a missing trailing slash).
    (b"GET /playbooks//mcp HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n", 404, 404),
    (b"GET /api/v1//me HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n", 404, 404),
    (b"GET /api/v1 HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n", 404, 404),
    # Bad percent-encoding or bytes in the query and in headers.
    (b"GET /playbooks/{playbook}/mcp?key=%ff HTTP/1.1\r\nHost: localhost\r\n\r\n", 401, 401),
    (b"GET /playbooks/{playbook}/sse?key=%zz%ff HTTP/1.1\r\nHost: localhost\r\n\r\n", 401, 401),
    (b"POST /playbooks/{playbook}/message?sessionId=%ff HTTP/1.1\r\nHost: localhost\r\n{auth}"
     b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", 401, 404),
    (b"GET /api/v1/playbooks?limit=%ff&cursor=%ed%a0%80 HTTP/1.1\r\nHost: localhost\r\n{auth}"
     b"\r\n", 401, 400),
    (b"GET /api/v1/me HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
     401, 401),
    (b"GET /api/v1/me HTTP/1.1\r\nHost: localhost\r\nCookie: \xff\xfe=\xff\r\n\r\n", 401, 401),
    (b"GET /playbooks/{playbook}/mcp HTTP/1.1\r\nHost: localhost\r\n{auth}Accept: text/event-"
     b"stream\r\nMcp-Session-Id: \xff\r\n\r\n", 401, 404),
    (b"POST /playbooks/{playbook}/mcp HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: \xff"
     b"\r\nContent-Length: 2\r\n\r\n{}", 401, 415),
    (b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nOrigin: \xff\r\n{auth}\r\n", 403, 403),
    # HTTP syntax and methods.
    (b"BREW /api/health HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n", 405, 405),
    (b"\xff\xfe /api/health HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n", 400, 400),
    (b"GET /api/health HTTP/9.9\r\nHost: localhost\r\n{auth}\r\n", 400, 400),
    (b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 1, 2\r\n\r\n",
     400, 400),
    (b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n{auth}X\x00: y\r\n\r\n", 400, 400),
    (b"POST /api/health HTTP/1.1\r\nHost: localhost\r\n{auth}Transfer-Encoding: gzip\r\n\r\n",
     400, 400),
]


def raw_status(port: int, raw: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 "), head
    return int(head.split()[1])


def test_malformed_requests_get_a_precise_4xx_and_are_never_logged_as_errors(
        daemon: Daemon) -> None:
    from tests.accounts_helpers import call, eventually, sign_up

    account = sign_up(daemon, "malformed@example.com")
    _, _, playbook = call(daemon, "POST", "/api/v1/playbooks", {"name": "p"}, key=account.key)
    first_line = len(daemon.output().splitlines())
    for raw, anonymous, authenticated in MALFORMED_REQUESTS:
        for auth, expected in ((b"", anonymous),
                               (b"X-API-Key: " + account.key.encode() + b"\r\n", authenticated)):
            sent = raw.replace(b"{auth}", auth).replace(b"{playbook}", playbook["id"].encode())
            assert raw_status(daemon.port, sent) == expected, sent
    # A last request whose access line, once written, says every earlier line is there too.
    trace = "0123456789abcdef0123456789abcdef"
    daemon.request("GET", "/api/health", headers={"traceparent": f"00-{trace}-0123456789abcdef-01"})
    eventually(lambda: any(r.get("trace_id") == trace for r in daemon.records()))
    lines = daemon.output().splitlines()[first_line:]
    assert not [line for line in lines if "Traceback" in line]
    records = [json.loads(line) for line in lines]
    assert [r["msg"] for r in records if r["level"] >= 40] == []
    # At most one line each, at info (the access line).
    assert sum(r["level"] >= 30 for r in records) <= 2 * len(MALFORMED_REQUESTS) + 1


def test_foreign_host_is_refused_but_health_answers_any_host(daemon: Daemon) -> None:
    status, _, body = daemon.request("GET", "/anything", headers={"host": "evil.example"})
    assert status == 403
    assert json.loads(body)["error"]["code"] == "host_not_allowed"
    assert "ALLOWED_HOSTS" in json.loads(body)["error"]["message"]
    for host in ("director.example.com", "lb.internal:3673", "localhost:1", "127.0.0.1",
                 "[::1]:3673"):
        status, _, _ = daemon.request("GET", "/anything", headers={"host": host})
        assert status == 404, host  # past the Host check, no such route
    status, _, _ = daemon.request("GET", "/api/health", headers={"host": "10.1.2.3:3673"})
    assert status == 200  # load balancers probe by address


def test_origin_check_and_cors(daemon: Daemon) -> None:
    status, _, body = daemon.request("GET", "/api/health",
                                     headers={"origin": "https://evil.example"})
    assert status == 403 and json.loads(body)["error"]["code"] == "origin_not_allowed"
    for origin in ("https://director.example.com", "https://app.example.com"):
        status, headers, _ = daemon.request("GET", "/api/health", headers={"origin": origin})
        assert status == 200
        assert headers["access-control-allow-origin"] == origin
        assert headers["access-control-allow-credentials"] == "true"
        exposed = headers["access-control-expose-headers"]
        assert "Mcp-Session-Id" in exposed and "WWW-Authenticate" in exposed
    status, headers, _ = daemon.request("OPTIONS", "/playbooks/x/mcp", headers={
        "origin": "https://app.example.com",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type, mcp-session-id",
    })
    assert status == 204
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "content-type, mcp-session-id"
    # Loopback origins get no favour, development or not; malformed ones are refused, not 500.
    for origin in ("http://localhost:5173", "http://director.example.com:abc", "http://[::1",
                   "null"):
        status, headers, body = daemon.request("GET", "/api/health", headers={"origin": origin})
        assert status == 403, origin
        assert json.loads(body)["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in headers


def test_development_grants_cors_to_configured_origins_only(start_daemon: StartDaemon,
                                                            migrated_url: str) -> None:
    port = free_port()
    daemon = start_daemon(DATABASE_URL=migrated_url, PORT=str(port), NODE_ENV="development",
                          ALLOWED_ORIGINS="http://127.0.0.1:5173")
    daemon.wait_healthy()
    for origin in ("http://evil.localhost", f"http://evil.localhost:{port}",
                   "http://localhost:9999", "http://127.0.0.1:1", f"http://127.0.0.1:{port}",
                   f"https://localhost:{port}", "http://[::1]:5173"):
        status, headers, body = daemon.request("OPTIONS", "/playbooks/x/mcp", headers={
            "origin": origin, "access-control-request-method": "POST"})
        assert status == 403, origin
        assert json.loads(body)["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in headers
    # BASE_URL (unset: http://localhost:PORT) and ALLOWED_ORIGINS do get credentialed CORS.
    for origin in (f"http://localhost:{port}", "http://127.0.0.1:5173"):
        status, headers, _ = daemon.request("GET", "/api/health", headers={"origin": origin})
        assert status == 200, origin
        assert headers["access-control-allow-origin"] == origin
        assert headers["access-control-allow-credentials"] == "true"


def test_production_refuses_loopback_origins(start_daemon: StartDaemon, migrated_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url, NODE_ENV="production",
                          BASE_URL="https://director.example.com")
    daemon.wait_healthy()
    status, _, _ = daemon.request("GET", "/api/health", headers={"origin": "http://localhost:5173"})
    assert status == 403
    status, _, _ = daemon.request("GET", "/api/health",
                                  headers={"origin": "https://director.example.com"})
    assert status == 200


def test_request_log_lines_redact_api_keys(daemon: Daemon) -> None:
    daemon.request("GET", "/no/route?key=dk_secretvalue&x=1")
    line = daemon.wait_for_log("GET /no/route")
    assert line["path"] == "/no/route?key=[REDACTED]&x=1"
    assert line["status"] == 404 and line["method"] == "GET"
    assert len(line["trace_id"]) == 32 and isinstance(line["duration_ms"], float)
    assert "dk_secretvalue" not in daemon.output()


# --- slow clients: deadlines and the per-address cap ----------------------------------------


SLOW = {"REQUEST_HEADER_TIMEOUT_SECONDS": "1", "REQUEST_BODY_TIMEOUT_SECONDS": "1",
        "IDLE_CONNECTION_TIMEOUT_SECONDS": "60"}


@pytest.fixture
def slow_daemon(start_daemon: StartDaemon, migrated_url: str) -> Daemon:
    started = start_daemon(DATABASE_URL=migrated_url, **SLOW)
    started.wait_healthy()
    return started


def trickle(port: int, parts: list[bytes], pause: float) -> tuple[int, bytes]:
    """Send ``parts`` ``pause`` seconds apart (each far inside the idle timeout) until the
    server answers or closes; (how many parts were sent, what came back)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for sent, part in enumerate(parts):
            readable, _, _ = select.select([sock], [], [], pause)
            if readable:
                return sent, read_until_closed(sock)
            try:
                sock.sendall(part)
            except OSError:  # closed under us
                return sent, read_until_closed(sock)
        return len(parts), read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything until the server closes (a timeout of the socket's own is an error)."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_a_head_trickled_line_by_line_is_cut_at_its_deadline(slow_daemon: Daemon) -> None:
    head = [b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n"]
    head += [f"X-Line-{n}: trickled\r\n".encode() for n in range(40)] + [b"\r\n"]
    sent, reply = trickle(slow_daemon.port, head, pause=0.25)
    assert sent < len(head), "the whole head was accepted, ten seconds late"
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    line = slow_daemon.wait_for_log("408 request head not received within 1 s")
    assert line["level"] == 30 and line["path"] == "/api/health"
    assert slow_daemon.health()[0] == 200


def test_a_body_trickled_byte_by_byte_is_cut_at_its_deadline(slow_daemon: Daemon) -> None:
    head = (b"POST /api/v1/auth/login HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: 60\r\n\r\n")
    body = [bytes([byte]) for byte in json.dumps({"email": "a@example.com", "password": "x" * 20})
            .ljust(60).encode()]
    sent, reply = trickle(slow_daemon.port, [head, *body], pause=0.1)
    assert sent < 1 + len(body)
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert "408 request body not received" in slow_daemon.wait_for_log(
        "POST /api/v1/auth/login 408")["msg"]


def test_a_slow_but_complete_request_is_answered(slow_daemon: Daemon) -> None:
    # Head in three pieces and body in two, each part well inside its own deadline.
    body = b'{"email": "nobody@example.com", "password": "wrong password"}'
    parts = [b"POST /api/v1/auth/login HTTP/1.1\r\nHost: local",
             b"host\r\nContent-Type: application/json\r\nConnection: close\r\n",
             f"Content-Length: {len(body)}\r\n\r\n".encode(), body[:20], body[20:]]
    sent, reply = trickle(slow_daemon.port, parts, pause=0.3)
    assert sent == len(parts)
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:100]


def test_an_idle_keep_alive_connection_is_closed(start_daemon: StartDaemon,
                                                 migrated_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url, IDLE_CONNECTION_TIMEOUT_SECONDS="1")
    daemon.wait_healthy()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reply = read_until_closed(sock)  # the answer, then the close
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b'{"status": "ok"}\r\n0\r\n\r\n')


def open_sse(port: int, playbook: str, key: str) -> tuple[socket.socket, str]:
    """A legacy ``/sse`` stream over a raw socket, and its message endpoint."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET /playbooks/{playbook}/sse HTTP/1.1\r\nHost: localhost\r\n"
                 f"X-API-Key: {key}\r\nAccept: text/event-stream\r\n\r\n".encode())
    received = b""
    marker = b"event: endpoint\ndata: "
    while marker not in received or b"\n\n" not in received.split(marker, 1)[1]:
        received += sock.recv(65536)
    endpoint = received.split(marker, 1)[1].split(b"\n", 1)[0]
    return sock, endpoint.decode()


def assert_stream_alive(daemon: Daemon, sock: socket.socket, endpoint: str, key: str) -> None:
    """A ping posted to the session is answered on its stream."""
    status, _, _ = daemon.request("POST", endpoint, json.dumps(
        {"jsonrpc": "2.0", "id": 7, "method": "ping"}).encode(),
        {"content-type": "application/json", "x-api-key": key})
    assert status == 202
    received = b""
    while b'"id":7' not in received:
        chunk = sock.recv(65536)
        assert chunk, "the stream was closed"
        received += chunk


@pytest.fixture
def owner(slow_daemon: Daemon) -> tuple[str, str]:
    """(API key, playbook id) of a user of ``slow_daemon``."""
    from tests.accounts_helpers import call, sign_up

    account = sign_up(slow_daemon, "streams@example.com")
    _, _, playbook = call(slow_daemon, "POST", "/api/v1/playbooks", {"name": "p"},
                          key=account.key)
    return account.key, playbook["id"]


def test_an_established_stream_outlives_both_deadlines(slow_daemon: Daemon,
                                                       owner: tuple[str, str]) -> None:
    key, playbook = owner
    sock, endpoint = open_sse(slow_daemon.port, playbook, key)
    with sock:
        # Both deadlines (1 s each) pass several times over while the stream is held.
        readable, _, _ = select.select([sock], [], [], 3)
        assert not readable or sock.recv(65536, socket.MSG_PEEK), "the stream was closed"
        assert_stream_alive(slow_daemon, sock, endpoint, key)


def test_the_connection_cap_refuses_the_next_half_open_connection(
        start_daemon: StartDaemon, migrated_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url, MAX_CONNECTIONS_PER_ADDRESS="4")
    daemon.wait_healthy()
    half_open = [socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
                 for _ in range(4)]
    for sock in half_open:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: local")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as refused:
        refused.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_until_closed(refused) == b"", "a fifth connection was served"
    line = daemon.wait_for_log("refused 1 connection(s) from 127.0.0.1")
    assert line["level"] == 30 and "MAX_CONNECTIONS_PER_ADDRESS=4" in line["msg"]
    for sock in half_open:  # the first four were kept, and are answered
        with sock:
            sock.sendall(b"host\r\nConnection: close\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 200 ")
    assert daemon.health()[0] == 200  # their slots are free again


def test_a_trusted_proxy_is_not_capped(start_daemon: StartDaemon, migrated_url: str) -> None:
    """A proxy speaks for all its clients at once: its address is exempt from the cap."""
    daemon = start_daemon(DATABASE_URL=migrated_url, MAX_CONNECTIONS_PER_ADDRESS="2",
                          TRUSTED_PROXIES="127.0.0.1")
    daemon.wait_healthy()
    half_open = [socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
                 for _ in range(5)]
    try:
        for sock in half_open:
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: local")
        for sock in half_open:
            sock.sendall(b"host\r\nConnection: close\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in half_open:
            sock.close()
    assert "refused" not in daemon.output()


def test_the_cap_counts_ipv4_addresses_and_ipv6_blocks() -> None:
    from director.web.edge import address_key

    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"  # a dual-stack listener's IPv4 peer
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"


def test_streams_do_not_count_against_the_cap(start_daemon: StartDaemon,
                                              migrated_url: str) -> None:
    from tests.accounts_helpers import call, sign_up

    daemon = start_daemon(DATABASE_URL=migrated_url, MAX_CONNECTIONS_PER_ADDRESS="2")
    daemon.wait_healthy()
    account = sign_up(daemon, "capped@example.com")
    _, _, playbook = call(daemon, "POST", "/api/v1/playbooks", {"name": "p"}, key=account.key)
    streams = [open_sse(daemon.port, playbook["id"], account.key) for _ in range(5)]
    try:
        assert daemon.health()[0] == 200  # five streams held, and still room for requests
        for sock, endpoint in streams:
            assert_stream_alive(daemon, sock, endpoint, account.key)
    finally:
        for sock, _ in streams:
            sock.close()


# --- lifecycle: systemd and signals ---------------------------------------------------------


def receive_all(sock: socket.socket, until: Callable[[list[str]], bool],
                timeout: float = 15.0) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while not until(messages) and time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    return messages


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's ``NOTIFY_SOCKET``."""
    directory = make_temp_dir("director-test-notify-")
    path = str(directory / "notify.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            yield path, sock
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def port_in_use() -> Iterator[int]:
    """A loopback port another process (here: the test) already listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def assert_exits_unready(daemon: Daemon, sock: socket.socket, fragment: str) -> None:
    """The start failed: FATAL naming the listener, exit 1 (systemd retries a port in use,
    which may be the previous instance still draining), and never ``READY=1``."""
    assert daemon.wait_exit(timeout=15) == 1
    fatal = daemon.wait_for_log("FATAL: cannot listen")
    assert fatal["level"] == 60 and fragment in fatal["msg"]
    sent = receive_all(sock, lambda m: any("STOPPING=1" in x for x in m), timeout=2)
    assert not any("READY=1" in message for message in sent), sent


def test_sd_notify_ready_watchdog_and_stopping(start_daemon: StartDaemon, migrated_url: str) -> None:
    with notify_socket() as (path, sock):
        daemon = start_daemon(DATABASE_URL=migrated_url, NOTIFY_SOCKET=path,
                              WATCHDOG_USEC="200000")
        messages = receive_all(sock, lambda m: sum("WATCHDOG=1" in x for x in m) >= 3)
        ready = [m for m in messages if "READY=1" in m]
        assert ready and f"MAINPID={daemon.process.pid}" in ready[0]
        assert any("STATUS=serving" in m for m in messages)
        daemon.process.send_signal(signal.SIGTERM)
        messages = receive_all(sock, lambda m: any("STOPPING=1" in x for x in m))
        assert any("STOPPING=1" in m for m in messages)
        assert daemon.wait_exit() == 0


@pytest.mark.parametrize("listener", ["PORT", "METRICS_LISTEN"])
def test_a_start_that_cannot_listen_exits_without_ready(start_daemon: StartDaemon,
                                                        migrated_url: str, listener: str) -> None:
    with port_in_use() as busy, notify_socket() as (path, sock):
        if listener == "PORT":
            daemon = start_daemon(DATABASE_URL=migrated_url, NOTIFY_SOCKET=path,
                                  HOST="127.0.0.1", PORT=str(busy))
            assert_exits_unready(daemon, sock, f"tcp:{busy}:interface=127.0.0.1")
        else:
            daemon = start_daemon(DATABASE_URL=migrated_url, NOTIFY_SOCKET=path,
                                  METRICS_LISTEN=f"127.0.0.1:{busy}")
            assert_exits_unready(daemon, sock, f"METRICS_LISTEN=127.0.0.1:{busy}")
            with pytest.raises(OSError):  # the HTTP port it did open is closed again
                socket.create_connection(("127.0.0.1", daemon.port), timeout=2).close()


def test_an_embedded_start_that_cannot_listen_leaves_no_cluster(start_daemon: StartDaemon,
                                                                state_directory: Path) -> None:
    with port_in_use() as busy, notify_socket() as (path, sock):
        daemon = start_daemon(STATE_DIRECTORY=str(state_directory), NOTIFY_SOCKET=path,
                              HOST="127.0.0.1", PORT=str(busy))
        assert_exits_unready(daemon, sock, f"tcp:{busy}")
    assert EmbeddedPostgres(state_directory).running_postmaster() is None


def test_an_embedded_start_that_fails_stops_its_cluster(start_daemon: StartDaemon,
                                                       state_directory: Path) -> None:
    cluster = EmbeddedPostgres(state_directory)
    cluster.start()
    query(cluster.url(), "CREATE TABLE director_schema (version integer PRIMARY KEY, name text)")
    query(cluster.url(), "INSERT INTO director_schema VALUES (999, 'future')")
    cluster.stop()
    daemon = start_daemon(STATE_DIRECTORY=str(state_directory))
    assert daemon.wait_exit() != 0
    assert "newer than this Director knows" in daemon.wait_for_log("FATAL")["msg"]
    assert "started" in daemon.wait_for_log("private PostgreSQL")["msg"]
    assert cluster.running_postmaster() is None, "the failed start left its cluster running"


def test_sigterm_drains_in_flight_streams_within_the_timeout(start_daemon: StartDaemon,
                                                            migrated_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url, SHUTDOWN_TIMEOUT_SECONDS="2")
    daemon.wait_healthy()
    idle = socket.create_connection(("127.0.0.1", daemon.port))
    idle.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")  # now an idle keep-alive
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGINT)
    assert daemon.wait_exit() == 0
    assert time.monotonic() - started < 5
    idle.settimeout(5)
    assert idle.recv(100) == b""  # closed by the daemon
    idle.close()


def test_native_journald_entries_when_stdout_is_the_journal(start_daemon: StartDaemon,
                                                           migrated_url: str) -> None:
    directory = make_temp_dir("director-test-journal-")
    path = str(directory / "journal.sock")
    stdout_path = directory / "stdout"
    stdout_path.touch()
    stat = os.stat(stdout_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        from tests.harness import base_environment

        environ = base_environment(DATABASE_URL=migrated_url, PORT=str(free_port()),
                                   JOURNAL_STREAM=f"{stat.st_dev}:{stat.st_ino}",
                                   DIRECTOR_JOURNAL_SOCKET=path)
        daemon = Daemon(environ, stdout_path=stdout_path)
        try:
            entries = receive_all(sock, lambda m: any("director is healthy" in x for x in m))
            running = next(e for e in entries if "MESSAGE=director gateway running" in e)
            fields = dict(line.split("=", 1) for line in running.splitlines() if "=" in line)
            assert fields["PRIORITY"] == "6"
            assert fields["SYSLOG_IDENTIFIER"] == "director"
            assert fields["LOGGER_NAME"] == "gateway"
            assert fields["PORT"] == str(daemon.port)
            daemon.request("GET", "/api/health?key=dk_x", headers={"traceparent":
                           "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
            entries = receive_all(sock, lambda m: any("TRACE_ID=4bf92f" in x for x in m))
            access = next(e for e in entries if "TRACE_ID=" in e)
            assert "TRACE_ID=4bf92f3577b34da6a3ce929d0e0e4736" in access
            assert "PATH=/api/health?key=[REDACTED]" in access
            assert daemon.terminate() == 0
            assert "director gateway running" not in stdout_path.read_text()
        finally:
            daemon.stop()
    shutil.rmtree(directory, ignore_errors=True)
