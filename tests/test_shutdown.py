"""A stop under load: SIGTERM to a daemon holding 1,000 open MCP streams and a stdio upstream.

The closest equivalent here of "``systemctl stop`` during 1,000 open streams finishes within the
stop timeout with no orphaned children": the daemon must exit with status 0 within
``SHUTDOWN_TIMEOUT_SECONDS`` + 5 s, every stream must see its connection closed, and no process
the daemon started may outlive it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.accounts_helpers import call, sign_up
from tests.harness import Daemon

StartDaemon = Callable[..., Daemon]
REFERENCE = str(Path(__file__).parent / "fixtures" / "reference_server.py")
SESSIONS = 1_000
SHUTDOWN_TIMEOUT = 3
PARALLEL = 50  # sessions being set up at a time
PROTOCOL = "2025-06-18"


def _message(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


INITIALIZE = _message({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                       "params": {"protocolVersion": PROTOCOL, "capabilities": {},
                                  "clientInfo": {"name": "shutdown-test", "version": "1"}}})
INITIALIZED = _message({"jsonrpc": "2.0", "method": "notifications/initialized"})


# --- processes ------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` split after the command (state is [0], ppid [1], starttime [19])."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def descendants(root: int) -> dict[int, str]:
    """Every live process under ``root``, with its start time (to tell a reused pid apart)."""
    parents: dict[int, int] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            parents[int(entry)] = int(fields[1])
            starts[int(entry)] = fields[19]
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = starts[pid]
                frontier.append(pid)
    return found


def still_running(pid: int, start: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[19] == start and fields[0] != "Z"


# --- 1,000 sessions with open GET streams, held by asyncio in a thread -----------------------


class Streams:
    """Opens sessions (initialize, initialized, GET) on raw sockets and watches them close."""

    def __init__(self, port: int, key: str, playbook: str = "ref") -> None:
        self.port, self.key, self.path = port, key, f"/playbooks/{playbook}/mcp"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.failures: list[str] = []
        self.closed_at: dict[int, float] = {}
        self.clean_ends = 0  # streams that got the chunked terminator before the close
        self.tasks: list[asyncio.Future[None]] = []
        self.writers: list[asyncio.StreamWriter] = []

    def _post(self, body: bytes, session: str | None = None) -> bytes:
        head = (f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                "accept: application/json, text/event-stream\r\n"
                f"content-type: application/json\r\nx-api-key: {self.key}\r\n"
                f"content-length: {len(body)}\r\n")
        if session is not None:
            head += f"mcp-session-id: {session}\r\nmcp-protocol-version: {PROTOCOL}\r\n"
        return head.encode() + b"\r\n" + body

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {name.strip().lower(): value.strip() for name, _, value in
                   (line.partition(":") for line in head[1:] if line)}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                body += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")
            return status, headers, body
        return status, headers, await reader.readexactly(int(headers.get("content-length", 0)))

    async def _one(self, index: int, gate: asyncio.Semaphore, opened: asyncio.Event,
                   counter: list[int]) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writers.append(writer)
            writer.write(self._post(INITIALIZE))
            status, headers, body = await self._response(reader)
            session = headers.get("mcp-session-id")
            if status != 200 or session is None:
                raise AssertionError(f"initialize: {status} {body[:200]!r}")
            writer.write(self._post(INITIALIZED, session))
            status, _, body = await self._response(reader)
            if status != 202:
                raise AssertionError(f"initialized: {status} {body[:200]!r}")
            writer.write(f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                         f"accept: text/event-stream\r\nx-api-key: {self.key}\r\n"
                         f"mcp-session-id: {session}\r\nmcp-protocol-version: {PROTOCOL}\r\n\r\n"
                         .encode())
            received = await reader.readuntil(b"\r\n\r\n")
            if not received.startswith(b"HTTP/1.1 200"):
                raise AssertionError(f"GET: {received[:200]!r}")
            received += await reader.read(65536)  # the stream's first event: it is open
            counter[0] += 1
            if counter[0] == SESSIONS:
                opened.set()
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except OSError:
            pass
        self.closed_at[index] = time.monotonic()
        if received.endswith(b"\r\n0\r\n\r\n"):
            self.clean_ends += 1

    async def _open(self, count: int, timeout: float) -> None:
        gate = asyncio.Semaphore(PARALLEL)
        opened = asyncio.Event()
        counter = [0]
        for index in range(count):
            task = asyncio.ensure_future(self._one(index, gate, opened, counter))
            task.add_done_callback(self._failed)
            self.tasks.append(task)
        waiter = asyncio.ensure_future(opened.wait())
        watched: list[asyncio.Future[Any]] = [waiter, *self.tasks]
        await asyncio.wait(watched, timeout=timeout,
                           return_when=asyncio.FIRST_EXCEPTION)
        if not opened.is_set():
            waiter.cancel()
            raise AssertionError(f"{counter[0]} of {count} streams opened in {timeout} s; "
                                 f"first failures: {self.failures[:3]}")

    def _failed(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failures.append(repr(task.exception()))

    def open(self, count: int, timeout: float) -> None:
        asyncio.run_coroutine_threadsafe(self._open(count, timeout), self.loop).result(
            timeout + 5)

    def wait_closed(self, timeout: float) -> int:
        """How many streams saw their connection closed within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while len(self.closed_at) < len(self.tasks) and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.closed_at)

    def stop(self) -> None:
        def close_all() -> None:
            for writer in self.writers:
                writer.transport.abort()
            for task in self.tasks:
                task.cancel()

        self.loop.call_soon_threadsafe(close_all)
        time.sleep(0.1)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


