"""Several instances, any of which serves any session (issue 17): what it costs.

* Adoption: a handshake-era session opened on instance A, its first ``tools/call`` sent to
  instance B (which reads the session's row once and rebuilds it), against the first call of
  a session opened and called on A itself (both pay the session's first routing; only the
  first pays the adoption). One call at a time, keep-alive connections, the stdio echo server.
  Extra = adopted percentile minus local percentile, over the same number of sessions.
* A forwarded ``POST /message``: a legacy ``/sse`` session whose stream is on A; its
  ``tools/call`` POSTed to A, or to B (which checks the stored session, then relays the message
  to A by NOTIFY); timed from the POST to the answer's event on A's stream, alternately.
* Throughput through nginx, round robin, no affinity: ``bench.mcpload gateway`` with 32
  sessions (one call in flight each) against nginx with 1, 2 and 3 instances behind it, and
  against one instance directly. On a 2-core machine, nginx (one worker), the load generator
  and the instances share the two cores: more instances cannot add capacity here; the figure
  shows what spreading every session over all instances costs, not what more machines give.
* The held-session hot path: the daemon's CPU per ``tools/call`` of a session it holds (one in
  flight), on this branch; with ``BENCH_MAIN_SOURCE`` set to a source tree of another commit
  (``git archive main | tar -x -C DIR``) the same load runs alternately against a daemon started
  from that tree (on its own private PostgreSQL: the schemas differ) in the same run.
* The event log under load: 500 sessions with a GET stream on one instance and 100 playbook
  changes (each a ``list_changed`` to every stream, so 50,000 events), with
  ``MCP_EVENT_LOG_EVENTS=20000``; the log's rows and size (``pg_total_relation_size``) sampled
  during the changes and after the next trim.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg2

from bench import api
from bench.daemon import start_director
from bench.mcp import MCP_ENV, _checked, gateway_load, start_gateway
from bench.probe import HOST, free_port
from bench.reaper import Reaper
from bench.report import Figure, formatted
from bench.servers import Server, launch
from bench.streams import start_holder
from bench.throughput import LoadRun, measure

ACCEPT = "application/json, text/event-stream"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
THROUGHPUT_SESSIONS = 32
EVENT_LOG_LIMIT = 20_000


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class _Mcp:
    """Raw handshake-era requests on one keep-alive connection per instance."""

    def __init__(self, playbook: str, key: str) -> None:
        self.path = f"/playbooks/{playbook}/mcp"
        self.key = key
        self.connections: dict[int, http.client.HTTPConnection] = {}
        self.ids = 0

    def post(self, port: int, message: dict[str, Any],
             session: str | None = None) -> tuple[int, str | None, bytes]:
        connection = self.connections.get(port)
        if connection is None:
            connection = self.connections[port] = http.client.HTTPConnection(HOST, port,
                                                                              timeout=30)
        headers = {"content-type": "application/json", "accept": ACCEPT, "x-api-key": self.key}
        if session is not None:
            headers["mcp-session-id"] = session
        connection.request("POST", self.path, json.dumps(message).encode(), headers)
        response = connection.getresponse()
        return response.status, response.getheader("mcp-session-id"), response.read()

    def open(self, port: int) -> str:
        status, session, body = self.post(port, {
            "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "bench-cluster", "version": "1"}}})
        assert status == 200 and session is not None, body
        status, _, body = self.post(port, {"jsonrpc": "2.0",
                                           "method": "notifications/initialized"}, session)
        assert status == 202, body
        return session

    def timed_call(self, port: int, session: str) -> float:
        self.ids += 1
        started = time.perf_counter()
        status, _, body = self.post(port, {"jsonrpc": "2.0", "id": self.ids,
                                           "method": "tools/call", "params": {
                                               "name": "echo", "arguments": {"text": "bench"}}},
                                    session)
        elapsed = (time.perf_counter() - started) * 1000
        if status != 200 or b'"bench"' not in body:
            raise RuntimeError(f"tools/call on port {port}: {status} {body[:300]!r}")
        return elapsed


def adoption(a: Server, b: Server, playbook: str, key: str, sessions: int) -> list[Figure]:
    mcp = _Mcp(playbook, key)
    for port in (a.port, b.port):  # each instance's echo server started and listed
        mcp.timed_call(port, mcp.open(port))
    local: list[float] = []
    adopted: list[float] = []
    held: list[float] = []
    for _ in range(sessions):
        local.append(mcp.timed_call(a.port, mcp.open(a.port)))
        session = mcp.open(a.port)
        adopted.append(mcp.timed_call(b.port, session))
        held.append(mcp.timed_call(b.port, session))
    extra50 = _percentile(adopted, 0.5) - _percentile(local, 0.5)
    extra99 = _percentile(adopted, 0.99) - _percentile(local, 0.99)
    versus = (f"first call where opened: p50 {formatted(_percentile(local, 0.5), 'ms')}, "
              f"p99 {formatted(_percentile(local, 0.99), 'ms')}; adopted: p50 "
              f"{formatted(_percentile(adopted, 0.5), 'ms')}, p99 "
              f"{formatted(_percentile(adopted, 0.99), 'ms')}; next call there p50 "
              f"{formatted(_percentile(held, 0.5), 'ms')}")
    details = {"local_ms": local, "adopted_ms": adopted, "held_ms": held}
    return [Figure("cluster_adopt_extra_p50", f"first call on another instance (adoption), "
                   f"extra p50 ({sessions} sessions)", "ms", (extra50,), baseline=versus,
                   details=details),
            Figure("cluster_adopt_extra_p99", "  extra p99", "ms", (extra99,))]


class _SseStream:
    """A legacy ``/sse`` session's stream on one instance, read on this thread."""

    def __init__(self, port: int, playbook: str, key: str) -> None:
        self.socket = socket.create_connection((HOST, port), timeout=30)
        self.socket.sendall(f"GET /playbooks/{playbook}/sse?key={key} HTTP/1.1\r\n"
                            f"Host: {HOST}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
        self.buffer = b""
        self.wait_for(b"event: endpoint")
        line = self.buffer.split(b"event: endpoint", 1)[1].split(b"data: ", 1)[1]
        self.endpoint = line.split(b"\n", 1)[0].strip().decode()

    def wait_for(self, text: bytes) -> None:
        while text not in self.buffer:
            chunk = self.socket.recv(65536)
            if not chunk:
                raise RuntimeError("the /sse stream ended")
            self.buffer += chunk
        self.buffer = self.buffer[self.buffer.index(text):]

    def close(self) -> None:
        self.socket.close()


def forwarded_message(a: Server, b: Server, playbook: str, key: str,
                      messages: int) -> list[Figure]:
    stream = _SseStream(a.port, playbook, key)
    connections = {port: http.client.HTTPConnection(HOST, port, timeout=30)
                   for port in (a.port, b.port)}
    times: dict[int, list[float]] = {a.port: [], b.port: []}

    def post(port: int, message: dict[str, Any]) -> float:
        started = time.perf_counter()
        connections[port].request("POST", stream.endpoint, json.dumps(message).encode(),
                                  {"content-type": "application/json", "x-api-key": key})
        response = connections[port].getresponse()
        response.read()
        if response.status != 202:
            raise RuntimeError(f"POST /message on port {port}: {response.status}")
        if "id" in message:
            stream.wait_for(f'"id":{message["id"]}'.encode())
        return (time.perf_counter() - started) * 1000

    try:
        post(a.port, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2024-11-05", "capabilities": {},
            "clientInfo": {"name": "bench-cluster", "version": "1"}}})
        post(a.port, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        for number in range(1, 2 * messages + 21):
            port = (a.port, b.port)[number % 2]
            elapsed = post(port, {"jsonrpc": "2.0", "id": number, "method": "tools/call",
                                  "params": {"name": "echo", "arguments": {"text": "bench"}}})
            if number > 20:  # both paths warm
                times[port].append(elapsed)
    finally:
        stream.close()
        for connection in connections.values():
            connection.close()
    here, there = times[a.port], times[b.port]
    versus = (f"to the stream's instance: p50 {formatted(_percentile(here, 0.5), 'ms')}, p99 "
              f"{formatted(_percentile(here, 0.99), 'ms')}; relayed: p50 "
              f"{formatted(_percentile(there, 0.5), 'ms')}, p99 "
              f"{formatted(_percentile(there, 0.99), 'ms')}")
    return [Figure("cluster_forwarded_extra_p50", "/sse POST /message to another instance "
                   "(relayed by NOTIFY), POST → answer on the stream, extra p50", "ms",
                   (_percentile(there, 0.5) - _percentile(here, 0.5),), baseline=versus,
                   details={"local_ms": here, "relayed_ms": there}),
            Figure("cluster_forwarded_extra_p99", "  extra p99", "ms",
                   (_percentile(there, 0.99) - _percentile(here, 0.99),))]


class _Nginx:
    """nginx in front of ``ports``, round robin, the guide's proxy settings."""

    def __init__(self, workdir: Path, ports: list[int]) -> None:
        self.port = free_port()
        self.directory = workdir / f"nginx-{self.port}"
        self.directory.mkdir()
        servers = "".join(f"    server {HOST}:{port};\n" for port in ports)
        config = self.directory / "nginx.conf"
        d = self.directory
        config.write_text(
            f"pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nworker_processes 1;\n"
            "events { worker_connections 4096; }\n"
            f"http {{\naccess_log off;\nclient_body_temp_path {d}/body;\n"
            f"proxy_temp_path {d}/proxy;\nfastcgi_temp_path {d}/fastcgi;\n"
            f"uwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n"
            f"upstream director {{\n{servers}    keepalive 64;\n}}\n"
            f"server {{\n    listen {HOST}:{self.port};\n    location / {{\n"
            "        proxy_pass http://director;\n        proxy_http_version 1.1;\n"
            "        proxy_set_header Connection \"\";\n        proxy_set_header Host $host;\n"
            "        proxy_buffering off;\n    }\n}\n}\n")
        self.process = subprocess.Popen([NGINX, "-p", str(d), "-c", str(config), "-g",
                                         "daemon off;"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def throughput(workdir: Path, servers: list[Server], rounds: int,
               duration: float) -> list[Figure]:
    proxies = {count: _Nginx(workdir, [s.port for s in servers[:count]]) for count in (1, 2, 3)}
    rates: dict[str, list[float]] = {"direct": [], "1": [], "2": [], "3": []}
    bad: dict[str, int] = dict.fromkeys(rates, 0)
    errors: dict[str, str] = {}
    try:
        targets = [("direct", servers[0].port)] + [(str(n), p.port) for n, p in proxies.items()]
        for index in range(rounds):
            for name, port in targets if index % 2 == 0 else list(reversed(targets)):
                # A fresh account each run: this branch's shared rate limiter refuses a subject
                # that several instances serve steadily within seconds, whatever its limit
                # (expired leases' unspent permits keep counting; main gives them back).
                client = api.sign_up(servers[0].port, f"cluster-rps-{index}-{name}")
                playbook, key = api.create_playbook(client, "Bench Echo"), str(client.key)
                api.add_echo_server(client, playbook)
                for server in servers:
                    _checked(gateway_load(server.port, playbook, key, 2, 0.3, 0.3), "priming")
                load = gateway_load(port, playbook, key, THROUGHPUT_SESSIONS, duration, 1.0)
                rates[name].append(float(load["requests_per_second"]))
                bad[name] += int(load.get("bad_answers") or 0) + int(load.get(
                    "setup_failures") or 0)
                if load.get("first_error"):
                    errors.setdefault(name, str(load["first_error"]))
    finally:
        for proxy in proxies.values():
            proxy.stop()
    details = {"calls_per_second": rates, "bad_answers": bad, "first_errors": errors,
               "cpus": os.cpu_count()}
    note = (f"one instance direct {formatted(statistics.median(rates['direct']), 'calls/s')}; "
            f"{os.cpu_count()} CPUs shared by nginx, the load generator and the instances; "
            f"wrong answers {sum(bad.values())}")
    return [Figure(f"cluster_rps_{n}", f"{'' if n == '1' else '  '}tools/call through nginx, "
                   f"{n} instance{'s' if n != '1' else ''} round robin, {THROUGHPUT_SESSIONS} "
                   "sessions", "calls/s", tuple(rates[n]),
                   baseline=note if n == "1" else "—", details=details if n == "1" else {})
            for n in ("1", "2", "3")]


def _main_daemon(reaper: Reaper, workdir: Path, source: Path) -> Server:
    """A daemon from another source tree, on a private PostgreSQL of its own."""
    port = free_port()
    state = workdir / "state-main"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PORT"))}
    env.update(MCP_ENV, PYTHONPATH=str(source / "src"), PORT=str(port), HOST=HOST,
               LOG_LEVEL="warn", NODE_ENV="development", STATE_DIRECTORY=str(state),
               SIGNUP_RATE_LIMIT_PER_HOUR="1000000", MAX_CONNECTIONS_PER_ADDRESS="0")
    env.pop("DATABASE_URL", None)
    import sys

    return launch(reaper, "director-main", [sys.executable, "-m", "director.cli",
                                            "--env-file=", "serve"],
                  env=env, port=port, log_path=workdir / "director-main.log", timeout=120)


def hot_path(reaper: Reaper, workdir: Path, server: Server, playbook: str, key: str,
             rounds: int, duration: float) -> list[Figure]:
    runs: dict[str, list[LoadRun]] = {"branch": [], "main": []}
    targets: list[tuple[str, Server, str, str]] = [("branch", server, playbook, key)]
    main_source = os.environ.get("BENCH_MAIN_SOURCE")
    other: Server | None = None
    if main_source:
        other = _main_daemon(reaper, workdir, Path(main_source))
        client = api.sign_up(other.port, "cluster-main")
        other_playbook = api.create_playbook(client, "Bench Echo")
        api.add_echo_server(client, other_playbook)
        targets.append(("main", other, other_playbook, str(client.key)))
        _checked(gateway_load(other.port, other_playbook, str(client.key), 1, 0.5, 0.5),
                 "priming main")
    for index in range(rounds):
        for name, target, target_playbook, target_key in (
                targets if index % 2 == 0 else list(reversed(targets))):
            runs[name].append(measure(target, None, lambda port, p=target_playbook,
                                      k=target_key: _checked(gateway_load(
                                          port, p, k, 1, duration, 1.0), "held calls")))
    if other is not None:
        other.stop()
    main_cpu = [r.server_cpu_us for r in runs["main"]]
    baseline = (f"main {formatted(statistics.median(main_cpu), 'µs')} in the same run"
                if main_cpu else "main not run (BENCH_MAIN_SOURCE unset)")
    return [Figure("cluster_held_cpu_per_call", "daemon CPU per tools/call of a held session, "
                   "1 in flight", "µs", tuple(r.server_cpu_us for r in runs["branch"]),
                   baseline=baseline,
                   details={"branch": [r.load for r in runs["branch"]],
                            "main": [r.load for r in runs["main"]]}),
            Figure("cluster_held_p50", "  latency p50 of those calls", "ms",
                   tuple(r.latency("p50") for r in runs["branch"]),
                   baseline=(f"main {formatted(statistics.median([r.latency('p50') for r in runs['main']]), 'ms')}"  # noqa: E501
                             if runs["main"] else "—"))]


def event_log(reaper: Reaper, workdir: Path, database_url: str, changes: int,
              sessions: int) -> list[Figure]:
    server = start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                            log_path=workdir / "director-cluster-events.log",
                            database_url=database_url,
                            extra_env=MCP_ENV | {"MCP_EVENT_LOG_EVENTS": str(EVENT_LOG_LIMIT)})
    client = api.sign_up(server.port, "cluster-events")
    playbook = api.create_playbook(client, "Bench Events")
    holder = start_holder(reaper, ["--port", str(server.port), "--sessions", str(sessions),
                                   "--timeout", "300", "--playbook", playbook,
                                   "--key", str(client.key)], timeout=300)
    connection = psycopg2.connect(database_url)
    connection.autocommit = True
    samples: list[tuple[int, int]] = []

    def sample() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*), pg_total_relation_size('mcp_events') "
                           "FROM mcp_events")
            rows, size = cursor.fetchone()
            samples.append((int(rows), int(size)))

    toggle = api.PromptToggle(client, playbook)
    try:
        sample()
        started = time.monotonic()
        for _ in range(changes):
            toggle.toggle()
            time.sleep(0.05)
            sample()
        elapsed = time.monotonic() - started
        time.sleep(11)  # the next trim (every 10 s)
        sample()
    finally:
        holder.stop()
        server.stop()
        connection.close()
    peak_rows = max(rows for rows, _ in samples)
    peak_size = max(size for _, size in samples)
    after_rows, after_size = samples[-1]
    events = changes * sessions
    return [Figure("cluster_event_log_rows", f"event log rows, {events:,} events in "
                   f"{elapsed:.0f} s to {sessions} streams, limit {EVENT_LOG_LIMIT:,}: peak",
                   "rows", (float(peak_rows),),
                   baseline=f"after the next trim {after_rows:,}",
                   details={"samples": samples}),
            Figure("cluster_event_log_bytes", "  its size on disk (table and indexes): peak",
                   "MiB", (peak_size / 2**20,),
                   baseline=f"after the trim {after_size / 2**20:.1f} MiB; "
                            f"{peak_size / max(peak_rows, 1):.0f} B per event at the peak")]


def cluster_figures(reaper: Reaper, workdir: Path, database_url: str, quick: bool) -> list[Figure]:
    a, client, playbook = start_gateway(reaper, workdir, database_url, "cluster-a")
    key = str(client.key)
    others = [start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                             log_path=workdir / f"director-cluster-{name}.log",
                             database_url=database_url, extra_env=MCP_ENV)
              for name in ("b", "c")]
    servers = [a, *others]
    figures = adoption(a, others[0], playbook, key, 100 if quick else 500)
    figures += forwarded_message(a, others[0], playbook, key, 100 if quick else 500)
    figures += hot_path(reaper, workdir, a, playbook, key, 2 if quick else 6,
                        2.0 if quick else 3.0)
    figures += throughput(workdir, servers, 1 if quick else 3, 2.0 if quick else 4.0)
    for server in servers:
        server.stop()
    figures += event_log(reaper, workdir, database_url, 20 if quick else 100,
                         200 if quick else 500)
    return figures
