"""Idle resident memory: ``VmRSS`` of the daemon after it is healthy and has idled 2 s.

Also shown: the anonymous part (the heap: what Director itself allocates; the rest is
file-backed pages of the interpreter and shared libraries, mostly shared with other processes)
and the peak (``VmHWM``), which a transient allocation at start can push far above the idle
figure. The plain twisted.web server measured the same way is the baseline.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.daemon import start_director
from bench.probe import free_port
from bench.procfs import status_kib
from bench.reaper import Reaper
from bench.report import Budget, Figure, formatted
from bench.servers import Server, start_baseline

#: DESIGN.md says "≤ 60 MB"; /proc reports KiB, so the figure is in MiB (1 MiB = 1,048,576 B).
RSS_BUDGET = Budget(60.0, "≤ 60 MB")
_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def _idle_sample(server: Server, idle: float) -> dict[str, int]:
    time.sleep(idle)
    sample = {field: status_kib(server.pid, field) for field in _FIELDS}
    server.stop()
    return sample


def _mib(samples: list[dict[str, int]], field: str = "VmRSS") -> tuple[float, ...]:
    return tuple(sample[field] / 1024 for sample in samples)


def idle_memory(reaper: Reaper, workdir: Path, database_url: str, runs: int,
                idle: float = 2.0) -> list[Figure]:
    """Figure 3: ``runs`` daemons (external DB) and as many baseline servers, each idle ``idle`` s."""
    director = []
    for _ in range(runs):
        server = start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                                log_path=workdir / "director-memory.log", database_url=database_url)
        director.append(_idle_sample(server, idle))
    baseline = []
    for _ in range(runs):
        baseline.append(_idle_sample(start_baseline(reaper, workdir / "baseline-memory.log"), idle))
    def versus(field: str) -> str:
        return f"{formatted(statistics.median(_mib(baseline, field)), 'MiB')} plain twisted.web"

    return [
        Figure("idle_rss_external", "idle RSS, external DB (VmRSS)", "MiB", _mib(director),
               RSS_BUDGET, versus("VmRSS") + "; original ≈150 MB",
               {"unit_note": "MiB = 1024 KiB as /proc reports; 60 MB (SI) = 57.2 MiB",
                "idle_seconds": idle, "director_kib": director, "baseline_kib": baseline}),
        Figure("idle_rss_anonymous", "  of which: anonymous (RssAnon)", "MiB",
               _mib(director, "RssAnon"), baseline=versus("RssAnon")),
        Figure("peak_rss_start", "  peak RSS while starting (VmHWM)", "MiB",
               _mib(director, "VmHWM"), baseline=versus("VmHWM")),
    ]
