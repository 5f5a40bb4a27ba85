"""``python -m bench``: run every figure, print the table, save ``bench/results/latest.json``.

The run order is: one external PostgreSQL (started and migrated once), then the groups
(``--only`` picks some): ``startup`` (the plain twisted.web baseline's start time, then
start-to-healthy: external, embedded fresh, embedded existing), ``memory`` (idle), ``health``
(the cost of ``GET /api/health``), ``accounts`` (API key resolution, ``/api/v1/me``, a rate
limit shared by two instances), ``playbooks`` (propagation between two instances, 10,000
playbooks in the cache), ``mcp`` (the gateway: added latency, CPU and throughput of
``tools/call``, idle sessions with streams, ``list_changed`` fan-out), ``ops`` (what
``METRICS_LISTEN`` costs a proxied ``tools/call``), ``tracing`` (what OpenTelemetry costs it:
off next to the code of ``main``, on sampling every trace and 1 in 100; spans per call;
``bench/tracing.py``), ``modern`` (the stateless era:
a modern ``tools/call`` next to a handshake-era one, to a handshake-only and to a dual-era
upstream, two instances without affinity), ``slow`` (2,000 slow clients: connections held
over time, time until all are closed, RSS, and health latency meanwhile), ``revocation`` (a
key revoked on one instance: how long until the last of its 100, then 1,000 streams on another
is closed) and ``fuzz`` (100,000 generated inputs against one daemon: 5xx answers, error-level
log lines, RSS before and after; ``bench/fuzz.py``), ``studio``, ``registry`` (search
latency cold and cached, install → first ``tools/list``; ``bench/registry.py``), ``sandbox``
(a stdio server's start, boxed and not) and ``oauth`` (an OAuth access token's cost on the hot
path next to an API key's, and the SDK client's sign-in through headless Chromium;
``bench/oauth.py``). A group that fails is reported and the others still run. Everything runs
under one ``Reaper`` and in one throwaway directory under /tmp (kept only when the run fails,
for its logs).
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

import twisted
from bench import (
    accounts,
    fuzz,
    mcp,
    memory,
    modern,
    ops,
    playbooks,
    revocation,
    slowclients,
    startup,
    throughput,
    tracing,
    upstream_oauth,
    wrk,
)
from bench.daemon import log_findings
from bench.database import ExternalDatabase, start_external_database
from bench.probe import ProbeError
from bench.reaper import Reaper
from bench.report import Figure, formatted, save, table
from bench.servers import REPOSITORY
from bench.studio import studio_figures
from director.db.embedded import find_server_binaries


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewest runs and 2 s loads: a smoke test of the bench itself")
    parser.add_argument("--only", type=_groups, default=list(GROUPS),
                        help=f"comma-separated groups to run (default all: {','.join(GROUPS)})")
    return parser.parse_args(argv)


def _groups(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown group(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(GROUPS)}")
    return [name for name in GROUPS if name in names]  # always in the run order


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


@attrs.frozen
class Context:
    """What every group of figures gets."""

    reaper: Reaper
    workdir: Path
    database: ExternalDatabase
    quick: bool


def _startup(c: Context) -> list[Figure]:
    starts = 5 if c.quick else 10
    baseline = startup.baseline_starts(c.reaper, c.workdir, starts)
    return (startup.external_database(c.reaper, c.workdir, c.database.url, starts, baseline)
            + startup.embedded_database(c.reaper, c.workdir, 3, 5))


def _memory(c: Context) -> list[Figure]:
    return memory.idle_memory(c.reaper, c.workdir, c.database.url, 2 if c.quick else 3)


def _health(c: Context) -> list[Figure]:
    return throughput.health_cost(c.reaper, c.workdir, c.database.url,
                                  c.database.postmaster_pid, rounds=1 if c.quick else 3,
                                  duration=2.0 if c.quick else 5.0)


def _accounts(c: Context) -> list[Figure]:
    return (accounts.key_cost(20_000 if c.quick else 100_000)
            + accounts.me_cost(c.reaper, c.workdir, c.database.url, rounds=1 if c.quick else 2,
                               duration=2.0 if c.quick else 3.0)
            + accounts.rate_limit_accuracy(c.reaper, c.workdir, c.database.url,
                                           rounds=1 if c.quick else 3))


def _playbooks(c: Context) -> list[Figure]:
    return (playbooks.propagation(c.reaper, c.workdir, c.database.url,
                                  changes=200 if c.quick else 1000)
            + playbooks.many_playbooks(c.reaper, c.workdir, c.database, 10_000,
                                       starts=1 if c.quick else 3, reloads=3 if c.quick else 5))


def _mcp(c: Context) -> list[Figure]:
    return (mcp.calls(c.reaper, c.workdir, c.database.url, rounds=1 if c.quick else 2,
                      duration=2.0 if c.quick else 3.0)
            + mcp.idle_streams(c.reaper, c.workdir, c.database.url,
                               sessions=2_000 if c.quick else 10_000,
                               fanouts=3 if c.quick else 5))


def _ops(c: Context) -> list[Figure]:
    return ops.metrics_overhead(c.reaper, c.workdir, c.database.url, rounds=2 if c.quick else 6,
                                duration=2.0 if c.quick else 3.0)


def _tracing(c: Context) -> list[Figure]:
    return tracing.tracing_overhead(c.reaper, c.workdir, c.database.url,
                                    rounds=2 if c.quick else 6, duration=2.0 if c.quick else 3.0)


def _modern(c: Context) -> list[Figure]:
    duration = 2.0 if c.quick else 3.0
    return (modern.modern_vs_handshake(c.reaper, c.workdir, c.database.url,
                                       rounds=2 if c.quick else 6, duration=duration)
            + modern.two_instances(c.reaper, c.workdir, c.database.url,
                                   rounds=1 if c.quick else 3, duration=duration))


def _slow(c: Context) -> list[Figure]:
    return slowclients.slow_clients(c.reaper, c.workdir, c.database.url, 1 if c.quick else 3)


def _revocation(c: Context) -> list[Figure]:
    return revocation.revocation(c.reaper, c.workdir, c.database.url, (100, 1_000),
                                 rounds=2 if c.quick else 5)


def _fuzz(c: Context) -> list[Figure]:
    return fuzz.fuzz_run(c.reaper, c.workdir, c.database.url,
                         inputs=5_000 if c.quick else 100_000,
                         settle_seconds=2.0 if c.quick else 10.0)


#: Every group of figures, in the order they run.
GROUPS: dict[str, Callable[[Context], list[Figure]]] = {
    "startup": _startup, "memory": _memory, "health": _health,
    "accounts": _accounts, "playbooks": _playbooks, "mcp": _mcp, "ops": _ops,
    "tracing": _tracing, "modern": _modern, "slow": _slow, "revocation": _revocation, "fuzz": _fuzz,
}



def _studio(c: Context) -> list[Figure]:
    """``studio``: the web interface (bench/studio.py): the render time of a playbook page of
    50 servers / 500 tools, page weight, add server → its tools on the page."""
    return studio_figures(c.reaper, c.workdir, c.database.url,
                          renders=50 if c.quick else 200, adds=5 if c.quick else 20)


GROUPS["studio"] = _studio

def _registry(c: Context) -> list[Figure]:
    """``registry``: search latency cold and cached, install → first tools/list
    (bench/registry.py)."""
    from bench.registry import registry_figures

    return registry_figures(c.reaper, c.workdir, c.database.url,
                            searches=10 if c.quick else 30, installs=2 if c.quick else 5)


GROUPS["registry"] = _registry


def _sandbox(c: Context) -> list[Figure]:
    """``sandbox``: a stdio server's spawn → initialize, without and with the systemd sandbox
    (bench/sandbox.py; needs root and a bootable systemd, as tests/test_systemd_boot.py)."""
    from bench import sandbox

    return sandbox.start_overhead(c.reaper, 5 if c.quick else 20)


GROUPS["sandbox"] = _sandbox

def _oauth(c: Context) -> list[Figure]:
    """``oauth`` (bench/oauth.py): an OAuth access token's cost on the hot path next to an API
    key's, and the SDK client's whole sign-in through headless Chromium to a tool's answer."""
    from bench import oauth

    return (oauth.validation_cost(20_000 if c.quick else 100_000)
            + oauth.browser_flow(c.reaper, c.workdir, c.database.url, 2 if c.quick else 5))


