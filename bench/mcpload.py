"""MCP ``tools/call`` load on asyncio protocols, run as its own process: through the gateway,
or straight to the stdio echo server as the baseline.

``python -m bench.mcpload gateway --port N --playbook ID --key K --sessions S`` opens ``S``
keep-alive connections to 127.0.0.1, each its own MCP session (``initialize``, then
``notifications/initialized``, as a client does), and keeps one ``tools/call`` of ``echo`` in
flight on each. ``python -m bench.mcpload direct --sessions S -- CMD…`` starts ``CMD`` (the
echo server) with pipes, does the same handshake over stdin/stdout, and keeps ``S`` calls in
flight on the one pipe: what a client of the echo server gets without any gateway.

``python -m bench.mcpload modern --port N[,M…] --playbook ID --key K --sessions S`` speaks
the stateless era (2026-07-28): no handshake, every call one self-contained POST (routing
headers ``MCP-Protocol-Version``, ``Mcp-Method``, ``Mcp-Name``; ``params._meta`` with the
protocol version, client capabilities and client info). Each of the ``S`` workers keeps one
call in flight and holds one keep-alive connection per port; with several ports its calls go
to them in turn (round-robin, no affinity of any kind).

All print one JSON object like ``bench.loadgen``'s (``requests_per_second`` is calls/s,
latencies are per call in ms over the window after ``--warmup``, ``responses_total`` counts
every call of the run for the caller's CPU-per-call division), plus ``bad_answers``: calls
whose answer was not the echoed text (a JSON-RPC error, ``isError``, a wrong status).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import sys
import time
from typing import Any

from bench.loadgen import HOST, ProtocolError, Tally, summary, take_message

_GRACE_SECONDS = 5.0
_TEXT = "bench"
_EXPECTED = b'"text":"' + _TEXT.encode() + b'"'
_SESSION_HEADER = re.compile(rb"\r\nmcp-session-id:[ \t]*([^\r\n]+)", re.IGNORECASE)
PROTOCOL_VERSION = "2025-06-18"


def _json(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def initialize_message(request_id: int = 0) -> bytes:
    return _json({"jsonrpc": "2.0", "id": request_id, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
        "clientInfo": {"name": "director-bench", "version": "1"}}})


MODERN_VERSION = "2026-07-28"
MODERN_META = {"io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
               "io.modelcontextprotocol/clientCapabilities": {},
               "io.modelcontextprotocol/clientInfo": {"name": "director-bench", "version": "1"}}


def modern_call(port: int, path: str, key: str, request_id: int) -> bytes:
    body = _json({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                  "params": {"name": "echo", "arguments": {"text": _TEXT},
                             "_meta": MODERN_META}})
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "accept: application/json, text/event-stream\r\n"
            f"content-type: application/json\r\nx-api-key: {key}\r\n"
            f"mcp-protocol-version: {MODERN_VERSION}\r\nmcp-method: tools/call\r\n"
            f"mcp-name: echo\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


INITIALIZED = _json({"jsonrpc": "2.0", "method": "notifications/initialized"})


def call_message(request_id: int) -> bytes:
    return _json({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                  "params": {"name": "echo", "arguments": {"text": _TEXT}}})


def post(port: int, path: str, key: str, body: bytes, session: str | None = None) -> bytes:
    """One POST to the MCP endpoint with the headers a Streamable HTTP client sends."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "accept: application/json, text/event-stream\r\n"
            f"content-type: application/json\r\nx-api-key: {key}\r\n"
            f"content-length: {len(body)}\r\n")
    if session is not None:
        head += f"mcp-session-id: {session}\r\nmcp-protocol-version: {PROTOCOL_VERSION}\r\n"
    return head.encode() + b"\r\n" + body


def session_id(head: bytes) -> str | None:
    match = _SESSION_HEADER.search(head)
    return match[1].decode().strip() if match else None


