"""Tracing: what OpenTelemetry costs a proxied ``tools/call``, off and on.

Four daemons on the same database, each with its own account and a playbook with the stdio
echo server (``bench.echo_server``):

* ``main``: the code this branch started from (``git archive`` of ``BENCH_TRACING_BASELINE``,
  default ``main``, run from a copy under the bench's directory with ``PYTHONPATH``), when the
  repository has that revision; else left out;
* ``off``: this code, no ``OTEL_*`` endpoint;
* ``on 1.0``: this code exporting every trace (``OTEL_TRACES_SAMPLER=parentbased_always_on``);
* ``on 0.01``: this code keeping 1 trace in 100 (``parentbased_traceidratio``, ``0.01``).

The tracing daemons export over OTLP/HTTP to a receiver in this process (a thread decoding
``ExportTraceServiceRequest`` with ``opentelemetry-proto``, counting spans per daemon by path).
Every round runs the same ``tools/call`` load (``bench.mcpload gateway``, ``SESSIONS``
sessions, one call in flight each) on each daemon, in a rotating order; CPU per proxied call is
the daemon's ``utime + stime`` over the run (its export thread included) divided by every call
of the run. Spans per call come from a calibration apart (one session, ``CALIBRATION_SECONDS``,
sampling 1.0): the spans received divided by the calls made, none dropped at that rate.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench import api
from bench.daemon import start_director
from bench.mcp import MCP_ENV, _checked, _echo_pid, gateway_load
from bench.probe import HOST, free_port
from bench.reaper import Reaper
from bench.report import Figure, formatted
from bench.servers import REPOSITORY, Server
from bench.throughput import LoadRun, measure

SESSIONS = 32
CALIBRATION_SECONDS = 2.0
BASELINE_REVISION = "main"


class Receiver:
    """Counts the spans each daemon exports (by the path it posts to)."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        self.spans: dict[str, int] = {}
        self.traces: dict[str, set[bytes]] = {}
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                exported = ExportTraceServiceRequest()
                exported.ParseFromString(body)
                label = self.path.strip("/").split("/")[0]
                with lock:
                    for resource in exported.resource_spans:
                        for scope in resource.scope_spans:
                            receiver.spans[label] = receiver.spans.get(label, 0) + len(scope.spans)
                            receiver.traces.setdefault(label, set()).update(
                                span.trace_id for span in scope.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def endpoint(self, label: str) -> str:
        return f"http://{HOST}:{self.port}/{label}/v1/traces"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _baseline_source(workdir: Path) -> Path | None:
    """``src`` of the baseline revision, exported (read-only use of the repository)."""
    target = workdir / "tracing-baseline"
    target.mkdir()
    archive = subprocess.run(["git", "archive", BASELINE_REVISION, "src"], cwd=REPOSITORY,
                             capture_output=True, check=False, timeout=60)
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True,
                   timeout=60)
    return target / "src"


@contextmanager
def _receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    try:
        yield receiver
    finally:
        receiver.stop()


def _gateway(reaper: Reaper, workdir: Path, database_url: str, label: str,
             env: dict[str, str]) -> tuple[Server, str, str]:
    server = start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                            log_path=workdir / f"director-{label}.log",
                            database_url=database_url, extra_env=MCP_ENV | env)
    client = api.sign_up(server.port, label)
    playbook = api.create_playbook(client, "Bench Echo")
    api.add_echo_server(client, playbook)
    _checked(gateway_load(server.port, playbook, str(client.key), 1, 0.5, 0.5), "priming call")
    return server, str(client.key), playbook


