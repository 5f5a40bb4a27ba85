"""Slow clients: many connections that each send a request head one line at a time.

``python -m bench.slowloris --port N --connections C --sources spread|one`` opens ``C``
connections to 127.0.0.1:``N`` (``spread``: each from its own source address 127.1.x.y, so
that a per-address cap cannot hide the deadlines; ``one``: all from 127.0.0.2), sends a request
line at once and then one header line every ``--interval`` seconds, never ending the head.
It watches every connection until the server closes it (or ``--limit`` seconds pass) and
prints one JSON line: how many were still held at each ``--mark`` (5 s, 10 s, …), when the
last one was closed, how many the server closed at once (refused: within
``REFUSED_WITHIN`` s of connecting) and how many were answered 408.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import selectors
import socket
import time
from typing import Any

from bench.probe import HOST

#: A connection closed this soon after it was opened was refused, not timed out.
REFUSED_WITHIN = 1.0


def source_address(index: int, sources: str) -> str:
    if sources == "one":
        return "127.0.0.2"
    return f"127.1.{index // 250}.{index % 250 + 1}"


class Slow:
    def __init__(self, sock: socket.socket, opened: float) -> None:
        self.sock = sock
        self.opened = opened
        self.closed: float | None = None
        self.answer = b""


def open_all(port: int, count: int, sources: str) -> tuple[list[Slow], int]:
    """Connect ``count`` sockets and send each a request line; (connections, failures)."""
    connections, failures = [], 0
    for index in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((source_address(index, sources), 0))
            sock.settimeout(5)
            sock.connect((HOST, port))
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n")
        except OSError:
            failures += 1
            sock.close()
            continue
        sock.setblocking(False)
        connections.append(Slow(sock, time.monotonic()))
    return connections, failures


def watch(connections: list[Slow], started: float, interval: float, mark: float,
          limit: float) -> dict[str, int]:
    """Trickle a header line every ``interval`` s until all are closed; held count per mark."""
    selector = selectors.DefaultSelector()
    for connection in connections:
        selector.register(connection.sock, selectors.EVENT_READ, connection)
    held: dict[str, int] = {}
    next_mark, next_line, line = mark, interval, 0
    while selector.get_map() and time.monotonic() - started < limit:
        elapsed = time.monotonic() - started
        for key, _ in selector.select(timeout=max(0.0, min(next_mark, next_line) - elapsed)):
            _read(selector, key.data)
        elapsed = time.monotonic() - started
        if elapsed >= next_mark:
            held[f"{next_mark:g}"] = len(selector.get_map())
            next_mark += mark
        if elapsed >= next_line:
            line += 1
            for key in list(selector.get_map().values()):
                _send(selector, key.data, f"X-Slow-{line}: trickled\r\n".encode())
            next_line += interval
    held[f"{next_mark:g}"] = len(selector.get_map())
    return held


def _read(selector: selectors.BaseSelector, connection: Slow) -> None:
    try:
        chunk = connection.sock.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        chunk = b""
    if chunk:
        connection.answer += chunk[:64]
        return
    _closed(selector, connection)


def _send(selector: selectors.BaseSelector, connection: Slow, data: bytes) -> None:
    try:
        connection.sock.send(data)
    except BlockingIOError:
        pass
    except OSError:
        _closed(selector, connection)


def _closed(selector: selectors.BaseSelector, connection: Slow) -> None:
    connection.closed = time.monotonic()
    selector.unregister(connection.sock)
    connection.sock.close()


def summary(connections: list[Slow], failures: int, held: dict[str, int],
            started: float) -> dict[str, Any]:
    closed = [c for c in connections if c.closed is not None]
    refused = sum(1 for c in closed if c.closed is not None and c.closed - c.opened < REFUSED_WITHIN)
    return {
        "opened": len(connections),
        "connect_failures": failures,
        "refused_at_once": refused,
        "answered_408": sum(1 for c in connections if c.answer.startswith(b"HTTP/1.1 408")),
        "held": held,
        "still_open_at_limit": len(connections) - len(closed),
        "all_closed_s": (max(c.closed for c in closed if c.closed is not None) - started
                         if closed and len(closed) == len(connections) else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--sources", choices=("spread", "one"), default="spread")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between lines")
    parser.add_argument("--mark", type=float, default=5.0, help="count held ones this often")
    parser.add_argument("--limit", type=float, default=120.0, help="give up after this long")
    arguments = parser.parse_args()
    if not 1 <= arguments.connections <= 60_000:
        parser.error("--connections: 1-60,000 (250 source addresses per 127.1.x.0/24)")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    connections, failures = open_all(arguments.port, arguments.connections, arguments.sources)
    try:
        held = watch(connections, started, arguments.interval, arguments.mark, arguments.limit)
        print(json.dumps(summary(connections, failures, held, started)), flush=True)
    finally:
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.sock.close()


if __name__ == "__main__":
    main()
