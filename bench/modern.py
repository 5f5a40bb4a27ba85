"""MCP's stateless era (2026-07-28) through the gateway: what a modern ``tools/call`` costs
next to a handshake-era one, and two instances serving modern calls without affinity.

* Modern vs handshake: one daemon, one playbook with the stdio echo server
  (``bench.echo_server``); ``bench.mcpload gateway`` (a session: ``initialize``, then calls
  with ``Mcp-Session-Id``) and ``bench.mcpload modern`` (no handshake; every call a
  self-contained POST with the routing headers and ``params._meta``), alternately in every
  round and in alternating order, one call in flight. Added = modern percentile minus the
  handshake one of the same round; CPU per call is the daemon's ``utime + stime`` delta over
  the run divided by every call of the run.
* Two instances, round-robin: two daemons on one database, one account, one playbook; each
  worker of ``bench.mcpload modern --port A,B`` holds a connection to each and sends its calls
  to them in turn (no session, no affinity). Success rate (answers that are the echoed text,
  200) and calls/s, against the same load on one instance, alternately in every round.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.daemon import start_director
from bench.mcp import MCP_ENV, _checked, _echo_pid, gateway_load, start_gateway
from bench.probe import free_port
from bench.reaper import Reaper
from bench.report import Figure, formatted
from bench.servers import Server, python_module
from bench.throughput import LoadRun, measure, run_json

SESSIONS = 8  # workers for the two-instance figure


def modern_load(ports: list[int], playbook: str, key: str, sessions: int, duration: float,
                warmup: float) -> dict[str, Any]:
    return run_json(python_module(
        "bench.mcpload", "modern", "--port", ",".join(str(port) for port in ports),
        "--playbook", playbook, "--key", key, "--sessions", str(sessions),
        "--duration", str(duration), "--warmup", str(warmup)),
        warmup + duration + 60, "bench.mcpload")


def _median(values: list[float]) -> float:
    return statistics.median(values)


def modern_vs_handshake(reaper: Reaper, workdir: Path, database_url: str, rounds: int,
                        duration: float, warmup: float = 1.0) -> list[Figure]:
    server, client, playbook = start_gateway(reaper, workdir, database_url, "modern-calls")
    key = str(client.key)
    _checked(gateway_load(server.port, playbook, key, 1, 0.5, 0.5), "priming call")
    _checked(modern_load([server.port], playbook, key, 1, 0.5, 0.5), "priming modern call")
    echo = _echo_pid(server.pid)
    handshake: list[LoadRun] = []
    modern: list[LoadRun] = []

    def run_handshake(port: int) -> dict[str, Any]:
        return _checked(gateway_load(port, playbook, key, 1, duration, warmup), "handshake era")

    def run_modern(port: int) -> dict[str, Any]:
        return _checked(modern_load([port], playbook, key, 1, duration, warmup), "modern era")

    for index in range(rounds):
        order = ((handshake, run_handshake), (modern, run_modern))
        for runs, generate in order if index % 2 == 0 else tuple(reversed(order)):
            runs.append(measure(server, echo, generate))
    server.stop()
    bad = sum(int(run.load.get("bad_answers") or 0) for run in modern)

    def added(stat: str) -> tuple[float, ...]:
        return tuple(m.latency(stat) - h.latency(stat)
                     for m, h in zip(modern, handshake, strict=True))

    def versus(stat: str) -> str:
        return (f"handshake {formatted(_median([r.latency(stat) for r in handshake]), 'ms')}, "
                f"modern {formatted(_median([r.latency(stat) for r in modern]), 'ms')}")

    details = {"handshake": [r.load | {"daemon_cpu_us_per_call": r.server_cpu_us}
                             for r in handshake],
               "modern": [r.load | {"daemon_cpu_us_per_call": r.server_cpu_us} for r in modern]}
    return [
        Figure("modern_added_p50", "modern-era tools/call vs handshake era, added p50", "ms",
               added("p50"), baseline=versus("p50"), details=details),
        Figure("modern_added_p99", "  added p99", "ms", added("p99"), baseline=versus("p99")),
        Figure("modern_cpu_per_call", "  daemon CPU per modern tools/call (1 in flight)", "µs",
               tuple(r.server_cpu_us for r in modern),
               baseline=f"handshake {formatted(_median([r.server_cpu_us for r in handshake]), 'µs')}"
                        f"; {bad} wrong answers"),
        Figure("modern_rps_1", "  modern calls/s, 1 in flight", "calls/s",
               tuple(r.rate for r in modern),
               baseline=f"handshake {formatted(_median([r.rate for r in handshake]), 'calls/s')}"),
    ]


def _second_instance(reaper: Reaper, workdir: Path, database_url: str) -> Server:
    return start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                          log_path=workdir / "director-modern-b.log",
                          database_url=database_url, extra_env=MCP_ENV)


def two_instances(reaper: Reaper, workdir: Path, database_url: str, rounds: int,
                  duration: float, warmup: float = 1.0) -> list[Figure]:
    first, client, playbook = start_gateway(reaper, workdir, database_url, "modern-a")
    second = _second_instance(reaper, workdir, database_url)
    key = str(client.key)
    ports = [first.port, second.port]
    _checked(modern_load(ports, playbook, key, 2, 1.0, 1.0), "priming both instances")
    both: list[dict[str, Any]] = []
    one: list[dict[str, Any]] = []
    for index in range(rounds):
        order = ((both, ports), (one, [first.port]))
        for runs, targets in order if index % 2 == 0 else tuple(reversed(order)):
            runs.append(modern_load(targets, playbook, key, SESSIONS, duration, warmup))
    first.stop()
    second.stop()

    def success(load: dict[str, Any]) -> float:
        total = int(load["responses_total"])
        return (total - int(load.get("bad_answers") or 0)) / total if total else 0.0

    split = [load.get("calls_per_port") for load in both]
    one_rate = _median([float(x["requests_per_second"]) for x in one])
    one_p99 = _median([float(x["latency_ms"]["p99"]) for x in one])
    return [
        Figure("modern_two_rps", f"modern tools/call, 2 instances round-robin, {SESSIONS} "
               "in flight", "calls/s", tuple(float(load["requests_per_second"]) for load in both),
               baseline=f"1 instance {formatted(one_rate, 'calls/s')}",
               details={"two": both, "one": one}),
        Figure("modern_two_success", "  answered correctly, 2 instances, no affinity", "x",
               tuple(success(load) for load in both),
               baseline=f"1 instance {_median([success(x) for x in one]):.4f}; "
                        f"calls per instance {split[-1] if split else '?'}"),
        Figure("modern_two_p99", "  latency p99, 2 instances", "ms",
               tuple(float(load["latency_ms"]["p99"]) for load in both),
               baseline=f"1 instance {formatted(one_p99, 'ms')}"),
    ]
