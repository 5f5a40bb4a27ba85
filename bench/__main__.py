"""``python -m bench``: run every figure, print the table, save ``bench/results/latest.json``.

The run order is: one external PostgreSQL (started and migrated once), the plain twisted.web
baseline's start time, then start-to-healthy (external, embedded fresh, embedded existing),
idle memory, and the cost of ``GET /api/health``. Everything runs under one ``Reaper`` and in
one throwaway directory under /tmp (kept only when the run fails, for its logs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import twisted
from bench import memory, startup, throughput, wrk
from bench.database import start_external_database
from bench.probe import ProbeError
from bench.reaper import Reaper
from bench.report import Figure, save, table
from bench.servers import REPOSITORY
from director.db.embedded import find_server_binaries


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewest runs and 2 s loads: a smoke test of the bench itself")
    return parser.parse_args(argv)


def _workdir(reaper: Reaper, keep: list[bool]) -> Path:
    """A directory under /tmp that the server account (postgres) can traverse."""
    path = Path(tempfile.mkdtemp(prefix="director-bench-", dir="/tmp"))
    path.chmod(0o755)

    def remove() -> None:
        if keep:
            print(f"bench: logs kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)

    reaper.push(f"remove {path}", remove)
    return path


def _command_output(argv: list[str]) -> str:
    """First line of what ``argv`` prints (wrk prints its version with a failing status)."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False,
                                cwd=REPOSITORY, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (result.stdout + result.stderr).strip().split("\n")[0]


def _machine(load_at_start: float) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg()[0],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "postgres": _command_output([str(find_server_binaries() / "postgres"), "--version"]),
        "wrk": _command_output(["wrk", "--version"]) if wrk.available() else None,
        "commit": _command_output(["git", "rev-parse", "--short", "HEAD"]),
        "source_modified": _command_output(["git", "status", "--porcelain", "src"]) != "",
    }


def _run(reaper: Reaper, quick: bool, figures: list[Figure], keep: list[bool]) -> None:
    workdir = _workdir(reaper, keep)
    database = start_external_database(reaper, workdir / "external")
    starts = 5 if quick else 10
    baseline = startup.baseline_starts(reaper, workdir, starts)
    figures += startup.external_database(reaper, workdir, database.url, starts, baseline)
    figures += startup.embedded_database(reaper, workdir, 3, 5)
    figures += memory.idle_memory(reaper, workdir, database.url, 2 if quick else 3)
    figures += throughput.health_cost(reaper, workdir, database.url, database.postmaster_pid,
                                      rounds=1 if quick else 3, duration=2.0 if quick else 5.0)


def _load_notes(figure: Figure) -> list[str]:
    """Load runs whose numbers need a caveat: wrong answers, dropped connections, busy client."""
    notes = []
    label = figure.label.strip()
    for side in ("director", "baseline"):
        runs = figure.details.get(side)
        for load in runs if isinstance(runs, list) else [runs] if runs else []:
            if load.get("unexpected_status"):
                notes.append(f"{label}: {side} gave {load['unexpected_status']} answers of an "
                             f"unexpected status {load.get('statuses', '')}")
            if load.get("lost_connections"):
                notes.append(f"{label}: {side} closed {load['lost_connections']} keep-alive "
                             "connections")
            share = load.get("client_cpu_share")
            if share is not None and share > 0.9:
                notes.append(f"{label}: the Python loader used {share:.0%} of a CPU against "
                             f"{side}; the loader may be the limit")
    return notes


def findings(figures: list[Figure], load_at_start: float) -> list[str]:
    """What in the results deserves a reader's attention, one line each."""
    notes = []
    if load_at_start >= 0.5:
        notes.append(f"the machine was busy before the bench started (1-minute load average "
                     f"{load_at_start:.1f} on {os.cpu_count()} CPUs): figures may be pessimistic")
    notes += [f"OVER BUDGET: {f.label.strip()} = {f.median:.3g} {f.unit} ({f.budget.text})"
              for f in figures if f.within_budget is False and f.budget is not None]
    for figure in figures:
        notes += _load_notes(figure)
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _arguments(argv)
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    figures: list[Figure] = []
    keep: list[bool] = []
    status = 0
    reaper = Reaper()
    try:
        with reaper:
            try:
                _run(reaper, arguments.quick, figures, keep)
            except Exception:
                keep.append(True)  # a failure: its logs are worth reading; an interrupt is not
                raise
    except KeyboardInterrupt:
        print("\nbench: interrupted; everything it started has been stopped", file=sys.stderr)
        status = 130
    except ProbeError as error:
        print(f"bench: {error}", file=sys.stderr)
        status = 1
    except Exception:
        traceback.print_exc()
        status = 1
    if figures:
        print(table(figures))
    notes = findings(figures, load_at_start) + reaper.notes
    for note in notes:
        print("! " + note)
    if status == 0:
        path = save({
            "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(time.monotonic() - started, 1),
            "quick": arguments.quick,
            "machine": _machine(load_at_start),
            "figures": [figure.as_json() for figure in figures],
            "findings": notes,
        })
        print(f"\n{len(figures)} figures in {time.monotonic() - started:.0f} s; "
              f"saved {path.relative_to(REPOSITORY)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
