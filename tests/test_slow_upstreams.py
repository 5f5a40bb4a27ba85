"""Slow and hanging upstream servers never stall a new session: lists answer with the servers
that are ready (naming the others in ``_meta``), a server that becomes ready late follows with
``list_changed``, a call for its tool waits for it, and a start is bounded by the server's own
``timeout_seconds`` — in both protocol eras, with the SDK client and raw HTTP, through a real
daemon.

The slow servers are ``raw_server.py --initialize-gate PATH`` (stdio: it takes ``initialize``
and answers only once the test creates ``PATH``; never, if it does not) and ``SilentServer``
(HTTP: it accepts connections, reads, and never answers). No assertion is about time: a list
that waited for a hanging server (``timeout_seconds: 20``) would outlast the client's own
request timeout (``READ_TIMEOUT``) and fail the test.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from director.config import Settings
from tests.accounts_helpers import Account, call, sign_up
from tests.harness import Daemon, make_temp_dir
from tests.test_mcp_gateway import ACCEPT, INIT, RAW, parse_response, reference_server

StartDaemon = Callable[..., Daemon]
PENDING = "director/pending"
#: MCP_LIST_WAIT_SECONDS: the default (the harness raises it for the other tests).
LIST_WAIT = Settings().mcp_list_wait_seconds
#: Each request's own timeout on the client side: longer than a list waits, shorter than a
#: hanging server's ``timeout_seconds``, so that an answer that waited for it fails the test.
READ_TIMEOUT = 10.0
HANGING_TIMEOUT = 20
MODES = ["legacy", "auto"]  # the handshake era, and 2026-07-28 negotiated by the SDK


class SilentServer:
    """An HTTP "server" on loopback that accepts every connection and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            while True:
                connection, _ = self.listener.accept()
                self.connections.append(connection)  # held open, never written to
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


class Setup:
    def __init__(self, daemon: Daemon, owner: Account, gates: Path, silent: SilentServer):
        self.daemon = daemon
        self.owner = owner
        self.gates = gates
        self.silent = silent

    def url(self) -> str:
        return f"{self.daemon.base}/playbooks/slow/mcp?key={self.owner.key}"

    def add_server(self, server: dict[str, Any]) -> None:
        status, _, body = call(self.daemon, "POST", "/api/v1/playbooks/slow/servers", server,
                               key=self.owner.key)
        assert status == 201, body

    def gated(self, name: str, **overrides: Any) -> Path:
        """A stdio server whose ``initialize`` waits for the returned path to exist; its tools
        are prefixed ``<name>_``."""
        gate = self.gates / name
        self.add_server({"name": name, "type": "stdio", "command": sys.executable,
                         "args": [RAW, "--initialize-gate", str(gate)],
                         "prefix": f"{name}_", **overrides})
        return gate

    def silent_http(self, name: str, **overrides: Any) -> None:
        self.add_server({"name": name, "type": "http", "prefix": f"{name}_",
                         "url": f"http://127.0.0.1:{self.silent.port}/mcp", **overrides})

    def post(self, message: dict[str, Any], session: str | None = None
             ) -> tuple[int, dict[str, str], bytes]:
        headers = {"accept": ACCEPT, "content-type": "application/json",
                   "x-api-key": self.owner.key}
        if session:
            headers["mcp-session-id"] = session
        return self.daemon.request("POST", "/playbooks/slow/mcp", json.dumps(message).encode(),
                                   headers)


@pytest.fixture
def setup(start_daemon: StartDaemon, migrated_url: str) -> Iterator[Setup]:
    daemon = start_daemon(DATABASE_URL=migrated_url, MCP_LIST_WAIT_SECONDS=str(LIST_WAIT),
                          DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true",
                          DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS="true")
    daemon.wait_healthy()
    owner = sign_up(daemon, "slow@example.com")
    assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Slow"}, key=owner.key)[0] == 201
    silent = SilentServer()
    made = Setup(daemon, owner, make_temp_dir("director-test-gates-"), silent)
    made.add_server(reference_server())
    yield made
    silent.close()


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 90))


def client(setup: Setup, mode: str, read_timeout: float = READ_TIMEOUT, **options: Any) -> Client:
    return Client(setup.url(), mode=mode, read_timeout_seconds=read_timeout, **options)


def names(listing: Any) -> set[str]:
    return {tool.name for tool in listing.tools}


def pending(listing: Any) -> list[str]:
    return list((listing.meta or {}).get(PENDING) or [])


async def until_listed(list_tools: Callable[[], Awaitable[Any]], tool: str) -> Any:
    """``list_tools()`` again until ``tool`` is in its answer (the reference server may be
    slower to start than a list waits, on a busy machine)."""
    for _ in range(10):
        listing = await list_tools()
        if tool in names(listing):
            return listing
    raise AssertionError(f"{tool} never listed")


async def new_session_list(setup: Setup, mode: str) -> Any:
    """``tools/list`` in a new session (a new context for a 2026-07-28 client is the same one
    on the daemon's side: one per user and playbook)."""
    async with client(setup, mode) as session:
        return await session.list_tools()


