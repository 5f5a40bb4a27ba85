"""MCP gateway (handshake era): per-call overhead, throughput, idle streams and fan-out.

* Added latency: ``tools/call`` of ``echo`` on ``bench.echo_server`` (a stdio server that
  answers in microseconds), one call in flight, through the gateway (one Streamable HTTP
  session, ``bench.mcpload gateway``) and straight over the server's stdin/stdout
  (``bench.mcpload direct``), alternately in the same run; added = the gateway's percentile
  minus the direct one.
* Gateway CPU per proxied call: the daemon's ``utime + stime`` over a run divided by every
  call of the run (the echo server's own CPU is its own process, reported apart). Its floor:
  ``bench.baseline_server`` answering the same POSTs itself (plain twisted.web, no upstream),
  loaded and measured the same way in the same rounds.
* Throughput with 1, 8 and 32 sessions, one connection and one call in flight each; the echo
  server with as many calls in flight on its pipe is the baseline.
* Idle sessions: ``bench.streams`` opens ``sessions`` sessions (``initialize``,
  ``notifications/initialized``, ``GET`` stream) and holds them; memory per session is the
  daemon's RSS delta divided by their number. The same on a fresh daemon for the legacy
  HTTP+SSE transport (one ``GET /sse`` each). The plain twisted.web server holding as many
  raw SSE responses is the baseline.
* Fan-out: a prompt added to or removed from the playbook (one REST request) sends
  ``notifications/prompts/list_changed`` to every one of those streams; timed from the commit
  (the NOTIFY, seen by a LISTEN connection in the holder's process) to the kernel's receive
  stamp on the last stream. Twisted buffers every write until the reactor's next turn, so the
  first stream's arrival comes only after the daemon has prepared all of them: first → last
  shows the socket writes alone. The baseline's ``POST /fanout`` has no database, so its
  request → last is the comparable figure.
"""

from __future__ import annotations

import contextlib
import http.client
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from bench import api
from bench.accounts import NO_LIMIT
from bench.daemon import start_director
from bench.probe import HOST, free_port
from bench.procfs import children_of, cpu_seconds, status_kib
from bench.reaper import Reaper
from bench.report import Budget, Figure, formatted
from bench.servers import Server, python_module, start_baseline
from bench.streams import StreamHolder, start_holder
from bench.throughput import LoadRun, measure, run_json

ADDED_P50_BUDGET = Budget(0.5, "≤ 0.5 ms")
ADDED_P99_BUDGET = Budget(2.0, "≤ 2 ms")
CPU_BUDGET = Budget(250.0, "≤ 250 µs")
THROUGHPUT_BUDGET = Budget(3000.0, "≥ 3,000 calls/s", at_most=False)
#: DESIGN.md says 16 KB; /proc counts KiB, so the figure is in KiB: 16,000 B = 15.6 KiB.
SESSION_MEMORY_BUDGET = Budget(16_000 / 1024, "≤ 16 KB")
FANOUT_BUDGET = Budget(100.0, "≤ 100 ms at 10,000")
FANOUT_BUDGET_SIZE = 10_000
STALL_BUDGET = Budget(20.0, "≤ 20 ms")
SESSION_COUNTS = (1, 8, 32)

MCP_ENV = NO_LIMIT | {"DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS": "true",
                      "MCP_MAX_SESSIONS_PER_USER": "20000"}


def start_gateway(reaper: Reaper, workdir: Path, database_url: str,
                  label: str) -> tuple[Server, api.Client, str]:
    """A daemon for MCP figures, an account, and a playbook with the echo server."""
    server = start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                            log_path=workdir / f"director-{label}.log",
                            database_url=database_url, extra_env=MCP_ENV)
    client = api.sign_up(server.port, label)
    playbook = api.create_playbook(client, "Bench Echo")
    api.add_echo_server(client, playbook)
    return server, client, playbook


def gateway_load(port: int, playbook: str, key: str, sessions: int, duration: float,
                 warmup: float) -> dict[str, Any]:
    return run_json(python_module(
        "bench.mcpload", "gateway", "--port", str(port), "--playbook", playbook, "--key", key,
        "--sessions", str(sessions), "--duration", str(duration), "--warmup", str(warmup)),
        warmup + duration + 60, "bench.mcpload")


