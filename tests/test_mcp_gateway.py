"""The gateway end to end: real MCP clients (the SDK, raw HTTP) through a real daemon to real
upstream servers (the SDK's reference server over stdio)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters, types

from tests.accounts_helpers import Account, call, eventually, sign_up
from tests.harness import Daemon, make_temp_dir
from tests.raw_stream import RawStream

StartDaemon = Callable[..., Daemon]
REFERENCE = str(Path(__file__).parent / "fixtures" / "reference_server.py")
RAW = str(Path(__file__).parent / "fixtures" / "raw_server.py")
ACCEPT = "application/json, text/event-stream"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "raw", "version": "1"}}}


class Gateway:
    def __init__(self, daemon: Daemon, owner: Account, cancel_log: Path) -> None:
        self.daemon = daemon
        self.owner = owner
        self.cancel_log = cancel_log

    def url(self, playbook: str = "ref", key: str | None = None) -> str:
        return f"{self.daemon.base}/playbooks/{playbook}/mcp?key={key or self.owner.key}"

    def post(self, message: dict[str, Any], session: str | None = None,
             playbook: str = "ref", headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, str], bytes]:
        sent = {"accept": ACCEPT, "content-type": "application/json",
                "x-api-key": self.owner.key, **(headers or {})}
        if session:
            sent["mcp-session-id"] = session
        return self.daemon.request("POST", f"/playbooks/{playbook}/mcp",
                                   json.dumps(message).encode(), sent)

    def open_session(self) -> str:
        status, headers, _ = self.post(INIT)
        assert status == 200
        session = headers["mcp-session-id"]
        assert self.post({"jsonrpc": "2.0", "method": "notifications/initialized"},
                         session)[0] == 202
        return session


def reference_server(**overrides: Any) -> dict[str, Any]:
    return {"name": "reference", "type": "stdio", "command": sys.executable,
            "args": [REFERENCE], **overrides}


@pytest.fixture
def gateway(start_daemon: StartDaemon, migrated_url: str) -> Iterator[Gateway]:
    # The stdio servers write here: as nobody when the suite runs as root.
    directory = make_temp_dir("director-test-mcp-", 0o777)
    cancel_log = directory / "cancelled.log"
    os.environ["REFERENCE_CANCEL_LOG"] = str(cancel_log)  # inherited by the daemon's children
    daemon = start_daemon(DATABASE_URL=migrated_url,
                          DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true")
    daemon.wait_healthy()
    owner = sign_up(daemon, "mcp@example.com")
    assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Ref"}, key=owner.key)[0] == 201
    server = reference_server(env={"REFERENCE_CANCEL_LOG": str(cancel_log)})
    status, _, body = call(daemon, "POST", "/api/v1/playbooks/ref/servers", server,
                           key=owner.key)
    assert status == 201, body
    assert call(daemon, "POST", "/api/v1/playbooks/ref/prompts", {
        "name": "welcome", "title": "Welcome", "body": "Welcome {{name}} to {{place}}.",
        "arguments": [{"name": "name", "required": True}, {"name": "place"}]},
        key=owner.key)[0] == 201
    yield Gateway(daemon, owner, cancel_log)
    os.environ.pop("REFERENCE_CANCEL_LOG", None)


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 60))


# --- real clients -------------------------------------------------------------------------


def test_sdk_client_lists_calls_and_gets_prompts(gateway: Gateway) -> None:
    async def scenario() -> dict[str, Any]:
        async with Client(gateway.url(), mode="legacy") as client:
            tools = await client.list_tools()
            echoed = await client.call_tool("echo", {"text": "héllo"})
            added = await client.call_tool("add", {"a": 2, "b": 40})
            prompts = await client.list_prompts()
            welcome = await client.get_prompt("welcome", {"name": "Ada", "place": "Director"})
            resources = await client.list_resources()
            static = await client.read_resource("test://static")
            return {"tools": tools, "echo": echoed, "add": added, "prompts": prompts,
                    "welcome": welcome, "resources": resources, "static": static,
                    "server": client.server_info}

    got = run(scenario())
    names = [tool.name for tool in got["tools"].tools]
    assert names[:3] == ["echo", "add", "norm"] and "ask" in names
    assert got["echo"].content[0].text == "héllo" and not got["echo"].is_error
    assert got["add"].structured_content == {"result": 42}
    assert [p.name for p in got["prompts"].prompts] == ["welcome", ]
    assert got["welcome"].messages[0].content.text == "Welcome Ada to Director."
    assert [str(r.uri) for r in got["resources"].resources] == ["test://static"]
    assert got["static"].contents[0].text == "static content"
    assert got["server"].name == "director/ref"


def test_schemas_pass_through_byte_faithfully(gateway: Gateway) -> None:
    async def both() -> tuple[Any, Any]:
        direct = StdioServerParameters(command=sys.executable, args=[REFERENCE])
        async with Client(direct, mode="legacy") as client:
            upstream = await client.list_tools()
        async with Client(gateway.url(), mode="legacy") as client:
            through = await client.list_tools()
        return upstream, through

    upstream, through = run(both())
    assert [t.model_dump(mode="json") for t in through.tools] == \
        [t.model_dump(mode="json") for t in upstream.tools]
    norm = next(t for t in through.tools if t.name == "norm")
    assert "$defs" in norm.input_schema


def test_auto_mode_client_works_on_the_same_url(gateway: Gateway) -> None:
    # mode="auto" negotiates 2026-07-28 now (tests/test_mcp_modern.py checks the era itself).
    async def scenario() -> str:
        async with Client(gateway.url(), mode="auto") as client:
            result = await client.call_tool("echo", {"text": "auto"})
            return str(result.content[0].text)

    assert run(scenario()) == "auto"


def test_progress_logging_and_sampling_reach_the_calling_client(gateway: Gateway) -> None:
    progress: list[float] = []
    logs: list[Any] = []

    async def sampling(context: Any, params: types.CreateMessageRequestParams) -> Any:
        question = params.messages[0].content.text
        return types.CreateMessageResult(role="assistant", model="test-model",
                                         content=types.TextContent(type="text",
                                                                   text=f"answer to {question}"))

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params.data)

    async def scenario() -> tuple[Any, Any, Any]:
        async with Client(gateway.url(), mode="legacy", sampling_callback=sampling,
                          logging_callback=on_log) as client:
            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                progress.append(value)

            slow = await client.call_tool("slow", {"steps": 3, "delay": 0.05},
                                          progress_callback=on_progress)
            chatty = await client.call_tool("chatty", {"message": "hello log"})
            asked = await client.call_tool("ask", {"question": "2+2?"})
            return slow, chatty, asked

    slow, chatty, asked = run(scenario())
    assert slow.content[0].text == "done after 3 steps" and progress == [1, 2, 3]
    assert chatty.content[0].text == "logged" and "hello log" in json.dumps(logs)
    assert asked.content[0].text == "answer to 2+2?"


def test_many_sessions_each_get_their_own_answers(gateway: Gateway) -> None:
    async def one(index: int) -> list[str]:
        async with Client(gateway.url(), mode="legacy") as client:
            return [str((await client.call_tool("echo", {"text": f"s{index}-{n}"}))
                        .content[0].text) for n in range(5)]

    async def scenario() -> list[list[str]]:
        return list(await asyncio.gather(*(one(i) for i in range(8))))

    results = run(scenario())
    assert results == [[f"s{i}-{n}" for n in range(5)] for i in range(8)]


# --- playbook settings take effect ----------------------------------------------------------


def test_prefix_filters_and_list_changed(gateway: Gateway) -> None:
    session = gateway.open_session()
    stream = GetStream(gateway, session)
    try:
        status, _, _ = call(gateway.daemon, "PATCH", "/api/v1/playbooks/ref/servers/reference",
                            {"prefix": "ref_", "include": ["echo", "add"]},
                            key=gateway.owner.key)
        assert status == 200
        assert stream.wait_for("notifications/tools/list_changed")
    finally:
        stream.close()
    status, _, body = gateway.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session)
    tools = [t["name"] for t in parse_response(body)["result"]["tools"]]
    assert tools == ["ref_echo", "ref_add"]
    status, _, body = gateway.post({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                    "params": {"name": "ref_echo", "arguments": {"text": "p"}}},
                                   session)
    assert parse_response(body)["result"]["content"][0]["text"] == "p"
    status, _, body = gateway.post({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                                    "params": {"name": "norm", "arguments": {}}}, session)
    assert parse_response(body)["error"]["code"] == -32602


def test_disabled_and_broken_servers_contribute_nothing(gateway: Gateway) -> None:
    call(gateway.daemon, "POST", "/api/v1/playbooks/ref/servers",
         {"name": "broken", "type": "stdio", "command": "/nonexistent/mcp-server"},
         key=gateway.owner.key)
    session = gateway.open_session()
    _, _, body = gateway.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session)
    assert "echo" in [t["name"] for t in parse_response(body)["result"]["tools"]]
    call(gateway.daemon, "PATCH", "/api/v1/playbooks/ref/servers/reference", {"disabled": True},
         key=gateway.owner.key)
    _, _, body = gateway.post({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, session)
    assert parse_response(body)["result"]["tools"] == []


# --- raw HTTP edge cases --------------------------------------------------------------------


def parse_response(body: bytes) -> dict[str, Any]:
    """A JSON body, or the last ``data:`` event of an SSE body."""
    text = body.decode()
    if text.lstrip().startswith("{"):
        return dict(json.loads(text))
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    return dict(json.loads(events[-1]))


def test_session_rules(gateway: Gateway) -> None:
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    status, _, body = gateway.post(listing)
    assert status == 400 and json.loads(body)["error"]["code"] == -32600
    status, _, body = gateway.post(listing, session="no-such-session")
    assert status == 404
    session = gateway.open_session()
    status, _, body = gateway.post(listing, session, headers={"mcp-protocol-version": "1999-01-01"})
    assert status == 400 and "MCP-Protocol-Version" in json.loads(body)["error"]["message"]
    assert gateway.post(listing, session)[0] == 200
    status, _, _ = gateway.daemon.request("DELETE", "/playbooks/ref/mcp", headers={
        "x-api-key": gateway.owner.key, "mcp-session-id": session})
    assert status == 204
    assert gateway.post(listing, session)[0] == 404


def test_bad_requests_get_precise_json_rpc_errors(gateway: Gateway) -> None:
    session = gateway.open_session()
    base = {"accept": ACCEPT, "x-api-key": gateway.owner.key, "mcp-session-id": session}
    status, _, body = gateway.daemon.request("POST", "/playbooks/ref/mcp", b"{oops",
                                             {**base, "content-type": "application/json"})
    assert status == 400 and json.loads(body)["error"]["code"] == -32700
    status, _, body = gateway.daemon.request("POST", "/playbooks/ref/mcp", b"[]",
                                             {**base, "content-type": "application/json"})
    assert status == 400 and json.loads(body)["error"]["code"] == -32600
    status, _, _ = gateway.daemon.request("POST", "/playbooks/ref/mcp", b"{}",
                                          {**base, "content-type": "text/plain"})
    assert status == 415
    status, _, _ = gateway.daemon.request("POST", "/playbooks/ref/mcp",
                                          json.dumps(INIT).encode(),
                                          {"accept": "text/html", "x-api-key": gateway.owner.key,
                                           "content-type": "application/json"})
    assert status == 406
    _, _, body = gateway.post({"jsonrpc": "2.0", "id": 9, "method": "no/such"}, session)
    assert json.loads(body)["error"]["code"] == -32601
    _, _, body = gateway.post({"jsonrpc": "2.0", "id": 10, "method": "tools/call",
                               "params": {"name": "nope", "arguments": {}}}, session)
    assert json.loads(body)["error"]["code"] == -32602
    modern = {"jsonrpc": "2.0", "id": 11, "method": "server/discover", "params": {}}
    status, _, body = gateway.post(modern)
    assert status == 400 and json.loads(body)["error"]["code"] == -32022
    assert "2025-11-25" in json.loads(body)["error"]["message"]


def test_authentication_and_ownership(gateway: Gateway) -> None:
    status, headers, body = gateway.daemon.request(
        "POST", "/playbooks/ref/mcp", json.dumps(INIT).encode(),
        {"accept": ACCEPT, "content-type": "application/json"})
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["error"]["message"].startswith("authentication required")
    other = sign_up(gateway.daemon, "intruder@example.com")
    status, _, _ = gateway.post(INIT, headers={"x-api-key": other.key})
    assert status == 404
    status, _, _ = gateway.daemon.request(
        "POST", f"/playbooks/ref/mcp?key={gateway.owner.key}", json.dumps(INIT).encode(),
        {"accept": ACCEPT, "content-type": "application/json"})
    assert status == 200
    session = gateway.open_session()
    status, _, _ = gateway.post({"jsonrpc": "2.0", "id": 2, "method": "ping"}, session,
                                headers={"x-api-key": other.key})
    assert status == 404  # another user's session id is no session at all


# --- streams --------------------------------------------------------------------------------


class GetStream(RawStream):
    """A raw GET stream of a session, read in the background."""

    def __init__(self, gateway: Gateway, session: str, last_event_id: str | None = None) -> None:
        extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        super().__init__(gateway.daemon.port, (
            f"GET /playbooks/ref/mcp HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream"
            f"\r\nx-api-key: {gateway.owner.key}\r\nMcp-Session-Id: {session}\r\n{extra}\r\n"
            ).encode())

    def wait_for(self, text: str, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.data and time.monotonic() < deadline:
            time.sleep(0.01)
        return text.encode() in self.data


def test_get_stream_headers_resumption_and_second_stream(gateway: Gateway) -> None:
    session = gateway.open_session()
    stream = GetStream(gateway, session)
    assert stream.wait_for("stream open")
    head = stream.data.split(b"\r\n\r\n")[0].lower()
    assert b"content-type: text/event-stream" in head and b"x-accel-buffering: no" in head
    second = GetStream(gateway, session)
    assert second.wait_for("409")
    second.close()
    call(gateway.daemon, "PATCH", "/api/v1/playbooks/ref", {"description": "x"},
         key=gateway.owner.key)
    call(gateway.daemon, "POST", "/api/v1/playbooks/ref/prompts", {"name": "p2", "body": "b"},
         key=gateway.owner.key)
    assert stream.wait_for("notifications/prompts/list_changed")
    first_id = next(line for line in stream.data.decode().splitlines()
                    if line.startswith("id: ")).split(": ")[1]
    stream.close()
    time.sleep(0.2)
    # A change while the client is away: replayed when it comes back with Last-Event-ID.
    call(gateway.daemon, "POST", "/api/v1/playbooks/ref/prompts", {"name": "p3", "body": "b"},
         key=gateway.owner.key)
    resumed = GetStream(gateway, session, last_event_id=first_id)
    try:
        assert resumed.wait_for("notifications/prompts/list_changed")
        assert first_id.encode() not in resumed.data  # only what came after it
    finally:
        resumed.close()


def test_legacy_sse_transport(gateway: Gateway) -> None:
    from mcp.client.session import ClientSession
    from mcp.client.sse import sse_client

    async def scenario() -> str:
        url = f"{gateway.daemon.base}/playbooks/ref/sse?key={gateway.owner.key}"
        async with sse_client(url) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("echo", {"text": "over sse"})
            return str(result.content[0].text)

    assert run(scenario()) == "over sse"


# --- faults ---------------------------------------------------------------------------------


def test_upstream_crash_mid_call_then_recovery(gateway: Gateway) -> None:
    session = gateway.open_session()
    _, _, body = gateway.post({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                               "params": {"name": "crash", "arguments": {}}}, session)
    response = parse_response(body)
    assert "error" in response and "reference" in response["error"]["message"]

    def works() -> bool:
        _, _, body = gateway.post({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                   "params": {"name": "echo", "arguments": {"text": "back"}}},
                                  session)
        result = parse_response(body).get("result")
        return bool(result) and result["content"][0]["text"] == "back"

    eventually(works, timeout=10, interval=0.2)


def test_upstream_hang_times_out_and_is_cancelled(gateway: Gateway) -> None:
    # The stdlib-only raw server: it starts well within its 1 s timeout, which bounds its
    # start as well as each call.
    raw_log = gateway.cancel_log.parent / "raw.log"
    assert call(gateway.daemon, "POST", "/api/v1/playbooks/ref/servers", {
        "name": "raw", "type": "stdio", "command": sys.executable, "args": [RAW],
        "prefix": "raw_", "env": {"RAW_LOG": str(raw_log)}, "timeout_seconds": 1},
        key=gateway.owner.key)[0] == 201
    session = gateway.open_session()
    gateway.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, session)  # started
    started = time.monotonic()
    _, _, body = gateway.post({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                               "params": {"name": "raw_hang", "arguments": {}}}, session)
    assert time.monotonic() - started < 5
    assert parse_response(body)["error"]["code"] == -32001
    eventually(lambda: raw_log.exists() and '"notifications/cancelled"' in
               raw_log.read_text(), timeout=5)


def test_client_cancellation_and_disconnect_reach_the_upstream(gateway: Gateway) -> None:
    import socket
    import threading

    session = gateway.open_session()
    gateway.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, session)  # started
    result: dict[str, Any] = {}

    def hang() -> None:
        result["response"] = gateway.post({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                                           "params": {"name": "hang", "arguments": {"tag": "c1"}}},
                                          session)

    thread = threading.Thread(target=hang)
    thread.start()
    eventually(lambda: gateway.cancel_log.exists() and "started c1" in
               gateway.cancel_log.read_text(), timeout=10)
    assert gateway.post({"jsonrpc": "2.0", "method": "notifications/cancelled",
                         "params": {"requestId": 7}}, session)[0] == 202
    thread.join(10)
    status, _, body = result["response"]
    assert status == 200 and parse_response(body)["error"]["message"] == "request cancelled"
    eventually(lambda: gateway.cancel_log.exists() and "cancelled c1" in
               gateway.cancel_log.read_text(), timeout=5)

    body = json.dumps({"jsonrpc": "2.0", "id": 8, "method": "tools/call",
                       "params": {"name": "hang", "arguments": {"tag": "d1"}}}).encode()
    with socket.create_connection(("127.0.0.1", gateway.daemon.port)) as sock:
        sock.sendall(b"POST /playbooks/ref/mcp HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nAccept: " + ACCEPT.encode() +
                     b"\r\nx-api-key: " + gateway.owner.key.encode() +
                     b"\r\nMcp-Session-Id: " + session.encode() +
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        eventually(lambda: "started d1" in gateway.cancel_log.read_text(), timeout=10)
    eventually(lambda: "cancelled d1" in gateway.cancel_log.read_text(), timeout=5)


def test_abandoned_sessions_are_capped(start_daemon: StartDaemon, migrated_url: str) -> None:
    """The cap, through a real daemon; idle expiry is timed in process, on a fake clock
    (tests/test_sessions_inprocess.py)."""
    daemon = start_daemon(DATABASE_URL=migrated_url, MCP_MAX_SESSIONS_PER_USER="50",
                          API_KEY_RATE_LIMIT_MAX_REQUESTS="100000",
                          USER_RATE_LIMIT_MAX_REQUESTS="100000")
    daemon.wait_healthy()
    owner = sign_up(daemon, "many@example.com")
    call(daemon, "POST", "/api/v1/playbooks", {"name": "Empty"}, key=owner.key)
    headers = {"accept": ACCEPT, "content-type": "application/json", "x-api-key": owner.key}
    sessions = []
    for _ in range(1000):
        status, response_headers, _ = daemon.request("POST", "/playbooks/empty/mcp",
                                                     json.dumps(INIT).encode(), headers)
        assert status == 200
        sessions.append(response_headers["mcp-session-id"])
    ping = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "ping"}).encode()
    def status(session: str) -> int:
        return daemon.request("POST", "/playbooks/empty/mcp", ping,
                              {**headers, "mcp-session-id": session})[0]

    # The cap ended the least recently used ones; the newest 50 live.
    assert [status(s) for s in sessions[-50:]] == [200] * 50
    assert [status(s) for s in sessions[:900:100]] == [404] * 9


# --- HTTP upstreams ----------------------------------------------------------------------------

HTTP_REFERENCE = str(Path(__file__).parent / "fixtures" / "http_reference_server.py")


@pytest.fixture
def http_upstreams() -> Iterator[dict[str, int]]:
    """The SDK's reference server over Streamable HTTP and over the legacy SSE transport."""
    from tests.harness import free_port, local_servers

    ports = {"streamable-http": free_port(), "sse": free_port()}
    with local_servers([[sys.executable, HTTP_REFERENCE, "--transport", transport, "--port",
                         str(port)] for transport, port in ports.items()],
                       list(ports.values())):
        yield ports


