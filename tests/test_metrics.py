"""Prometheus metrics: a separate listener, off by default, counting real HTTP and MCP traffic."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from director.config import ConfigError, load_settings
from director.metrics import Metrics
from director.service import DirectorService
from tests.accounts_helpers import call, eventually, sign_up
from tests.harness import SECRET, Daemon, free_port, make_temp_dir, query

StartDaemon = Callable[..., Daemon]
RAW = str(Path(__file__).parent / "fixtures" / "raw_server.py")
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
    # The stdlib-only raw server starts well within the 1 s that bounds its start and calls.
    server = {"name": "raw", "type": "stdio", "command": sys.executable,
              "args": [RAW], "timeout_seconds": 1}
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
    assert hung["error"]["code"] == -32001  # the server's 1 s timeout

    cancelled: dict[str, Any] = {}

    def hang() -> None:
        cancelled["response"] = mcp_post(daemon, owner.key, {
            "jsonrpc": "2.0", "id": 6, "method": "tools/call",
            "params": {"name": "hang", "arguments": {"tag": "c"}}}, session)

    thread = threading.Thread(target=hang)
    thread.start()
    time.sleep(0.3)
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
    assert value(samples, "director_upstream_restarts") == 0
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
