"""A bounded HTTP/1.1 keep-alive load generator on asyncio protocols, run as its own process.

``python -m bench.loadgen --port N`` opens ``--connections`` keep-alive connections to
127.0.0.1 (and nowhere else), keeps exactly one ``GET --path`` in flight on each, and
prints one JSON object: requests/s and latency percentiles over the measuring window (after
``--warmup``), plus totals over the whole run so that the caller can divide the server's CPU
time by every request it served. It stops at the first of: the window's end, ``--max-requests``
responses, or a hard deadline a few seconds later (then whatever is in flight is abandoned).
It reports its own CPU share: near 1.0 means the generator, not the server, was the limit.
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
from array import array
from typing import Any

import attrs

HOST = "127.0.0.1"
_GRACE_SECONDS = 5.0
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)")


class ProtocolError(Exception):
    """The server's response cannot be framed (no length, bad chunk)."""


def _chunked_end(buffer: bytearray, position: int) -> int | None:
    """End offset of a chunked body starting at ``position``, or None if incomplete."""
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        try:
            size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
        except ValueError:
            raise ProtocolError("bad chunk size line") from None
        position = line_end + 2
        if size == 0:
            if buffer[position:position + 2] == b"\r\n":
                return position + 2
            trailers_end = buffer.find(b"\r\n\r\n", position)
            return None if trailers_end < 0 else trailers_end + 4
        position += size + 2
        if position > len(buffer):
            return None


