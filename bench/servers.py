"""Starting a server under measurement, timing it to healthy, and stopping it for sure.

``launch`` is shared by the Director daemon and the plain twisted.web baseline: spawn, register
the stop with the reaper, poll ``/api/health`` until 200. The Director-specific parts (its
environment, the private PostgreSQL it may leave behind) live in ``bench.daemon``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs

from bench.probe import ProbeError, Readiness, free_port, wait_until_healthy
from bench.reaper import Reaper, spawn, stop_process

REPOSITORY = Path(__file__).resolve().parent.parent


@attrs.define
class Server:
    """A running server: its process, port, log, how fast it came up, and how to stop it."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    readiness: Readiness
    _stop_now: Callable[[], None]
    stop_seconds: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> float:
        """Stop it now (SIGTERM, then SIGKILL); returns how long the stop took."""
        started = time.monotonic()
        self._stop_now()
        self.stop_seconds = time.monotonic() - started
        return self.stop_seconds


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def launch(reaper: Reaper, name: str, argv: Sequence[str], *, env: Mapping[str, str],
           port: int, log_path: Path, after_stop: Callable[[], None] | None = None,
           timeout: float = 60.0) -> Server:
    """Spawn ``argv`` and return once ``/api/health`` on ``port`` answers 200."""
    with open(log_path, "ab") as log:
        spawned_at = time.monotonic()
        process = spawn(argv, env=env, output=log, cwd=REPOSITORY)

    def stop() -> None:
        stop_process(process)
        if after_stop is not None:
            after_stop()

    stop_now = reaper.push(f"stop {name} (pid {process.pid})", stop)
    try:
        readiness = wait_until_healthy(process, port, spawned_at, timeout)
    except ProbeError as error:
        stop_now()
        raise ProbeError(f"{name}: {error}; its log ends with:\n{log_tail(log_path)}") from None
    return Server(name, process, port, log_path, readiness, stop_now)


def python_module(module: str, *arguments: str) -> list[str]:
    """argv running ``python -m module`` with this interpreter (the project's venv)."""
    return [sys.executable, "-m", module, *arguments]


def start_baseline(reaper: Reaper, log_path: Path) -> Server:
    """Start the plain twisted.web baseline (``bench.baseline_server``) on a free port."""
    port = free_port()
    return launch(reaper, "baseline", python_module("bench.baseline_server", "--port", str(port)),
                  env=os.environ, port=port, log_path=log_path)
