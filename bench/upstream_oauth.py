"""Upstream OAuth: what a cached token adds to a call, and how many refreshes a crowd of calls
at expiry causes across instances.

* The provider's own cost: ``OAuthProvider.headers`` with a cached, fresh token (what the
  HTTP transport awaits before each request), timed in this process over 100,000 calls a
  round: the work the seam adds to a request, without the network's noise.

* Added latency: ``tools/call`` of ``echo`` on the protected fixture server
  (``tests/fixtures/oauth_server.py``: the ``mcp`` SDK's server with its bearer middleware,
  and its authorization server), one call in flight (``bench.mcpload gateway``, one session),
  through two playbooks of the same daemon: one whose server Director authorized by OAuth (the
  token cached, put on each request by the OAuth provider), one whose server has a static
  ``Authorization`` header (a token minted by the same authorization server). Both reach the
  same server, which checks either token the same way; the loads alternate, in alternating
  order, in the same run. Figures: each one's p50 and p99, and OAuth minus static per round.
* Refreshes at expiry: two daemons on one database, ten client sessions on each (each with
  its upstream session and the token), every token expired at the authorization server (which
  answers refreshes after 1 s, to hold the race open), then 100 concurrent ``tools/call`` over
  the twenty sessions: how many refreshes the authorization server saw (budget: one).
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.daemon import start_director
from bench.mcp import _checked, gateway_load
from bench.probe import HOST, free_port
from bench.reaper import Reaper, spawn, stop_process
from bench.report import Budget, Figure, formatted
from bench.servers import REPOSITORY, Server

FIXTURE = REPOSITORY / "tests" / "fixtures" / "oauth_server.py"
ENV = {"DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS": "true", "API_KEY_RATE_LIMIT_MAX_REQUESTS":
       "100000000", "USER_RATE_LIMIT_MAX_REQUESTS": "100000000"}
ONE_REFRESH = Budget(1.0, "exactly 1", low=1.0)


def _http(port: int, method: str, path: str, body: Any = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        sent = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["content-type"] = "application/json"
        connection.request(method, path, data, sent)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, \
            response.read()
    finally:
        connection.close()


def _ok(answer: tuple[int, dict[str, str], bytes], expected: int = 200) -> Any:
    status, _, body = answer
    if status != expected:
        raise RuntimeError(f"unexpected {status}: {body[:300].decode(errors='replace')}")
    return json.loads(body) if body else None


def _protected(reaper: Reaper, workdir: Path) -> int:
    """The fixture server, on a free port; returns the port once it listens."""
    port = free_port()
    with open(workdir / "oauth-server.log", "ab") as log:
        process = spawn([sys.executable, str(FIXTURE), "--port", str(port)], output=log,
                        cwd=FIXTURE.parent)
    reaper.push(f"stop the OAuth fixture (pid {process.pid})", lambda: stop_process(process))
    deadline = time.monotonic() + 30
    while True:
        try:
            _http(port, "GET", "/debug/stats")
            return port
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the OAuth fixture server did not start") from None
            time.sleep(0.1)


class Owner:
    """An account on a daemon: its API key and its session cookie (for the callback)."""

    def __init__(self, port: int, label: str) -> None:
        self.port = port
        status, headers, body = _http(port, "POST", "/api/v1/auth/signup", {
            "email": f"{label}-{time.monotonic_ns()}@bench.invalid",
            "password": "bench-password-1234"})
        if status != 201:
            raise RuntimeError(f"sign-up: {status} {body[:200]!r}")
        self.key = json.loads(body)["api_key"]["key"]
        self.cookie = headers["set-cookie"].split(";", 1)[0]

    def api(self, method: str, path: str, body: Any = None, expected: int = 200) -> Any:
        return _ok(_http(self.port, method, path, body, {"x-api-key": self.key}), expected)

    def add_server(self, playbook: str, server: dict[str, Any]) -> None:
        self.api("POST", "/api/v1/playbooks", {"name": playbook}, 201)
        self.api("POST", f"/api/v1/playbooks/{playbook}/servers", server, 201)

    def authorize(self, oauth_port: int, playbook: str, name: str) -> None:
        """The whole flow: the authorize URL, the authorization server (which approves at
        once), and the callback with the session cookie."""
        url = self.api("POST", f"/api/v1/playbooks/{playbook}/servers/{name}/authorize")[
            "authorize_url"]
        parts = urllib.parse.urlsplit(url)
        status, headers, _ = _http(oauth_port, "GET", f"{parts.path}?{parts.query}")
        back = urllib.parse.urlsplit(headers["location"])
        status, headers, body = _http(self.port, "GET", f"{back.path}?{back.query}",
                                      headers={"cookie": self.cookie})
        if status != 303 or "server-authorized" not in headers.get("location", ""):
            raise RuntimeError(f"authorization did not complete: {status} "
                               f"{headers.get('location')} {body[:200]!r}")


def _daemon(reaper: Reaper, workdir: Path, database_url: str, label: str) -> Server:
    port = free_port()
    return start_director(reaper, port=port, state_directory=workdir / "state-external",
                          log_path=workdir / f"director-{label}.log", database_url=database_url,
                          extra_env=ENV | {"BASE_URL": f"http://{HOST}:{port}"})


# --- added latency ----------------------------------------------------------------------------


def cached_token_latency(reaper: Reaper, workdir: Path, database_url: str, rounds: int,
                         duration: float, warmup: float = 1.0) -> list[Figure]:
    oauth_port = _protected(reaper, workdir)
    url = f"http://{HOST}:{oauth_port}/mcp"
    daemon = _daemon(reaper, workdir, database_url, "oauth-latency")
    owner = Owner(daemon.port, "oauth-latency")
    owner.add_server("by-oauth", {"name": "protected", "type": "http", "url": url})
    owner.authorize(oauth_port, "by-oauth", "protected")
    minted = _ok(_http(oauth_port, "POST", "/debug/mint", {}))["access_token"]
    owner.add_server("by-header", {"name": "protected", "type": "http", "url": url, "headers": {
        "Authorization": {"value": f"Bearer {minted}", "secret": True}}})
    loads: dict[str, list[dict[str, Any]]] = {"by-oauth": [], "by-header": []}
    for playbook in loads:  # a first session each (the upstream handshake, a first list)
        _checked(gateway_load(daemon.port, playbook, owner.key, 1, 0.5, 0.5), playbook)
    for index in range(rounds):
        order = list(loads) if index % 2 == 0 else list(reversed(loads))
        for playbook in order:
            loads[playbook].append(_checked(gateway_load(daemon.port, playbook, owner.key, 1,
                                                         duration, warmup), playbook))
    refreshes = _ok(_http(oauth_port, "GET", "/debug/stats"))["refreshes"]
    daemon.stop()
    figures = []
    for name in ("p50", "p99"):
        oauth = [load["latency_ms"][name] for load in loads["by-oauth"]]
        static = [load["latency_ms"][name] for load in loads["by-header"]]
        figures.append(Figure(
            f"upstream_oauth.cached_token_added_{name}_ms",
            f"tools/call {name}, OAuth token vs static header: added", "ms",
            tuple(a - b for a, b in zip(oauth, static, strict=True)),
            baseline=f"static header {formatted(statistics.median(static), 'ms')}, OAuth "
                     f"{formatted(statistics.median(oauth), 'ms')}",
            details={"oauth_ms": oauth, "static_ms": static, "refreshes": refreshes}))
    return figures


# --- refreshes at expiry ----------------------------------------------------------------------


def _session(port: int, key: str, playbook: str) -> str:
    _, headers, _ = _http(port, "POST", f"/playbooks/{playbook}/mcp", {
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "bench", "version": "1"}}},
        {"x-api-key": key, "accept": "application/json, text/event-stream"})
    session = headers["mcp-session-id"]
    _http(port, "POST", f"/playbooks/{playbook}/mcp",
          {"jsonrpc": "2.0", "method": "notifications/initialized"},
          {"x-api-key": key, "mcp-session-id": session,
           "accept": "application/json, text/event-stream"})
    return session


def _echo(port: int, key: str, playbook: str, session: str, request_id: int) -> bool:
    status, _, body = _http(port, "POST", f"/playbooks/{playbook}/mcp", {
        "jsonrpc": "2.0", "id": request_id, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": f"call {request_id}"}}},
        {"x-api-key": key, "mcp-session-id": session,
         "accept": "application/json, text/event-stream"})
    return status == 200 and f'"text": "call {request_id}"' in body.decode().replace(
        '"text":"', '"text": "')


def _crowd_call(arguments: tuple[tuple[int, str], str, int]) -> bool:
    (port, session), key, number = arguments
    return _echo(port, key, "work", session, 100 + number)


def refreshes_at_expiry(reaper: Reaper, workdir: Path, database_url: str, rounds: int
                        ) -> list[Figure]:
    seen: list[float] = []
    failures = 0
    for index in range(rounds):
        oauth_port = _protected(reaper, workdir)
        first = _daemon(reaper, workdir, database_url, f"oauth-refresh-{index}-a")
        second = _daemon(reaper, workdir, database_url, f"oauth-refresh-{index}-b")
        owner = Owner(first.port, f"oauth-refresh-{index}")
        owner.add_server("work", {"name": "protected", "type": "http",
                                  "url": f"http://{HOST}:{oauth_port}/mcp"})
        owner.authorize(oauth_port, "work", "protected")
        sessions = [(daemon.port, _session(daemon.port, owner.key, "work"))
                    for daemon in (first, second) for _ in range(10)]
        for port, session in sessions:
            _echo(port, owner.key, "work", session, 1)
        _ok(_http(oauth_port, "POST", "/debug/knobs", {"refresh_delay": 1.0}))
        _ok(_http(oauth_port, "POST", "/debug/expire", {}))

        with ThreadPoolExecutor(100) as pool:
            failures += sum(1 for ok in pool.map(_crowd_call, [
                (sessions[number % len(sessions)], owner.key, number)
                for number in range(100)]) if not ok)
        seen.append(float(_ok(_http(oauth_port, "GET", "/debug/stats"))["refreshes"]))
        first.stop()
        second.stop()
    return [Figure("upstream_oauth.refreshes_at_expiry",
                   "refreshes for 100 concurrent calls at expiry, 2 instances", "refreshes",
                   tuple(seen), budget=ONE_REFRESH,
                   details={"failed_calls": failures, "calls_per_round": 100})]


# --- the provider's own cost ------------------------------------------------------------------


class _NoDatabase:
    """The provider's hot path never reaches the database (a cached, fresh token)."""

    async def run(self, interaction: Any) -> Any:
        raise AssertionError("the cached path used the database")


