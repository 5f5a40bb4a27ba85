"""Nothing the bench starts outlives it: child tracking, ordered cleanup, signal handling.

Every child is started in its own session (so a terminal's Ctrl-C reaches only us, and we stop
children in a known order) with a parent-death signal (so even a SIGKILLed bench takes them
down). ``Reaper`` runs the cleanups last-in first-out on normal exit, on an exception, on Ctrl-C
and on SIGTERM/SIGHUP; a second Ctrl-C during cleanup is ignored so that cleanup finishes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

_PR_SET_PDEATHSIG = 1


def _die_with_parent(signum: int) -> Callable[[], None]:
    def preexec() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)

    return preexec


def spawn(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
          output: IO[bytes] | int = subprocess.DEVNULL, cwd: Path | None = None,
          death_signal: int = signal.SIGTERM,
          stdin: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session; it gets ``death_signal`` if the bench dies."""
    return subprocess.Popen(
        list(argv), env=dict(env) if env is not None else None, stdin=stdin,
        stdout=output, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
        preexec_fn=_die_with_parent(death_signal),
    )


def stop_process(process: subprocess.Popen[bytes], grace: float = 15.0) -> float:
    """SIGTERM the child, SIGKILL its process group after it exits or after ``grace`` s.

    Like systemd's ``KillMode=mixed``: only the main process is asked to stop, so that it can
    stop its own children in order; whatever of its group remains afterwards is killed.
    Returns the seconds taken.
    """
    started = time.monotonic()
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"bench: pid {process.pid} ignored SIGTERM for {grace:.0f} s; killing it",
                  file=sys.stderr)
    # Anything left in its group (the leader may be gone already) is killed outright.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.returncode is None:
        process.wait(5)
    return time.monotonic() - started


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


def stop_pid(pid: int, grace: float = 10.0) -> None:
    """Stop a process we did not spawn ourselves (a postmaster): SIGINT, then SIGKILL."""
    for signum, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.02)
    print(f"bench: pid {pid} survived SIGKILL", file=sys.stderr)


class _Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, turned into the same unwinding as Ctrl-C."""


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(f"signal {signal.Signals(signum).name}")


class Reaper:
    """A stack of cleanups; use as a context manager around the whole run."""

    def __init__(self) -> None:
        self._cleanups: list[tuple[str, Callable[[], object]]] = []
        #: What cleanups found worth reporting (e.g. a process that outlived its parent).
        self.notes: list[str] = []

    def __enter__(self) -> Reaper:
        # Python leaves SIGINT ignored when it started ignored (``cmd &`` in a script): take
        # it back, so that an interrupt always unwinds through the cleanups.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _raise_interrupt)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.run_all()
        finally:
            signal.signal(signal.SIGINT, previous)

    def push(self, description: str, cleanup: Callable[[], object]) -> Callable[[], None]:
        """Register ``cleanup``; returns a function that runs it now (once) instead of at exit."""
        entry = (description, cleanup)
        self._cleanups.append(entry)

        def run_now() -> None:
            if entry in self._cleanups:
                self._cleanups.remove(entry)
                cleanup()

        return run_now

    def run_all(self) -> None:
        while self._cleanups:
            description, cleanup = self._cleanups.pop()
            try:
                cleanup()
            except Exception as error:  # keep cleaning up the rest
                print(f"bench: cleanup '{description}' failed: {error}", file=sys.stderr)
