"""Playbooks: a change on one instance seen by a client of another; the cost of 10,000 of them.

* Propagation A→B: two daemons on one database. An MCP client of B (``bench.streams``, one
  session with its GET stream open) waits for ``notifications/prompts/list_changed`` while a
  prompt is added to (or removed from) the playbook through A's REST API, ``changes`` times.
  Each change is timed from the moment it committed (the NOTIFY, as a third LISTEN connection
  in the client's process sees it) to the kernel's arrival stamp on B's stream: what the
  budget is about. Also shown: from the request sent to A (the write's own time included).
* Cache reload: 10,000 playbooks of one user, inserted with SQL into a database of their own
  (name and description only; no servers, prompts or secrets), and ``PlaybookCache.reload()``
  timed in a separate process on the daemon's ``Database`` (``bench.reload``). The daemon's
  start-to-healthy with them minus with none is shown too.
* Memory per cached playbook: the daemon's idle RSS with the 10,000 minus with none, divided.
  Daemons with and without them are started alternately, and each pair gives one sample.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import psycopg2

from bench import api
from bench.accounts import NO_LIMIT
from bench.daemon import start_director
from bench.database import ExternalDatabase
from bench.loadgen import percentile
from bench.probe import free_port
from bench.procfs import status_kib
from bench.reaper import Reaper
from bench.report import Budget, Figure, formatted
from bench.servers import Server, python_module
from bench.streams import start_holder
from bench.throughput import run_json

PROPAGATION_BUDGET = Budget(50.0, "p99 ≤ 50 ms")
BULK_DATABASE = "director_bench_playbooks"


# --- propagation ---------------------------------------------------------------------------


def _wait_until_visible(client: api.Client, playbook_id: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.request("GET", f"/api/v1/playbooks/{playbook_id}")
            return
        except api.ApiFailure:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def propagation(reaper: Reaper, workdir: Path, database_url: str, changes: int) -> list[Figure]:
    """Figure: ``changes`` prompt toggles on A, each awaited on B's GET stream."""
    a, b = (start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                           log_path=workdir / f"director-propagation-{name}.log",
                           database_url=database_url, extra_env=NO_LIMIT)
            for name in "ab")
    writer = api.sign_up(a.port, "propagation")
    playbook = api.create_playbook(writer, "Propagation")
    _wait_until_visible(api.Client(b.port, writer.key), playbook)
    holder = start_holder(reaper, ["--port", str(b.port), "--playbook", playbook,
                                   "--key", str(writer.key), "--sessions", "1",
                                   "--listen-dsn", database_url])
    toggle = api.PromptToggle(writer, playbook)
    committed, sent, answered, missed = [], [], [], 0
    try:
        for _ in range(changes):
            holder.command("mark")
            before = time.time_ns()
            toggle.toggle()
            after = time.time_ns()
            arrival = holder.command("wait 5")
            if not arrival["received"] or arrival["last_ns"] is None:
                missed += 1
                continue
            last = arrival["last_ns"]
            sent.append((last - before) / 1e6)
            answered.append((after - before) / 1e6)
            if arrival["notify_ns"] is not None:
                committed.append((last - arrival["notify_ns"]) / 1e6)
    finally:
        holder.stop()
        a.stop()
        b.stop()
    return _propagation_figures(committed, sent, answered, missed, changes)


def _p(values: list[float], fraction: float) -> float:
    return percentile(sorted(values), fraction)  # type: ignore[arg-type]


def _propagation_figures(committed: list[float], sent: list[float], answered: list[float],
                         missed: int, changes: int) -> list[Figure]:
    details = {"changes": changes, "missed": missed,
               "committed_to_b_ms": {"p50": _p(committed, 0.5), "p90": _p(committed, 0.9),
                                     "p99": _p(committed, 0.99), "max": max(committed)},
               "sent_to_b_ms": {"p50": _p(sent, 0.5), "p99": _p(sent, 0.99)},
               "a_answered_ms": {"p50": _p(answered, 0.5), "p99": _p(answered, 0.99)}}
    write = (f"A's write itself: p50 {formatted(_p(answered, 0.5), 'ms')}, "
             f"p99 {formatted(_p(answered, 0.99), 'ms')}")
    return [
        Figure("propagation_p50", f"change on A → B's client, p50 ({len(committed):,} changes)",
               "ms", (_p(committed, 0.5),), baseline="committed → list_changed on B's stream",
               details=details),
        Figure("propagation_p99", "  p99", "ms", (_p(committed, 0.99),), PROPAGATION_BUDGET,
               baseline="original: never (no invalidation)"),
        Figure("propagation_sent_p99", "  from the request to A, p99 (write included)", "ms",
               (_p(sent, 0.99),), baseline=write),
    ]


