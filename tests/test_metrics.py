"""Prometheus metrics: a separate listener, off by default, counting real HTTP and MCP traffic."""

from __future__ import annotations

import datetime
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from director.config import ConfigError, load_settings
from director.metrics import Metrics
from director.service import DirectorService
from tests.accounts_helpers import call, eventually, sign_up
from tests.harness import (
    DIRECTOR,
    SECRET,
    Daemon,
    base_environment,
    free_port,
    make_temp_dir,
    query,
)

StartDaemon = Callable[..., Daemon]
RAW = str(Path(__file__).parent / "fixtures" / "raw_server.py")
REFERENCE = str(Path(__file__).parent / "fixtures" / "reference_server.py")
ACCEPT = "application/json, text/event-stream"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, path: str = "/metrics", host: str | None = None
           ) -> tuple[int, str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"host": host} if host else {})
        response = connection.getresponse()
        return response.status, response.getheader("content-type") or "", \
            response.read().decode()
    finally:
        connection.close()


def parse(text: str) -> Samples:
    """Every sample of the exposition, by name and sorted labels (parsing it is the check)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def mcp_post(daemon: Daemon, key: str, message: dict[str, Any], session: str | None = None
             ) -> tuple[int, dict[str, str], Any]:
    headers = {"accept": ACCEPT, "content-type": "application/json", "x-api-key": key}
    if session:
        headers["mcp-session-id"] = session
    status, response_headers, body = daemon.request("POST", "/playbooks/ref/mcp",
                                                    json.dumps(message).encode(), headers)
    return status, response_headers, json.loads(body) if body else None


def test_metrics_count_http_and_mcp_traffic_on_their_own_listener(
        start_daemon: StartDaemon, migrated_url: str) -> None:
    metrics_port = free_port()
    daemon = start_daemon(DATABASE_URL=migrated_url, METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
                          DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true")
    daemon.wait_healthy()
    assert daemon.wait_for_log("metrics at")["msg"] == \
        f"metrics at http://127.0.0.1:{metrics_port}/metrics"

    # Never on the gateway's port.
    assert daemon.request("GET", "/metrics")[0] == 404

    owner = sign_up(daemon, "metrics@example.com")
    assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Ref"}, key=owner.key)[0] == 201
    # The stdlib-only raw server starts well within the 3 s that bound its start and calls; it
    # writes each message it receives to RAW_LOG (the account of its child may be nobody).
    received = make_temp_dir("director-test-metrics-raw-", 0o777) / "received.jsonl"
    server = {"name": "raw", "type": "stdio", "command": sys.executable,
              "args": [RAW], "timeout_seconds": 3, "env": {"RAW_LOG": str(received)}}
    assert call(daemon, "POST", "/api/v1/playbooks/ref/servers", server,
                key=owner.key)[0] == 201
    assert call(daemon, "GET", "/api/v1/playbooks/no-such-one", key=owner.key)[0] == 404

    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "metrics-test", "version": "1"}}}
    status, headers, _ = mcp_post(daemon, owner.key, init)
    assert status == 200
    session = headers["mcp-session-id"]
    mcp_post(daemon, owner.key, {"jsonrpc": "2.0", "method": "notifications/initialized"},
             session)
    assert "result" in mcp_post(daemon, owner.key, {"jsonrpc": "2.0", "id": 2,
                                                    "method": "tools/list"}, session)[2]
    echoed = mcp_post(daemon, owner.key, {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                          "params": {"name": "echo",
                                                     "arguments": {"text": "hi"}}}, session)[2]
    assert echoed["result"]["content"][0]["text"] == "hi"
    assert "error" in mcp_post(daemon, owner.key, {"jsonrpc": "2.0", "id": 4,
                                                   "method": "made/up"}, session)[2]
    hung = mcp_post(daemon, owner.key, {"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                                        "params": {"name": "hang",
                                                   "arguments": {"tag": "t"}}}, session)[2]
    assert hung["error"]["code"] == -32001  # the server's 3 s timeout

    cancelled: dict[str, Any] = {}

    def hang() -> None:
        cancelled["response"] = mcp_post(daemon, owner.key, {
            "jsonrpc": "2.0", "id": 6, "method": "tools/call",
            "params": {"name": "hang", "arguments": {"tag": "c"}}}, session)

    thread = threading.Thread(target=hang)
    thread.start()
    # Cancelled once the server has it, well within its timeout.
    eventually(lambda: '"tag": "c"' in received.read_text(), timeout=2, interval=0.01)
    mcp_post(daemon, owner.key, {"jsonrpc": "2.0", "method": "notifications/cancelled",
                                 "params": {"requestId": 6}}, session)
    thread.join(10)
    assert cancelled["response"][2]["error"]["message"] == "request cancelled"

    # A second key limited to one request an hour: the second request is refused.
    status, _, created = call(daemon, "POST", "/api/v1/api-keys", {"name": "limited"},
                              key=owner.key)
    assert status == 201
    query(migrated_url, "UPDATE api_keys SET rate_limit_max_requests = 1, "
                        "rate_limit_window_seconds = 3600 WHERE id = %s", created["id"])
    query(migrated_url, "SELECT pg_notify('director_changes', %s)", f"api_key:{created['id']}")
    eventually(lambda: call(daemon, "GET", "/api/v1/me", key=created["key"])[0] == 429,
               timeout=5, interval=0.1)

    status, content_type, text = scrape(metrics_port)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    samples = parse(text)

    # HTTP: route templates, never raw paths, ids or keys.
    assert value(samples, "director_http_requests_total", route="/playbooks/{playbook_id}/mcp",
                 method="POST", status="200") >= 5
    assert value(samples, "director_http_requests_total", route="/playbooks/{playbook_id}/mcp",
                 method="POST", status="202") >= 2
    assert value(samples, "director_http_requests_total", route="/api/v1/playbooks",
                 method="POST", status="201") == 1
    assert value(samples, "director_http_requests_total", route="/api/v1/playbooks/{playbook_id}",
                 method="GET", status="404") == 1
    assert value(samples, "director_http_requests_total", route="other", method="GET",
                 status="404") == 1  # /metrics on the gateway's port
    assert value(samples, "director_http_request_seconds_count",
                 route="/playbooks/{playbook_id}/mcp", method="POST") >= 7
    assert "/playbooks/ref" not in text and "no-such-one" not in text
    assert owner.key not in text and created["key"] not in text and "dk_" not in text
    routes = {dict(labels).get("route") for (name, labels) in samples
              if name == "director_http_requests_total"}
    assert all(route == "other" or route.startswith("/") for route in routes)

    # MCP: every outcome, and methods outside the protocol folded into "other".
    assert value(samples, "director_mcp_requests_total", method="tools/list", outcome="ok") == 1
    assert value(samples, "director_mcp_requests_total", method="tools/call", outcome="ok") == 1
    assert value(samples, "director_mcp_requests_total", method="other", outcome="error") == 1
    assert value(samples, "director_mcp_requests_total", method="tools/call",
                 outcome="timeout") == 1
    assert value(samples, "director_mcp_requests_total", method="tools/call",
                 outcome="cancelled") == 1
    assert value(samples, "director_mcp_request_seconds_count", method="tools/call") == 3
    assert value(samples, "director_mcp_request_seconds_bucket", method="tools/call",
                 le="+Inf") == 3
    assert value(samples, "director_rate_limited_total") == 1

    # Gauges read from the service tree.
    assert value(samples, "director_mcp_sessions", transport="streamable") == 1
    assert value(samples, "director_mcp_sessions", transport="sse") == 0
    assert value(samples, "director_upstreams", type="stdio", state="started") == 1
    assert ("director_upstream_restarts", ()) not in samples  # a counter now, per server
    assert value(samples, "director_database_available") == 1
    assert value(samples, "director_database_listen_up") == 1
    assert value(samples, "director_database_pool_connections", state="up") == 4
    assert value(samples, "director_cache_entries", cache="users") == 1
    assert value(samples, "director_cache_entries", cache="api_keys") == 2
    assert value(samples, "director_cache_entries", cache="playbooks") == 1
    assert value(samples, "director_build_info", version="0.1.0",
                 python=".".join(map(str, sys.version_info[:3]))) == 1
    assert value(samples, "process_resident_memory_bytes") > 10_000_000
    assert value(samples, "process_open_fds") > 0

    # The listener answers /metrics only, and loopback Host names only (DNS rebinding).
    assert scrape(metrics_port, "/api/health")[0] == 404
    assert scrape(metrics_port, host="attacker.example")[0] == 403
    assert scrape(metrics_port, host="localhost:9464")[0] == 200
    # Scrapes are not counted as gateway traffic, nor logged.
    assert value(parse(scrape(metrics_port)[2]), "director_http_requests_total",
                 route="other", method="GET", status="404") == 1
    assert not [r for r in daemon.records() if "/metrics" in r.get("msg", "")
                and r.get("status") == 200]
    assert daemon.terminate() == 0


def test_metrics_on_a_unix_socket(start_daemon: StartDaemon, migrated_url: str) -> None:
    directory = make_temp_dir("director-test-metrics-")
    path = directory / "metrics.sock"
    daemon = start_daemon(DATABASE_URL=migrated_url, METRICS_LISTEN=f"unix:{path}")
    daemon.wait_healthy()
    assert oct(path.stat().st_mode & 0o777) == "0o660"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: anything\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert value(parse(body.decode()), "director_database_available") == 1
    assert daemon.terminate() == 0
    assert not path.exists()


def test_metrics_are_off_by_default(start_daemon: StartDaemon, migrated_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url)
    daemon.wait_healthy()
    assert daemon.request("GET", "/metrics")[0] == 404
    assert not [r for r in daemon.records() if "metrics at" in r.get("msg", "")]


@pytest.mark.parametrize("address", ["0.0.0.0:9464", "[::]:9464", ":9464", "192.0.2.10:9464"])
def test_a_non_loopback_metrics_listener_is_refused(start_daemon: StartDaemon,
                                                    address: str) -> None:
    daemon = start_daemon(METRICS_LISTEN=address)
    assert daemon.wait_exit() == 78
    lines = daemon.output().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"METRICS_LISTEN={address!r} is not a loopback address")
    assert "METRICS_ALLOW_PUBLIC=true" in lines[0]


def test_public_metrics_need_the_explicit_switch() -> None:
    with pytest.raises(ConfigError):
        load_settings({"METRICS_LISTEN": "0.0.0.0:9464", "METRICS_ALLOW_PUBLIC": "false"})
    settings = load_settings({"METRICS_LISTEN": "0.0.0.0:9464", "METRICS_ALLOW_PUBLIC": "true"})
    assert settings.metrics_listen == "0.0.0.0:9464"
    assert load_settings({"METRICS_LISTEN": "localhost:9464"}).metrics_listen == "127.0.0.1:9464"
    assert load_settings({"METRICS_LISTEN": "[::1]:9464"}).metrics_listen == "[::1]:9464"


def test_two_services_in_one_process_count_separately() -> None:
    environ = {"DATABASE_URL": "postgres://u:p@127.0.0.1:1/d", "BETTER_AUTH_SECRET": SECRET}
    # Nothing reads metrics: none are kept (the instruments are skipped, prometheus_client
    # is not even imported by the daemon).
    assert DirectorService(load_settings(environ), reactor).metrics is None
    settings = load_settings({**environ, "METRICS_LISTEN": "127.0.0.1:9464"})
    first, second = DirectorService(settings, reactor), DirectorService(settings, reactor)
    assert isinstance(first.metrics, Metrics) and first.metrics.registry is not \
        second.metrics.registry
    first.metrics.mcp_request("tools/call", "ok", 0.01)
    first.metrics.rate_limited.inc()
    assert first.metrics.mcp_requests_by_method() == {"tools/call": 1}
    assert second.metrics.mcp_requests_by_method() == {}
    assert value(parse(second.metrics.exposition().decode()), "director_rate_limited_total") == 0
    assert value(parse(first.metrics.exposition().decode()), "director_rate_limited_total") == 1


# --- what an operator of a gateway needs ----------------------------------------------------


class Scraper:
    """``/metrics`` of one daemon: how far series moved since ``mark()``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.marked = self.now()

    def now(self) -> Samples:
        return parse(scrape(self.port)[2])

    def mark(self) -> None:
        self.marked = self.now()

    def moved(self, name: str, **labels: str) -> float:
        return value(self.now(), name, **labels) - value(self.marked, name, **labels)

    def eventually_moves(self, name: str, by: float = 1, **labels: str) -> None:
        eventually(lambda: self.moved(name, **labels) >= by, timeout=10, interval=0.05)


