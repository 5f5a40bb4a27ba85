"""MCP's stateless era (2026-07-28) through the gateway: what a modern ``tools/call`` costs
next to a handshake-era one, and two instances serving modern calls without affinity.

* Modern vs handshake: one daemon, two playbooks with the stdio echo server
  (``bench.echo_server``): handshake-only (the gateway bridges a modern call to it: envelope
  off, the handshake era's session), and ``--eras both`` (it answers ``server/discover``, so
  the gateway speaks 2026-07-28 to a process of its own and relays a modern call as is).
  ``bench.mcpload gateway`` (a session: ``initialize``, then calls with ``Mcp-Session-Id``)
  and ``bench.mcpload modern`` (no handshake; every call a self-contained POST with the
  routing headers and ``params._meta``) on each, all four in every round and in alternating
  order, one call in flight. Added = modern percentile minus the handshake one of the same
  round and playbook; CPU per call is the daemon's ``utime + stime`` delta over the run
  divided by every call of the run.
* Two instances, round-robin: two daemons on one database, one account, one playbook; each
  worker of ``bench.mcpload modern --port A,B`` holds a connection to each and sends its calls
  to them in turn (no session, no affinity). Success rate (answers that are the echoed text,
  200) and calls/s, against the same load on one instance, alternately in every round.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from bench import api
from bench.daemon import start_director
from bench.mcp import MCP_ENV, _checked, gateway_load, start_gateway
from bench.probe import free_port
from bench.reaper import Reaper
from bench.report import Figure, formatted
from bench.servers import Server, python_module
from bench.throughput import LoadRun, measure, run_json

SESSIONS = 8  # workers for the two-instance figure
#: The echo server's option that makes it speak 2026-07-28 too.
DUAL_ERA = ("--eras", "both")


def modern_load(ports: list[int], playbook: str, key: str, sessions: int, duration: float,
                warmup: float) -> dict[str, Any]:
    return run_json(python_module(
        "bench.mcpload", "modern", "--port", ",".join(str(port) for port in ports),
        "--playbook", playbook, "--key", key, "--sessions", str(sessions),
        "--duration", str(duration), "--warmup", str(warmup)),
        warmup + duration + 60, "bench.mcpload")


def _median(values: list[float]) -> float:
    return statistics.median(values)


@attrs.define
class EraRuns:
    """Handshake-era and modern calls to one playbook, one of each per round."""

    playbook: str
    handshake: list[LoadRun] = attrs.field(factory=list)
    modern: list[LoadRun] = attrs.field(factory=list)

    @property
    def bad_answers(self) -> int:
        return sum(int(run.load.get("bad_answers") or 0) for run in self.modern)


def _dual_era_playbook(client: api.Client) -> str:
    """A second playbook whose echo server speaks both eras: the gateway relays a modern call
    to it as is, where the handshake-only one makes it translate (bridge) the call."""
    playbook = api.create_playbook(client, "Bench Echo Dual-Era")
    api.add_echo_server(client, playbook, options=DUAL_ERA)
    return playbook


def modern_vs_handshake(reaper: Reaper, workdir: Path, database_url: str, rounds: int,
                        duration: float, warmup: float = 1.0) -> list[Figure]:
    """Both clients' calls to the handshake-only echo server and to the dual-era one, all
    four in every round (in alternating order), on one daemon."""
    server, client, playbook = start_gateway(reaper, workdir, database_url, "modern-calls")
    key = str(client.key)
    pairs = (EraRuns(playbook), EraRuns(_dual_era_playbook(client)))
    for pair in pairs:
        _checked(gateway_load(server.port, pair.playbook, key, 1, 0.5, 0.5), "priming call")
        _checked(modern_load([server.port], pair.playbook, key, 1, 0.5, 0.5),
                 "priming modern call")

    def handshake_era(target: str) -> Callable[[int], dict[str, Any]]:
        return lambda port: _checked(gateway_load(port, target, key, 1, duration, warmup),
                                     "handshake era")

    def modern_era(target: str) -> Callable[[int], dict[str, Any]]:
        return lambda port: _checked(modern_load([port], target, key, 1, duration, warmup),
                                     "modern era")

    steps = [step for pair in pairs for step in ((pair.handshake, handshake_era(pair.playbook)),
                                                 (pair.modern, modern_era(pair.playbook)))]
    for index in range(rounds):
        for runs, generate in steps if index % 2 == 0 else reversed(steps):
            runs.append(measure(server, None, generate))  # the echo servers' CPU is theirs
    server.stop()
    bridged, relayed = pairs
    return [
        *_era_figures("modern", "modern-era tools/call vs handshake era", bridged),
        Figure("modern_rps_1", "  modern calls/s, 1 in flight", "calls/s",
               tuple(r.rate for r in bridged.modern),
               baseline=f"handshake "
                        f"{formatted(_median([r.rate for r in bridged.handshake]), 'calls/s')}"),
        *_era_figures("modern_dual", "modern tools/call to a dual-era upstream (relayed as is)",
                      relayed),
    ]


def _era_figures(prefix: str, title: str, pair: EraRuns) -> list[Figure]:
    """Added latency (modern minus handshake of the same round) and the daemon's CPU."""
    def added(stat: str) -> tuple[float, ...]:
        return tuple(m.latency(stat) - h.latency(stat)
                     for m, h in zip(pair.modern, pair.handshake, strict=True))

    def versus(stat: str) -> str:
        return (f"handshake {formatted(_median([r.latency(stat) for r in pair.handshake]), 'ms')}"
                f", modern {formatted(_median([r.latency(stat) for r in pair.modern]), 'ms')}")

    details = {"handshake": [r.load | {"daemon_cpu_us_per_call": r.server_cpu_us}
                             for r in pair.handshake],
               "modern": [r.load | {"daemon_cpu_us_per_call": r.server_cpu_us}
                          for r in pair.modern]}
    handshake_cpu = formatted(_median([r.server_cpu_us for r in pair.handshake]), "µs")
    return [
        Figure(f"{prefix}_added_p50", f"{title}, added p50", "ms", added("p50"),
               baseline=versus("p50"), details=details),
        Figure(f"{prefix}_added_p99", "  added p99", "ms", added("p99"), baseline=versus("p99")),
        Figure(f"{prefix}_cpu_per_call", "  daemon CPU per modern tools/call (1 in flight)", "µs",
               tuple(r.server_cpu_us for r in pair.modern),
               baseline=f"handshake {handshake_cpu}; {pair.bad_answers} wrong answers"),
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