def provider_cost(calls: int, rounds: int) -> list[Figure]:
    """Figure: what ``OAuthProvider.headers`` costs one upstream request with a cached token
    (the whole of what the OAuth seam adds to a request the server accepts: the HTTP
    transport awaits it and merges its one header), measured in this process."""
    import uuid

    from twisted.internet import reactor

    from director.config import Settings
    from director.crypto import SecretBox
    from director.mcp.upstream.http_plumbing import new_pool
    from director.oauth.client.discovery import Discovery
    from director.oauth.client.service import UpstreamAuthorizations
    from director.oauth.client.store import Credential
    from director.oauth.client.tokens import Client
    from director.playbooks.model import Server as Upstream

    url = "https://mcp.example.com/mcp"
    service = UpstreamAuthorizations(Settings(), _NoDatabase(),  # type: ignore[arg-type]
                                     SecretBox("x" * 40), reactor, new_pool(reactor))
    user = uuid.uuid4()
    service._discoveries[url] = Discovery(url, url, "https://as.example.com", {}, {})
    now = time.time()
    credential = Credential(uuid.uuid4(), user, "https://as.example.com", url,
                            Client("dcr", "id", None, "none"), "https://as.example.com/token",
                            None, "a" * 40, "r" * 40, "mcp", now + 3600, now, 1)
    credential.header = {"Authorization": "Bearer " + "a" * 40}
    service._install(credential)
    provider = service.provider(user, Upstream("p", "http", url=url))
    assert provider is not None
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            pending = provider.headers(url)
            try:  # noqa: SIM105 - the cheapest driver of a coroutine that never suspends
                pending.send(None)
            except StopIteration:
                pass
        samples.append((time.perf_counter() - started) / calls * 1e6)
    return [Figure("upstream_oauth.provider_us", "OAuth provider per upstream request (cached "
                   "token)", "µs", tuple(samples), baseline="static header: none",
                   details={"calls_per_round": calls})]