def _framed(buffer: bytearray) -> tuple[int, bytes, int, int] | None:
    """(status, lower-cased head, body start, end) of the first complete response, else None."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buffer[:head_end + 2]).lower()
    status = int(head[9:12])
    body_start = head_end + 4
    length = _CONTENT_LENGTH.search(head)
    end: int | None
    if length is not None:
        end = body_start + int(length[1])
        if end > len(buffer):
            return None
    elif b"\r\ntransfer-encoding: chunked\r\n" in head:
        end = _chunked_end(buffer, body_start)
        if end is None:
            return None
    else:
        raise ProtocolError("a response without Content-Length or chunked encoding")
    return status, head, body_start, end


def take_response(buffer: bytearray) -> int | None:
    """Remove the first complete response from ``buffer`` and return its status, else None."""
    framed = _framed(buffer)
    if framed is None:
        return None
    del buffer[:framed[3]]
    return framed[0]


def take_message(buffer: bytearray) -> tuple[int, bytes, bytes] | None:
    """Like ``take_response`` but returns (status, head, body), both as sent.

    The head keeps its case (header values such as session ids are case-sensitive); the body
    is still chunk-framed when the transfer was chunked.
    """
    framed = _framed(buffer)
    if framed is None:
        return None
    status, _, body_start, end = framed
    head = bytes(buffer[:body_start - 2])
    body = bytes(buffer[body_start:end])
    del buffer[:end]
    return status, head, body


@attrs.define
class Tally:
    """Shared by all connections: the clock limits and what was counted."""

    window_start: int
    window_end: int
    max_requests: int
    expected_status: int
    total: int = 0
    in_window: int = 0
    statuses: dict[int, int] = attrs.Factory(dict)
    latencies: array[int] = attrs.Factory(lambda: array("q"))
    lost_connections: int = 0

    def finished(self, now: int) -> bool:
        return now >= self.window_end or self.total >= self.max_requests

    def record(self, status: int, sent: int, now: int) -> None:
        self.total += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if self.window_start <= now <= self.window_end:
            self.in_window += 1
            self.latencies.append(now - sent)


class Connection(asyncio.Protocol):
    """One keep-alive connection with one request in flight at a time."""

    def __init__(self, request: bytes, tally: Tally, done: asyncio.Future[None]) -> None:
        self.request = request
        self.tally = tally
        self.done = done
        self.buffer = bytearray()
        self.sent = 0
        self.transport: asyncio.Transport | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        now = time.perf_counter_ns()
        if self.tally.finished(now):
            self.closing = True
            self.transport.close()
            return
        self.sent = now
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (status := take_response(self.buffer)) is not None:
            self.tally.record(status, self.sent, time.perf_counter_ns())
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.tally.lost_connections += 1
        if not self.done.done():
            self.done.set_result(None)


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


async def generate(port: int, path: str, expected_status: int, connections: int,
                   duration: float, warmup: float, max_requests: int,
                   headers: tuple[str, ...] = ()) -> Tally:
    loop = asyncio.get_running_loop()
    extra = "".join(f"{header}\r\n" for header in headers)
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{extra}\r\n".encode()
    start = time.perf_counter_ns()
    window_start = start + int(warmup * 1e9)
    tally = Tally(window_start, window_start + int(duration * 1e9), max_requests,
                  expected_status)
    dones = [loop.create_future() for _ in range(connections)]
    opened = await asyncio.gather(*(
        loop.create_connection(lambda d=done: Connection(request, tally, d), HOST, port)  # type: ignore[misc]
        for done in dones
    ))
    try:
        await asyncio.wait_for(asyncio.gather(*dones), warmup + duration + _GRACE_SECONDS)
    except TimeoutError:
        pass  # a stuck response: abandon it, the counts so far stand
    finally:
        for transport, _ in opened:
            transport.abort()
    return tally


def summary(tally: Tally, duration: float, connections: int, cpu: float, wall: float) -> dict[str, Any]:
    latencies = sorted(tally.latencies)
    milliseconds = {name: percentile(latencies, fraction) / 1e6
                    for name, fraction in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))}
    return {
        "requests_per_second": tally.in_window / duration,
        "responses_in_window": tally.in_window,
        "responses_total": tally.total,
        "unexpected_status": sum(n for status, n in tally.statuses.items()
                                 if status != tally.expected_status),
        "statuses": {str(status): n for status, n in sorted(tally.statuses.items())},
        "lost_connections": tally.lost_connections,
        "hit_max_requests": tally.total >= tally.max_requests,
        "latency_ms": milliseconds | {"max": (latencies[-1] / 1e6) if latencies else None},
        "connections": connections,
        "duration_s": duration,
        "client_cpu_share": cpu / wall if wall > 0 else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--path", default="/api/health")
    parser.add_argument("--expect", type=int, default=200, help="the status every answer should have")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="measuring window, seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before the window")
    parser.add_argument("--max-requests", type=int, default=2_000_000)
    parser.add_argument("--header", action="append", default=[],
                        help="an extra request header, 'name: value' (repeatable)")
    arguments = parser.parse_args()
    if not (1 <= arguments.connections <= 1024 and 0 < arguments.duration <= 60
            and 0 <= arguments.warmup <= 10 and 1 <= arguments.max_requests <= 10_000_000
            and arguments.path.startswith("/")
            and all(":" in h and "\r" not in h and "\n" not in h for h in arguments.header)):
        parser.error("out of bounds: 1-1024 connections, duration ≤ 60 s, warmup ≤ 10 s, "
                     "max-requests ≤ 10,000,000, a path starting with /, headers 'name: value'")
    gc.disable()  # bounded run; collector pauses would show up as client-side latency
    cpu_before, wall_before = sum(os.times()[:2]), time.monotonic()
    try:
        tally = asyncio.run(generate(arguments.port, arguments.path, arguments.expect,
                                     arguments.connections, arguments.duration,
                                     arguments.warmup, arguments.max_requests,
                                     tuple(arguments.header)))
    except (OSError, ProtocolError) as error:
        print(f"loadgen: {error}", file=sys.stderr)
        return 1
    cpu, wall = sum(os.times()[:2]) - cpu_before, time.monotonic() - wall_before
    print(json.dumps(summary(tally, arguments.duration, arguments.connections, cpu, wall)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