# --- 10,000 playbooks ----------------------------------------------------------------------


def _insert_playbooks(dsn: str, count: int) -> None:
    connection = psycopg2.connect(dsn)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("INSERT INTO users (email, password_hash, status) VALUES "
                           "('bulk@bench.invalid', 'not-a-hash', 'active') RETURNING id")
            row = cursor.fetchone()
            assert row is not None
            user_id = row[0]
            cursor.execute(
                "INSERT INTO playbooks (user_id, id, name, description) "
                "SELECT %s, 'playbook-' || g, 'Playbook ' || g, "
                "'A bench playbook, number ' || g FROM generate_series(1, %s) g",
                (user_id, count))
    finally:
        connection.close()


def _idle_daemon(reaper: Reaper, workdir: Path, url: str, label: str,
                 idle: float = 2.0) -> tuple[Server, int]:
    """Start a daemon on ``url``, let it idle, note its RSS (KiB), stop it."""
    server = start_director(reaper, port=free_port(), state_directory=workdir / "state-bulk",
                            log_path=workdir / f"director-{label}.log", database_url=url)
    time.sleep(idle)
    rss = status_kib(server.pid, "VmRSS")
    server.stop()
    return server, rss


def many_playbooks(reaper: Reaper, workdir: Path, database: ExternalDatabase, count: int,
                   starts: int, reloads: int) -> list[Figure]:
    """Figures: reload time, start-to-healthy and RSS with ``count`` playbooks vs none.

    Two databases of their own, one empty and one with the playbooks, so that the daemons
    with and without them can be started alternately (drift in the machine affects both).
    """
    empty_url, _ = database.extra_database(BULK_DATABASE + "_empty")
    url, dsn = database.extra_database(BULK_DATABASE)
    _insert_playbooks(dsn, count)
    empty, full = [], []
    for _ in range(starts):
        empty.append(_idle_daemon(reaper, workdir, empty_url, "bulk-empty"))
        full.append(_idle_daemon(reaper, workdir, url, "bulk-full"))
    reload = run_json(python_module("bench.reload", "--url", url, "--runs", str(reloads)),
                      120, "bench.reload")
    if reload["playbooks"] != count:
        raise RuntimeError(f"bench.reload loaded {reload['playbooks']} playbooks, not {count}")
    pairs = list(zip(empty, full, strict=True))
    empty_rss = statistics.median(rss for _, rss in empty)
    per_playbook = tuple((f_rss - e_rss) * 1024 / count for (_, e_rss), (_, f_rss) in pairs)
    empty_start = statistics.median(s.readiness.healthy for s, _ in empty)
    in_process = (reload["rss_kib_after_first"] - reload["rss_kib_before"]) * 1024 / count
    return [
        Figure("playbook_reload", f"PlaybookCache.reload(), {count:,} playbooks", "ms",
               tuple(s * 1000 for s in reload["seconds"]),
               baseline="in its own process on the real Database",
               details={"reload": reload, "first_is_cold": True}),
        Figure("playbook_start_delta", f"  start → healthy with {count:,} minus with 0", "ms",
               tuple((f.readiness.healthy - e.readiness.healthy) * 1000
                     for (e, _), (f, _) in pairs),
               baseline=f"{formatted(empty_start, 's')} with 0",
               details={"empty_s": [s.readiness.healthy for s, _ in empty],
                        "full_s": [s.readiness.healthy for s, _ in full]}),
        Figure("playbook_memory", "memory per cached playbook (daemon RSS delta)", "B",
               per_playbook,
               baseline=f"{in_process:,.0f} B in bench.reload; idle RSS with 0: "
                        f"{formatted(empty_rss / 1024, 'MiB')}",
               details={"empty_rss_kib": [rss for _, rss in empty],
                        "full_rss_kib": [rss for _, rss in full]}),
    ]
