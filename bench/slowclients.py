"""Slow clients against one daemon: how long 2,000 trickling connections are held, what they
cost, and what ordinary requests see meanwhile.

Each round starts a daemon with the default deadlines and cap, measures ``GET /api/health``
latency alone (fresh connections from 127.0.0.1, back to back), then runs ``bench.slowloris``
twice: 2,000 connections spread over as many source addresses (the deadlines alone), then
2,000 from one address (the per-address cap first). During each attack the same health
requests are timed and the daemon's ``VmRSS`` sampled. The issue's finding before the
deadlines existed: all 2,000 were held for the whole 100 s observed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.daemon import start_director
from bench.probe import free_port, health_status
from bench.procfs import status_kib
from bench.reaper import Reaper
from bench.report import Figure, formatted
from bench.servers import Server, python_module
from bench.throughput import finish_json, start_json

CONNECTIONS = 2000
#: How often the idle-probing loop asks for health, and how long the quiet baseline lasts.
PROBE_PAUSE = 0.02
QUIET_SECONDS = 3.0
LIMIT_SECONDS = 120.0


def _health_ms(port: int) -> float | None:
    started = time.perf_counter()
    status = health_status(port)
    return (time.perf_counter() - started) * 1000 if status == 200 else None


def _quiet_latencies(port: int) -> list[float]:
    latencies, until = [], time.monotonic() + QUIET_SECONDS
    while time.monotonic() < until:
        latency = _health_ms(port)
        if latency is not None:
            latencies.append(latency)
        time.sleep(PROBE_PAUSE)
    return latencies


def _attack(server: Server, sources: str) -> dict[str, Any]:
    """One ``bench.slowloris`` run, timing health requests and sampling RSS meanwhile."""
    attacker = start_json(python_module(
        "bench.slowloris", "--port", str(server.port), "--connections", str(CONNECTIONS),
        "--sources", sources, "--limit", str(LIMIT_SECONDS)))
    latencies: list[float] = []
    failed = 0
    peak_kib = status_kib(server.pid, "VmRSS")
    while attacker.poll() is None:
        latency = _health_ms(server.port)
        if latency is None:
            failed += 1
        else:
            latencies.append(latency)
        peak_kib = max(peak_kib, status_kib(server.pid, "VmRSS"))
        time.sleep(PROBE_PAUSE)
    result = finish_json(attacker, 10, "bench.slowloris")
    result.update(health_ms=latencies, health_failures=failed, peak_rss_kib=peak_kib)
    return result


def _round(reaper: Reaper, workdir: Path, database_url: str) -> dict[str, Any]:
    server = start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                            log_path=workdir / "director-slow.log", database_url=database_url,
                            extra_env={"MAX_CONNECTIONS_PER_ADDRESS": "64"})
    try:
        rss_kib = status_kib(server.pid, "VmRSS")
        quiet = _quiet_latencies(server.port)
        spread = _attack(server, "spread")
        one = _attack(server, "one")
        after_kib = status_kib(server.pid, "VmRSS")
    finally:
        server.stop()
    return {"quiet_ms": quiet, "spread": spread, "one": one, "rss_kib": rss_kib,
            "rss_after_kib": after_kib}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[-1] if len(values) >= 2 else float("nan")


def _held(rounds: list[dict[str, Any]], attack: str, mark: str) -> tuple[float, ...]:
    return tuple(float(r[attack]["held"].get(mark, 0)) for r in rounds)


def _all_closed(rounds: list[dict[str, Any]], attack: str) -> tuple[float, ...]:
    return tuple(r[attack]["all_closed_s"] if r[attack]["all_closed_s"] is not None
                 else LIMIT_SECONDS for r in rounds)


def _refused(rounds: list[dict[str, Any]], attack: str) -> str:
    refused = _median([r[attack]["refused_at_once"] for r in rounds])
    return f"refused at once: {refused:,.0f}; before the deadlines: all held 100 s"


def _health_note(rounds: list[dict[str, Any]], attack: str, quiet: str) -> str:
    p99 = formatted(_median([_p99(r[attack]["health_ms"]) for r in rounds]), "ms")
    failed = ", ".join(str(r[attack]["health_failures"]) for r in rounds)
    return f"p99 {p99}; without the attack p50 / p99 {quiet}; failed: {failed}"


def slow_clients(reaper: Reaper, workdir: Path, database_url: str, rounds: int) -> list[Figure]:
    results = [_round(reaper, workdir, database_url) for _ in range(rounds)]
    quiet_ms = [x for r in results for x in r["quiet_ms"]]
    quiet = f"{formatted(_median(quiet_ms), 'ms')} / {formatted(_p99(quiet_ms), 'ms')}"
    rss_before = formatted(_median([r["rss_kib"] / 1024 for r in results]), "MiB")
    figures = []
    for attack, title in (("spread", f"{CONNECTIONS:,} slow clients, one address each"),
                          ("one", f"{CONNECTIONS:,} slow clients from one address")):
        figures += [
            Figure(f"slow_{attack}_held_5s", f"{title}: held at 5 s", "n",
                   _held(results, attack, "5"), baseline=_refused(results, attack),
                   details={"rounds": [{k: v for k, v in r[attack].items() if k != "health_ms"}
                                       for r in results]}),
            Figure(f"slow_{attack}_held_15s", "  held at 15 s", "n",
                   _held(results, attack, "15"),
                   baseline="held at 10 s: " + ", ".join(
                       f"{int(x):,}" for x in _held(results, attack, "10"))),
            Figure(f"slow_{attack}_all_closed", "  last one closed after", "s",
                   _all_closed(results, attack),
                   baseline="answered 408: " + ", ".join(
                       f"{r[attack]['answered_408']:,}" for r in results)),
            Figure(f"slow_{attack}_peak_rss", "  daemon peak RSS during the attack", "MiB",
                   tuple(r[attack]["peak_rss_kib"] / 1024 for r in results),
                   baseline=f"before {rss_before}"),
            Figure(f"slow_{attack}_health", "  GET /api/health meanwhile, p50", "ms",
                   tuple(_median(r[attack]["health_ms"]) for r in results),
                   baseline=_health_note(results, attack, quiet)),
        ]
    return figures