def metered(start_daemon: StartDaemon, database_url: str, **env: str) -> tuple[Daemon, Scraper]:
    """A healthy daemon with ``METRICS_LISTEN``, and its scraper."""
    port = free_port()
    daemon = start_daemon(DATABASE_URL=database_url, METRICS_LISTEN=f"127.0.0.1:{port}", **env)
    daemon.wait_healthy()
    return daemon, Scraper(port)


def initialize(version: str = "2025-11-25") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": version, "capabilities": {},
                       "clientInfo": {"name": "metrics-test", "version": "1"}}}


def admin(url: str, *args: str) -> None:
    result = subprocess.run([DIRECTOR, *args], env=base_environment(DATABASE_URL=url),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_authentication_failures_are_counted_by_reason(start_daemon: StartDaemon,
                                                       migrated_url: str) -> None:
    daemon, metrics = metered(start_daemon, migrated_url, WAITLIST_ENABLED="true")
    failures = "director_auth_failures_total"
    reasons = ("missing", "invalid_key", "revoked", "disabled", "expired_session", "pending",
               "invalid_token")
    for reason in reasons:
        assert (failures, (("reason", reason),)) in metrics.marked  # at 0 from the start

    def refused(reason: str, count: int, *requests: tuple[str, dict[str, str]]) -> None:
        """Each request is refused, and counted under ``reason`` only."""
        metrics.mark()
        for path, headers in requests:
            assert daemon.request("GET", path, headers=headers)[0] in (401, 403)
        assert {r: metrics.moved(failures, reason=r) for r in reasons} == {
            r: count if r == reason else 0 for r in reasons}

    owner = sign_up(daemon, "auth-metrics@example.com")  # pending: the waitlist is on
    refused("pending", 1, ("/api/v1/playbooks", {"x-api-key": owner.key}))
    admin(migrated_url, "users", "activate", owner.email)
    eventually(lambda: call(daemon, "GET", "/api/v1/playbooks", key=owner.key)[0] == 200)

    refused("missing", 1, ("/api/v1/playbooks", {}))
    refused("invalid_key", 3, ("/api/v1/playbooks", {"x-api-key": "dk_" + "x" * 64}),
            ("/api/v1/playbooks", {"x-api-key": "not-a-key"}),
            ("/playbooks/ref/mcp?key=dk_" + "y" * 64, {}))
    refused("expired_session", 1, ("/api/v1/playbooks",
                                   {"cookie": "director_session=no-such-session"}))
    refused("invalid_token", 2, ("/playbooks/ref/mcp", {"authorization": "Bearer dat_" + "z" * 43}),
            ("/api/v1/me", {"authorization": "Bearer dat_" + "z" * 43}))
    status, _, spare = call(daemon, "POST", "/api/v1/api-keys", {"name": "spare"},
                            key=owner.key)
    assert status == 201
    assert call(daemon, "DELETE", f"/api/v1/api-keys/{spare['id']}", key=owner.key)[0] == 204
    refused("revoked", 2, ("/playbooks/ref/mcp?key=" + spare["key"], {}),
            ("/api/v1/me", {"x-api-key": spare["key"]}))
    admin(migrated_url, "users", "disable", owner.email)
    eventually(lambda: call(daemon, "GET", "/api/v1/me", key=owner.key)[0] == 401)
    refused("disabled", 1, ("/api/v1/me", {"x-api-key": owner.key}))


def test_sessions_initialize_playbooks_and_upstreams_are_counted(start_daemon: StartDaemon,
                                                                 migrated_url: str) -> None:
    daemon, metrics = metered(start_daemon, migrated_url, DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true")
    owner = sign_up(daemon, "ops-metrics@example.com")
    assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Ref"}, key=owner.key)[0] == 201
    server = {"name": "reference", "type": "stdio", "command": sys.executable,
              "args": [REFERENCE], "expose_prompts": True,
              # bounds its start too (the SDK takes ~2 s to import on a busy machine) and
              # the "hang" call below
              "timeout_seconds": 8}
    assert call(daemon, "POST", "/api/v1/playbooks/ref/servers", server,
                key=owner.key)[0] == 201
    pk = str(query(migrated_url, "SELECT pk FROM playbooks WHERE id = 'ref'")[0][0])
    upstream = {"playbook": pk, "server": "reference"}

    # initialize, by transport and negotiated version; a session created.
    status, headers, _ = mcp_post(daemon, owner.key, initialize())
    assert status == 200
    session = headers["mcp-session-id"]
    assert metrics.moved("director_mcp_initialize_total", transport="streamable",
                         version="2025-11-25") == 1
    assert metrics.moved("director_mcp_sessions_created_total", transport="streamable") == 1

    def tool(name: str, arguments: dict[str, Any]) -> Any:
        metrics.mark()
        return mcp_post(daemon, owner.key, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                            "params": {"name": name, "arguments": arguments}},
                        session)[2]

    # Per playbook and per server: answers, upstream errors, timeouts, failures, restarts;
    # the time waiting for the upstream apart from the gateway's own.
    assert tool("echo", {"text": "hi"})["result"]["content"][0]["text"] == "hi"
    assert metrics.moved("director_playbook_requests_total", playbook=pk, outcome="ok") == 1
    assert metrics.moved("director_playbook_request_seconds_count", playbook=pk) == 1
    # tools/list (to find the tool's server), then tools/call
    assert metrics.moved("director_upstream_requests_total", **upstream, outcome="ok") == 2
    assert metrics.moved("director_upstream_request_seconds_count", **upstream) == 2
    assert metrics.moved("director_mcp_gateway_seconds_count", method="tools/call") == 1
    assert metrics.moved("director_mcp_request_seconds_sum", method="tools/call") > \
        metrics.moved("director_mcp_gateway_seconds_sum", method="tools/call")
    metrics.mark()
    answered = mcp_post(daemon, owner.key, {"jsonrpc": "2.0", "id": 3, "method": "prompts/get",
                                            "params": {"name": "greet"}}, session)[2]
    assert "error" in answered  # the server's own refusal: a required argument is missing
    assert metrics.moved("director_upstream_requests_total", **upstream, outcome="error") == 1
    assert tool("hang", {"tag": "m"})["error"]["code"] == -32001
    assert metrics.moved("director_upstream_requests_total", **upstream, outcome="timeout") == 1
    assert metrics.moved("director_playbook_requests_total", playbook=pk, outcome="timeout") == 1
    assert "error" in tool("crash", {})
    assert metrics.moved("director_upstream_requests_total", **upstream, outcome="failed") == 1
    metrics.eventually_moves("director_upstream_restarts_total", **upstream)

    # The legacy transport's initialize, at another version.
    metrics.mark()
    stream = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    stream.sendall(f"GET /playbooks/ref/sse?key={owner.key} HTTP/1.1\r\nHost: localhost\r\n"
                   "\r\n".encode())
    received = b""
    while (found := re.search(rb"sessionId=([\w-]+)[&\n]", received)) is None:
        received += stream.recv(65536)
    sse_session = found.group(1).decode()
    assert daemon.request("POST", f"/playbooks/ref/message?sessionId={sse_session}",
                          json.dumps(initialize("2025-06-18")).encode(),
                          {"content-type": "application/json",
                           "x-api-key": owner.key})[0] == 202
    metrics.eventually_moves("director_mcp_initialize_total", transport="sse",
                             version="2025-06-18")
    assert metrics.moved("director_mcp_sessions_created_total", transport="sse") == 1

    # A client's DELETE; then deleting the playbook ends the rest (the /sse one too) and
    # removes the playbook's series.
    metrics.mark()
    assert daemon.request("DELETE", "/playbooks/ref/mcp", headers={
        "mcp-session-id": session, "x-api-key": owner.key})[0] == 204
    assert metrics.moved("director_mcp_sessions_ended_total", transport="streamable",
                         reason="client") == 1
    assert mcp_post(daemon, owner.key, initialize())[0] == 200
    assert pk in scrape(metrics.port)[2]
    assert call(daemon, "DELETE", "/api/v1/playbooks/ref", key=owner.key)[0] == 204
    metrics.eventually_moves("director_mcp_sessions_ended_total", transport="streamable",
                             reason="deleted")
    assert metrics.moved("director_mcp_sessions_ended_total", transport="sse",
                         reason="deleted") == 1
    assert pk not in scrape(metrics.port)[2]
    stream.close()


def test_sessions_ended_by_the_cap_and_by_idle_expiry_are_counted(start_daemon: StartDaemon,
                                                                  migrated_url: str) -> None:
    daemon, metrics = metered(start_daemon, migrated_url, MCP_MAX_SESSIONS_PER_USER="2",
                              MCP_SESSION_IDLE_SECONDS="1")
    owner = sign_up(daemon, "cap-metrics@example.com")
    assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Ref"}, key=owner.key)[0] == 201
    for _ in range(3):
        assert mcp_post(daemon, owner.key, initialize())[0] == 200
    assert metrics.moved("director_mcp_sessions_ended_total", transport="streamable",
                         reason="cap") == 1
    metrics.eventually_moves("director_mcp_sessions_ended_total", 2, transport="streamable",
                             reason="idle")


def test_playbook_and_server_series_are_bounded_and_removed_with_their_playbook() -> None:
    from director.metrics import MAX_PLAYBOOK_SERIES, MAX_SERVER_SERIES
    from director.playbooks.model import Server
    from director.playbooks.store import Playbook

    metrics = Metrics()
    now = datetime.datetime.now(datetime.UTC)
    playbooks = [Playbook(uuid.uuid4(), uuid.uuid4(), f"p{n}", f"P{n}", "", n, 1, now, now,
                          (Server(name="s1", type="stdio", command="x"),
                           Server(name="s2", type="stdio", command="x")))
                 for n in range(MAX_SERVER_SERIES)]
    for playbook in playbooks:
        metrics.mcp_request("tools/call", "ok", 0.01, playbook.pk, 0.005)
        for server in playbook.servers:
            metrics.upstream_request(playbook.pk, server.name, "ok", 0.005)

    def series(name: str) -> list[dict[str, str]]:
        return [dict(labels) for (sample, labels) in parse(metrics.exposition().decode())
                if sample == name]

    playbook_labels = {s["playbook"] for s in series("director_playbook_requests_total")}
    assert len(playbook_labels) == MAX_PLAYBOOK_SERIES + 1 and "other" in playbook_labels
    pairs = {(s["playbook"], s["server"]) for s in series("director_upstream_requests_total")}
    assert len(pairs) == MAX_SERVER_SERIES + 1 and ("other", "other") in pairs
    assert value(parse(metrics.exposition().decode()), "director_playbook_requests_total",
                 playbook="other", outcome="ok") == MAX_SERVER_SERIES - MAX_PLAYBOOK_SERIES

    # Deleting a playbook removes its series and frees its place for another one.
    first, late = playbooks[0], playbooks[-1]
    metrics.playbook_changed(first, None)
    text = metrics.exposition().decode()
    assert str(first.pk) not in text
    fresh = Playbook(uuid.uuid4(), uuid.uuid4(), "fresh", "Fresh", "", 0, 1, now, now)
    metrics.mcp_request("tools/call", "ok", 0.01, fresh.pk)
    assert str(fresh.pk) in metrics.exposition().decode()
    # A server removed from a playbook: its series go, the playbook's stay.
    second = playbooks[1]
    metrics.playbook_changed(second, attrs.evolve(second, servers=second.servers[:1]))
    assert {s["server"] for s in series("director_upstream_requests_total")
            if s["playbook"] == str(second.pk)} == {"s1"}
    assert str(late.pk) not in text  # it never had series of its own
