"""The cost of ``GET /api/health`` on loopback: requests/s, latency, CPU time per request.

One daemon (external DB) and one plain twisted.web baseline are started once and loaded the
same way, alternately, so that drift in the machine affects both: the Python generator
(``bench.loadgen``, a separate process) for ``rounds`` rounds, then ``wrk`` once each when it
is installed. Each round also loads the daemon with an unrouted path (a JSON 404 through the
same edge policy and Klein, but no database), which splits the health check's cost into the
web stack's share and the ``SELECT 1`` share.

Server CPU per request is the ``utime + stime`` delta of the server process over a load run
divided by every response that run received; for the daemon the PostgreSQL CPU (postmaster and
backends: each health check runs ``SELECT 1``) is reported apart.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from bench import wrk
from bench.daemon import start_director
from bench.probe import free_port
from bench.procfs import cpu_seconds, status_kib, tree_cpu_seconds
from bench.reaper import Reaper, spawn, stop_process
from bench.report import Figure, formatted
from bench.servers import REPOSITORY, Server, python_module, start_baseline

CONNECTIONS = 32
UNROUTED_PATH = "/api/bench-unrouted"


@attrs.frozen
class LoadRun:
    """One load run against one server, with the server-side CPU it cost."""

    load: dict[str, Any]
    server_cpu_us: float
    database_cpu_us: float | None

    @property
    def rate(self) -> float:
        return float(self.load["requests_per_second"])

    def latency(self, name: str) -> float:
        return float(self.load["latency_ms"][name])


def python_load(port: int, duration: float, warmup: float, path: str = "/api/health",
                expect: int = 200, *, connections: int = CONNECTIONS,
                headers: Sequence[str] = (), max_requests: int | None = None) -> dict[str, Any]:
    """Run ``bench.loadgen`` in its own process and return its JSON summary."""
    argv = python_module("bench.loadgen", "--port", str(port), "--connections", str(connections),
                         "--duration", str(duration), "--warmup", str(warmup), "--path", path,
                         "--expect", str(expect))
    for header in headers:
        argv += ["--header", header]
    if max_requests is not None:
        argv += ["--max-requests", str(max_requests)]
    return run_json(argv, warmup + duration + 30, "loadgen")


def start_json(argv: list[str]) -> subprocess.Popen[bytes]:
    """Start a load process whose last stdout line will be a JSON summary."""
    return spawn(argv, output=subprocess.PIPE, cwd=REPOSITORY)


def finish_json(process: subprocess.Popen[bytes], timeout: float, name: str) -> dict[str, Any]:
    """Wait for a process from ``start_json`` (stopping it for sure) and parse its summary."""
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        stop_process(process, grace=1.0)
    if process.returncode != 0:
        raise RuntimeError(f"{name} failed ({process.returncode}): "
                           f"{output.decode(errors='replace')[-2000:]}")
    # The last line that starts a JSON object, read up to that object's end: a child of the
    # load process that shares its output (its stderr) may have written after it.
    for line in reversed(output.decode(errors="replace").strip().splitlines()):
        if line.startswith("{"):
            return dict(json.JSONDecoder().raw_decode(line)[0])
    raise RuntimeError(f"{name} printed no JSON summary: "
                       f"{output.decode(errors='replace')[-2000:]}")


def run_json(argv: list[str], timeout: float, name: str) -> dict[str, Any]:
    """Run a load process to its end and return its JSON summary."""
    return finish_json(start_json(argv), timeout, name)


def measure(server: Server, database_pid: int | None,
            generate: Callable[[int], dict[str, Any]]) -> LoadRun:
    """Run ``generate(port)`` and charge the server's CPU delta to the responses it counted."""
    server_before = cpu_seconds(server.pid)
    database_before = tree_cpu_seconds(database_pid) if database_pid is not None else 0.0
    load = generate(server.port)
    served = max(int(load["responses_total"]), 1)
    server_cpu = (cpu_seconds(server.pid) - server_before) / served * 1e6
    database_cpu = None
    if database_pid is not None:
        database_cpu = (tree_cpu_seconds(database_pid) - database_before) / served * 1e6
    return LoadRun(load, server_cpu, database_cpu)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _python_figures(director: list[LoadRun], baseline: list[LoadRun],
                    unrouted: list[LoadRun]) -> list[Figure]:
    base_rate = _median([run.rate for run in baseline])
    ratios = tuple(d.rate / b.rate for d, b in zip(director, baseline, strict=True))

    def versus(values: list[float], unit: str) -> str:
        return f"{formatted(_median(values), unit)} plain twisted.web"

    return [
        Figure("health_rps_python", "GET /api/health, Python loader, 32 conns", "req/s",
               tuple(run.rate for run in director), baseline=versus([r.rate for r in baseline], "req/s"),
               details={"director": [r.load for r in director],
                        "baseline": [r.load for r in baseline]}),
        Figure("health_ratio_python", "  Director / baseline throughput", "x", ratios,
               baseline=f"1.00x = {formatted(base_rate, 'req/s')}"),
        Figure("health_p50_python", "  latency p50 (Python loader)", "ms",
               tuple(run.latency("p50") for run in director),
               baseline=versus([r.latency("p50") for r in baseline], "ms")),
        Figure("health_p99_python", "  latency p99 (Python loader)", "ms",
               tuple(run.latency("p99") for run in director),
               baseline=versus([r.latency("p99") for r in baseline], "ms")),
        Figure("health_cpu_per_request", "  daemon CPU per health request", "µs",
               tuple(run.server_cpu_us for run in director),
               baseline=versus([r.server_cpu_us for r in baseline], "µs")),
        Figure("health_db_cpu_per_request", "  PostgreSQL CPU per health request", "µs",
               tuple(run.database_cpu_us or 0.0 for run in director)),
        Figure("unrouted_rps_python", "unrouted GET → 404 (no DB), Python loader", "req/s",
               tuple(run.rate for run in unrouted), baseline=versus([r.rate for r in baseline], "req/s"),
               details={"director": [r.load for r in unrouted]}),
        Figure("unrouted_cpu_per_request", "  daemon CPU per unrouted request", "µs",
               tuple(run.server_cpu_us for run in unrouted),
               baseline=versus([r.server_cpu_us for r in baseline], "µs")),
    ]


