"""Start-to-healthy: spawn to the first 200 from ``/api/health``, polled every 5 ms.

Three situations: an external database (already running and migrated; the DESIGN budget is
≤ 1 s), the embedded default on a fresh state directory (initdb included), and the embedded
default on an existing cluster. The plain twisted.web server's spawn-to-200 is the floor that
the interpreter and Twisted alone set.
"""

from __future__ import annotations

from pathlib import Path

from bench.daemon import start_director
from bench.probe import free_port
from bench.reaper import Reaper
from bench.report import Budget, Figure, formatted
from bench.servers import Server, start_baseline

START_BUDGET = Budget(1.0, "≤ 1 s")


def _director_once(reaper: Reaper, workdir: Path, state_directory: Path, log_name: str,
                   database_url: str | None) -> Server:
    server = start_director(reaper, port=free_port(), state_directory=state_directory,
                            log_path=workdir / f"{log_name}.log", database_url=database_url)
    server.stop()
    return server


def baseline_starts(reaper: Reaper, workdir: Path, runs: int) -> list[float]:
    """Spawn-to-200 of the plain twisted.web server, ``runs`` times."""
    samples = []
    for _ in range(runs):
        server = start_baseline(reaper, workdir / "baseline-start.log")
        server.stop()
        samples.append(server.readiness.healthy)
    return samples


def _details(servers: list[Server]) -> dict[str, object]:
    return {
        "answering_s": [s.readiness.answering for s in servers],
        "polls": [s.readiness.polls for s in servers],
        "stop_s": [s.stop_seconds for s in servers],
    }


def external_database(reaper: Reaper, workdir: Path, database_url: str, runs: int,
                      baseline: list[float]) -> list[Figure]:
    """Figure 1: ``runs`` starts against the bench's migrated PostgreSQL."""
    servers = [_director_once(reaper, workdir, workdir / "state-external", "director-external",
                              database_url) for _ in range(runs)]
    floor = Figure("baseline_start", "", "s", tuple(baseline)).median
    return [
        Figure("start_external_healthy", "start → healthy, external DB", "s",
               tuple(s.readiness.healthy for s in servers), START_BUDGET,
               f"{formatted(floor, 's')} plain twisted.web; TS original 0.8-1.5 s",
               _details(servers) | {"baseline_start_s": baseline}),
        Figure("start_external_answering", "  of which: start → first HTTP answer", "s",
               tuple(s.readiness.answering for s in servers)),
    ]


def embedded_database(reaper: Reaper, workdir: Path, first_runs: int,
                      later_runs: int) -> list[Figure]:
    """Figure 2: fresh state directories (initdb included), then restarts of one of them."""
    fresh = [_director_once(reaper, workdir, workdir / f"state-embedded-{index}",
                            "director-embedded", None) for index in range(first_runs)]
    existing = workdir / f"state-embedded-{first_runs - 1}"
    later = [_director_once(reaper, workdir, existing, "director-embedded", None)
             for _ in range(later_runs)]
    return [
        Figure("start_embedded_first", "start → healthy, embedded, first (initdb)", "s",
               tuple(s.readiness.healthy for s in fresh), details=_details(fresh)),
        Figure("start_embedded_later", "start → healthy, embedded, existing cluster", "s",
               tuple(s.readiness.healthy for s in later), details=_details(later)),
    ]