def direct_load(in_flight: int, duration: float, warmup: float) -> dict[str, Any]:
    import sys

    return run_json(python_module(
        "bench.mcpload", "direct", "--sessions", str(in_flight), "--duration", str(duration),
        "--warmup", str(warmup), "--", sys.executable, "-I", "-S", str(api.ECHO_SERVER)),
        warmup + duration + 60, "bench.mcpload")


def _echo_pid(daemon_pid: int) -> int | None:
    """The echo server the daemon started (its child, after the stdio launcher's execs)."""
    for pid in children_of(daemon_pid):
        try:
            if b"echo_server.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def _checked(load: dict[str, Any], what: str) -> dict[str, Any]:
    if load.get("setup_failures") or not load.get("responses_in_window"):
        raise RuntimeError(f"{what}: no calls measured ({load.get('first_error')})")
    return load


# --- calls ---------------------------------------------------------------------------------


def calls(reaper: Reaper, workdir: Path, database_url: str, rounds: int, duration: float,
          warmup: float = 1.0) -> list[Figure]:
    """Latency, CPU and throughput of proxied ``tools/call``; direct stdio as the baseline."""
    server, client, playbook = start_gateway(reaper, workdir, database_url, "mcp-calls")
    key = str(client.key)
    _checked(gateway_load(server.port, playbook, key, 1, 0.5, 0.5), "priming call")
    echo = _echo_pid(server.pid)
    base = start_baseline(reaper, workdir / "baseline-calls.log")
    direct: dict[int, list[dict[str, Any]]] = {1: [], 32: []}
    gateway: dict[int, list[LoadRun]] = {count: [] for count in SESSION_COUNTS}
    floor: dict[int, list[LoadRun]] = {1: [], 32: []}
    for _ in range(rounds):
        for count in SESSION_COUNTS:
            if count in direct:
                direct[count].append(_checked(direct_load(count, duration, warmup), "direct"))

            def load(port: int, sessions: int = count) -> dict[str, Any]:
                return _checked(gateway_load(port, playbook, key, sessions, duration, warmup),
                                f"gateway, {sessions} sessions")

            gateway[count].append(measure(server, echo, load))
            if count in floor:
                floor[count].append(measure(base, None, load))
    server.stop()
    base.stop()
    return _call_figures(direct, gateway, floor, echo is not None)


def _call_figures(direct: dict[int, list[dict[str, Any]]], gateway: dict[int, list[LoadRun]],
                  floor: dict[int, list[LoadRun]], echo_found: bool) -> list[Figure]:
    def direct_ms(stat: str) -> list[float]:
        return [float(load["latency_ms"][stat]) for load in direct[1]]

    def gateway_ms(stat: str) -> list[float]:
        return [run.latency(stat) for run in gateway[1]]

    def added(stat: str) -> tuple[float, ...]:
        return tuple(g - d for g, d in zip(gateway_ms(stat), direct_ms(stat), strict=True))

    def versus(stat: str) -> str:
        return (f"direct stdio {formatted(statistics.median(direct_ms(stat)), 'ms')}, "
                f"via Director {formatted(statistics.median(gateway_ms(stat)), 'ms')}")

    def rate(count: int) -> tuple[float, ...]:
        return tuple(run.rate for run in gateway[count])

    def cpu(count: int, runs: dict[int, list[LoadRun]] = gateway) -> tuple[float, ...]:
        return tuple(run.server_cpu_us for run in runs[count])

    echo_cpu = statistics.median(run.database_cpu_us or 0.0 for run in gateway[32])
    details = {
        "direct": direct,
        "gateway": {count: [run.load | {"daemon_cpu_us_per_call": run.server_cpu_us,
                                        "echo_cpu_us_per_call": run.database_cpu_us}
                            for run in runs] for count, runs in gateway.items()},
    }
    direct_rate = statistics.median(load["requests_per_second"] for load in direct[32])
    direct_one = statistics.median(load["requests_per_second"] for load in direct[1])
    return [
        Figure("mcp_added_p50", "tools/call latency added by the gateway, p50", "ms",
               added("p50"), ADDED_P50_BUDGET, versus("p50") + "; TS original ≈8 ms",
               details=details),
        Figure("mcp_added_p99", "  added p99", "ms", added("p99"), ADDED_P99_BUDGET,
               versus("p99")),
        Figure("mcp_cpu_per_call", "gateway CPU per proxied tools/call (32 sessions)", "µs",
               cpu(32), CPU_BUDGET,
               f"1 session {formatted(statistics.median(cpu(1)), 'µs')}; echo server "
               + (formatted(echo_cpu, 'µs') if echo_found else "not found")
               + "; original ≈5-6.5 ms"),
        Figure("mcp_cpu_floor", "  plain twisted.web answering those POSTs itself", "µs",
               cpu(32, floor), baseline=f"1 session {formatted(statistics.median(cpu(1, floor)), 'µs')}"
               "; no upstream: the HTTP server's own cost per call",
               details={"floor": {count: [run.load for run in runs]
                                  for count, runs in floor.items()}}),
        Figure("mcp_rps_1", "tools/call throughput, 1 session", "calls/s", rate(1),
               baseline=f"direct stdio 1 in flight {formatted(direct_one, 'calls/s')}"),
        Figure("mcp_rps_8", "  8 sessions", "calls/s", rate(8),
               baseline=f"CPU/call {formatted(statistics.median(cpu(8)), 'µs')}"),
        Figure("mcp_rps_32", "  32 sessions", "calls/s", rate(32), THROUGHPUT_BUDGET,
               f"direct stdio 32 in flight {formatted(direct_rate, 'calls/s')}; "
               "original ≈180/s per core"),
        Figure("mcp_p99_32", "  latency p99 at 32 sessions", "ms",
               tuple(run.latency("p99") for run in gateway[32]),
               baseline=f"p50 {formatted(statistics.median(r.latency('p50') for r in gateway[32]), 'ms')}"),
    ]


