"""The same load from ``wrk`` (C, one thread, 32 connections, 5 s), when it is on PATH.

wrk's own request loop costs far less than the Python generator's, so its figure shows what
the server can do when the client is not the limit; on a fresh machine without wrk this part
is skipped and the Python generator's figures stand alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

from bench.probe import HEALTH_PATH, HOST

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_LATENCY = re.compile(r"^\s*(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.MULTILINE)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: (.*)")


def available() -> str | None:
    return shutil.which("wrk")


def parse(output: str) -> dict[str, Any]:
    """requests/s, totals and latency percentiles (ms) from ``wrk --latency`` output."""
    rate, total = _RATE.search(output), _REQUESTS.search(output)
    if rate is None or total is None:
        raise ValueError(f"unexpected wrk output:\n{output}")
    latencies = {f"p{m[1]}": float(m[2]) * _UNITS[m[3]] for m in _LATENCY.finditer(output)}
    non_2xx = _NON_2XX.search(output)
    socket_errors = _SOCKET_ERRORS.search(output)
    return {
        "requests_per_second": float(rate[1]),
        "responses_total": int(total[1]),
        "unexpected_status": int(non_2xx[1]) if non_2xx else 0,
        "socket_errors": socket_errors[1].strip() if socket_errors else None,
        "latency_ms": latencies,
    }


def run(port: int, duration: int = 5, connections: int = 32) -> dict[str, Any]:
    """One bounded wrk run against 127.0.0.1:``port``."""
    binary = available()
    assert binary is not None
    argv = [binary, "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
            f"http://{HOST}:{port}{HEALTH_PATH}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30,
                            check=True)
    return parse(result.stdout)