GROUPS["oauth"] = _oauth


def _upstream_oauth(c: Context) -> list[Figure]:
    """``upstream-oauth``: what the OAuth provider costs a request; a call with a cached upstream OAuth
    token vs a static header (same run); and the refreshes 100 concurrent calls at expiry
    cause on two instances (bench/upstream_oauth.py)."""
    return (upstream_oauth.provider_cost(100_000, 3 if c.quick else 7)
            + upstream_oauth.cached_token_latency(c.reaper, c.workdir, c.database.url,
                                                rounds=2 if c.quick else 6,
                                                duration=2.0 if c.quick else 3.0)
            + upstream_oauth.refreshes_at_expiry(c.reaper, c.workdir, c.database.url,
                                                 rounds=1 if c.quick else 3))


GROUPS["upstream-oauth"] = _upstream_oauth


def _cluster(c: Context) -> list[Figure]:
    """``cluster`` (bench/cluster.py): any instance serving any session — a request on an
    instance that does not hold its session (adoption), a forwarded /sse POST /message,
    calls/s through nginx with 1, 2 and 3 instances, the held-session hot path (against
    ``BENCH_MAIN_SOURCE`` when set), and the event log's size under load."""
    from bench import cluster

    return cluster.cluster_figures(c.reaper, c.workdir, c.database.url, c.quick)


