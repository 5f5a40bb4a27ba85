"""Asking a server on 127.0.0.1 for ``GET /api/health``: once, or until it first says 200."""

from __future__ import annotations

import socket
import subprocess
import time

import attrs

HOST = "127.0.0.1"
HEALTH_PATH = "/api/health"


class ProbeError(Exception):
    """The server never became healthy; the message says what we saw instead."""


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def health_status(port: int, timeout: float = 2.0) -> int | None:
    """The status code of one ``GET /api/health`` on a fresh connection; None if refused."""
    request = (f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
               "Connection: close\r\n\r\n").encode()
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(request)
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    except (ConnectionRefusedError, ConnectionResetError, TimeoutError):
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


@attrs.frozen
class Readiness:
    """Seconds from spawn to the first answer of any status, and to the first 200."""

    answering: float
    healthy: float
    polls: int


def wait_until_healthy(process: subprocess.Popen[bytes], port: int, spawned_at: float,
                       timeout: float = 60.0, interval: float = 0.005) -> Readiness:
    """Poll every ``interval`` s until 200; ``spawned_at`` is ``time.monotonic()`` at spawn."""
    answering: float | None = None
    polls = 0
    deadline = spawned_at + timeout
    last: int | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ProbeError(f"the server exited with status {process.returncode} before it "
                             f"was healthy (last answer: {last})")
        last = health_status(port)
        polls += 1
        now = time.monotonic()
        if last is not None and answering is None:
            answering = now - spawned_at
        if last == 200:
            assert answering is not None
            return Readiness(answering, now - spawned_at, polls)
        time.sleep(interval)
    raise ProbeError(f"not healthy within {timeout:.0f} s (last answer: {last})")
