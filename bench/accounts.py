"""Accounts: what resolving an API key costs, and how exactly two instances share a rate limit.

* In process: ``AccountCache.key()`` on a warm cache (the daemon's per-request lookup: SHA-256
  of the presented key, then a dictionary), timed call by call, against ``hash_token`` alone
  and a bare dictionary lookup. The cache gets a database stub that fails if it is ever asked.
* End to end: ``GET /api/v1/me`` with ``x-api-key`` (authentication, the per-key rate limit
  with its permits in memory, a small JSON answer) against ``GET /api/health`` (one
  ``SELECT 1``) and an unrouted path (a JSON 404: the web stack without any route), loaded
  alternately on one daemon whose rate limit is raised out of the way.
* Rate-limit accuracy: two daemons on one database, one fresh key limited to ``N`` requests
  per hour, ``N`` requests driven at each at the same time; accepted / ``N`` should be within
  10% (the limiter leases permits in batches of 5%, so up to one batch per instance may be
  left unspent when the limit is reached; it must never exceed ``N``).
"""

from __future__ import annotations

import datetime
import gc
import statistics
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, cast
from uuid import uuid4

from bench import api
from bench.daemon import start_director
from bench.loadgen import percentile
from bench.probe import free_port
from bench.reaper import Reaper
from bench.report import Budget, Figure, formatted
from bench.servers import python_module
from bench.throughput import UNROUTED_PATH, LoadRun, finish_json, measure, python_load, start_json

#: Far above anything a bench run sends: the limiter still runs, it never refuses.
NO_LIMIT = {"API_KEY_RATE_LIMIT_MAX_REQUESTS": "1000000000",
            "USER_RATE_LIMIT_MAX_REQUESTS": "1000000000"}
RATE_LIMIT_BUDGET = Budget(1.10, "within 10% of N", low=0.90)


# --- in process --------------------------------------------------------------------------


class _NoDatabase:
    """Stands in for ``Database``: a cached key must never reach it."""

    def __getattr__(self, name: str) -> NoReturn:
        raise AssertionError(f"the account cache used the database ({name}) for a cached key")


def _drive(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that must finish without suspending (a cache hit)."""
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return finished.value
    coroutine.close()
    raise AssertionError("AccountCache.key() suspended: the key was not cached")


def _time_calls(call: Callable[[], object], calls: int) -> list[int]:
    """Nanoseconds of each of ``calls`` calls (timer overhead included)."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(calls):
        started = clock()
        call()
        samples.append(clock() - started)
    return samples


def _summary(samples: list[int], overhead: float) -> dict[str, float]:
    ordered = sorted(samples)
    return {name: max(0.0, percentile(ordered, fraction) - overhead) / 1000
            for name, fraction in (("p50", 0.50), ("p99", 0.99))}


def key_cost(calls: int, keys: int = 10_000) -> list[Figure]:
    """``AccountCache.key()`` for a cached key among ``keys``, per call, in µs."""
    from twisted.internet.task import Clock

    from director.accounts import store
    from director.accounts.cache import AccountCache
    from director.accounts.credentials import generate_api_key, hash_token
    from director.db.database import Database

    # A cached key never reads the clock: a still one will do.
    cache = AccountCache(cast(Database, _NoDatabase()), Clock())
    values = [generate_api_key() for _ in range(keys)]
    now = datetime.datetime.now(datetime.UTC)
    for value in values:
        record = store.ApiKey(uuid4(), uuid4(), "default", value[:10], now,
                              key_hash=hash_token(value))
        cache.remember_key(record)
    value = values[keys // 2]
    digest = hash_token(value)
    assert _drive(cache.key(value)) is not None
    table = cache.keys_by_hash

    def nothing() -> None:
        return None

    measured = {
        "key": lambda: _drive(cache.key(value)),
        "hash_token": lambda: hash_token(value),
        "dict": lambda: table.get(digest),
    }
    gc.collect()
    gc.disable()
    try:
        overhead = statistics.median(_time_calls(nothing, calls))
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in measured}
        for _ in range(3):  # interleaved, so that drift affects all three alike
            for name, call in measured.items():
                rounds[name].append(_summary(_time_calls(call, calls), overhead))
    finally:
        gc.enable()

    def median_of(name: str, stat: str) -> float:
        return statistics.median(r[stat] for r in rounds[name])

    base = (f"hash_token alone {formatted(median_of('hash_token', 'p50'), 'µs')}, "
            f"dict lookup {formatted(median_of('dict', 'p50'), 'µs')}")
    details = {"calls_per_round": calls, "cached_keys": keys,
               "timer_overhead_ns_subtracted": overhead, "rounds_us": rounds}
    return [
        Figure("key_lookup_p50", "API key → cached key, AccountCache.key() p50", "µs",
               tuple(r["p50"] for r in rounds["key"]), baseline=base, details=details),
        Figure("key_lookup_p99", "  p99", "µs", tuple(r["p99"] for r in rounds["key"]),
               baseline=f"hash_token alone {formatted(median_of('hash_token', 'p99'), 'µs')}"),
    ]


# --- end to end ----------------------------------------------------------------------------


def me_cost(reaper: Reaper, workdir: Path, database_url: str, rounds: int,
            duration: float, warmup: float = 1.0) -> list[Figure]:
    """``GET /api/v1/me`` with a key vs ``/api/health`` and an unrouted 404, alternately."""
    server = start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                            log_path=workdir / "director-accounts.log",
                            database_url=database_url, extra_env=NO_LIMIT)
    client = api.sign_up(server.port, "me")
    header = f"x-api-key: {client.key}"
    runs: dict[str, list[LoadRun]] = {"me": [], "health": [], "unrouted": []}
    loads: dict[str, Callable[[int], dict[str, Any]]] = {
        "me": lambda port: python_load(port, duration, warmup, "/api/v1/me", headers=[header]),
        "health": lambda port: python_load(port, duration, warmup),
        "unrouted": lambda port: python_load(port, duration, warmup, UNROUTED_PATH, 404),
    }
    for _ in range(rounds):
        for name, load in loads.items():
            runs[name].append(measure(server, None, load))
    server.stop()

    def med(name: str, value: Callable[[LoadRun], float]) -> float:
        return statistics.median(value(run) for run in runs[name])

    def versus(value: Callable[[LoadRun], float], unit: str) -> str:
        return (f"health {formatted(med('health', value), unit)}, "
                f"unrouted 404 {formatted(med('unrouted', value), unit)}")

    def cpu(run: LoadRun) -> float:
        return run.server_cpu_us

    me = runs["me"]
    return [
        Figure("me_rps", "GET /api/v1/me with API key, 32 conns", "req/s",
               tuple(run.rate for run in me), baseline=versus(lambda r: r.rate, "req/s"),
               details={"director": [run.load for run in me],
                        "baseline": [run.load for run in runs["health"]],
                        "unrouted": [run.load for run in runs["unrouted"]]}),
        Figure("me_cpu_per_request", "  daemon CPU per /me request", "µs",
               tuple(cpu(run) for run in me), baseline=versus(cpu, "µs")),
        Figure("me_minus_unrouted_cpu", "  /me minus unrouted 404 (auth, limit, route)", "µs",
               tuple(m.server_cpu_us - u.server_cpu_us
                     for m, u in zip(me, runs["unrouted"], strict=True))),
        Figure("me_p99", "  latency p99 (Python loader, 32 conns)", "ms",
               tuple(run.latency("p99") for run in me),
               baseline=versus(lambda r: r.latency("p99"), "ms")),
    ]


