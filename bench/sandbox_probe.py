"""Run inside the booted namespace by bench/sandbox.py, as the daemon's account: start a stdio
server ``runs`` times in each mode, alternating, and print the seconds from the spawn to the
answered ``initialize`` as JSON (``{"none": [...], "systemd": [...]}``).

``python sandbox_probe.py RUNS SERVER_SCRIPT SOCKET CACHE_DIRECTORY``: ``none`` is the daemon's
own chain without a sandbox (``Unboxed``), ``systemd`` the ``SystemdBox`` through the socket.
A script file, not a module of ``bench``: only ``director`` is importable in the namespace.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from twisted.internet import defer, reactor, task

from director.mcp.upstream.stdio import StdioUpstream
from director.sandbox.launcher import Launcher, Limits, SystemdBox, Unboxed


async def start_once(launcher: Launcher, server: str) -> float:
    upstream = StdioUpstream("probe", sys.executable, [server], {}, None, reactor,
                             launcher=launcher, restart=False)
    started = time.monotonic()
    await upstream.start()
    elapsed = time.monotonic() - started
    await upstream.close()
    return elapsed


async def main(_: Any) -> None:
    runs, server, socket, cache = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    launchers: dict[str, Launcher] = {
        "none": Unboxed(),
        "systemd": SystemdBox(socket, cache, Limits(1024 ** 3, 512), b"bench" * 8)}
    samples: dict[str, list[float]] = {name: [] for name in launchers}
    for launcher in launchers.values():  # one warm-up each (page cache, dynamic users)
        await start_once(launcher, server)
    for _ in range(runs):
        for name, launcher in launchers.items():
            samples[name].append(await start_once(launcher, server))
    print(json.dumps(samples), flush=True)


if __name__ == "__main__":
    task.react(lambda reactor_: defer.ensureDeferred(main(reactor_)))
