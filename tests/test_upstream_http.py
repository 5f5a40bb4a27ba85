"""Upstream MCP sessions over HTTP, against real servers on 127.0.0.1: the ``mcp`` SDK's
MCPServer (Streamable HTTP answering with SSE streams or with JSON, and the legacy HTTP+SSE
transport; tests/fixtures/http_reference_server.py) and @modelcontextprotocol/server-everything.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, ssl, task, threads
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.web import resource, server
from twisted.web.client import BrowserLikePolicyForHTTPS, HTTPConnectionPool

from director.mcp.sse import EventTooLarge, SseParser
from director.mcp.upstream.base import (
    UpstreamError,
    UpstreamRequestError,
    UpstreamTimeout,
)
from director.mcp.upstream.connect import CheckedEndpoints
from director.mcp.upstream.http import HttpUpstream, connect_http
from director.mcp.upstream.http_plumbing import new_pool
from director.mcp.upstream.legacy_sse import LegacySseUpstream
from director.mcp.upstream.streamable import StreamableHttpUpstream
from tests.harness import free_port

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "http_reference_server.py"
EVERYTHING = HERE / "npm" / "node_modules" / ".bin" / "mcp-server-everything"
TOKEN = {"X-Test-Token": "s3cret"}


# --- servers ---------------------------------------------------------------------------------

class Server:
    """A fixture server process on a port of its own."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.argv, self.port, self.env = argv, port, env
        self.base = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.launch()

    def launch(self) -> None:
        self.process = subprocess.Popen(
            self.argv, env={**os.environ, **(self.env or {})}, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv} exited: {self.process.stderr.read()!r}")  # type: ignore[union-attr]
            with socket.socket() as probe:
                probe.settimeout(0.2)
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.argv} did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def debug(self, what: str) -> Any:
        with urllib.request.urlopen(f"{self.base}/debug/{what}", timeout=5) as answer:  # noqa: S310
            return json.load(answer)

    def log(self) -> list[dict[str, Any]]:
        return self.debug("log")  # type: ignore[no-any-return]


