"""``PlaybookCache.reload()`` timed in a process of its own, on Director's real ``Database``.

``python -m bench.reload --url URL --runs N`` connects the daemon's query pool to ``URL``
(on the reactor, as the daemon does), reloads every playbook ``N`` times and prints one JSON
object: the seconds each reload took (three queries and building the cache), how many
playbooks it loaded, and the resident memory before the first reload and after it (after a
full collection): what the cache itself holds, without the rest of a daemon around it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any

from twisted.internet import defer, task

from bench.procfs import status_kib
from director.crypto import SecretBox
from director.db.database import Database
from director.playbooks.cache import PlaybookCache


async def _reload(reactor: Any, url: str, runs: int) -> dict[str, Any]:
    database = Database(url, 1, reactor)
    database.start()
    deadline = time.monotonic() + 30
    while not database.available:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no database connection: {database.unavailable_reason}")
        await task.deferLater(reactor, 0.01, lambda: None)
    cache = PlaybookCache(database, SecretBox("bench-secret-" + "x" * 40))
    gc.collect()
    rss_before = status_kib(os.getpid(), "VmRSS")
    seconds = []
    rss_after_first = None
    try:
        for _ in range(runs):
            started = time.perf_counter()
            await cache.reload()
            seconds.append(time.perf_counter() - started)
            if rss_after_first is None:
                gc.collect()
                rss_after_first = status_kib(os.getpid(), "VmRSS")
    finally:
        database.stop()
    return {"seconds": seconds, "playbooks": len(cache), "rss_kib_before": rss_before,
            "rss_kib_after_first": rss_after_first}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    if not 1 <= arguments.runs <= 50:
        parser.error("1-50 runs")

    async def run(reactor: Any) -> None:
        print(json.dumps(await _reload(reactor, arguments.url, arguments.runs)), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))  # exits the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