class Counts:
    """What went wrong, shared by all sessions."""

    def __init__(self) -> None:
        self.bad_answers = 0
        self.setup_failures = 0
        self.first_error: str | None = None

    def bad(self, what: str) -> None:
        self.bad_answers += 1
        if self.first_error is None:
            self.first_error = what[:300]


class GatewaySession(asyncio.Protocol):
    """One connection, one MCP session, one ``tools/call`` in flight at a time."""

    def __init__(self, port: int, playbook: str, key: str, tally: Tally, counts: Counts,
                 done: asyncio.Future[None]) -> None:
        self.port, self.key, self.tally, self.counts, self.done = port, key, tally, counts, done
        self.path = f"/playbooks/{playbook}/mcp"
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.session: str | None = None
        self.stage = "initialize"
        self.next_id = 1
        self.sent = 0
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(post(self.port, self.path, self.key, initialize_message()))

    def _fail_setup(self, what: str) -> None:
        self.counts.setup_failures += 1
        if self.counts.first_error is None:
            self.counts.first_error = what[:300]
        self.closing = True
        assert self.transport is not None
        self.transport.close()

    def _send_call(self) -> None:
        assert self.transport is not None
        now = time.perf_counter_ns()
        if self.tally.finished(now):
            self.closing = True
            self.transport.close()
            return
        self.sent = now
        self.transport.write(post(self.port, self.path, self.key, call_message(self.next_id),
                                  self.session))
        self.next_id += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (message := take_message(self.buffer)) is not None:
            status, head, body = message
            if self.stage == "calls":
                self.tally.record(status, self.sent, time.perf_counter_ns())
                if status != 200 or _EXPECTED not in body or b'"isError":true' in body:
                    self.counts.bad(f"{status} {body[:200]!r}")
                self._send_call()
            elif self.stage == "initialize":
                self.session = session_id(head)
                if status != 200 or self.session is None:
                    self._fail_setup(f"initialize: {status} {body[:200]!r}")
                    return
                self.stage = "initialized"
                assert self.transport is not None
                self.transport.write(post(self.port, self.path, self.key, INITIALIZED,
                                          self.session))
            elif self.stage == "initialized":
                if status != 202:
                    self._fail_setup(f"notifications/initialized: {status} {body[:200]!r}")
                    return
                self.stage = "calls"
                self._send_call()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.tally.lost_connections += 1
        if not self.done.done():
            self.done.set_result(None)


class ModernWorker:
    """One call in flight, sent to each of its connections (one per port) in turn."""

    def __init__(self, ports: list[int], playbook: str, key: str, tally: Tally,
                 counts: Counts, done: asyncio.Future[None]) -> None:
        self.ports, self.key, self.tally, self.counts, self.done = ports, key, tally, counts, done
        self.path = f"/playbooks/{playbook}/mcp"
        self.connections: list[ModernConnection] = []
        self.turn = 0
        self.next_id = 1
        self.sent = 0
        self.closing = False
        self.per_port = [0] * len(ports)

    def start(self) -> None:
        self._send_call()

    def _send_call(self) -> None:
        now = time.perf_counter_ns()
        if self.tally.finished(now):
            self.closing = True
            for connection in self.connections:
                if connection.transport is not None:
                    connection.transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        self.sent = now
        index = self.turn % len(self.connections)
        self.turn += 1
        connection = self.connections[index]
        assert connection.transport is not None
        connection.transport.write(modern_call(self.ports[index], self.path, self.key,
                                               self.next_id))
        self.next_id += 1

    def answered(self, index: int, status: int, body: bytes) -> None:
        self.tally.record(status, self.sent, time.perf_counter_ns())
        if self.tally.window_start <= self.sent:
            self.per_port[index] += 1
        if status != 200 or _EXPECTED not in body or b'"isError":true' in body:
            self.counts.bad(f"port {self.ports[index]}: {status} {body[:200]!r}")
        self._send_call()

    def lost(self) -> None:
        if not self.closing:
            self.tally.lost_connections += 1
            self.closing = True
            if not self.done.done():
                self.done.set_result(None)


