"""The registry: search latency cold and cached, and the time from installing a registry entry
to its first ``tools/list``.

A local registry (``tests/fixtures/registry_server.py``, API v0.1, ``Cache-Control:
max-age=60``) serves a catalogue of ``FILLERS`` servers plus ``@modelcontextprotocol/
server-everything`` (npm); one daemon reads it (``REGISTRY_TRUST=any``).

* Search, cold: ``searches`` ``GET /api/v1/registry/servers?q=…`` each with a query not asked
  before (so the daemon asks the registry); cached: the same query again (answered from the
  daemon's cache). Baseline: the same request sent to the registry directly, in the same run.
* Install → first tools/list: ``installs`` rounds of ``POST …/servers/from-registry``, then
  ``tools/list`` on a handshake-era session until the server's tools are listed; timed from
  the POST sent. The npm package is in the stdio account's npm cache after the first round
  (``details`` has each round; the first may include the download). Baseline: the same command
  line added as a plain stdio server (``DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS``), timed the
  same way. The server is removed between rounds.
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import api
from bench.daemon import start_director
from bench.probe import HOST, ProbeError, free_port
from bench.reaper import Reaper, spawn
from bench.report import Figure
from bench.servers import REPOSITORY

REGISTRY_SERVER = REPOSITORY / "tests" / "fixtures" / "registry_server.py"
FILLERS = 300
EVERYTHING = "io.github.modelcontextprotocol/everything"
PACKAGE, VERSION = "@modelcontextprotocol/server-everything", "2026.8.31"
ACCEPT = "application/json, text/event-stream"


def _catalogue() -> dict[str, Any]:
    fillers = [{"server": {"name": f"io.example/filler-{index:04d}", "version": "1.0.0",
                           "description": f"Filler server number {index}", "packages": [{
                               "registryType": "npm", "identifier": f"filler-{index}",
                               "version": "1.0.0", "transport": {"type": "stdio"}}]}}
               for index in range(FILLERS)]
    everything = {"server": {"name": EVERYTHING, "version": VERSION, "description": "All",
                             "packages": [{"registryType": "npm", "identifier": PACKAGE,
                                           "version": VERSION,
                                           "transport": {"type": "stdio"}}]}}
    return {"servers": [everything, *fillers]}


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> float:
    """Milliseconds for one GET on a new connection (its status must be 200)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    started = time.perf_counter()
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise ProbeError(f"GET {path} on port {port}: {response.status}")
    return (time.perf_counter() - started) * 1000


def _post(port: int, path: str, body: Any, headers: dict[str, str]) -> tuple[int, dict[str, str],
                                                                              bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        connection.request("POST", path, json.dumps(body).encode(),
                           {"content-type": "application/json", **headers})
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        connection.close()


def _tools(port: int, key: str, playbook: str) -> list[str]:
    headers = {"x-api-key": key, "accept": ACCEPT}
    path = f"/playbooks/{playbook}/mcp"
    _, answer, _ = _post(port, path, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                      "params": {"protocolVersion": "2025-11-25",
                                                 "capabilities": {},
                                                 "clientInfo": {"name": "bench",
                                                                "version": "1"}}}, headers)
    headers["mcp-session-id"] = answer["mcp-session-id"]
    _post(port, path, {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
    _, _, body = _post(port, path, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                       headers)
    text = body.decode()
    if not text.lstrip().startswith("{"):
        text = [line[6:] for line in text.splitlines() if line.startswith("data: ")][-1]
    return [tool["name"] for tool in json.loads(text)["result"]["tools"]]


def _until_listed(port: int, key: str, playbook: str, tool: str, started: float,
                  timeout: float = 300.0) -> float:
    while time.perf_counter() - started < timeout:
        if tool in _tools(port, key, playbook):
            return (time.perf_counter() - started) * 1000
        time.sleep(0.05)
    raise ProbeError(f"{tool} never listed in {timeout:.0f} s")


def _install_rounds(client: api.Client, port: int, playbook: str, rounds: int,
                    registry: bool) -> list[float]:
    assert client.key is not None
    times = []
    for index in range(rounds):
        name = f"{'reg' if registry else 'raw'}{index}"
        started = time.perf_counter()
        if registry:
            client.request("POST", f"/api/v1/playbooks/{playbook}/servers/from-registry",
                           {"name": EVERYTHING, "server_name": name, "choice": "package:0"},
                           expect=201)
        else:
            client.request("POST", f"/api/v1/playbooks/{playbook}/servers", {
                "name": name, "type": "stdio", "command": "npx",
                "args": ["-y", "--", f"{PACKAGE}@{VERSION}"]}, expect=201)
        times.append(_until_listed(port, client.key, playbook, "echo", started))
        client.request("DELETE", f"/api/v1/playbooks/{playbook}/servers/{name}", expect=204)
    return times


def registry_figures(reaper: Reaper, workdir: Path, database_url: str, searches: int,
                     installs: int) -> list[Figure]:
    catalogue = workdir / "registry-catalogue.json"
    catalogue.write_text(json.dumps(_catalogue()))
    catalogue.chmod(0o644)
    registry_port = free_port()
    with open(workdir / "registry.log", "ab") as log:
        process = spawn([sys.executable, str(REGISTRY_SERVER), str(catalogue),
                         str(registry_port)], output=log)
    reaper.push("stop the bench registry", process.terminate)
    deadline = time.monotonic() + 30
    while True:
        try:
            _get(registry_port, "/v0.1/servers?limit=1")
            break
        except (OSError, ProbeError):
            if time.monotonic() > deadline:
                raise ProbeError("the bench registry did not start") from None
            time.sleep(0.1)
    port = free_port()
    start_director(reaper, port=port, state_directory=workdir / "state-registry",
                   log_path=workdir / "director-registry.log", database_url=database_url,
                   extra_env={"REGISTRY_URL": f"http://{HOST}:{registry_port}",
                              "REGISTRY_TRUST": "any",
                              "DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS": "true",
                              "API_KEY_RATE_LIMIT_MAX_REQUESTS": "1000000"})
    client = api.sign_up(port, "registry")
    headers = {"x-api-key": client.key or ""}
    cold = [_get(port, f"/api/v1/registry/servers?q=filler-{index:04d}", headers)
            for index in range(searches)]
    _get(port, "/api/v1/registry/servers?q=filler", headers)
    cached = [_get(port, "/api/v1/registry/servers?q=filler", headers) for _ in range(searches)]
    direct = [_get(registry_port, f"/v0.1/servers?search=filler-{index:04d}&limit=30"
                                  "&version=latest") for index in range(searches)]
    playbook = api.create_playbook(client, "Registry bench")
    baseline = _install_rounds(client, port, playbook, installs, registry=False)
    installed = _install_rounds(client, port, playbook, installs, registry=True)
    return [
        Figure("registry_search_cold", f"Registry: search, cold (the daemon asks the registry; "
               f"median of {searches})", "ms", tuple(cold),
               baseline=f"the registry directly {statistics.median(direct):.1f} ms",
               details={"cold_ms": cold, "direct_ms": direct}),
        Figure("registry_search_cached", "  search, cached (same query again)", "ms",
               tuple(cached), baseline=f"cold {statistics.median(cold):.1f} ms",
               details={"cached_ms": cached}),
        Figure("registry_install_listed", "Registry: install (npm, npx) → first tools/list "
               "with its tools", "ms", tuple(installed),
               baseline=f"same command as a plain stdio server "
                        f"{statistics.median(baseline):.0f} ms",
               details={"registry_ms": installed, "plain_stdio_ms": baseline}),
    ]