def test_http_and_sse_upstreams_through_the_gateway(start_daemon: StartDaemon,
                                                    migrated_url: str,
                                                    http_upstreams: dict[str, int]) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url,
                          DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS="true")
    daemon.wait_healthy()
    owner = sign_up(daemon, "http@example.com")
    call(daemon, "POST", "/api/v1/playbooks", {"name": "Remote"}, key=owner.key)
    for name, body in (
        ("streamable", {"type": "http", "prefix": "s_",
                        "url": f"http://127.0.0.1:{http_upstreams['streamable-http']}/mcp"}),
        # An ``http`` server that only speaks the legacy transport: found by the fallback.
        ("fallback", {"type": "http", "prefix": "f_",
                      "url": f"http://127.0.0.1:{http_upstreams['sse']}/sse"}),
        ("legacy", {"type": "sse", "prefix": "l_",
                    "url": f"http://127.0.0.1:{http_upstreams['sse']}/sse"}),
    ):
        status, _, response = call(daemon, "POST", "/api/v1/playbooks/remote/servers",
                                   {"name": name, **body}, key=owner.key)
        assert status == 201, response
    url = f"{daemon.base}/playbooks/remote/mcp?key={owner.key}"
    progress: list[float] = []

    async def sampling(context: Any, params: types.CreateMessageRequestParams) -> Any:
        return types.CreateMessageResult(role="assistant", model="m",
                                         content=types.TextContent(type="text", text="sampled"))

    async def scenario() -> dict[str, Any]:
        async with Client(url, mode="legacy", sampling_callback=sampling) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            echoes = {prefix: (await client.call_tool(f"{prefix}echo", {"text": prefix}))
                      .content[0].text for prefix in ("s_", "f_", "l_")}

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                progress.append(value)

            slow = await client.call_tool("s_slow", {"steps": 2, "delay": 0.05},
                                          progress_callback=on_progress)
            sample = await client.call_tool("s_sample", {"prompt": "hi"})
            return {"names": names, "echoes": echoes, "slow": slow, "sample": sample}

    got = run(scenario())
    assert {"s_echo", "f_echo", "l_echo"} <= set(got["names"])
    assert got["echoes"] == {"s_": "s_", "f_": "f_", "l_": "l_"}
    assert progress == [1, 2] and not got["slow"].is_error
    assert "sampled" in got["sample"].content[0].text


