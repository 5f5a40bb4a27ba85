"""The stdio sandbox's start overhead: spawn → ``initialize`` answered, sandboxed and not.

systemd 252 is booted as PID 1 of fresh namespaces (``tests/systemd_boot.py``, the host laid
out as ``tests/test_systemd_boot.py`` does: the package's units verbatim, the sandbox socket
enabled), and ``bench/sandbox_probe.py`` runs there as the ``director`` account, as the
packaged daemon does: it starts the standard-library ``tests/fixtures/raw_server.py`` (so that
the server's own start is small and the overhead shows) alternately without a sandbox and in a
``director-stdio@`` unit through the socket, in the same run.
"""

from __future__ import annotations

import json
import statistics

from bench.reaper import Reaper
from bench.report import Figure, formatted
from tests.systemd_boot import SystemdNamespace, check_capability
from tests.test_systemd_boot import CHECKOUT_INSIDE, host_layout

PROBE = CHECKOUT_INSIDE / "bench" / "sandbox_probe.py"
SERVER = CHECKOUT_INSIDE / "tests" / "fixtures" / "raw_server.py"


def start_overhead(reaper: Reaper, runs: int) -> list[Figure]:
    check_capability()
    ns = SystemdNamespace()
    reaper.push("destroy the systemd namespace", ns.destroy)
    python = host_layout(ns, 990, 990)
    ns.boot()
    result = ns.run(["setpriv", "--reuid=director", "--regid=director", "--clear-groups",
                     python, str(PROBE), str(runs), str(SERVER), "/run/director-stdio.sock",
                     "/var/cache/director-stdio"], timeout=60 + runs * 10)
    if result.returncode != 0:
        raise RuntimeError(f"the probe failed ({result.returncode}): {result.stderr[-2000:]}")
    samples = json.loads(result.stdout.strip().splitlines()[-1])
    plain = statistics.median(samples["none"])
    overhead = [boxed - unboxed for boxed, unboxed in zip(samples["systemd"], samples["none"],
                                                           strict=True)]
    return [
        Figure("stdio_start_unsandboxed", "stdio start → initialize, no sandbox", "s",
               tuple(samples["none"]), details={"server": SERVER.name}),
        Figure("stdio_start_systemd_sandbox", "stdio start → initialize, systemd sandbox", "s",
               tuple(samples["systemd"]), baseline=f"{formatted(plain, 's')} unsandboxed"),
        Figure("stdio_sandbox_overhead", "  sandbox start overhead per stdio server", "s",
               tuple(overhead), details={"pairs": "each sandboxed start minus the unsandboxed "
                                                  "start just before it"}),
    ]