# --- idle streams and fan-out --------------------------------------------------------------


def _settled_rss(pid: int, settle: float = 1.0) -> int:
    time.sleep(settle)
    return status_kib(pid, "VmRSS")


class StallProbe:
    """A concurrent caller: ``GET /api/health`` back to back on one keep-alive connection
    while a fan-out runs; its worst latency is how long the fan-out stalled other requests."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StallProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                connection.request("GET", "/api/health")
                connection.getresponse().read()
                self.latencies_ms.append((time.perf_counter() - started) * 1e3)
        finally:
            connection.close()


def _fanouts(holder: StreamHolder, trigger: Callable[[], None], count: int,
             probe_port: int | None = None) -> list[dict[str, Any]]:
    """``count`` changes, each awaited on every stream: kernel stamps relative to the trigger;
    with ``probe_port``, the worst latency of a concurrent caller during each."""
    results = []
    for _ in range(count):
        holder.command("mark")
        with contextlib.ExitStack() as probing:
            probe = probing.enter_context(StallProbe(probe_port)) if probe_port else None
            before = time.time_ns()
            trigger()
            after = time.time_ns()
            arrival = holder.command("wait 30", timeout=60)
        if arrival["first_ns"] is None:
            results.append({"received": 0, "open": arrival["open"]})
            continue
        committed = arrival.get("notify_ns")
        results.append({
            "received": arrival["received"], "open": arrival["open"],
            "committed_to_last_ms": None if committed is None
            else (arrival["last_ns"] - committed) / 1e6,
            "request_to_committed_ms": None if committed is None else (committed - before) / 1e6,
            "spread_ms": (arrival["last_ns"] - arrival["first_ns"]) / 1e6,
            "request_to_first_ms": (arrival["first_ns"] - before) / 1e6,
            "request_to_last_ms": (arrival["last_ns"] - before) / 1e6,
            "request_answered_ms": (after - before) / 1e6,
            "last_read_after_last_stamp_ms": (arrival["last_read_ns"] - arrival["last_ns"]) / 1e6,
            "unstamped": arrival["unstamped"],
            "concurrent_worst_ms": max(probe.latencies_ms) if probe and probe.latencies_ms
            else None,
            "concurrent_calls": len(probe.latencies_ms) if probe else 0,
        })
    return results


def _holder_arguments(port: int, sessions: int) -> list[str]:
    return ["--port", str(port), "--sessions", str(sessions), "--timeout", "300"]


def _baseline_streams(reaper: Reaper, workdir: Path, sessions: int,
                      fanouts: int) -> dict[str, Any]:
    base = start_baseline(reaper, workdir / "baseline-streams.log")
    rss_before = _settled_rss(base.pid, 0.5)
    holder = start_holder(reaper, [*_holder_arguments(base.port, sessions), "--plain-sse", "/sse"])
    rss_after = _settled_rss(base.pid)
    connection = http.client.HTTPConnection(HOST, base.port, timeout=60)

    def trigger(path: str) -> Callable[[], None]:
        def post() -> None:
            connection.request("POST", path)
            connection.getresponse().read()
        return post

    try:
        results = _fanouts(holder, trigger("/fanout"), fanouts)
        raw = _fanouts(holder, trigger("/fanout-raw"), fanouts)
    finally:
        connection.close()
        holder.stop()
        base.stop()
    return {"ready": holder.ready, "rss_kib": [rss_before, rss_after],
            "per_stream_kib": (rss_after - rss_before) / max(1, holder.ready["ready"]),
            "fanouts": results, "raw_fanouts": raw}


@attrs.frozen
class StreamRun:
    """``sessions`` idle sessions held on a fresh daemon, and the fan-outs to them."""

    transport: str
    ready: dict[str, Any]
    rss_kib: tuple[int, int]
    open_cpu_seconds: float
    fanouts: list[dict[str, Any]]

    @property
    def opened(self) -> int:
        return int(self.ready["ready"])

    @property
    def per_session_kib(self) -> float:
        return (self.rss_kib[1] - self.rss_kib[0]) / max(1, self.opened)

    def complete(self) -> list[dict[str, Any]]:
        """The fan-outs that reached every stream (and whose commit was seen)."""
        return [r for r in self.fanouts if r["received"] == r["open"] == self.opened
                and r.get("committed_to_last_ms") is not None]


def _hold(reaper: Reaper, workdir: Path, database_url: str, sessions: int, fanouts: int,
          transport: str) -> StreamRun:
    """Open ``sessions`` sessions of ``transport`` (``streamable``: initialize, initialized,
    GET; ``legacy``: ``GET /sse``) on a fresh daemon, note its RSS, then ``fanouts`` changes."""
    server, client, playbook = start_gateway(reaper, workdir, database_url,
                                             f"mcp-streams-{transport}")
    key = str(client.key)
    identity = (["--playbook", playbook, "--key", key] if transport == "streamable" else
                ["--plain-sse", f"/playbooks/{playbook}/sse?key={key}"])
    warm = start_holder(reaper, [*_holder_arguments(server.port, 50), *identity])
    warm.stop()  # every code path has run once (streamable sessions stay until idle expiry)
    rss_before = _settled_rss(server.pid, 0.5)
    cpu_before = cpu_seconds(server.pid)
    holder = start_holder(reaper, [*_holder_arguments(server.port, sessions), *identity,
                                   "--listen-dsn", database_url], timeout=300)
    open_cpu = cpu_seconds(server.pid) - cpu_before
    rss_after = _settled_rss(server.pid)
    toggle = api.PromptToggle(client, playbook)
    try:
        results = _fanouts(holder, toggle.toggle, fanouts, probe_port=server.port)
    finally:
        holder.stop()
        server.stop()
    return StreamRun(transport, holder.ready, (rss_before, rss_after), open_cpu, results)


def idle_streams(reaper: Reaper, workdir: Path, database_url: str, sessions: int,
                 fanouts: int) -> list[Figure]:
    """Idle sessions with streams (Streamable HTTP, then legacy HTTP+SSE) and fan-outs, and
    the plain twisted.web server holding as many raw streams."""
    streamable = _hold(reaper, workdir, database_url, sessions, fanouts, "streamable")
    legacy = _hold(reaper, workdir, database_url, sessions, fanouts, "legacy")
    baseline = _baseline_streams(reaper, workdir, sessions, fanouts)
    return _stream_figures(streamable, legacy, baseline)


def _baseline_median(results: list[dict[str, Any]], name: str) -> float:
    complete = [r for r in results if r["received"] == r["open"]]
    return statistics.median(r[name] for r in complete) if complete else float("nan")


def _stream_figures(run: StreamRun, legacy: StreamRun,
                    baseline: dict[str, Any]) -> list[Figure]:
    complete = run.complete()
    rates = run.ready.get("open_rate") or {}
    budget = FANOUT_BUDGET if run.opened >= FANOUT_BUDGET_SIZE else None
    legacy_budget = FANOUT_BUDGET if legacy.opened >= FANOUT_BUDGET_SIZE else None
    plain = (f"plain twisted.web SSE {formatted(baseline['per_stream_kib'], 'KiB')}; "
             "original ≈90 KB")
    return [
        Figure("mcp_idle_sessions", "idle MCP sessions with a GET stream, one process", "n",
               (float(run.opened),),
               baseline=f"{run.ready['failures']} failed to open; plain twisted.web held "
                        f"{baseline['ready']['ready']:,}",
               details={"streamable": attrs.asdict(run), "legacy": attrs.asdict(legacy),
                        "baseline": baseline}),
        Figure("mcp_session_memory", "  memory per idle session (RSS delta)", "KiB",
               (run.per_session_kib,), SESSION_MEMORY_BUDGET, plain),
        Figure("mcp_session_open_rate", "  sessions opened per second (3 requests each)",
               "sessions/s", (run.opened / run.ready["open_seconds"],),
               baseline=f"first tenth {formatted(rates.get('first_tenth_per_s'), 'sessions/s')}, "
                        f"last tenth {formatted(rates.get('last_tenth_per_s'), 'sessions/s')}; "
                        f"daemon CPU {run.open_cpu_seconds / max(1, run.opened) * 1e6:.0f} "
                        "µs/session"),
        Figure("mcp_fanout", f"list_changed fan-out to {run.opened:,} streams "
               "(committed → last stream)", "ms",
               tuple(r["committed_to_last_ms"] for r in complete), budget,
               "plain twisted.web, request → last: "
               + formatted(_baseline_median(baseline["fanouts"], "request_to_last_ms"), "ms")
               + "; raw send(2) per socket: "
               + formatted(_baseline_median(baseline["raw_fanouts"], "request_to_last_ms"), "ms"),
               details={"fanouts": run.fanouts}),
        Figure("mcp_fanout_stall", "  worst latency of a concurrent /api/health meanwhile",
               "ms", tuple(r["concurrent_worst_ms"] for r in complete
                           if r.get("concurrent_worst_ms") is not None),
               STALL_BUDGET if budget else None,
               baseline=f"{_median_count(complete, 'concurrent_calls')} calls during each "
                        "fan-out (median)"),
        Figure("mcp_fanout_spread", "  of which first → last stream (the socket writes)", "ms",
               tuple(r["spread_ms"] for r in complete),
               baseline="plain twisted.web "
                        + formatted(_baseline_median(baseline["fanouts"], "spread_ms"), "ms")),
        Figure("mcp_fanout_request_to_last", "  from the change request to the last stream",
               "ms", tuple(r["request_to_last_ms"] for r in complete),
               baseline=f"committed after {_median_of(complete, 'request_to_committed_ms')}, "
                        f"request answered after {_median_of(complete, 'request_answered_ms')}"),
        Figure("mcp_legacy_session_memory", f"legacy HTTP+SSE: memory per idle session "
               f"({legacy.opened:,} held)", "KiB", (legacy.per_session_kib,),
               SESSION_MEMORY_BUDGET, plain + f"; {legacy.ready['failures']} failed to open"),
        Figure("mcp_legacy_fanout", f"  list_changed fan-out to {legacy.opened:,} "
               "legacy streams (committed → last)", "ms",
               tuple(r["committed_to_last_ms"] for r in legacy.complete()),
               legacy_budget, f"opened {legacy.opened / legacy.ready['open_seconds']:,.0f} "
                              "sessions/s (1 request each)",
               details={"fanouts": legacy.fanouts}),
    ]


def _median_count(results: list[dict[str, Any]], name: str) -> str:
    return f"{statistics.median(r[name] for r in results):,.0f}" if results else "—"


def _median_of(results: list[dict[str, Any]], name: str) -> str:
    return formatted(statistics.median(r[name] for r in results) if results else None, "ms")