EVERYTHING = Path(__file__).parent / "npm" / "node_modules" / ".bin" / "mcp-server-everything"


def test_server_everything_over_stdio_sse_and_streamable_http(start_daemon: StartDaemon,
                                                              migrated_url: str) -> None:
    import socket
    import subprocess

    from tests.harness import free_port

    assert EVERYTHING.exists(), "run `make test` (it installs tests/npm) first"
    ports = {"sse": free_port(), "streamableHttp": free_port()}
    processes = [subprocess.Popen(["node", str(EVERYTHING), mode],
                                  env={**os.environ, "PORT": str(port)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for mode, port in ports.items()]
    try:
        for port in ports.values():
            def listening(port: int = port) -> bool:
                with socket.socket() as probe:
                    return probe.connect_ex(("127.0.0.1", port)) == 0
            eventually(listening, timeout=30, interval=0.1)
        daemon = start_daemon(DATABASE_URL=migrated_url,
                              DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true",
                              DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS="true")
        daemon.wait_healthy()
        owner = sign_up(daemon, "everything@example.com")
        call(daemon, "POST", "/api/v1/playbooks", {"name": "Everything"}, key=owner.key)
        servers = [
            {"name": "stdio", "type": "stdio", "command": "node",
             "args": [str(EVERYTHING), "stdio"], "prefix": "a_"},
            {"name": "sse", "type": "sse", "prefix": "b_",
             "url": f"http://127.0.0.1:{ports['sse']}/sse"},
            {"name": "http", "type": "http", "prefix": "c_",
             "url": f"http://127.0.0.1:{ports['streamableHttp']}/mcp"},
        ]
        for server in servers:
            status, _, body = call(daemon, "POST", "/api/v1/playbooks/everything/servers",
                                   server, key=owner.key)
            assert status == 201, body

        async def scenario(mode: str) -> tuple[list[str], dict[str, str]]:
            async with Client(f"{daemon.base}/playbooks/everything/mcp?key={owner.key}",
                              mode=mode) as client:
                names = [t.name for t in (await client.list_tools()).tools]
                echoes = {}
                for prefix in ("a_", "b_", "c_"):
                    result = await client.call_tool(f"{prefix}echo", {"message": prefix})
                    echoes[prefix] = str(result.content[0].text)
                return names, echoes

        # A handshake-era client, then a 2026-07-28 one: for the latter the gateway probes
        # server/discover first (this server speaks only the handshake era) and falls back.
        for mode in ("legacy", "auto"):
            names, echoes = run(scenario(mode))
            assert {"a_echo", "b_echo", "c_echo"} <= set(names), mode
            assert all(prefix in text for prefix, text in echoes.items()), (mode, echoes)
        assert "[stdio] no MCP 2026-07-28" in daemon.output()
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


async def tool_names(client: Any, until: str, timeout: float = 20.0) -> list[str]:
    """The client's tools once ``until`` is among them (a server registers some tools only
    after ``initialized``, and says so with list_changed)."""
    deadline = time.monotonic() + timeout
    while True:
        names = [tool.name for tool in (await client.list_tools()).tools]
        if until in names or time.monotonic() > deadline:
            return names
        await asyncio.sleep(0.1)


def test_url_elicitation_reaches_the_clients_that_declare_it(start_daemon: StartDaemon,
                                                            migrated_url: str) -> None:
    """server-everything registers ``trigger-url-elicitation`` only for a client that declares
    ``elicitation.url``. Its HTTP session (one per client session) is told what the client
    declared: the tool is there for a client with an elicitation callback, in both eras (a
    modern client gets the request as input_required), and absent for one without; the shared
    stdio process is told everything the gateway relays, and its request is refused for a
    session that did not declare URL elicitation."""
    from tests.harness import free_port, local_servers

    port = free_port()
    with local_servers([["node", str(EVERYTHING), "streamableHttp"]], [port],
                       env={**os.environ, "PORT": str(port)}):
        daemon = start_daemon(DATABASE_URL=migrated_url,
                              DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true",
                              DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS="true")
        daemon.wait_healthy()
        owner = sign_up(daemon, "elicit@example.com")
        call(daemon, "POST", "/api/v1/playbooks", {"name": "Everything"}, key=owner.key)
        for server in ({"name": "http", "type": "http", "prefix": "c_",
                        "url": f"http://127.0.0.1:{port}/mcp"},
                       {"name": "stdio", "type": "stdio", "command": "node",
                        "args": [str(EVERYTHING), "stdio"], "prefix": "a_"}):
            status, _, body = call(daemon, "POST", "/api/v1/playbooks/everything/servers",
                                   server, key=owner.key)
            assert status == 201, body
        url = f"{daemon.base}/playbooks/everything/mcp?key={owner.key}"
        asked: list[Any] = []

        async def accept(context: Any, params: Any) -> Any:
            asked.append(params)
            return types.ElicitResult(action="accept")

        async def no_roots(context: Any) -> Any:
            return types.ListRootsResult(roots=[])

        async def declaring(mode: str) -> tuple[list[str], Any]:
            async with Client(url, mode=mode, elicitation_callback=accept) as client:
                names = await tool_names(client, until="c_trigger-url-elicitation")
                result = await client.call_tool("c_trigger-url-elicitation", {
                    "url": "https://example.com/consent", "elicitationId": f"e-{mode}"})
                return names, result

        async def not_declaring() -> tuple[list[str], Any]:
            # Roots declared (and nothing else): get-roots-list is the sign that the server
            # registered this session's conditional tools.
            async with Client(url, mode="legacy", list_roots_callback=no_roots) as client:
                names = await tool_names(client, until="c_get-roots-list")
                return names, await client.call_tool("a_trigger-url-elicitation",
                                                     {"url": "https://example.com/consent"})

        for mode in ("legacy", "auto"):
            names, result = run(declaring(mode))
            assert {"c_trigger-url-elicitation", "a_trigger-url-elicitation"} <= set(names)
            assert not result.is_error and "completed the URL elicitation" in \
                result.content[0].text, (mode, result)
            assert (asked[-1].mode, asked[-1].url, asked[-1].elicitation_id) == \
                ("url", "https://example.com/consent", f"e-{mode}")
        names, refused = run(not_declaring())
        assert "c_get-roots-list" in names, names
        assert "c_trigger-url-elicitation" not in names
        assert "c_trigger-elicitation-request" not in names  # no form elicitation either
        assert "a_trigger-url-elicitation" in names  # the shared process: all, refused here
        assert refused.is_error and \
            "not support elicitation/create (elicitation is not among its capabilities)" in \
            refused.content[0].text, refused
        assert len(asked) == 2


def test_a_url_elicitation_and_its_completion_reach_the_client(gateway: Gateway) -> None:
    """The reference server (a shared stdio process) sends the user to a URL, then says the
    flow completed (notifications/elicitation/complete): both reach the calling client."""
    asked: list[Any] = []
    completed: list[Any] = []

    async def accept(context: Any, params: Any) -> Any:
        asked.append(params)
        return types.ElicitResult(action="accept")

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ElicitCompleteNotification):
            completed.append(message.params.elicitation_id)

    async def scenario() -> Any:
        async with Client(gateway.url(), mode="legacy", elicitation_callback=accept,
                          message_handler=on_message) as client:
            result = await client.call_tool("consent", {"url": "https://example.com/ok"})
            deadline = time.monotonic() + 10
            while not completed and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return result

    result = run(scenario())
    assert result.content[0].text == "accept", result
    assert [(p.mode, p.url, p.elicitation_id) for p in asked] == \
        [("url", "https://example.com/ok", "consent-1")]
    assert completed == ["consent-1"]


def test_the_capabilities_a_server_request_needs() -> None:
    from director.mcp.capabilities import missing, relayed

    both = {"elicitation": {"form": {}, "url": {}}, "sampling": {}, "roots": {}}
    assert all(missing(method, params, both) is None for method, params in (
        ("elicitation/create", {"mode": "url"}), ("elicitation/create", {}),
        ("sampling/createMessage", {}), ("roots/list", {}), ("ping", {})))
    assert missing("elicitation/create", {"mode": "url"}, {"elicitation": {}}) == \
        {"elicitation": {"url": {}}}  # an empty elicitation is form mode only
    assert missing("elicitation/create", {}, {"elicitation": {}}) is None
    assert missing("elicitation/create", {"mode": "form"}, {"elicitation": {"url": {}}}) == \
        {"elicitation": {"form": {}}}
    assert missing("sampling/createMessage", {}, {"roots": {}}) == {"sampling": {}}
    assert relayed({**both, "experimental": {"x": {}}, "tasks": {}}) == both


def test_no_upstream_process_outlives_the_daemon(gateway: Gateway) -> None:
    import signal

    session = gateway.open_session()
    _, _, body = gateway.post({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                               "params": {"name": "pid", "arguments": {}}}, session)
    child = int(parse_response(body)["result"]["content"][0]["text"])
    assert Path(f"/proc/{child}").exists()
    gateway.daemon.process.send_signal(signal.SIGKILL)
    gateway.daemon.wait_exit()
    eventually(lambda: not Path(f"/proc/{child}").exists() or
               Path(f"/proc/{child}/stat").read_text().split()[2] == "Z", timeout=5)


def test_deleting_a_playbook_ends_its_sessions(gateway: Gateway) -> None:
    session = gateway.open_session()
    stream = GetStream(gateway, session)
    try:
        assert stream.wait_for("stream open")
        assert call(gateway.daemon, "DELETE", "/api/v1/playbooks/ref",
                    key=gateway.owner.key)[0] == 204
        assert stream.wait_for("\r\n0\r\n\r\n")  # the GET stream was finished
    finally:
        stream.close()
    status, _, _ = gateway.post({"jsonrpc": "2.0", "id": 2, "method": "ping"}, session)
    assert status == 404


def test_unknown_mcp_paths_and_methods_are_404_and_405(gateway: Gateway) -> None:
    key = {"x-api-key": gateway.owner.key}
    status, _, body = gateway.daemon.request("GET", "/playbooks/ref/nope", headers=key)
    assert status == 404 and json.loads(body)["error"]["message"].startswith("no such MCP")
    status, headers, _ = gateway.daemon.request("PUT", "/playbooks/ref/mcp", b"{}", headers=key)
    assert status == 405 and "POST" in headers["allow"]
    status, _, _ = gateway.daemon.request("POST", "/playbooks/ref/sse", b"{}", headers=key)
    assert status == 405
    assert "unhandled error" not in gateway.daemon.output()


def test_an_unknown_resource_is_32002_in_the_handshake_era(gateway: Gateway) -> None:
    # (-32602 in the 2026-07-28 era: tests/test_mcp_modern.py)
    session = gateway.open_session()
    _, _, body = gateway.post({"jsonrpc": "2.0", "id": 3, "method": "resources/read",
                               "params": {"uri": "test://nowhere"}}, session)
    error = parse_response(body)["error"]
    assert error["code"] == -32002 and error["data"] == {"uri": "test://nowhere"}, error


def test_a_restarted_upstream_is_told_again_what_its_sessions_asked(
        gateway: Gateway) -> None:
    """A stdio upstream that crashed and was restarted has forgotten the subscriptions and the
    log level: the gateway subscribes again what its sessions still want, and sets the most
    verbose level any of them asked for (a shared process serves them all)."""
    received = gateway.cancel_log.parent / "raw.jsonl"  # where the server may write
    raw = {"name": "raw", "type": "stdio", "command": sys.executable, "args": [RAW],
           "env": {"RAW_LOG": str(received)}, "prefix": "raw_"}
    status, _, body = call(gateway.daemon, "POST", "/api/v1/playbooks/ref/servers", raw,
                           key=gateway.owner.key)
    assert status == 201, body

    def ask(session: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        _, _, answer = gateway.post({"jsonrpc": "2.0", "id": 9, "method": method,
                                     "params": params}, session)
        return parse_response(answer)

    def sent() -> list[tuple[str, Any]]:
        if not received.exists():
            return []
        messages = [json.loads(line) for line in received.read_text().splitlines()]
        return [(m.get("method"), m.get("params")) for m in messages if "method" in m]

    quiet, chatty = gateway.open_session(), gateway.open_session()
    assert "result" in ask(quiet, "logging/setLevel", {"level": "error"})
    assert "result" in ask(chatty, "logging/setLevel", {"level": "debug"})
    assert "result" in ask(quiet, "logging/setLevel", {"level": "warning"})  # the last writer
    assert "result" in ask(chatty, "resources/subscribe", {"uri": "raw://note"})
    levels = [params["level"] for method, params in sent() if method == "logging/setLevel"]
    assert levels[-1] == "debug", levels  # the most verbose wanted, not the last one set
    ask(chatty, "tools/call", {"name": "raw_crash", "arguments": {"code": 3}})

    def told_again() -> bool:
        methods = [method for method, _ in sent()]
        restarted = len(methods) - methods[::-1].index("initialize") if \
            methods.count("initialize") >= 2 else None
        return restarted is not None and {"logging/setLevel", "resources/subscribe"} <= \
            set(methods[restarted:])

    try:
        eventually(told_again, timeout=10)
    except AssertionError:
        raise AssertionError(f"{sent()}\n{gateway.daemon.output()[-3000:]}") from None
    after = sent()[-2:]
    assert ("logging/setLevel", {"level": "debug"}) in after
    assert ("resources/subscribe", {"uri": "raw://note"}) in after


def test_a_roots_question_does_not_fail_a_modern_clients_call(gateway: Gateway) -> None:
    """A handshake-era server may ask for roots whenever it likes (server-everything does right
    after ``initialized``), so the question reaches whichever 2026-07-28 call is in flight. A
    client that declared no roots is answered for as a handshake-era one would be (-32601):
    the server carries on, and the call is not failed with -32021 as for sampling."""
    raw = {"name": "raw", "type": "stdio", "command": sys.executable, "args": [RAW],
           "prefix": "raw_"}
    status, _, body = call(gateway.daemon, "POST", "/api/v1/playbooks/ref/servers", raw,
                           key=gateway.owner.key)
    assert status == 201, body

    async def scenario() -> Any:
        async with Client(gateway.url(), mode="auto") as client:  # declares no roots
            return await client.call_tool("raw_roots", {})

    result = run(scenario())
    assert not result.is_error, result
    answer = json.loads(result.content[0].text)
    assert answer["code"] == -32601 and "roots" in answer["message"], answer
