"""Operations: what the Prometheus metrics endpoint costs the hot path.

Two daemons on the same database, identical but for ``METRICS_LISTEN=127.0.0.1:<free port>``
(set on one, unset on the other), each with its own account and a playbook with the stdio
echo server (``bench.echo_server``). Both get the same ``tools/call`` load
(``bench.mcpload gateway``, ``SESSIONS`` sessions, one call in flight each), alternately in
every round and in alternating order, so that drift in the machine affects both alike.
Calls/s and the daemon's own CPU per proxied call (``utime + stime`` delta over the run
divided by every call of the run) are compared round by round. The metrics daemon's
``/metrics`` is scraped once at the end: its ``director_mcp_requests`` count of
``tools/call`` must cover the calls the loads made (else the endpoint was not measuring
anything).
"""

from __future__ import annotations

import http.client
import re
import statistics
from pathlib import Path
from typing import Any

from bench import api
from bench.daemon import start_director
from bench.mcp import MCP_ENV, _checked, _echo_pid, gateway_load
from bench.probe import HOST, free_port
from bench.reaper import Reaper
from bench.report import Figure, formatted
from bench.servers import Server
from bench.throughput import LoadRun, measure

SESSIONS = 32
_TOOLS_CALL = re.compile(
    r'^director_mcp_requests_total\{[^}]*method="tools/call"[^}]*\}\s+([0-9.e+]+)$', re.M)


def _gateway(reaper: Reaper, workdir: Path, database_url: str, label: str,
             metrics_port: int | None) -> tuple[Server, str, str]:
    env = dict(MCP_ENV)
    if metrics_port is not None:
        env["METRICS_LISTEN"] = f"{HOST}:{metrics_port}"
    server = start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                            log_path=workdir / f"director-{label}.log",
                            database_url=database_url, extra_env=env)
    client = api.sign_up(server.port, label)
    playbook = api.create_playbook(client, "Bench Echo")
    api.add_echo_server(client, playbook)
    return server, str(client.key), playbook


def _scrape(port: int) -> str:
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
        if response.status != 200:
            raise RuntimeError(f"/metrics answered {response.status}: {body[:200]}")
        return body
    finally:
        connection.close()


def metrics_overhead(reaper: Reaper, workdir: Path, database_url: str, rounds: int,
                     duration: float, warmup: float = 1.0) -> list[Figure]:
    """Figure: calls/s and daemon CPU per ``tools/call`` with and without ``METRICS_LISTEN``."""
    metrics_port = free_port()
    on, on_key, on_playbook = _gateway(reaper, workdir, database_url, "ops-metrics-on",
                                       metrics_port)
    off, off_key, off_playbook = _gateway(reaper, workdir, database_url, "ops-metrics-off", None)
    identity = {on.pid: (on_key, on_playbook), off.pid: (off_key, off_playbook)}
    calls_made = 0

    def load(server: Server) -> LoadRun:
        nonlocal calls_made
        key, playbook = identity[server.pid]

        def generate(port: int) -> dict[str, Any]:
            return _checked(gateway_load(port, playbook, key, SESSIONS, duration, warmup),
                            f"gateway, {SESSIONS} sessions")

        run = measure(server, _echo_pid(server.pid), generate)
        if server is on:
            calls_made += int(run.load["responses_total"])
        return run

    for server in (on, off):  # start each echo server; both daemons warm
        key, playbook = identity[server.pid]
        _checked(gateway_load(server.port, playbook, key, 1, 0.5, 0.5), "priming call")
    with_metrics: list[LoadRun] = []
    without: list[LoadRun] = []
    for index in range(rounds):
        order = (on, off) if index % 2 == 0 else (off, on)
        for server in order:
            (with_metrics if server is on else without).append(load(server))
    scraped = _scrape(metrics_port)
    on.stop()
    off.stop()
    counted = sum(float(value) for value in _TOOLS_CALL.findall(scraped))
    if counted < calls_made:
        raise RuntimeError(f"/metrics counted {counted:.0f} tools/call, the loads made "
                           f"{calls_made}: the metrics daemon did not count them")
    return _figures(with_metrics, without, counted, len(scraped))


def _figures(on: list[LoadRun], off: list[LoadRun], counted: float,
             scrape_bytes: int) -> list[Figure]:
    def median(values: list[float]) -> float:
        return statistics.median(values)

    details = {"metrics_on": [run.load | {"daemon_cpu_us_per_call": run.server_cpu_us}
                              for run in on],
               "metrics_off": [run.load | {"daemon_cpu_us_per_call": run.server_cpu_us}
                               for run in off],
               "tools_call_counted_by_metrics": counted, "scrape_bytes": scrape_bytes}
    pairs = list(zip(on, off, strict=True))
    return [
        Figure("ops_metrics_rps", f"tools/call throughput, {SESSIONS} sessions, "
               "METRICS_LISTEN set", "calls/s", tuple(run.rate for run in on),
               baseline=f"unset {formatted(median([r.rate for r in off]), 'calls/s')}",
               details=details),
        Figure("ops_metrics_rps_ratio", "  set / unset throughput (same round)", "x",
               tuple(a.rate / b.rate for a, b in pairs), baseline="1.00x = no cost"),
        Figure("ops_metrics_cpu_per_call", "  daemon CPU per proxied tools/call, set", "µs",
               tuple(run.server_cpu_us for run in on),
               baseline=f"unset {formatted(median([r.server_cpu_us for r in off]), 'µs')}"),
        Figure("ops_metrics_cpu_added", "  CPU per call added by metrics (set - unset)", "µs",
               tuple(a.server_cpu_us - b.server_cpu_us for a, b in pairs),
               baseline=f"/metrics counted {counted:,.0f} tools/call; one scrape "
                        f"{scrape_bytes:,} B"),
    ]