class ModernConnection(asyncio.Protocol):
    def __init__(self, worker: ModernWorker, index: int) -> None:
        self.worker, self.index = worker, index
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (message := take_message(self.buffer)) is not None:
            status, _, body = message
            self.worker.answered(self.index, status, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.lost()


async def modern(ports: list[int], playbook: str, key: str, sessions: int, duration: float,
                 warmup: float, max_calls: int) -> tuple[Tally, Counts, list[int]]:
    loop = asyncio.get_running_loop()
    start = time.perf_counter_ns()
    window_start = start + int(warmup * 1e9)
    tally = Tally(window_start, window_start + int(duration * 1e9), max_calls, 200)
    counts = Counts()
    dones = [loop.create_future() for _ in range(sessions)]
    workers = [ModernWorker(ports, playbook, key, tally, counts, done) for done in dones]
    transports = []
    for worker in workers:
        for index, port in enumerate(ports):
            transport, connection = await loop.create_connection(
                lambda w=worker, i=index: ModernConnection(w, i), HOST, port)  # type: ignore[misc]
            worker.connections.append(connection)
            transports.append(transport)
    for worker in workers:
        worker.start()
    try:
        await asyncio.wait_for(asyncio.gather(*dones), warmup + duration + _GRACE_SECONDS)
    except TimeoutError:
        pass
    finally:
        for transport in transports:
            transport.abort()
    per_port = [sum(worker.per_port[i] for worker in workers) for i in range(len(ports))]
    return tally, counts, per_port


async def gateway(port: int, playbook: str, key: str, sessions: int, duration: float,
                  warmup: float, max_calls: int) -> tuple[Tally, Counts]:
    loop = asyncio.get_running_loop()
    start = time.perf_counter_ns()
    window_start = start + int(warmup * 1e9)
    tally = Tally(window_start, window_start + int(duration * 1e9), max_calls, 200)
    counts = Counts()
    dones = [loop.create_future() for _ in range(sessions)]
    opened = await asyncio.gather(*(
        loop.create_connection(
            lambda d=done: GatewaySession(port, playbook, key, tally, counts, d),  # type: ignore[misc]
            HOST, port)
        for done in dones))
    try:
        await asyncio.wait_for(asyncio.gather(*dones), warmup + duration + _GRACE_SECONDS)
    except TimeoutError:
        pass
    finally:
        for transport, _ in opened:
            transport.abort()
    return tally, counts


class DirectClient(asyncio.SubprocessProtocol):
    """The echo server's stdin/stdout, ``in_flight`` calls outstanding at a time."""

    def __init__(self, tally: Tally, counts: Counts, in_flight: int,
                 done: asyncio.Future[None]) -> None:
        self.tally, self.counts, self.in_flight, self.done = tally, counts, in_flight, done
        self.transport: asyncio.SubprocessTransport | None = None
        self.buffer = bytearray()
        self.sent: dict[int, int] = {}
        self.next_id = 1
        self.ready = False
        self.stopping = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport
        self._write(initialize_message())

    def _write(self, line: bytes) -> None:
        assert self.transport is not None
        pipe = self.transport.get_pipe_transport(0)
        assert isinstance(pipe, asyncio.WriteTransport)
        pipe.write(line + b"\n")

    def _send_call(self) -> None:
        now = time.perf_counter_ns()
        if self.tally.finished(now):
            if not self.sent and not self.done.done():
                self.done.set_result(None)
            return
        self.sent[self.next_id] = now
        self._write(call_message(self.next_id))
        self.next_id += 1

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        self.buffer += data
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 1]
            if not self.ready:
                self.ready = True
                self._write(INITIALIZED)
                for _ in range(self.in_flight):
                    self._send_call()
                continue
            message = json.loads(line)
            sent = self.sent.pop(message.get("id"), None)
            if sent is None:
                self.counts.bad(f"an answer to no call: {line[:200]!r}")
                continue
            self.tally.record(200, sent, time.perf_counter_ns())
            if _EXPECTED not in line:
                self.counts.bad(line[:200].decode(errors="replace"))
            self._send_call()

    def process_exited(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def direct(command: list[str], in_flight: int, duration: float, warmup: float,
                 max_calls: int) -> tuple[Tally, Counts]:
    loop = asyncio.get_running_loop()
    start = time.perf_counter_ns()
    window_start = start + int(warmup * 1e9)
    tally = Tally(window_start, window_start + int(duration * 1e9), max_calls, 200)
    counts = Counts()
    done: asyncio.Future[None] = loop.create_future()
    transport, _ = await loop.subprocess_exec(
        lambda: DirectClient(tally, counts, in_flight, done), *command,
        stderr=None)
    try:
        await asyncio.wait_for(done, warmup + duration + _GRACE_SECONDS)
    except TimeoutError:
        pass
    finally:
        transport.close()
    return tally, counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("gateway", "direct", "modern"))
    parser.add_argument("--port", help="gateway: port on 127.0.0.1; modern: port[,port…]")
    parser.add_argument("--playbook", help="gateway: the playbook id")
    parser.add_argument("--key", help="gateway: the API key")
    parser.add_argument("--sessions", type=int, default=1,
                        help="gateway: sessions (one connection each); direct: calls in flight")
    parser.add_argument("--duration", type=float, default=5.0, help="measuring window, seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before the window")
    parser.add_argument("--max-calls", type=int, default=2_000_000)
    argv = sys.argv[1:]
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    arguments = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    arguments.command = command
    if not (1 <= arguments.sessions <= 1024 and 0 < arguments.duration <= 60
            and 0 <= arguments.warmup <= 10 and 1 <= arguments.max_calls <= 10_000_000):
        parser.error("out of bounds: 1-1024 sessions, duration ≤ 60 s, warmup ≤ 10 s")
    if arguments.mode in ("gateway", "modern") and not (arguments.port and arguments.playbook
                                            and arguments.key):
        parser.error("gateway needs --port, --playbook and --key")
    if arguments.mode == "direct" and not arguments.command:
        parser.error("direct needs the server's command after --")
    gc.disable()  # bounded run; collector pauses would show up as client-side latency
    cpu_before, wall_before = sum(os.times()[:2]), time.monotonic()
    per_port: list[int] | None = None
    try:
        if arguments.mode == "modern":
            tally, counts, per_port = asyncio.run(modern(
                [int(port) for port in arguments.port.split(",")], arguments.playbook,
                arguments.key, arguments.sessions, arguments.duration, arguments.warmup,
                arguments.max_calls))
        elif arguments.mode == "gateway":
            tally, counts = asyncio.run(gateway(
                int(arguments.port), arguments.playbook, arguments.key, arguments.sessions,
                arguments.duration, arguments.warmup, arguments.max_calls))
        else:
            tally, counts = asyncio.run(direct(
                arguments.command, arguments.sessions, arguments.duration, arguments.warmup,
                arguments.max_calls))
    except (OSError, ProtocolError) as error:
        print(f"mcpload: {error}", file=sys.stderr)
        return 1
    cpu, wall = sum(os.times()[:2]) - cpu_before, time.monotonic() - wall_before
    result = summary(tally, arguments.duration, arguments.sessions, cpu, wall)
    result.update(mode=arguments.mode, bad_answers=counts.bad_answers,
                  setup_failures=counts.setup_failures, first_error=counts.first_error)
    if per_port is not None:
        result.update(calls_per_port=per_port,
                      ok_in_window=tally.statuses.get(200, 0) - counts.bad_answers)
    # One write: the echo server (direct mode) shares this pipe for its stderr, and print()
    # unbuffered (PYTHONUNBUFFERED) writes the line and its end apart, which it can split.
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
