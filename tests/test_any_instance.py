"""Any instance serves any session (issue 17): three daemons on one database behind a real nginx,
round robin, no affinity.

What the tests establish, and docs/manual.rst ("Several instances behind a load balancer")
relies on:

* handshake-era sessions of the ``mcp`` SDK client (many at once, each request landing on
  whichever instance nginx picks) and legacy ``/sse`` sessions (the stream on one instance,
  each ``POST /message`` on any) work as on one instance; a sampling request made during a call
  is answered by a POST that reaches another instance and is relayed to the one waiting;
* a session is adopted only with the credential that opened it (another user's key, or another
  key of the same user, gets 404 as before); DELETE on one instance ends it on all of them; a
  revoked key's sessions end everywhere (their GET streams close, their rows go); the per-user
  cap counts the sessions of every instance;
* an event produced on one instance reaches the GET stream held by another, and a client
  resuming with ``Last-Event-ID`` on a third gets what it missed, from the event log;
* SIGKILL of one instance and a rolling restart (SIGTERM one by one) lose no session: the SDK
  clients go on with the same sessions; only calls in flight on the instance that went away
  may fail.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, types

from tests.accounts_helpers import Account, call, eventually, sign_up
from tests.harness import Daemon, free_port, make_temp_dir, query
from tests.raw_stream import RawStream
from tests.test_nginx import NGINX, Nginx, Through, post_mcp, server, upstream

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx-light); the "
                          "several-instances tests need a real balancer")

StartDaemon = Callable[..., Daemon]
CLUSTER_SERVER = str(Path(__file__).parent / "fixtures" / "cluster_server.py")
RAW_SERVER = str(Path(__file__).parent / "fixtures" / "raw_server.py")
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25",
                   "capabilities": {"sampling": {}},
                   "clientInfo": {"name": "any-instance", "version": "1"}}}
CAP = 30


class Cluster:
    def __init__(self, start_daemon: StartDaemon, url: str, **settings: str) -> None:
        self.start_daemon = start_daemon
        self.url = url
        self.settings = settings
        self.ports = [free_port() for _ in range(3)]
        self.daemons = [self.start(port) for port in self.ports]
        self.proxy_port = free_port()
        # Round robin, and no pause after a failure: a restarted instance is used at once.
        block = upstream(self.ports)
        for port in self.ports:
            block = block.replace(f"server 127.0.0.1:{port};",
                                  f"server 127.0.0.1:{port} max_fails=0;")
        self.proxy = Nginx(block + server(self.proxy_port))
        for daemon in self.daemons:
            daemon.wait_healthy()
        self.proxy.wait_listening(self.proxy_port)
        self.owner = sign_up(self.daemons[0], "cluster@example.com")
        self.playbook = self.new_playbook(self.owner)

    def balance(self, down: int | None = None) -> None:
        """nginx without instance ``down`` (None: with all of them), reloaded gracefully: the
        usual way to take an instance out of an nginx upstream, which has no active health
        checks, while it restarts (docs/manual.rst)."""
        text = self.proxy.config.read_text()
        for index, port in enumerate(self.ports):
            state = " down" if index == down else ""
            text = re.sub(rf"server 127\.0\.0\.1:{port} max_fails=0( down)?;",
                          f"server 127.0.0.1:{port} max_fails=0{state};", text)
        self.proxy.config.write_text(text)
        self.proxy.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # the new workers take over; the old ones finish what they carry

    def start(self, port: int) -> Daemon:
        return self.start_daemon(DATABASE_URL=self.url, PORT=str(port),
                                 BASE_URL="http://localhost",
                                 DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true",
                                 MCP_MAX_SESSIONS_PER_USER=str(CAP),
                                 API_KEY_RATE_LIMIT_MAX_REQUESTS="1000000",
                                 USER_RATE_LIMIT_MAX_REQUESTS="1000000", **self.settings)

    def new_playbook(self, owner: Account, name: str = "Cluster") -> str:
        status, _, body = call(self.daemons[0], "POST", "/api/v1/playbooks", {"name": name},
                               key=owner.key)
        assert status == 201, body
        playbook = str(body["id"])
        status, _, body = call(self.daemons[0], "POST", f"/api/v1/playbooks/{playbook}/servers",
                               {"name": "cluster", "type": "stdio", "command": sys.executable,
                                "args": [CLUSTER_SERVER]}, key=owner.key)
        assert status == 201, body

        def everywhere() -> bool:
            return all(call(d, "GET", f"/api/v1/playbooks/{playbook}/servers",
                            key=owner.key)[0] == 200 for d in self.daemons)
        eventually(everywhere)
        return playbook

    @property
    def balanced(self) -> Through:
        return Through_(self.proxy_port)

    def mcp_url(self, key: str | None = None, transport: str = "mcp") -> str:
        return (f"http://127.0.0.1:{self.proxy_port}/playbooks/{self.playbook}/{transport}"
                f"?key={key or self.owner.key}")

    def open_session(self, daemon: Daemon, key: str | None = None) -> str:
        status, headers, body = post_mcp(Through_(daemon.port), self.playbook,
                                         key or self.owner.key, INIT)
        assert status == 200, body
        return headers["mcp-session-id"]


@pytest.fixture
def cluster(start_daemon: StartDaemon, migrated_url: str) -> Iterator[Cluster]:
    started = Cluster(start_daemon, migrated_url)
    yield started
    started.proxy.stop()


def Through_(port: int) -> Through:
    return Through(port, "localhost")


def run(coroutine: Any, timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def sampled(context: Any, params: types.CreateMessageRequestParams) -> Any:
    question = params.messages[0].content.text  # type: ignore[union-attr]
    return types.CreateMessageResult(role="assistant", model="test-model",
                                     content=types.TextContent(type="text",
                                                               text=f"answer to {question}"))


def text(result: Any) -> str:
    assert not result.is_error, result
    return str(result.content[0].text)


def adoptions(cluster: Cluster) -> list[int]:
    return [daemon.output().count("MCP session adopted") for daemon in cluster.daemons]


# --- many sessions, round robin ----------------------------------------------------------------


def test_handshake_and_sse_sessions_through_round_robin(cluster: Cluster) -> None:
    from mcp.client.session import ClientSession
    from mcp.client.sse import sse_client

    async def legacy(index: int) -> list[str]:
        async with Client(cluster.mcp_url(), mode="legacy") as client:
            tools = await client.list_tools()
            assert "echo" in [tool.name for tool in tools.tools]
            return [text(await client.call_tool("echo", {"text": f"s{index}-{n}"}))
                    for n in range(6)]

    async def asking() -> list[str]:
        async with Client(cluster.mcp_url(), mode="legacy", sampling_callback=sampled) as client:
            return [text(await client.call_tool("ask", {"question": f"q{n}"}))
                    for n in range(6)]

    async def auto() -> str:
        async with Client(cluster.mcp_url(), mode="auto") as client:
            return text(await client.call_tool("echo", {"text": "auto"}))

    async def legacy_sse(ask: bool) -> list[str]:
        async with sse_client(cluster.mcp_url(transport="sse")) as (read, write), \
                ClientSession(read, write, sampling_callback=sampled) as session:
            await session.initialize()
            answers = [text(await session.call_tool("echo", {"text": f"sse-{n}"}))
                       for n in range(6)]
            if ask:
                answers.append(text(await session.call_tool("ask", {"question": "over sse"})))
            return answers

    async def scenario() -> tuple[Any, ...]:
        together = await asyncio.gather(asyncio.gather(*(legacy(i) for i in range(10))),
                                        auto(), legacy_sse(False), legacy_sse(False))
        # Sampling alone: a stdio server shared by a playbook's sessions on one instance asks
        # the session that used it last (director.mcp.fanout), which is this one only when
        # no other is calling it at the same time.
        return (*together, await asking(), await legacy_sse(True))

    sessions, automatic, sse_one, sse_two, asked, sse_asked = run(scenario(), 90)
    assert sessions == [[f"s{i}-{n}" for n in range(6)] for i in range(10)]
    assert asked == [f"answer to q{n}" for n in range(6)]
    assert automatic == "auto"
    assert sse_one == sse_two == [f"sse-{n}" for n in range(6)]
    assert sse_asked == [f"sse-{n}" for n in range(6)] + ["answer to over sse"]
    # Every instance adopted sessions it had not created.
    assert all(count > 0 for count in adoptions(cluster)), adoptions(cluster)


# --- who may reach a session, and its end -------------------------------------------------------


def test_credential_delete_revocation_and_cap_hold_everywhere(cluster: Cluster) -> None:
    first, second, third = cluster.daemons
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    session = cluster.open_session(first)
    status, _, body = post_mcp(Through_(second.port), cluster.playbook, cluster.owner.key, ping,
                               session)
    assert status == 200, body  # adopted
    # Another user's key, or another key of the owner: no such session, on any instance.
    stranger = sign_up(first, "stranger@example.com")
    status, _, body = call(first, "POST", "/api/v1/api-keys", {"name": "second"},
                           key=cluster.owner.key)
    assert status == 201, body
    other_key, key_id = str(body["key"]), str(body["id"])
    for daemon in cluster.daemons:
        for key in (stranger.key, other_key):
            status, _, _ = post_mcp(Through_(daemon.port), cluster.playbook, key, ping, session)
            assert status == 404

    # DELETE on the third ends it on the first two (which hold copies).
    status, _, _ = cluster_delete(third, cluster, session)
    assert status == 204
    for daemon in (first, second, third):
        eventually(lambda d=daemon: post_mcp(Through_(d.port), cluster.playbook,
                                             cluster.owner.key, ping, session)[0] == 404)

    # A revoked key's sessions end everywhere: the GET stream held by the second closes.
    session = cluster.open_session(first, other_key)
    stream = GetStream(second.port, cluster.playbook, other_key, session)
    assert stream.wait_for(b"stream open")
    assert call(third, "DELETE", f"/api/v1/api-keys/{key_id}", key=cluster.owner.key)[0] == 204
    assert stream.wait_closed()
    eventually(lambda: query(cluster.url, "SELECT count(*) FROM mcp_sessions WHERE "
                                          "credential_id = %s", key_id)[0][0] == 0)

    # The cap counts every instance's sessions: the oldest of CAP + 1 ends everywhere.
    capped = sign_up(first, "capped@example.com")
    playbook = cluster.new_playbook(capped, "Capped")
    opened = []
    for number in range(CAP + 1):
        daemon = cluster.daemons[number % 3]
        status, headers, body = post_mcp(Through_(daemon.port), playbook, capped.key, INIT)
        assert status == 200, body
        opened.append(headers["mcp-session-id"])
    for daemon in cluster.daemons:
        eventually(lambda d=daemon: post_mcp(Through_(d.port), playbook, capped.key, ping,
                                             opened[0])[0] == 404)
        assert post_mcp(Through_(daemon.port), playbook, capped.key, ping, opened[-1])[0] == 200


def test_idle_sessions_end_everywhere(start_daemon: StartDaemon, migrated_url: str) -> None:
    """A session idle on every instance ends on all of them; one idle here but in use
    elsewhere lives on (``last_seen`` is shared)."""
    cluster = Cluster(start_daemon, migrated_url, MCP_SESSION_IDLE_SECONDS="2")
    try:
        first, second, third = cluster.daemons
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}

        def answer(daemon: Daemon, session: str) -> int:
            return post_mcp(Through_(daemon.port), cluster.playbook, cluster.owner.key, ping,
                            session)[0]

        idle, busy = cluster.open_session(first), cluster.open_session(first)
        assert answer(second, idle) == 200  # a copy on the second too
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the busy one is used on the others only
            assert answer(second, busy) == answer(third, busy) == 200
            time.sleep(0.3)
        for daemon in cluster.daemons:
            eventually(lambda d=daemon: answer(d, idle) == 404)
        assert answer(first, busy) == 200
    finally:
        cluster.proxy.stop()


def cluster_delete(daemon: Daemon, cluster: Cluster, session: str) -> tuple[int, Any, Any]:
    return Through_(daemon.port).request(
        "DELETE", f"/playbooks/{cluster.playbook}/mcp",
        headers={"x-api-key": cluster.owner.key, "mcp-session-id": session})


class GetStream(RawStream):
    """A session's GET stream on one instance, read in the background."""

    def __init__(self, port: int, playbook: str, key: str, session: str,
                 last_event_id: str | None = None) -> None:
        extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        super().__init__(port, (f"GET /playbooks/{playbook}/mcp HTTP/1.1\r\nHost: localhost"
                                f"\r\nAccept: text/event-stream\r\nx-api-key: {key}\r\n"
                                f"Mcp-Session-Id: {session}\r\n{extra}\r\n").encode())

    def wait_for(self, text: bytes, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while text not in self.data and time.monotonic() < deadline:
            time.sleep(0.01)
        return text in self.data

    def wait_closed(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ended and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.ended

    def event_ids(self, fragment: bytes) -> list[str]:
        """The ids of the events whose data holds ``fragment``."""
        ids = []
        for event in self.data.split(b"\n\n"):
            lines = event.split(b"\n")
            if any(fragment in line for line in lines if line.startswith(b"data:")):
                ids += [line[4:].strip().decode() for line in lines if line.startswith(b"id:")]
        return ids


def test_events_relayed_to_the_stream_and_resumed_elsewhere(cluster: Cluster) -> None:
    first, second, third = cluster.daemons
    key = cluster.owner.key
    session = cluster.open_session(first)
    touch = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
             "params": {"name": "touch_tools", "arguments": {}}}
    stream = GetStream(first.port, cluster.playbook, key, session)
    try:
        assert stream.wait_for(b"stream open")
        # The upstream of the second instance says its tools changed: relayed to the first.
        status, _, body = post_mcp(Through_(second.port), cluster.playbook, key, touch, session)
        assert status == 200, body
        assert stream.wait_for(b"notifications/tools/list_changed")
        seen = stream.event_ids(b"notifications/tools/list_changed")
        assert seen
    finally:
        stream.close()
    # While the client is away: one from the second's upstream, one from a playbook change.
    status, _, body = post_mcp(Through_(second.port), cluster.playbook, key,
                               dict(touch, id=4), session)
    assert status == 200, body
    assert call(third, "POST", f"/api/v1/playbooks/{cluster.playbook}/prompts",
                {"name": "p2", "body": "b"}, key=key)[0] == 201
    time.sleep(0.5)
    resumed = GetStream(third.port, cluster.playbook, key, session, last_event_id=seen[-1])
    try:
        assert resumed.wait_for(b"stream open")
        assert resumed.wait_for(b"notifications/tools/list_changed")
        assert resumed.wait_for(b"notifications/prompts/list_changed")
        assert seen[-1] not in resumed.event_ids(b"list_changed")  # only what came after it
    finally:
        resumed.close()
    log_size = query(cluster.url, "SELECT count(*) FROM mcp_events")[0][0]
    assert log_size >= 3


# --- instances that go away ----------------------------------------------------------------------


def test_adopting_instance_resubscribes_and_sets_the_log_level(cluster: Cluster) -> None:
    """The instance that subscribed goes away: the one adopting the session tells its own
    upstream the session's subscription and log level, so that the resource's updates go on
    reaching the client's GET stream."""
    first, second, _ = cluster.daemons
    key = cluster.owner.key
    received = make_temp_dir("director-test-adopt-raw-", 0o777) / "received.jsonl"
    server = {"name": "raw", "type": "stdio", "command": sys.executable, "args": [RAW_SERVER],
              "prefix": "raw_", "timeout_seconds": 5, "env": {"RAW_LOG": str(received)}}
    assert call(first, "POST", f"/api/v1/playbooks/{cluster.playbook}/servers", server,
                key=key)[0] == 201
    eventually(lambda: all(b"raw_update" in post_mcp(
        Through_(d.port), cluster.playbook, key,
        {"jsonrpc": "2.0", "id": 9, "method": "tools/list"}, cluster.open_session(d))[2]
        for d in (first, second)))
    received.unlink(missing_ok=True)

    def told(method: str) -> list[Any]:
        lines = received.read_text().splitlines() if received.exists() else []
        return [message["params"] for message in map(json.loads, lines)
                if message.get("method") == method]

    session = cluster.open_session(first)
    for number, (method, params) in enumerate((
            ("resources/subscribe", {"uri": "raw://note"}),
            ("logging/setLevel", {"level": "debug"})), 2):
        status, _, body = post_mcp(Through_(first.port), cluster.playbook, key,
                                   {"jsonrpc": "2.0", "id": number, "method": method,
                                    "params": params}, session)
        assert status == 200 and b'"result"' in body, body
    assert told("resources/subscribe") == [{"uri": "raw://note"}]
    assert {"level": "debug"} in told("logging/setLevel")
    set_levels = len(told("logging/setLevel"))
    first.terminate()
    # The next request and the GET stream land on the second instance, which adopts.
    status, _, body = post_mcp(Through_(second.port), cluster.playbook, key,
                               {"jsonrpc": "2.0", "id": 4, "method": "ping"}, session)
    assert status == 200, body
    stream = GetStream(second.port, cluster.playbook, key, session)
    try:
        assert stream.wait_for(b"stream open")
        eventually(lambda: len(told("resources/subscribe")) == 2 and
                   len(told("logging/setLevel")) > set_levels)
        assert told("resources/subscribe")[1] == {"uri": "raw://note"}
        assert told("logging/setLevel")[-1] == {"level": "debug"}
        status, _, body = post_mcp(Through_(second.port), cluster.playbook, key,
                                   {"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                                    "params": {"name": "raw_update", "arguments": {}}},
                                   session)
        assert status == 200 and b"not subscribed" not in body, body
        assert stream.wait_for(b"notifications/resources/updated")
        assert b"raw://note" in stream.data
    finally:
        stream.close()
    assert second.output().count("MCP session adopted") >= 1



def test_sigkill_and_rolling_restart_lose_no_session(cluster: Cluster) -> None:
    """Raw clients (a new connection per request, as nginx sees many clients) and SDK clients
    (kept-alive connections, a GET stream each) call on through SIGKILL of one instance and a
    rolling restart of all three; none of their sessions is lost."""
    raw_clients, sdk_clients = 4, 3
    failures: list[str] = []
    lost: list[str] = []
    calls = {"raw": 0, "sdk": 0}
    stop = threading.Event()
    balanced = Through_(cluster.proxy_port)

    def raw_loop(index: int) -> None:
        status, headers, body = post_mcp(balanced, cluster.playbook, cluster.owner.key, INIT)
        assert status == 200, body
        session = headers["mcp-session-id"]
        number = 0
        while not stop.is_set():
            number += 1
            message = {"jsonrpc": "2.0", "id": number, "method": "tools/call",
                       "params": {"name": "echo", "arguments": {"text": f"r{index}-{number}"}}}
            try:
                status, _, body = post_mcp(balanced, cluster.playbook, cluster.owner.key,
                                           message, session)
            except OSError as failure:
                failures.append(f"r{index}: {failure}")
                continue
            if status == 404:
                lost.append(f"r{index}: {body[:200]!r}")
                return
            if status != 200 or f'"r{index}-{number}"'.encode() not in body:
                failures.append(f"r{index}: {status} {body[:200]!r}")
            else:
                calls["raw"] += 1
            time.sleep(0.01)

    async def sdk_loop(index: int) -> None:
        async with Client(cluster.mcp_url(), mode="legacy") as client:
            number = 0
            while not stop.is_set():
                number += 1
                try:
                    got = text(await client.call_tool("echo", {"text": f"c{index}-{number}"}))
                    assert got == f"c{index}-{number}"
                    calls["sdk"] += 1
                except Exception as failure:  # a call in flight on an instance that went away
                    if "not found" in str(failure):
                        lost.append(f"c{index}: {failure}")
                        return
                    failures.append(f"c{index}: {type(failure).__name__}: {failure}")
                await asyncio.sleep(0.02)

    async def sdk_clients_until_stopped() -> list[Any]:
        return await asyncio.gather(*(sdk_loop(i) for i in range(sdk_clients)),
                                    return_exceptions=True)

    def restart_all() -> int:
        events = 0
        # SIGKILL of one instance while its clients' calls and streams go on.
        time.sleep(1.5)
        cluster.daemons[1].process.kill()
        cluster.daemons[1].process.wait(10)
        events += 1
        time.sleep(1.5)
        cluster.balance(down=1)
        cluster.daemons[1] = cluster.start(cluster.ports[1])
        cluster.daemons[1].wait_healthy()
        cluster.balance()
        # A rolling restart: SIGTERM one by one, each back before the next goes.
        for index in range(3):
            time.sleep(1.0)
            cluster.balance(down=index)
            assert cluster.daemons[index].terminate() == 0
            events += 1
            cluster.daemons[index] = cluster.start(cluster.ports[index])
            cluster.daemons[index].wait_healthy()
            cluster.balance()
        time.sleep(1.0)
        return events

    raws = [threading.Thread(target=raw_loop, args=(i,), daemon=True) for i in range(raw_clients)]
    for thread in raws:
        thread.start()
    sdk = threading.Thread(target=lambda: crashed.extend(
        r for r in run(sdk_clients_until_stopped(), 120) if r is not None), daemon=True)
    crashed: list[Any] = []
    sdk.start()
    events = restart_all()
    stop.set()
    for thread in [*raws, sdk]:
        thread.join(30)
    print(f"{calls} calls; {len(failures)} failed: {failures}; SDK clients that ended on a "
          f"transport error: {crashed}")
    assert lost == [], lost
    # Only calls in flight when an instance went away failed: at most one per client each time.
    assert len(failures) + len(crashed) <= (raw_clients + sdk_clients) * events, failures
    assert calls["raw"] > raw_clients * 50 and calls["sdk"] > 20, calls