GROUPS["cluster"] = _cluster

def _run(reaper: Reaper, arguments: argparse.Namespace, figures: list[Figure],
         keep: list[bool], failed: list[str], logged: list[str]) -> None:
    workdir = _workdir(reaper, keep)
    context = Context(reaper, workdir, start_external_database(reaper, workdir / "external"),
                      arguments.quick)
    for name in arguments.only:
        started = time.monotonic()
        try:
            figures += GROUPS[name](context)
        except (ProbeError, Exception) as error:  # the other groups still run
            keep.append(True)
            failed.append(f"group {name} failed: {error}")
            traceback.print_exc()
        print(f"bench: {name} done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    logged.extend(log_findings(workdir))


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
    notes += [f"OVER BUDGET: {f.label.strip()} = {formatted(f.median, f.unit)} ({f.budget.text})"
              for f in figures if f.within_budget is False and f.budget is not None]
    for figure in figures:
        notes += _load_notes(figure) + _special_notes(figure)
    return notes


def _special_notes(figure: Figure) -> list[str]:
    """Caveats that only some figures can have."""
    notes = []
    label = figure.label.strip()
    if figure.key == "rate_limit_two_instances" and max(figure.samples, default=0.0) > 1.0:
        notes.append(f"{label}: more than N requests were accepted in "
                     f"{sum(1 for s in figure.samples if s > 1.0)} of {len(figure.samples)} "
                     f"rounds (up to {max(figure.samples):.2f}x): the limit was exceeded")
    for result in figure.details.get("fanouts", []):
        if result.get("received") != result.get("open"):
            notes.append(f"{label}: a fan-out reached {result.get('received')} of "
                         f"{result.get('open')} open streams within 30 s")
    for kind in ("server_errors", "wrong_shape", "no_answer", "log_problems", "sse_problems"):
        notes += [f"{label}: {kind.replace('_', ' ')}: {example}"
                  for example in figure.details.get(kind) or []]
    by_sessions = figure.details.get("gateway")  # MCP loads: {sessions: [summary, …]}
    for runs in by_sessions.values() if isinstance(by_sessions, dict) else []:
        for load in runs if isinstance(runs, list) else []:
            if load.get("bad_answers") or load.get("lost_connections"):
                notes.append(f"{label}: {load['bad_answers']} wrong answers, "
                             f"{load['lost_connections']} lost connections with "
                             f"{load['connections']} sessions ({load.get('first_error')})")
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _arguments(argv)
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    figures: list[Figure] = []
    keep: list[bool] = []
    status = 0
    reaper = Reaper()
    failed: list[str] = []
    logged: list[str] = []  # what the daemons logged at warn or above
    try:
        with reaper:
            try:
                _run(reaper, arguments, figures, keep, failed, logged)
            except Exception:
                keep.append(True)  # a failure: its logs are worth reading; an interrupt is not
                raise
        if failed:
            status = 1
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
    notes = failed + findings(figures, load_at_start) + reaper.notes + logged
    for note in notes:
        print("! " + note)
    if status == 0 or (failed and figures):
        path = save({
            "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(time.monotonic() - started, 1),
            "quick": arguments.quick,
            "groups": arguments.only,
            "failed": failed,
            "machine": _machine(load_at_start),
            "figures": [figure.as_json() for figure in figures],
            "findings": notes,
        })
        print(f"\n{len(figures)} figures in {time.monotonic() - started:.0f} s; "
              f"saved {path.relative_to(REPOSITORY)}")
    return status


if __name__ == "__main__":
    sys.exit(main())

