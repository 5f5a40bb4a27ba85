"""The long fuzz run: ``inputs`` generated requests against one daemon, and what it cost.

The daemon (``LOG_LEVEL=warn``, limits raised so that the fuzzer is never throttled) serves a
playbook with the stdio echo server twice (handshake-only, and ``--eras both`` under the prefix
``m_``); a live handshake-era session and a held legacy SSE stream are the fuzzer's targets.
The inputs are drawn by the suite's own strategies (``tests/fuzzing.py``: both eras'
JSON-RPC, ``notifications/cancelled``, ``/sse`` + ``/message``, any route with odd headers and
raw bodies), in chunks of ``CHUNK`` examples with a seed each (reproducible, and Hypothesis'
memory of what it drew stays bounded), and sent by ``SENDERS`` threads, each request on a
fresh connection; each answer is held to the suite's properties (``fuzzing.check``).

Figures: inputs sent and inputs/s; answers by status class; 5xx answers and answers of the
wrong shape (both must be 0); log lines at level 50 or above (must be 0); the daemon's RSS
after a warm-up, right after the run, and after the sessions the fuzzer opened (by
``initialize``) were deleted and a pause let timers and the collector settle; and its growth
over the second half of the run against the first (sampled after each chunk: memory that
keeps growing at the same pace is a leak, a first-half growth that stops is warm-up). The first
offending inputs are kept in the figures' details and printed as findings.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from bench import api
from bench.accounts import NO_LIMIT
from bench.daemon import start_director
from bench.probe import free_port
from bench.procfs import status_kib
from bench.reaper import Reaper
from bench.report import Budget, Figure
from tests.fuzzing import (
    STRATEGIES,
    Case,
    LogWatch,
    SseHolder,
    Target,
    Unacceptable,
    check,
    open_session,
    send,
)

CHUNK = 10_000
#: Requests in flight: the daemon is one process, a few keep it busy while cases are drawn.
SENDERS = 4
ZERO = Budget(0.0, "0")
FUZZ_ENV = NO_LIMIT | {"DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS": "true",
                       "MCP_MAX_SESSIONS_PER_USER": "1000000",
                       "USER_RATE_LIMIT_MAX_REQUESTS": "100000000"}  # issue 16, item 6
KEPT_EXAMPLES = 5


@attrs.define
class Tally:
    """What the run saw."""

    sent: int = 0
    by_class: Counter[str] = attrs.field(factory=Counter)
    server_errors: list[str] = attrs.field(factory=list)
    wrong_shape: list[str] = attrs.field(factory=list)
    client_errors: list[str] = attrs.field(factory=list)
    opened_sessions: list[str] = attrs.field(factory=list)
    server_error_count: int = 0
    wrong_shape_count: int = 0

    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def record(self, case: Case, target: Target) -> None:
        try:
            answer = send(target.port, case)
        except OSError as failure:  # the daemon closed the connection: say so, go on
            with self._lock:
                self.sent += 1
                self.by_class["no answer"] += 1
                _keep(self.client_errors, f"{failure!r}: {case!r}")
            return
        try:
            check(case, answer)
            problem = None
        except Unacceptable as failure:
            problem = f"{failure}: {case!r}"
        with self._lock:
            self.sent += 1
            self.by_class[f"{answer.status // 100}xx"] += 1
            session = answer.headers.get("mcp-session-id")
            if session and answer.status == 200:
                self.opened_sessions.append(session)
            if problem is not None and answer.status >= 500:
                self.server_error_count += 1
                _keep(self.server_errors, problem)
            elif problem is not None:
                self.wrong_shape_count += 1
                _keep(self.wrong_shape, problem)


def _keep(examples: list[str], text: str) -> None:
    if len(examples) < KEPT_EXAMPLES:
        examples.append(text[:3000])


def _start(reaper: Reaper, workdir: Path, database_url: str) -> tuple[Any, Target, SseHolder]:
    server = start_director(reaper, port=free_port(), state_directory=workdir / "state-fuzz",
                            log_path=workdir / "fuzz-director.log", database_url=database_url,
                            extra_env=FUZZ_ENV)
    client = api.sign_up(server.port, "fuzz")
    playbook = api.create_playbook(client, "Fz")
    api.add_echo_server(client, playbook)
    client.request("POST", f"/api/v1/playbooks/{playbook}/servers", {
        "name": "modern", "type": "stdio", "command": sys.executable,
        "args": ["-I", "-S", str(api.ECHO_SERVER), "--eras", "both"], "prefix": "m_"},
        expect=201)
    key = str(client.key)
    holder = SseHolder(server.port, playbook, key)
    target = Target(server.port, key, playbook, open_session(server.port, key, playbook),
                    holder.session)
    for _ in range(50):  # warm-up: every upstream started, the code paths imported
        target.still_serves()
    return server, target, holder


def _run(target: Target, tally: Tally, inputs: int,
         on_chunk: Callable[[int], None]) -> None:
    """Draw ``inputs`` cases and send them from ``SENDERS`` threads: drawing (Hypothesis) and
    the daemon's work then overlap instead of taking turns."""
    cases: queue.Queue[Case | None] = queue.Queue(maxsize=SENDERS * 64)

    def sender() -> None:
        while (case := cases.get()) is not None:
            tally.record(case, target)

    threads = [threading.Thread(target=sender, name=f"fuzz-sender-{n}") for n in range(SENDERS)]
    for thread in threads:
        thread.start()
    try:
        _draw(target, inputs, cases.put, on_chunk)
    finally:
        for _ in threads:
            cases.put(None)
        for thread in threads:
            thread.join()