def _json_or_event(body: bytes) -> dict[str, Any]:
    text = body.decode()
    if text.lstrip().startswith("{"):
        return dict(json.loads(text))
    return dict(json.loads([line[6:] for line in text.splitlines()
                            if line.startswith("data: ")][-1]))


def _upstream_pid(daemon: Daemon, key: str) -> int:
    """Call the reference server's ``pid`` tool in a session of its own: the upstream runs."""
    headers = {"accept": "application/json, text/event-stream",
               "content-type": "application/json", "x-api-key": key}
    path = "/playbooks/ref/mcp"
    status, answered, _ = daemon.request("POST", path, INITIALIZE, headers)
    assert status == 200
    headers["mcp-session-id"] = answered["mcp-session-id"]
    assert daemon.request("POST", path, INITIALIZED, headers)[0] == 202
    status, _, body = daemon.request("POST", path, _message({
        "jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "pid", "arguments": {}}}), headers)
    assert status == 200, body
    return int(_json_or_event(body)["result"]["content"][0]["text"])


def test_sigterm_with_1000_open_streams_exits_in_time_and_leaves_no_children(
        start_daemon: StartDaemon, migrated_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url, LOG_LEVEL="info",
                          DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true",
                          SHUTDOWN_TIMEOUT_SECONDS=str(SHUTDOWN_TIMEOUT),
                          API_KEY_RATE_LIMIT_MAX_REQUESTS="1000000",
                          MCP_MAX_SESSIONS_PER_USER="5000")
    daemon.wait_healthy()
    owner = sign_up(daemon, "shutdown@example.com")
    assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Ref"}, key=owner.key)[0] == 201
    status, _, body = call(daemon, "POST", "/api/v1/playbooks/ref/servers", {
        "name": "reference", "type": "stdio", "command": sys.executable, "args": [REFERENCE]},
        key=owner.key)
    assert status == 201, body

    streams = Streams(daemon.port, owner.key)
    try:
        streams.open(SESSIONS, timeout=20)
        assert not streams.closed_at, "a stream closed before the stop"
        upstream = _upstream_pid(daemon, owner.key)
        children = descendants(daemon.process.pid)
        assert upstream in children, (upstream, children)

        daemon.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = daemon.wait_exit(timeout=SHUTDOWN_TIMEOUT + 5)
        took = time.monotonic() - signalled
        closed = streams.wait_closed(timeout=2)
        print(f"\nexit {code} after {took:.2f} s; {closed} of {SESSIONS} streams closed, "
              f"{streams.clean_ends} with the chunked terminator; children {sorted(children)}")
        assert code == 0, daemon.output()[-3000:]
        assert took <= SHUTDOWN_TIMEOUT + 5
        assert closed == SESSIONS, f"{SESSIONS - closed} streams still open after the exit"
        time.sleep(0.2)  # an orphan would be reparented now, not yet reaped
        left = {pid: start for pid, start in children.items() if still_running(pid, start)}
        assert not left, f"processes the daemon started outlived it: {left}"
        assert not still_running(upstream, children[upstream])
    finally:
        streams.stop()