def reference(transport: str = "streamable-http", *options: str,
              port: int | None = None) -> Server:
    port = port or free_port()
    return Server([sys.executable, str(FIXTURE), "--transport", transport, "--port", str(port),
                   *options], port)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    """Reference servers (all started at once): Streamable HTTP answering with SSE streams
    and requiring a header, the same answering with JSON, and legacy HTTP+SSE."""
    started = {
        "sse-mode": reference("streamable-http", "--require-header", "X-Test-Token=s3cret"),
        "json-mode": reference("streamable-http", "--json-response"),
        "legacy": reference("sse"),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def everything() -> Iterator[dict[str, Server]]:
    if not EVERYTHING.exists():
        pytest.skip("tests/npm/node_modules is missing: `make test` installs "
                    "@modelcontextprotocol/server-everything")
    started = {}
    try:
        for mode in ("streamableHttp", "sse"):
            port = free_port()
            started[mode] = Server(["node", str(EVERYTHING), mode], port, {"PORT": str(port)})
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest_twisted.async_yield_fixture
async def pool() -> AsyncIterator[HTTPConnectionPool]:
    """The pool of a daemon with DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS on: these servers
    listen on loopback (tests/test_upstream_connect.py has the rail itself)."""
    shared = new_pool(reactor, endpoints=CheckedEndpoints(reactor, allow_insecure=True))
    yield shared
    await shared.closeCachedConnections()


@pytest_twisted.async_yield_fixture
async def closing() -> AsyncIterator[Callable[[Any], Any]]:
    """``closing(session)`` closes it at the end of the test, whatever happens."""
    sessions: list[Any] = []

    def register(session: Any) -> Any:
        sessions.append(session)
        return session

    yield register
    for session in sessions:
        await session.close()


async def eventually(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await task.deferLater(reactor, 0.02, lambda: None)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def text_of(result: dict[str, Any]) -> str:
    return "".join(part["text"] for part in result["content"] if part["type"] == "text")


async def call(session: Any, tool: str, timeout: float | None = None, **arguments: Any) -> str:
    result = await session.request("tools/call", {"name": tool, "arguments": arguments},
                                   timeout=timeout)
    assert not result.get("isError"), result
    return text_of(result)


def posts(log: list[dict[str, Any]], method: str | None = None) -> list[dict[str, Any]]:
    return [entry for entry in log if entry["method"] == "POST" and isinstance(entry["body"], dict)
            and (method is None or entry["body"].get("method") == method)]


# --- the SSE framing ------------------------------------------------------------------------

def test_sse_parser_framing_split_anywhere() -> None:
    stream = (b"\xef\xbb\xbf: keep-alive\r\nretry: 250\r\nid: 7\r\nevent: endpoint\r\n"
              b"data: /messages?x=1\r\n\r\ndata: {\"a\":\r\ndata:  1}\rid: 8\r\r"
              b"id: 9\ndata:\n\nevent: message\ndata: tail\n\n")
    for size in (1, 2, 3, 7, len(stream)):
        parser = SseParser()
        events = []
        for start in range(0, len(stream), size):
            events += parser.feed(stream[start:start + size])
        assert [(e.event, e.data, e.id) for e in events] == [
            ("endpoint", "/messages?x=1", "7"),
            ("message", '{"a":\n 1}', "8"),
            ("message", "", "9"),  # an id-only "priming" event with empty data
            ("message", "tail", "9"),
        ], size
        assert parser.retry == 250 and parser.last_event_id == "9"


def test_sse_parser_bounds_events_and_lines() -> None:
    parser = SseParser(max_event_size=100)
    assert parser.feed(b"data: " + b"x" * 50 + b"\n\n")[0].data == "x" * 50
    with pytest.raises(EventTooLarge):
        parser.feed(b"data: " + b"x" * 60 + b"\ndata: " + b"y" * 60 + b"\n")
    with pytest.raises(EventTooLarge):
        SseParser(max_event_size=100).feed(b"data: " + b"z" * 200)  # no line end in sight


# --- Streamable HTTP against the reference server ----------------------------------------------

@pytest_twisted.ensureDeferred
async def test_handshake_list_calls_headers_and_delete(servers: dict[str, Server], pool: Any,
                                                       closing: Any) -> None:
    server = servers["sse-mode"]
    session = closing(StreamableHttpUpstream(
        "ref", f"{server.base}/mcp", {**TOKEN, "X-Extra": "yes"}, reactor, pool))
    await session.start()
    info = session.initialize_result
    assert info["serverInfo"] == {"name": "reference", "version": "1.0.0"}
    assert info["protocolVersion"] == "2025-11-25"
    assert info["instructions"] == "A server for tests."
    assert session.session_id

    # tools/list passes through untouched: every inputSchema is what the server declares.
    listed = await session.request("tools/list")
    declared = server.debug("schemas")
    assert {tool["name"]: tool["inputSchema"] for tool in listed["tools"]} == declared
    assert "$defs" in declared["describe"]
    assert await call(session, "echo", text="héllo ✓") == "héllo ✓"
    assert await call(session, "add", a=2, b=40) == "42"
    assert await call(session, "describe", item={"name": "bolt"}, count=3) == "3 of bolt (part)"
    with pytest.raises(UpstreamRequestError) as refused:
        await session.request("no/such/method")
    assert refused.value.error["code"] == -32601
    session.notify("notifications/roots/list_changed")
    await eventually(lambda: posts(server.log(), "notifications/roots/list_changed"))

    # The GET stream is open (the server logged it) before we close.
    await eventually(lambda: any(e["method"] == "GET" for e in server.log()))
    session_id = session.session_id
    await session.close()
    log = [e for e in server.log() if e["headers"].get("x-extra") == "yes"]
    initialize = posts(log, "initialize")
    assert len(initialize) == 1 and "mcp-session-id" not in initialize[0]["headers"]
    assert initialize[0]["headers"]["accept"] == "application/json, text/event-stream"
    assert initialize[0]["headers"]["content-type"] == "application/json"
    assert initialize[0]["body"]["params"]["clientInfo"]["name"] == "director"
    later = [e for e in log if e is not initialize[0]]
    assert later and all(e["headers"]["mcp-session-id"] == session_id and
                         e["headers"]["mcp-protocol-version"] == "2025-11-25" and
                         e["headers"]["x-test-token"] == "s3cret" for e in later)
    assert [e["body"]["method"] for e in posts(later)][:1] == ["notifications/initialized"]
    assert later[-1]["method"] == "DELETE"
    with pytest.raises(UpstreamError, match=r"^\[ref\] the session is closed"):
        await session.request("tools/list")


@pytest.mark.parametrize("mode", ["sse-mode", "json-mode"])
@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_calls(servers: dict[str, Server], pool: Any, closing: Any,
                                      mode: str) -> None:
    session = closing(StreamableHttpUpstream("ref", f"{servers[mode].base}/mcp", TOKEN,
                                             reactor, pool))
    await session.start()
    results = await defer.gatherResults([
        defer.ensureDeferred(call(session, "add", a=n, b=1000)) for n in range(50)])
    assert results == [str(n + 1000) for n in range(50)]
    listed = await session.request("tools/list")
    assert {tool["name"]: tool["inputSchema"] for tool in listed["tools"]} == \
        servers[mode].debug("schemas")


@pytest_twisted.ensureDeferred
async def test_progress_logs_and_timeout_reset_by_progress(servers: dict[str, Server],
                                                           pool: Any, closing: Any) -> None:
    server = servers["sse-mode"]
    session = closing(StreamableHttpUpstream("ref", f"{server.base}/mcp", TOKEN, reactor, pool))
    notifications: list[dict[str, Any]] = []
    session.on_notification = notifications.append
    await session.start()

    progress: list[dict[str, Any]] = []
    # 4 steps 0.25 s apart take 1 s, twice the timeout: progress keeps restarting it.
    result = await session.request(
        "tools/call", {"name": "slow", "arguments": {"steps": 4, "delay": 0.25},
                       "_meta": {"progressToken": "caller-token"}},
        timeout=0.5, on_progress=progress.append)
    assert text_of(result) == "done after 4 steps"
    assert [(p["progressToken"], p["progress"], p["total"]) for p in progress] == \
        [("caller-token", step, 4) for step in range(1, 5)]
    assert progress[0]["message"] == "step 1"
    sent = posts(server.log(), "tools/call")[-1]["body"]["params"]["_meta"]["progressToken"]
    assert sent != "caller-token"  # remapped on the way up

    assert await call(session, "shout", message="hello log") == "logged"
    logs = [n for n in notifications if n["method"] == "notifications/message"]
    assert [(n["params"]["level"], n["params"]["data"]) for n in logs] == [
        ("info", "hello log"), ("warning", {"detail": "hello log", "n": 2})]
    assert not [n for n in notifications if n["method"] == "notifications/progress"]


@pytest_twisted.ensureDeferred
async def test_sampling_request_answered_through_on_request(servers: dict[str, Server],
                                                            pool: Any, closing: Any) -> None:
    server = servers["sse-mode"]
    session = closing(StreamableHttpUpstream("ref", f"{server.base}/mcp", TOKEN, reactor, pool))
    asked: list[tuple[str, dict[str, Any]]] = []

    async def answer(method: str, params: dict[str, Any]) -> dict[str, Any]:
        asked.append((method, params))
        await sleep(0.05)
        return {"role": "assistant", "model": "test-model", "stopReason": "endTurn",
                "content": {"type": "text", "text": "hello from the gateway"}}

    session.on_request = answer
    await session.start()
    assert await call(session, "sample", prompt="say hello") == \
        "the client said: hello from the gateway"
    assert [method for method, _ in asked] == ["sampling/createMessage"]
    assert asked[0][1]["messages"][0]["content"]["text"] == "say hello"
    answers = [e for e in posts(server.log()) if "result" in e["body"] and
               e["body"]["result"].get("model") == "test-model"]
    assert len(answers) == 1 and answers[0]["headers"]["mcp-session-id"] == session.session_id

    # A sampling request still being answered when its tool call is cancelled is cancelled
    # too (the server no longer waits for it), and no answer is POSTed.
    waiting: list[str] = []
    abandoned: list[str] = []

    async def slow_answer(method: str, params: dict[str, Any]) -> dict[str, Any]:
        waiting.append(method)
        try:
            await sleep(30)
        except defer.CancelledError:
            abandoned.append(method)
            raise
        return {}

    session.on_request = slow_answer
    calling = defer.ensureDeferred(call(session, "sample", prompt="never mind"))
    await eventually(lambda: waiting)
    calling.cancel()
    with pytest.raises(defer.CancelledError):
        await calling
    assert abandoned == ["sampling/createMessage"]
    assert len([e for e in posts(server.log()) if "result" in e["body"]]) == 1


@pytest_twisted.ensureDeferred
async def test_get_stream_notifications_and_reconnection(servers: dict[str, Server], pool: Any,
                                                         closing: Any) -> None:
    server = servers["sse-mode"]
    session = closing(StreamableHttpUpstream("ref", f"{server.base}/mcp", TOKEN, reactor, pool))
    notifications: list[dict[str, Any]] = []
    session.on_notification = notifications.append
    await session.start()
    await eventually(lambda: session.get_stream_supported)

    assert await call(session, "announce") == "announced"
    await eventually(lambda: len(notifications) >= 2)
    assert notifications[:2] == [
        {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"},
        {"jsonrpc": "2.0", "method": "notifications/resources/updated",
         "params": {"uri": "test://announced"}}]

    # The server cuts the GET stream and sends while it is down: the client reconnects with
    # Last-Event-ID and gets what it missed.
    assert await call(session, "drop_get_stream") == "dropped"
    await eventually(lambda: {"uri": "test://after-drop"} in
                     [n.get("params") for n in notifications])
    resumed = [e for e in server.log() if e["method"] == "GET" and
               e["headers"].get("mcp-session-id") == session.session_id and
               "last-event-id" in e["headers"]]
    assert resumed


@pytest_twisted.ensureDeferred
async def test_request_stream_cut_by_the_server_is_resumed(servers: dict[str, Server],
                                                           pool: Any, closing: Any) -> None:
    server = servers["sse-mode"]
    session = closing(StreamableHttpUpstream("ref", f"{server.base}/mcp", TOKEN, reactor, pool))
    await session.start()
    assert await call(session, "drop_stream") == "survived"
    assert [e for e in server.log() if e["method"] == "GET" and "last-event-id" in e["headers"]
            and e["headers"].get("mcp-session-id") == session.session_id]
    assert await call(session, "echo", text="still fine") == "still fine"


@pytest_twisted.ensureDeferred
async def test_timeout_and_cancellation_send_notifications_cancelled(
        servers: dict[str, Server], pool: Any, closing: Any) -> None:
    server = servers["sse-mode"]
    session = closing(StreamableHttpUpstream("ref", f"{server.base}/mcp", TOKEN, reactor, pool))
    await session.start()

    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"^\[ref\] no answer to tools/call within 0.4 s"):
        await call(session, "hang", timeout=0.4)
    assert time.monotonic() - started < 2
    hang_id = posts(server.log(), "tools/call")[-1]["body"]["id"]
    await eventually(lambda: [e for e in posts(server.log(), "notifications/cancelled")
                              if e["body"]["params"]["requestId"] == hang_id])
    await eventually(lambda: str(hang_id) in server.debug("cancelled"))

    calling = defer.ensureDeferred(call(session, "hang"))
    await eventually(lambda: posts(server.log(), "tools/call")[-1]["body"]["id"] != hang_id)
    second_id = posts(server.log(), "tools/call")[-1]["body"]["id"]
    calling.cancel()
    with pytest.raises(defer.CancelledError):
        await calling
    await eventually(lambda: [e for e in posts(server.log(), "notifications/cancelled")
                              if e["body"]["params"]["requestId"] == second_id])
    await eventually(lambda: str(second_id) in server.debug("cancelled"))
    assert await call(session, "echo", text="after") == "after"


@pytest.mark.parametrize("mode", ["sse-mode", "json-mode"])
@pytest_twisted.ensureDeferred
async def test_oversized_message_fails_the_request(servers: dict[str, Server], pool: Any,
                                                   closing: Any, mode: str) -> None:
    session = closing(StreamableHttpUpstream("ref", f"{servers[mode].base}/mcp", TOKEN,
                                             reactor, pool, max_message_size=64 * 1024))
    await session.start()
    assert len(await call(session, "big", size=30_000)) == 30_000
    with pytest.raises(UpstreamError, match=r"^\[ref\] a message from http://127\.0\.0\.1:\d+"
                                            r"/mcp is larger than 65536 bytes"):
        await call(session, "big", size=100_000)
    assert await call(session, "echo", text="next") == "next"


@pytest_twisted.ensureDeferred
async def test_unreachable_and_unauthorised(servers: dict[str, Server], pool: Any,
                                            closing: Any) -> None:
    port = free_port()
    unreachable = closing(StreamableHttpUpstream(
        "gone", f"http://127.0.0.1:{port}/mcp?key=secret", {}, reactor, pool))
    with pytest.raises(UpstreamError) as refused:
        await unreachable.start()
    assert str(refused.value) == \
        f"[gone] failed to connect to http://127.0.0.1:{port}/mcp?…: connection refused"

    url = f"{servers['sse-mode'].base}/mcp"
    for connect in (lambda: StreamableHttpUpstream("ref", url, {}, reactor, pool).start(),
                    lambda: connect_http("ref", url, {}, reactor, pool)):
        with pytest.raises(UpstreamError) as denied:
            await connect()
        message = str(denied.value)
        assert message.startswith(f"[ref] POST {url}: HTTP 401 Unauthorized: missing "
                                  f"credentials: send the x-test-token header...")
        assert len(message.split(": ", 2)[2]) == 200  # the body's first 200 characters


@pytest_twisted.ensureDeferred
async def test_server_restart_expires_the_session_and_it_reinitialises(pool: Any,
                                                                       closing: Any) -> None:
    server = reference()
    try:
        server.wait_ready()
        session = closing(StreamableHttpUpstream("ref", f"{server.base}/mcp", {}, reactor, pool))
        closed: list[str] = []
        renewed: list[dict[str, Any]] = []
        notifications: list[dict[str, Any]] = []
        session.on_closed = closed.append
        session.on_restored = renewed.append
        session.on_notification = notifications.append
        await session.start()
        assert await call(session, "echo", text="before") == "before"
        first_id = session.session_id

        server.stop()
        with pytest.raises(UpstreamError, match=r"^\[ref\] failed to connect to .*: "
                                                r"connection refused$"):
            await call(session, "echo", text="while down")

        server.launch()
        server.wait_ready()
        assert await call(session, "echo", text="after") == "after"
        assert session.session_id != first_id
        assert closed == [] and len(renewed) == 1
        log = server.log()
        assert [e["body"]["method"] for e in posts(log)][:2] == \
            ["tools/call", "initialize"]  # 404, then the transparent re-initialisation
        assert log[0]["headers"]["mcp-session-id"] == first_id
        # The GET stream came back on the new session and delivers again.
        assert await call(session, "announce") == "announced"
        await eventually(lambda: {"uri": "test://announced"} in
                         [n.get("params") for n in notifications])
    finally:
        server.stop()


# --- the 2024-11-05 HTTP+SSE transport ----------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_legacy_sse_session(servers: dict[str, Server], pool: Any, closing: Any) -> None:
    server = servers["legacy"]
    session = closing(LegacySseUpstream("old", f"{server.base}/sse", {"X-Extra": "1"},
                                        reactor, pool))
    notifications: list[dict[str, Any]] = []
    session.on_notification = notifications.append

    async def answer(method: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"role": "assistant", "model": "m", "content": {"type": "text", "text": "yes"}}

    session.on_request = answer
    await session.start()
    assert session.endpoint is not None and session.endpoint.startswith(
        f"{server.base}/messages/?session_id=")
    assert session.initialize_result["serverInfo"]["name"] == "reference"
    listed = await session.request("tools/list")
    assert {t["name"]: t["inputSchema"] for t in listed["tools"]} == server.debug("schemas")
    results = await defer.gatherResults([
        defer.ensureDeferred(call(session, "add", a=n, b=1)) for n in range(20)])
    assert results == [str(n + 1) for n in range(20)]
    progress: list[dict[str, Any]] = []
    await session.request("tools/call", {"name": "slow", "arguments": {"steps": 2, "delay": 0.05},
                                         "_meta": {"progressToken": 99}},
                          on_progress=progress.append)
    assert [p["progressToken"] for p in progress] == [99, 99]
    assert await call(session, "sample", prompt="?") == "the client said: yes"
    assert await call(session, "announce") == "announced"
    await eventually(lambda: {"uri": "test://announced"} in
                     [n.get("params") for n in notifications])
    with pytest.raises(UpstreamTimeout):
        await call(session, "hang", timeout=0.3)
    await eventually(lambda: posts(server.log(), "notifications/cancelled"))
    assert all(e["headers"].get("x-extra") == "1" for e in server.log()
               if e["path"] != "/debug/log")


@pytest_twisted.ensureDeferred
async def test_fallback_to_legacy_sse_through_connect_http(servers: dict[str, Server],
                                                           pool: Any, closing: Any) -> None:
    url = f"{servers['legacy'].base}/sse"
    session = closing(await connect_http("old", url, {}, reactor, pool))
    assert isinstance(session, LegacySseUpstream)
    assert await call(session, "echo", text="via fallback") == "via fallback"
    # The same through HttpUpstream, as the upstream manager's factory uses it.
    wrapped = closing(HttpUpstream("old", url, {}, reactor, pool))
    seen: list[dict[str, Any]] = []
    wrapped.on_notification = seen.append
    await wrapped.start()
    assert wrapped.transport_name == "sse"
    assert await call(wrapped, "announce") == "announced"
    await eventually(lambda: len(seen) >= 2)
    # A Streamable HTTP server is used as such.
    direct = closing(HttpUpstream("ref", f"{servers['json-mode'].base}/mcp", {}, reactor, pool))
    await direct.start()
    assert direct.transport_name == "streamable-http"


@pytest_twisted.ensureDeferred
async def test_legacy_stream_loss_calls_on_closed_then_reconnects(pool: Any,
                                                                   closing: Any) -> None:
    server = reference("sse")
    try:
        server.wait_ready()
        session = closing(LegacySseUpstream("old", f"{server.base}/sse", {}, reactor, pool))
        closed: list[str] = []
        session.on_closed = closed.append
        await session.start()
        hanging = defer.ensureDeferred(call(session, "hang"))
        await sleep(0.2)
        server.stop()
        with pytest.raises(UpstreamError, match=r"^\[old\] the SSE stream was lost"):
            await hanging
        assert len(closed) == 1
        server.launch()
        server.wait_ready()
        assert await call(session, "echo", text="back") == "back"
        assert len(closed) == 1
    finally:
        server.stop()


# --- @modelcontextprotocol/server-everything ------------------------------------------------------

@pytest.mark.parametrize("mode", ["streamableHttp", "sse"])
@pytest_twisted.ensureDeferred
async def test_server_everything(everything: dict[str, Server], pool: Any, closing: Any,
                                 mode: str) -> None:
    path = "/mcp" if mode == "streamableHttp" else "/sse"
    session = closing(await connect_http("everything", everything[mode].base + path, {},
                                         reactor, pool))
    assert isinstance(session, StreamableHttpUpstream if mode == "streamableHttp"
                      else LegacySseUpstream)
    assert session.initialize_result["serverInfo"]["name"]
    listed = await session.request("tools/list")
    tools = {tool["name"]: tool for tool in listed["tools"]}
    assert tools["echo"]["inputSchema"]["properties"]["message"]["type"] == "string"
    result = await session.request("tools/call", {"name": "echo",
                                                  "arguments": {"message": "hi"}})
    assert text_of(result) == "Echo: hi"



@pytest_twisted.ensureDeferred
async def test_server_everything_restart_heals_through_the_get_stream(pool: Any,
                                                                       closing: Any) -> None:
    """The TypeScript SDK's example answers 400 "No valid session ID" (not 404) for a
    forgotten session; the GET stream notices by itself and the session re-initialises."""
    if not EVERYTHING.exists():
        pytest.skip("tests/npm/node_modules is missing: `make test` installs "
                    "@modelcontextprotocol/server-everything")
    port = free_port()
    server = Server(["node", str(EVERYTHING), "streamableHttp"], port, {"PORT": str(port)})
    try:
        server.wait_ready()
        session = closing(StreamableHttpUpstream("everything", f"{server.base}/mcp", {},
                                                 reactor, pool))
        renewed: list[dict[str, Any]] = []
        session.on_restored = renewed.append
        await session.start()
        progress: list[dict[str, Any]] = []
        result = await session.request(
            "tools/call", {"name": "trigger-long-running-operation",
                           "arguments": {"duration": 0.3, "steps": 3},
                           "_meta": {"progressToken": 5}}, on_progress=progress.append)
        assert "completed" in text_of(result)
        assert [(p["progressToken"], p["progress"]) for p in progress] == [(5, 1), (5, 2), (5, 3)]
        first = session.session_id

        server.stop()
        await sleep(0.1)
        server.launch()
        server.wait_ready()
        await eventually(lambda: renewed)
        assert session.session_id not in (None, first) and len(renewed) == 1
        result = await session.request("tools/call", {"name": "echo",
                                                      "arguments": {"message": "again"}})
        assert text_of(result) == "Echo: again"
    finally:
        server.stop()


# --- TLS ------------------------------------------------------------------------------------------

def self_signed_certificate(name: str = "127.0.0.1") -> tuple[bytes, bytes]:
    """A certificate for ``name`` (an IP address or a DNS name) that no platform trusts, and
    its key (PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    try:
        alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        alternative = x509.DNSName(name)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class StatelessJsonServer(resource.Resource):
    """A minimal Streamable HTTP server: JSON answers, no session id, no GET stream."""

    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        message = json.loads(request.content.getvalue())
        if "id" not in message:
            request.setResponseCode(202)
            return b""
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        if message["method"] == "initialize":
            result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                      "serverInfo": {"name": "tiny", "version": "0"}}
        elif message["method"] == "tools/list":
            result = {"tools": [{"name": "tiny", "inputSchema": {"type": "object"}}]}
        else:
            result = {"content": [{"type": "text", "text": "tiny answer"}]}
        return json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode()

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(405)
        return b""


class SeveralMessagesJsonServer(StatelessJsonServer):
    """Answers ``tools/call`` as the TypeScript SDK's conformance fixture does in JSON mode:
    the notifications the call produced, then its answer, one JSON text per line."""

    def render_POST(self, request: Any) -> bytes:
        message = json.loads(request.content.getvalue())
        answer = super().render_POST(request)
        if message.get("method") != "tools/call":
            return answer
        token = message["params"]["_meta"]["progressToken"]
        notifications = [
            {"jsonrpc": "2.0", "method": "notifications/progress",
             "params": {"progressToken": token, "progress": 1, "total": 2}},
            {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"},
        ]
        return b"".join(json.dumps(each).encode() + b"\n" for each in notifications) + answer


@pytest_twisted.ensureDeferred
async def test_a_json_body_of_several_messages_is_handled_message_by_message(
        closing: Any, pool: Any) -> None:
    port = reactor.listenTCP(0, server.Site(SeveralMessagesJsonServer()), interface="127.0.0.1")
    notes: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "mcp.upstream.http":
            notes.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        session = closing(StreamableHttpUpstream(
            "several", f"http://127.0.0.1:{port.getHost().port}/mcp", {}, reactor, pool))
        notifications: list[dict[str, Any]] = []
        session.on_notification = notifications.append
        await session.start()
        for _ in range(2):
            progress: list[dict[str, Any]] = []
            result = await session.request(
                "tools/call", {"name": "tiny", "arguments": {}, "_meta": {"progressToken": "t"}},
                on_progress=progress.append)
            assert text_of(result) == "tiny answer"
            assert [(each["progressToken"], each["progress"]) for each in progress] == [("t", 1)]
        assert [each["method"] for each in notifications] == \
            ["notifications/tools/list_changed"] * 2
        several = [note for note in notes if "JSON-RPC messages in one" in note]
        assert several == ["[several] answered with 3 JSON-RPC messages in one application/json "
                           "body (one per line, not one JSON text as the specification says); "
                           "each is handled"]
    finally:
        globalLogPublisher.removeObserver(observe)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_failing_hook_breaks_neither_the_call_nor_the_transport(closing: Any,
                                                                        pool: Any) -> None:
    """As over stdio (tests/test_upstream_stdio.py): one rule for both transports."""
    port = reactor.listenTCP(0, server.Site(SeveralMessagesJsonServer()), interface="127.0.0.1")
    failures: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "mcp.upstream" and "log_failure" in event:
            failures.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        session = closing(StreamableHttpUpstream(
            "several", f"http://127.0.0.1:{port.getHost().port}/mcp", {}, reactor, pool))

        def broken(message: dict[str, Any]) -> None:
            raise RuntimeError("bug in the gateway")

        session.on_notification = broken
        await session.start()
        result = await session.request(
            "tools/call", {"name": "tiny", "arguments": {}, "_meta": {"progressToken": "t"}},
            on_progress=broken)
        assert text_of(result) == "tiny answer"
        assert failures == ["[several] on_progress failed", "[several] on_notification failed"]
    finally:
        globalLogPublisher.removeObserver(observe)
        await port.stopListening()


class LyingJsonServer(StatelessJsonServer):
    """Answers ``tools/call`` with a result that is a string, and a ``ping`` with a number."""

    def render_POST(self, request: Any) -> bytes:
        message = json.loads(request.content.getvalue())
        answer = super().render_POST(request)
        if message.get("method") == "tools/call" and message["params"]["name"] == "lie":
            return json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": "text"}).encode()
        if message.get("method") == "ping":
            return json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": 7}).encode()
        return answer


@pytest_twisted.ensureDeferred
async def test_a_result_that_is_not_an_object_fails_that_request(closing: Any,
                                                                  pool: Any) -> None:
    port = reactor.listenTCP(0, server.Site(LyingJsonServer()), interface="127.0.0.1")
    try:
        session = closing(StreamableHttpUpstream(
            "liar", f"http://127.0.0.1:{port.getHost().port}/mcp", {}, reactor, pool))
        await session.start()
        for method, params, kind in (("tools/call", {"name": "lie", "arguments": {}}, "str"),
                                     ("ping", {}, "int")):
            with pytest.raises(UpstreamError) as raised:
                await session.request(method, params)
            assert str(raised.value) == (f"[liar] answered with a result that is not a JSON "
                                         f"object ({kind}); every MCP result is one")
        answer = await session.request("tools/call", {"name": "tiny", "arguments": {}})
        assert text_of(answer) == "tiny answer"
    finally:
        await port.stopListening()


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")  # twisted's server side
@pytest_twisted.ensureDeferred
async def test_tls_is_verified(pool: Any, closing: Any) -> None:
    listening = []

    def serve(certificate_pem: bytes, key_pem: bytes) -> str:
        certificate = ssl.PrivateCertificate.loadPEM(certificate_pem + key_pem)
        port = reactor.listenSSL(0, server.Site(StatelessJsonServer()), certificate.options(),
                                 interface="127.0.0.1")
        listening.append(port)
        return f"https://127.0.0.1:{port.getHost().port}/mcp"

    def trusting(certificate_pem: bytes) -> HTTPConnectionPool:
        trusted = new_pool(reactor, endpoints=CheckedEndpoints(
            reactor, allow_insecure=True, tls=BrowserLikePolicyForHTTPS(
                trustRoot=ssl.Certificate.loadPEM(certificate_pem))))
        pools.append(trusted)
        return trusted

    pools: list[HTTPConnectionPool] = []
    try:
        certificate_pem, key_pem = self_signed_certificate()
        url = serve(certificate_pem, key_pem)
        with pytest.raises(UpstreamError) as untrusted:
            await closing(StreamableHttpUpstream("tls", url, {}, reactor, pool)).start()
        assert str(untrusted.value) == f"[tls] POST {url}: TLS: certificate verify failed"

        # Trusting that certificate (a private CA) makes it work…
        session = closing(StreamableHttpUpstream("tls", url, {}, reactor,
                                                 trusting(certificate_pem)))
        await session.start()
        assert session.session_id is None and session.protocol_version == "2025-06-18"
        assert await call(session, "anything") == "tiny answer"
        await eventually(lambda: session.get_stream_supported is False)

        # …but only for the name it was issued to.
        other_pem, other_key = self_signed_certificate("127.0.0.2")
        other_url = serve(other_pem, other_key)
        with pytest.raises(UpstreamError) as mismatch:
            await closing(StreamableHttpUpstream("tls", other_url, {}, reactor,
                                                 trusting(other_pem))).start()
        assert str(mismatch.value) == \
            f"[tls] POST {other_url}: TLS: the certificate is not valid for this host name"
    finally:
        for port in listening:
            await port.stopListening()
        for each in pools:
            await each.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_a_modern_call_carries_the_mcp_param_headers_of_its_tool(pool: Any) -> None:
    """SEP-2243: the SDK server refuses a tools/call whose x-mcp-header argument is not
    mirrored into Mcp-Param-*. The session derives the headers from the tool's schema, learnt
    from tools/list, or (a call before any listing) learns it when refused and calls again."""
    from director.mcp.upstream.modern import ModernFirstHttpUpstream
    from tests.conformance.runner import HttpFixture

    fixture = await threads.deferToThread(HttpFixture)
    session = ModernFirstHttpUpstream("fixture", fixture.url, {}, reactor, pool)
    try:
        await session.start()
        assert session.era == "modern"
        assert session.tool_headers == {}
        first = await session.request("tools/call", {"name": "test_custom_header",
                                                     "arguments": {"region": "eu west"}})
        assert first["content"][0]["text"] == "region=eu west"
        assert "test_custom_header" in session.tool_headers
        again = await session.request("tools/call", {"name": "test_custom_header",
                                                     "arguments": {"region": "é"}})
        assert again["content"][0]["text"] == "region=é"
    finally:
        await session.close()  # (its subscriptions/listen stream too)
        await threads.deferToThread(fixture.stop)