def _draw(target: Target, inputs: int, emit: Callable[[Case], None],
          on_chunk: Callable[[int], None]) -> None:
    everything = st.one_of([strategy(target) for strategy in STRATEGIES.values()])
    size = min(CHUNK, max(1, inputs // 10))  # ten RSS samples at least
    for chunk, start in enumerate(range(0, inputs, size)):

        @seed(chunk)
        @settings(max_examples=min(size, inputs - start), phases=[Phase.generate],
                  database=None, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=everything)
        def one(case: Case) -> None:
            emit(case)

        one()
        on_chunk(min(start + size, inputs))


def _delete_sessions(target: Target, sessions: list[str]) -> None:
    for session in sessions:
        target.request("DELETE", f"/playbooks/{target.playbook}/mcp", None,
                       target.mcp_headers(session))


def fuzz_run(reaper: Reaper, workdir: Path, database_url: str, inputs: int,
             settle_seconds: float) -> list[Figure]:
    server, target, holder = _start(reaper, workdir, database_url)
    log = LogWatch(server.log_path)
    log.problems()  # what the start wrote is not the fuzzer's
    rss_before = status_kib(server.pid, "VmRSS")
    tally = Tally()
    rss_by_inputs: dict[int, float] = {0: rss_before / 1024}

    def progress(drawn: int) -> None:
        rss_by_inputs[drawn] = status_kib(server.pid, "VmRSS") / 1024
        print(f"bench: fuzz: {drawn:,} of {inputs:,} inputs drawn, daemon RSS "
              f"{rss_by_inputs[drawn]:.1f} MiB", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        _run(target, tally, inputs, progress)
    finally:
        elapsed = time.monotonic() - started
        holder.close()
    problems = log.problems()
    rss_after = status_kib(server.pid, "VmRSS")
    target.still_serves()
    _delete_sessions(target, tally.opened_sessions)
    time.sleep(settle_seconds)
    rss_settled = status_kib(server.pid, "VmRSS")
    alive = server.process.poll() is None
    server.stop()
    classes = ", ".join(f"{name} {count:,}" for name, count in sorted(tally.by_class.items()))
    details = {"by_status_class": dict(tally.by_class), "server_errors": tally.server_errors,
               "wrong_shape": tally.wrong_shape, "no_answer": tally.client_errors,
               "log_problems": problems[:KEPT_EXAMPLES], "sse_problems": holder.problems[:5],
               "sessions_opened_and_deleted": len(tally.opened_sessions),
               "daemon_alive_after": alive, "elapsed_s": round(elapsed, 1),
               "rss_mib_by_inputs_drawn": {str(k): round(v, 1) for k, v in rss_by_inputs.items()}}
    halfway = min(rss_by_inputs, key=lambda drawn: abs(drawn - inputs / 2))
    return [
        Figure("fuzz_inputs", f"fuzz: inputs sent ({classes})", "n", (float(tally.sent),),
               details=details),
        Figure("fuzz_rate", f"  inputs/s ({SENDERS} in flight)", "req/s",
               (tally.sent / elapsed,)),
        Figure("fuzz_5xx", "  5xx answers", "n", (float(tally.server_error_count),), ZERO),
        Figure("fuzz_wrong_shape", "  answers of the wrong shape", "n",
               (float(tally.wrong_shape_count + len(holder.problems)),), ZERO),
        Figure("fuzz_error_lines", "  log lines at level >= 50", "n", (float(len(problems)),),
               ZERO),
        Figure("fuzz_rss_before", "  daemon RSS before (after warm-up)", "MiB",
               (rss_before / 1024,)),
        Figure("fuzz_rss_after", "  daemon RSS right after", "MiB", (rss_after / 1024,),
               baseline=f"{(rss_after - rss_before) / 1024:+.1f} MiB"),
        Figure("fuzz_rss_second_half", "  RSS growth over the second half of the inputs",
               "MiB", (rss_by_inputs[max(rss_by_inputs)] - rss_by_inputs[halfway],),
               baseline=f"first half {rss_by_inputs[halfway] - rss_by_inputs[0]:+.1f} MiB"),
        Figure("fuzz_rss_settled", f"  daemon RSS {settle_seconds:g} s after, its "
                                   f"{len(tally.opened_sessions):,} sessions deleted", "MiB",
               (rss_settled / 1024,), baseline=f"{(rss_settled - rss_before) / 1024:+.1f} MiB"),
    ]