def tracing_overhead(reaper: Reaper, workdir: Path, database_url: str, rounds: int,
                     duration: float, warmup: float = 1.0) -> list[Figure]:
    """Figures: daemon CPU per ``tools/call`` with tracing off (and main's), on at 1.0 and at
    0.01; calls/s of each; spans per call."""
    with _receiver() as receiver:
        tracing = {"OTEL_BSP_SCHEDULE_DELAY": "200"}
        configurations: dict[str, dict[str, str]] = {
            "off": {},
            "on 1.0": tracing | {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint("all"),
                                 "OTEL_TRACES_SAMPLER": "parentbased_always_on"},
            "on 0.01": tracing | {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint("ratio"),
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.01"},
        }
        source = _baseline_source(workdir)
        if source is not None:
            configurations = {"main": {"PYTHONPATH": str(source)}} | configurations
        daemons = {label: _gateway(reaper, workdir, database_url,
                                   "tracing-" + label.replace(" ", "-").replace(".", ""), env)
                   for label, env in configurations.items()}
        calibrated = _spans_per_call(receiver, *daemons["on 1.0"])
        runs: dict[str, list[LoadRun]] = {label: [] for label in daemons}
        labels = list(daemons)
        for index in range(rounds):
            order = labels[index % len(labels):] + labels[:index % len(labels)]
            for label in order:
                server, key, playbook = daemons[label]

                def generate(port: int, key: str = key, playbook: str = playbook
                             ) -> dict[str, Any]:
                    return _checked(gateway_load(port, playbook, key, SESSIONS, duration,
                                                 warmup), f"gateway, {SESSIONS} sessions")

                runs[label].append(measure(server, _echo_pid(server.pid), generate))
        for server, _, _ in daemons.values():
            server.stop()  # a tracing daemon exports what it still holds as it stops
        received = dict(receiver.spans)
        traces = {label: len(ids) for label, ids in receiver.traces.items()}
    return _figures(runs, calibrated, received, traces)


def _spans_per_call(receiver: Receiver, server: Server, key: str, playbook: str) -> float:
    """One session, no queue pressure: every span of every call reaches the receiver."""
    import time

    before = receiver.spans.get("all", 0)
    load = _checked(gateway_load(server.port, playbook, key, 1, CALIBRATION_SECONDS, 0.0),
                    "calibration")
    time.sleep(1.5)  # the batch delay (200 ms) and the export
    return (receiver.spans.get("all", 0) - before) / max(int(load["responses_total"]), 1)


def _figures(runs: dict[str, list[LoadRun]], spans_per_call: float, received: dict[str, int],
             traces: dict[str, int]) -> list[Figure]:
    def median(values: list[float]) -> float:
        return statistics.median(values)

    off_cpu = median([run.server_cpu_us for run in runs["off"]])
    details = {label: [run.load | {"daemon_cpu_us_per_call": run.server_cpu_us}
                       for run in label_runs] for label, label_runs in runs.items()}
    calls = {label: sum(int(run.load["responses_total"]) for run in label_runs)
             for label, label_runs in runs.items()}
    details |= {"spans_received": received, "traces_received": traces, "calls": calls}
    figures = []
    if "main" in runs:
        figures.append(Figure(
            "tracing_cpu_main", f"daemon CPU per proxied tools/call, {SESSIONS} sessions, "
            f"{BASELINE_REVISION} (no tracing code)", "µs",
            tuple(run.server_cpu_us for run in runs["main"]), details=details))
    figures += [
        Figure("tracing_cpu_off", "  daemon CPU per proxied tools/call, tracing off", "µs",
               tuple(run.server_cpu_us for run in runs["off"]),
               baseline=(f"{BASELINE_REVISION} "
                         f"{formatted(median([r.server_cpu_us for r in runs['main']]), 'µs')}"
                         if "main" in runs else "—"),
               details={} if "main" in runs else details),
        Figure("tracing_cpu_on", "  … tracing on, every trace sampled (1.0)", "µs",
               tuple(run.server_cpu_us for run in runs["on 1.0"]),
               baseline=f"off {formatted(off_cpu, 'µs')}"),
        Figure("tracing_cpu_ratio", "  … tracing on, 1 trace in 100 sampled (0.01)", "µs",
               tuple(run.server_cpu_us for run in runs["on 0.01"]),
               baseline=f"off {formatted(off_cpu, 'µs')}"),
    ]
    for label, key in (("off", "off"), ("on 1.0", "on"), ("on 0.01", "ratio")):
        figures.append(Figure(
            f"tracing_rps_{key}", f"  tools/call throughput, tracing {label}", "calls/s",
            tuple(run.rate for run in runs[label])))
    exported = received.get("all", 0)
    figures.append(Figure(
        "tracing_spans_per_call", "  spans per proxied tools/call (sampled 1.0)", "spans",
        (spans_per_call,),
        baseline=f"under load: {exported:,} spans received for {calls['on 1.0']:,} calls at "
                 f"1.0; {traces.get('ratio', 0):,} traces for {calls['on 0.01']:,} at 0.01"))
    return figures