def _wrk_figures(director: LoadRun, baseline: LoadRun) -> list[Figure]:
    return [
        Figure("health_rps_wrk", "GET /api/health, wrk -t1 -c32 -d5s", "req/s", (director.rate,),
               baseline=f"{formatted(baseline.rate, 'req/s')} plain twisted.web",
               details={"director": director.load, "baseline": baseline.load}),
        Figure("health_ratio_wrk", "  Director / baseline throughput (wrk)", "x",
               (director.rate / baseline.rate,)),
        Figure("health_p99_wrk", "  latency p99 (wrk)", "ms", (director.latency("p99"),),
               baseline=f"{formatted(baseline.latency('p99'), 'ms')} plain twisted.web"),
        Figure("health_cpu_per_request_wrk", "  daemon CPU per health request (wrk)", "µs",
               (director.server_cpu_us,),
               baseline=f"{formatted(baseline.server_cpu_us, 'µs')} plain twisted.web"),
    ]


def health_cost(reaper: Reaper, workdir: Path, database_url: str, database_pid: int,
                rounds: int, duration: float, warmup: float = 1.0) -> list[Figure]:
    """Figure 4: load the daemon and the baseline alternately; returns the figures."""
    director = start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                              log_path=workdir / "director-load.log", database_url=database_url)
    base = start_baseline(reaper, workdir / "baseline-load.log")
    rss_before = status_kib(director.pid, "VmRSS")

    def health(port: int) -> dict[str, Any]:
        return python_load(port, duration, warmup)

    def unrouted(port: int) -> dict[str, Any]:
        return python_load(port, duration, warmup, UNROUTED_PATH, 404)

    director_runs, baseline_runs, unrouted_runs = [], [], []
    for _ in range(rounds):
        director_runs.append(measure(director, database_pid, health))
        baseline_runs.append(measure(base, None, health))
        unrouted_runs.append(measure(director, None, unrouted))
    figures = _python_figures(director_runs, baseline_runs, unrouted_runs)
    if wrk.available():
        figures += _wrk_figures(measure(director, database_pid, wrk.run), measure(base, None, wrk.run))
    figures[0].details["director_rss_kib_before_after_load"] = [
        rss_before, status_kib(director.pid, "VmRSS")]
    director.stop()
    base.stop()
    return figures