# --- a server that never answers ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_hanging_server_does_not_stall_new_sessions(setup: Setup, mode: str) -> None:
    setup.gated("hung", timeout_seconds=HANGING_TIMEOUT)  # the gate never opens
    setup.silent_http("mute", timeout_seconds=HANGING_TIMEOUT)

    async def scenario() -> tuple[Any, Any, Any]:
        first = await until_listed(lambda: new_session_list(setup, mode), "echo")
        async with client(setup, mode) as session:
            again = await session.list_tools()
            echoed = await session.call_tool("echo", {"text": "not stalled"})
        return first, again, echoed

    first, again, echoed = run(scenario())
    for listing in (first, again):
        assert {"echo", "add"} <= names(listing), names(listing)
        assert not any(name.startswith(("hung_", "mute_")) for name in names(listing))
        assert sorted(pending(listing)) == ["hung", "mute"], listing.meta
    assert echoed.content[0].text == "not stalled"


def test_a_hanging_server_on_raw_http(setup: Setup) -> None:
    setup.gated("hung", timeout_seconds=HANGING_TIMEOUT)
    status, headers, _ = setup.post(INIT)
    assert status == 200
    session = headers["mcp-session-id"]
    assert setup.post({"jsonrpc": "2.0", "method": "notifications/initialized"}, session)[0] \
        == 202
    status, _, body = setup.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session)
    result = parse_response(body)["result"]
    assert status == 200 and result["_meta"][PENDING] == ["hung"], result
    assert not any(tool["name"].startswith("hung_") for tool in result["tools"])
    # Nor does a prompt list wait for it (no server exposes prompts: none is waited for).
    status, _, body = setup.post({"jsonrpc": "2.0", "id": 3, "method": "prompts/list"},
                                 session)
    assert status == 200 and "_meta" not in parse_response(body)["result"]


# --- a server that becomes ready late ------------------------------------------------------


def test_a_late_server_follows_with_list_changed_on_the_session_stream(setup: Setup) -> None:
    gate = setup.gated("late")
    changed: list[str] = []

    async def scenario() -> tuple[Any, Any]:
        arrived = anyio.Event()

        async def on_message(message: Any) -> None:
            method = getattr(getattr(message, "root", message), "method", None)
            if method == "notifications/tools/list_changed":
                changed.append(method)
                arrived.set()

        async with client(setup, "legacy", message_handler=on_message) as session:
            before = await until_listed(session.list_tools, "echo")
            gate.touch()
            with anyio.fail_after(READ_TIMEOUT):
                await arrived.wait()
            after = await session.list_tools()
        return before, after

    before, after = run(scenario())
    assert "late_echo" not in names(before) and pending(before) == ["late"], before.meta
    assert {"late_echo", "echo"} <= names(after) and not pending(after)
    assert changed == ["notifications/tools/list_changed"]


def test_a_late_server_follows_on_the_listen_stream(setup: Setup) -> None:
    gate = setup.gated("late")

    async def scenario() -> tuple[Any, str, Any]:
        async with client(setup, "auto") as session, \
                session.listen(tools_list_changed=True) as subscription:
            before = await until_listed(session.list_tools, "echo")
            gate.touch()
            with anyio.fail_after(READ_TIMEOUT):
                event = await subscription.__anext__()
            after = await session.list_tools()
        return before, type(event).__name__, after

    before, event, after = run(scenario())
    assert "late_echo" not in names(before) and pending(before) == ["late"], before.meta
    assert event == "ToolsListChanged"
    assert {"late_echo", "echo"} <= names(after) and not pending(after)


@pytest.mark.parametrize("mode", MODES)
def test_a_call_for_a_starting_servers_tool_waits_for_it(setup: Setup, mode: str) -> None:
    gate = setup.gated("late")

    async def open_gate_once_listed_without_it() -> None:
        # The call's own list answered without the server (logged at debug level): the
        # call is now waiting for it.
        await asyncio.to_thread(setup.daemon.wait_for_log, "answered without late", 30)
        gate.touch()

    async def scenario() -> Any:
        # This call is meant to wait (for the list, the log line, the gate, the late server's
        # start): the short READ_TIMEOUT guards the tests where waiting would be the bug.
        async with client(setup, mode, read_timeout=60) as session:
            opening = asyncio.ensure_future(open_gate_once_listed_without_it())
            result = await session.call_tool("late_echo", {"text": "waited"})
            await opening
            return result

    result = run(scenario())
    assert not result.is_error and result.content[0].text == "waited"


# --- the start is bounded by the server's timeout ----------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_start_is_bounded_by_the_servers_timeout(setup: Setup, mode: str) -> None:
    setup.gated("hung", timeout_seconds=2)
    setup.silent_http("mute", timeout_seconds=2)

    async def scenario() -> Any:
        async with client(setup, mode) as session:
            return await session.list_tools()

    listing = run(scenario())
    assert not any(name.startswith(("hung_", "mute_")) for name in names(listing))
    for server in ("hung", "mute"):
        # The transport's own message for the step that timed out ("no answer to initialize
        # within 2 s"), or the manager's for the whole start ("did not start within 2 s").
        record = setup.daemon.wait_for_log(f"upstream unavailable: [{server}] ")
        assert " 2 s" in record["msg"], record
