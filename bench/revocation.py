"""Revocation: how long after a key is revoked on one instance its streams on another are closed.

Two daemons on one database. Each round, a fresh API key is made through A's REST API;
``bench.streams`` opens ``N`` Streamable HTTP sessions with it on B (``initialize``,
``notifications/initialized``, ``GET``: the streams stay open), and LISTENs on Director's change
channel itself. Then the key is revoked through A (``DELETE /api/v1/api-keys/{id}``) and the
holder waits until B has ended every stream (the chunked response's last chunk, by the kernel's
receive stamp). Timed from the revocation's commit (the NOTIFY as the holder's LISTEN connection
sees it) to the last stream ended — what "within a second" is about — and from the request sent
to A. B learns of the revocation from the NOTIFY, re-reads the key (one query), and ends the
key's sessions found in its per-credential index.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench import api
from bench.daemon import start_director
from bench.mcp import MCP_ENV
from bench.probe import free_port
from bench.reaper import Reaper
from bench.report import Budget, Figure, formatted
from bench.servers import Server
from bench.streams import start_holder

REVOCATION_BUDGET = Budget(1000.0, "≤ 1 s (issue 16)")


def _key_known(server: Server, key: str, timeout: float = 10.0) -> None:
    """Wait until ``server`` resolves ``key`` (its creation's NOTIFY has arrived)."""
    client = api.Client(server.port, key)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.request("GET", "/api/v1/me")
                return
            except api.ApiFailure:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
    finally:
        client.close()


def revocation(reaper: Reaper, workdir: Path, database_url: str, sizes: tuple[int, ...],
               rounds: int) -> list[Figure]:
    """Figures: revoke on A → the last of N streams on B closed, for each N in ``sizes``."""
    a, b = (start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                           log_path=workdir / f"director-revocation-{name}.log",
                           database_url=database_url, extra_env=MCP_ENV)
            for name in ("a", "b"))
    owner = api.sign_up(a.port, "revocation")
    playbook = api.create_playbook(owner, "Bench Revocation")
    results: dict[int, list[dict[str, Any]]] = {}
    try:
        for streams in sizes:
            results[streams] = [_one(reaper, owner, b, database_url, playbook, streams, index)
                                for index in range(rounds)]
    finally:
        owner.close()
        a.stop()
        b.stop()
    return _figures(results)


def _one(reaper: Reaper, owner: api.Client, b: Server, database_url: str, playbook: str,
         streams: int, index: int) -> dict[str, Any]:
    """One round: N streams of a fresh key held on B, the key revoked through A."""
    created = owner.request("POST", "/api/v1/api-keys", {"name": f"revoked-{streams}-{index}"},
                            expect=201)
    _key_known(b, created["key"])
    holder = start_holder(reaper, [
        "--port", str(b.port), "--playbook", playbook, "--key", created["key"],
        "--sessions", str(streams), "--timeout", "300", "--listen-dsn", database_url],
        timeout=300)
    try:
        holder.command("mark")
        before = time.time_ns()
        owner.request("DELETE", f"/api/v1/api-keys/{created['id']}", expect=204)
        answered = time.time_ns()
        ended = holder.command("ended 30", timeout=60)
    finally:
        holder.stop()
    committed = ended.get("notify_ns")
    complete = ended["ended"] == int(holder.ready["ready"]) and ended["last_ns"] is not None
    return {
        "streams": holder.ready["ready"], "ended": ended["ended"], "still_open": ended["open"],
        "complete": complete,
        "committed_to_last_ms": (ended["last_ns"] - committed) / 1e6
        if complete and committed is not None else None,
        "request_to_last_ms": (ended["last_ns"] - before) / 1e6 if complete else None,
        "first_to_last_ms": (ended["last_ns"] - ended["first_ns"]) / 1e6 if complete else None,
        "request_answered_ms": (answered - before) / 1e6,
        "unstamped": ended["unstamped"],
    }


def _figures(results: dict[int, list[dict[str, Any]]]) -> list[Figure]:
    figures = []
    for streams, rounds in results.items():
        timed = [r for r in rounds if r["committed_to_last_ms"] is not None]
        incomplete = len(rounds) - len(timed)
        spread = statistics.median(r["first_to_last_ms"] for r in timed) if timed else None
        request = statistics.median(r["request_to_last_ms"] for r in timed) if timed else None
        figures.append(Figure(
            f"revocation_{streams}", f"key revoked on A → last of {streams:,} streams on B "
            "closed (committed → last)", "ms", tuple(r["committed_to_last_ms"] for r in timed),
            REVOCATION_BUDGET,
            f"request → last {formatted(request, 'ms')}; first → last {formatted(spread, 'ms')}"
            + (f"; {incomplete} round(s) did not close every stream" if incomplete else ""),
            details={"rounds": rounds}))
    return figures
