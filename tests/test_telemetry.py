"""Telemetry: off by default, and when on exactly the fields README.rst documents, to a real
local receiver."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from director.db.database import Database
from director.metrics import Metrics
from director.telemetry import REPORT_FIELDS, TelemetryService
from tests.accounts_helpers import call, sign_up, until_available
from tests.harness import Daemon, free_port, query

StartDaemon = Callable[..., Daemon]
README = Path(__file__).parent.parent / "README.rst"
EMAIL = "private.person@example.com"


class Receiver:
    """A stand-in for the telemetry collector: records every POST, answers ``status``."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 204
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.reports.append((self.path, {k.lower(): v for k, v in
                                                     self.headers.items()}, body))
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, _, body in self.reports]

    def wait(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.reports) < count:
            assert time.monotonic() < deadline, f"{len(self.reports)} reports, not {count}"
            time.sleep(0.02)
        return self.payloads()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def documented_fields() -> list[str]:
    """The field list of README.rst's Telemetry section (``- ``name``: …`` items)."""
    text = README.read_text()
    section = text.split("\nTelemetry\n---------\n", 1)[1].split("\n-----", 1)[0]
    return re.findall(r"^- ``(\w+)``:", section, flags=re.MULTILINE)


def test_readme_documents_exactly_the_report_fields() -> None:
    assert documented_fields() == list(REPORT_FIELDS)


def test_nothing_is_sent_when_disabled_and_the_start_report_when_enabled(
        start_daemon: StartDaemon, migrated_url: str, receiver: Receiver) -> None:
    # Disabled (the default), even with a URL: nothing leaves, whatever happens.
    quiet = start_daemon(DATABASE_URL=migrated_url, TELEMETRY_URL=receiver.url,
                         DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true")
    quiet.wait_healthy()
    owner = sign_up(quiet, EMAIL)
    assert call(quiet, "POST", "/api/v1/playbooks", {"name": "Secret Project"},
                key=owner.key)[0] == 201
    for server in ({"name": "local-tool", "type": "stdio", "command": sys.executable,
                    "args": ["-c", "pass"], "env": {"TOKEN": "hunter2"}},
                   {"name": "remote-tool", "type": "http",
                    "url": "https://mcp.internal.example.com/mcp",
                    "headers": {"authorization": "Bearer s3cret"}}):
        status, _, body = call(quiet, "POST", "/api/v1/playbooks/secret-project/servers",
                               server, key=owner.key)
        assert status == 201, body
    assert quiet.terminate() == 0
    assert receiver.reports == []

    # Enabled: one report as soon as the instance is healthy.
    daemon = start_daemon(DATABASE_URL=migrated_url, TELEMETRY_ENABLED="true",
                          TELEMETRY_URL=receiver.url)
    daemon.wait_healthy()
    [report] = receiver.wait(1)
    path, headers, raw = receiver.reports[0]
    assert path == "/v1/events"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "director/0.1.0"
    assert list(report) == list(REPORT_FIELDS) == documented_fields()
    [(deployment_id,)] = query(migrated_url, "SELECT id::text FROM deployment")
    assert report["deployment_id"] == deployment_id
    assert report["version"] == "0.1.0"
    assert isinstance(report["uptime_seconds"], int) and 0 <= report["uptime_seconds"] < 60
    assert report["users"] == 1 and report["playbooks"] == 1
    assert report["servers"] == {"stdio": 1, "http": 1, "sse": 0}
    assert report["mcp_requests"] == {}
    for secret in (EMAIL, "private", owner.key, "dk_", "Secret", "secret-project", "local-tool",
                   "remote-tool", "hunter2", "s3cret", "mcp.internal", sys.executable,
                   owner.user_id):
        assert secret.encode() not in raw
    time.sleep(0.5)
    assert len(receiver.reports) == 1  # the next one is a day away
    assert daemon.terminate() == 0


def test_an_unreachable_collector_changes_nothing(start_daemon: StartDaemon,
                                                  migrated_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url, TELEMETRY_ENABLED="true",
                          TELEMETRY_URL=f"http://127.0.0.1:{free_port()}/v1/events",
                          LOG_LEVEL="debug")
    daemon.wait_healthy()
    assert "telemetry report not sent" in daemon.wait_for_log("telemetry report")["msg"]
    assert daemon.wait_for_log("telemetry report")["level"] == 20
    assert daemon.health()[0] == 200
    assert daemon.terminate() == 0


@pytest_twisted.ensureDeferred
async def test_mcp_requests_are_counted_since_the_last_delivered_report(
        migrated_url: str, receiver: Receiver) -> None:
    database = Database(migrated_url, 1, reactor)
    database.start()
    metrics = Metrics()
    telemetry = TelemetryService(receiver.url, database, metrics, reactor, reactor.seconds())
    telemetry.startService()
    try:
        while not database.available:
            await task.deferLater(reactor, 0.02, lambda: None)
        assert await telemetry.send()
        for method in ("tools/call", "tools/call", "tools/list", "vendor/extension"):
            metrics.mcp_request(method, "ok", 0.001)
        metrics.mcp_request("tools/call", "timeout", 1.0)
        assert await telemetry.send()
        receiver.status = 503  # refused: these counts are carried into the next report
        metrics.mcp_request("prompts/get", "ok", 0.001)
        assert not await telemetry.send()
        receiver.status = 200
        metrics.mcp_request("prompts/get", "error", 0.001)
        assert await telemetry.send()
        assert await telemetry.send()
        sent = [payload["mcp_requests"] for payload in receiver.payloads()]
        assert sent == [{}, {"other": 1, "tools/call": 3, "tools/list": 1},
                        {"prompts/get": 1}, {"prompts/get": 2}, {}]
    finally:
        telemetry.stopService()
        database.stop()


@pytest_twisted.ensureDeferred
async def test_the_uptime_is_counted_on_the_services_clock(migrated_url: str) -> None:
    database = Database(migrated_url, 1, reactor)
    database.start()
    clock = task.Clock()
    clock.advance(1_700_000_000.0)
    # The clock is the service's reactor: report() reads it and the database, nothing else.
    telemetry = TelemetryService("http://127.0.0.1:9/unused", database, Metrics(), clock,
                                 clock.seconds())
    try:
        await until_available(database)
        assert (await telemetry.report())["uptime_seconds"] == 0
        clock.advance(90_061.9)
        assert (await telemetry.report())["uptime_seconds"] == 90_061
    finally:
        database.stop()