# --- rate limits across instances ----------------------------------------------------------


def _hour() -> int:
    return int(time.time() // 3600)


def rate_limit_accuracy(reaper: Reaper, workdir: Path, database_url: str, rounds: int,
                        limit: int = 1000, connections: int = 16) -> list[Figure]:
    """Two daemons, one key limited to ``limit`` per hour, ``limit`` requests at each."""
    env = {"API_KEY_RATE_LIMIT_MAX_REQUESTS": str(limit),
           "API_KEY_RATE_LIMIT_WINDOW_SECONDS": "3600"}
    servers = [start_director(reaper, port=free_port(), state_directory=workdir / "state-external",
                              log_path=workdir / f"director-ratelimit-{index}.log",
                              database_url=database_url, extra_env=env)
               for index in range(2)]
    results: list[dict[str, Any]] = []
    attempts = 0
    while len(results) < rounds and attempts < rounds + 2:
        attempts += 1
        client = api.sign_up(servers[0].port, "ratelimit")  # a fresh key: a fresh window
        hour = _hour()
        processes = [start_json(python_module(
            "bench.loadgen", "--port", str(server.port), "--connections", str(connections),
            "--duration", "30", "--warmup", "0", "--path", "/api/v1/me",
            "--header", f"x-api-key: {client.key}", "--max-requests", str(limit)))
            for server in servers]
        loads = [finish_json(process, 60, "loadgen") for process in processes]
        if _hour() != hour:
            continue  # the hour turned during the run: two windows were counted
        accepted = [int(load["statuses"].get("200", 0)) for load in loads]
        refused = [int(load["statuses"].get("429", 0)) for load in loads]
        results.append({"accepted": accepted, "refused": refused,
                        "other": [load["unexpected_status"] - r for load, r in
                                  zip(loads, refused, strict=True)],
                        "sent": [load["responses_total"] for load in loads]})
    for server in servers:
        server.stop()
    ratios = tuple(sum(result["accepted"]) / limit for result in results)
    return [
        Figure("rate_limit_two_instances", f"rate limit across 2 instances: accepted / N "
               f"(N={limit:,})", "x", ratios, RATE_LIMIT_BUDGET,
               baseline=f"{2 * limit:,} requests sent; never above 1.00x by design",
               details={"limit": limit, "window_seconds": 3600, "rounds": results}),
    ]
