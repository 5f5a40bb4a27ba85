"""Both protocol eras on both sides of the gateway: the SDK client in ``mode="auto"`` (which
negotiates 2026-07-28 with the gateway) and ``mode="legacy"`` against upstreams that speak only
the stateless era, only the handshake era, or both (tests/fixtures/modern_http_server.py), a
sampling tool in every combination — so a server→client request crosses the era boundary one way
or the other (``input_required`` ⇄ ``sampling/createMessage``), or, with the upstream that
speaks both, stays in the client's own era end to end."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.client.client import Client
from mcp.shared.exceptions import MCPError

from tests.accounts_helpers import Account, call, sign_up
from tests.harness import Daemon, free_port, local_servers
from tests.test_mcp_gateway import run

StartDaemon = Callable[..., Daemon]
FIXTURE = str(Path(__file__).parent / "fixtures" / "modern_http_server.py")


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, int]]:
    """The SDK's MCPServer restricted to one era each."""
    ports = {"modern": free_port(), "legacy": free_port(), "both": free_port()}
    with local_servers([[sys.executable, FIXTURE, "--era", era, "--port", str(port)]
                        for era, port in ports.items()], list(ports.values())):
        yield ports


def debug_log(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/log", timeout=5) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


async def upstream_listening(port: int) -> None:
    """Waits until the gateway's subscriptions/listen request reached the stateless-era
    upstream: a change the upstream makes before it holds the stream is not announced (the
    stream has no history), so a test that changes something first waits for it."""
    with anyio.fail_after(10):
        while not any(entry["rpc"] == "subscriptions/listen"
                      for entry in await anyio.to_thread.run_sync(debug_log, port)):
            await anyio.sleep(0.05)


def setup(start_daemon: StartDaemon, migrated_url: str,
          upstreams: dict[str, int]) -> tuple[Daemon, Account, str]:
    daemon = start_daemon(DATABASE_URL=migrated_url,
                          DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS="true")
    daemon.wait_healthy()
    owner = sign_up(daemon, "bridge@example.com")
    assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Bridge"}, key=owner.key)[0] == 201
    for era, port in upstreams.items():
        status, _, body = call(daemon, "POST", "/api/v1/playbooks/bridge/servers", {
            "name": era, "type": "http", "prefix": f"{era[0]}_",
            "url": f"http://127.0.0.1:{port}/mcp"}, key=owner.key)
        assert status == 201, body
    return daemon, owner, f"{daemon.base}/playbooks/bridge/mcp?key={owner.key}"


def test_sampling_in_all_four_era_combinations(start_daemon: StartDaemon, migrated_url: str,
                                               upstreams: dict[str, int]) -> None:
    _, _, url = setup(start_daemon, migrated_url, upstreams)
    asked: list[tuple[str, str]] = []

    def sampler(mode: str) -> Any:
        async def sampling(context: Any, params: types.CreateMessageRequestParams) -> Any:
            prompt = params.messages[0].content
            asked.append((mode, getattr(prompt, "text", "")))
            return types.CreateMessageResult(
                role="assistant", model="m",
                content=types.TextContent(type="text", text=f"sampled for {mode}"))
        return sampling

    async def scenario() -> dict[tuple[str, str], Any]:
        results: dict[tuple[str, str], Any] = {}
        for mode in ("auto", "legacy"):
            async with Client(url, mode=mode, sampling_callback=sampler(mode)) as client:
                expected = "2026-07-28" if mode == "auto" else "2025-11-25"
                assert client.session.protocol_version == expected
                names = {tool.name for tool in (await client.list_tools()).tools}
                assert {"m_sample", "l_sample", "b_sample", "m_echo", "l_echo"} <= names, names
                for prefix in ("m", "l", "b"):
                    echoed = await client.call_tool(f"{prefix}_echo", {"text": "hi"})
                    assert echoed.content[0].text == "hi"
                    results[(mode, prefix)] = await client.call_tool(
                        f"{prefix}_sample", {"prompt": f"{mode}->{prefix}"})
        return results

    started = time.monotonic()
    results = run(scenario())
    for (mode, prefix), result in results.items():
        assert not result.is_error, (mode, prefix, result)
        assert result.content[0].text == f"the client said: sampled for {mode}", (mode, prefix)
    assert sorted(asked) == sorted([(m, f"{m}->{p}") for m in ("auto", "legacy")
                                    for p in ("m", "l", "b")])
    assert time.monotonic() - started < 30

    def seen(era: str) -> list[str]:
        return [entry["rpc"] for entry in debug_log(upstreams[era]) if entry["rpc"]]

    # Modern clients' sessions probe server/discover first, handshake-era clients' sessions
    # do the handshake first; a refusal is remembered per server, so each era is probed once.
    modern = seen("modern")
    assert modern.count("initialize") == 1, modern
    assert modern.count("server/discover") >= 2, modern
    legacy = seen("legacy")
    assert legacy.count("server/discover") == 1 and "initialize" in legacy, legacy
    # The upstream that speaks both eras served each client in its own era: the modern
    # client's sampling went up as input_required and came back as its retry (no bridge, the
    # server's own requestState), the legacy client's as a real sampling/createMessage.
    both = debug_log(upstreams["both"])
    modern_calls = [e for e in both if e["rpc"] == "tools/call" and e["mcp-method"]]
    legacy_calls = [e for e in both if e["rpc"] == "tools/call" and not e["mcp-method"]]
    assert [e["rpc"] for e in both].count("server/discover") == 1, both
    assert len(modern_calls) == 3, both  # echo, sample, and sample's retry
    assert len(legacy_calls) == 2, both  # echo, sample (answered within the call)
    assert "initialize" in [e["rpc"] for e in both]


def test_a_retry_with_an_unknown_request_state_is_refused(
        start_daemon: StartDaemon, migrated_url: str, upstreams: dict[str, int]) -> None:
    daemon, owner, _ = setup(start_daemon, migrated_url, upstreams)
    version = "2026-07-28"
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "l_sample", "arguments": {"prompt": "x"},
        "inputResponses": {"sampling-createMessage-1": {}},
        "requestState": "director-exchange:gone",
        "_meta": {"io.modelcontextprotocol/protocolVersion": version,
                  "io.modelcontextprotocol/clientCapabilities": {"sampling": {}}}}}
    status, _, raw = daemon.request("POST", "/playbooks/bridge/mcp", json.dumps(body).encode(), {
        "accept": "application/json, text/event-stream", "content-type": "application/json",
        "x-api-key": owner.key, "mcp-protocol-version": version, "mcp-method": "tools/call",
        "mcp-name": "l_sample"})
    answer = json.loads(raw)
    assert status == 400 and answer["error"]["code"] == -32602, answer
    assert "requestState" in answer["error"]["message"]

    # A state that is not the gateway's, for a handshake-era upstream: refused too, and the
    # call is not run afresh (it could do its work twice).
    calls_before = [e["rpc"] for e in debug_log(upstreams["legacy"])].count("tools/call")
    body["params"] = {**body["params"], "name": "l_echo", "arguments": {"text": "x"},
                      "requestState": "someone-else's"}
    status, _, raw = daemon.request("POST", "/playbooks/bridge/mcp", json.dumps(body).encode(), {
        "accept": "application/json, text/event-stream", "content-type": "application/json",
        "x-api-key": owner.key, "mcp-protocol-version": version, "mcp-method": "tools/call",
        "mcp-name": "l_echo"})
    answer = json.loads(raw)
    assert status == 400 and answer["error"]["code"] == -32602, answer
    assert "unknown requestState" in answer["error"]["message"]
    assert [e["rpc"] for e in debug_log(upstreams["legacy"])].count("tools/call") == calls_before


def test_a_client_that_refuses_sampling_gets_the_upstreams_error(
        start_daemon: StartDaemon, migrated_url: str, upstreams: dict[str, int]) -> None:
    _, _, url = setup(start_daemon, migrated_url, upstreams)

    async def refuse(context: Any, params: types.CreateMessageRequestParams) -> Any:
        return types.ErrorData(code=-1, message="no model here")

    async def scenario() -> list[str]:
        outcomes = []
        for mode in ("auto", "legacy"):
            async with Client(url, mode=mode, sampling_callback=refuse) as client:
                for prefix in ("m", "l", "b"):
                    try:
                        result = await client.call_tool(f"{prefix}_sample", {"prompt": "x"})
                        outcomes.append(f"{mode}/{prefix}: error={result.is_error}")
                    except MCPError as failure:
                        outcomes.append(f"{mode}/{prefix}: MCPError {failure}")
        return outcomes

    outcomes = run(scenario())
    # Whatever the combination, the call fails (as a tool error or a JSON-RPC error) and
    # nothing hangs.
    assert all("error=True" in o or "MCPError" in o for o in outcomes), outcomes


def test_a_client_without_the_capability_is_told_which_one(
        start_daemon: StartDaemon, migrated_url: str, upstreams: dict[str, int]) -> None:
    """A handshake-era upstream asks for sampling during a modern client's call, and that
    client declared no sampling capability: -32021 naming it, bridged by the gateway; the
    upstream that speaks both eras sees the client's own capabilities and refuses by itself."""
    _, _, url = setup(start_daemon, migrated_url, upstreams)

    async def scenario() -> dict[str, Any]:
        failures: dict[str, Any] = {}
        async with Client(url, mode="auto") as client:  # no sampling callback: not declared
            for prefix in ("l", "b"):
                try:
                    result = await client.call_tool(f"{prefix}_sample", {"prompt": "x"})
                    failures[prefix] = result
                except MCPError as failure:
                    failures[prefix] = failure
        return failures

    failures = run(scenario())
    bridged = failures["l"]
    assert isinstance(bridged, MCPError) and bridged.error.code == -32021, bridged
    assert "'sampling' capability" in str(bridged)
    assert bridged.error.data == {"requiredCapabilities": {"sampling": {}}}
    direct = failures["b"]  # the SDK server's own answer, verbatim
    assert isinstance(direct, MCPError) and direct.error.code == -32021, direct
    assert "resolver" in str(direct), direct


def test_change_notifications_from_a_modern_upstream_reach_both_eras(
        start_daemon: StartDaemon, migrated_url: str, upstreams: dict[str, int]) -> None:
    """The stateless-era upstream has no GET stream: the gateway keeps a subscriptions/listen
    open on it, so its list changes reach a handshake-era client's GET stream and a modern
    client's listen stream, and a legacy resources/subscribe becomes part of that filter."""
    _, _, url = setup(start_daemon, migrated_url, upstreams)
    legacy_seen: list[str] = []

    async def scenario() -> dict[str, Any]:
        got: dict[str, Any] = {}
        changed, updated = anyio.Event(), anyio.Event()

        async def on_message(message: Any) -> None:
            root = getattr(message, "root", message)
            method = getattr(root, "method", None)
            if method == "notifications/tools/list_changed":
                legacy_seen.append(method)
                changed.set()
            elif method == "notifications/resources/updated":
                legacy_seen.append(f"{method} {root.params.uri}")
                updated.set()

        async with Client(url, mode="legacy", message_handler=on_message) as legacy:
            await legacy.list_tools()  # the upstream session starts, and with it the listen
            await upstream_listening(upstreams["modern"])
            await legacy.call_tool("m_grow", {"name": "fresh"})
            with anyio.fail_after(10):
                await changed.wait()
            got["legacy_tools"] = {tool.name for tool in (await legacy.list_tools()).tools}
            await legacy.session.subscribe_resource("memo://note")  # (handshake-era method)
            await legacy.call_tool("m_touch", {"uri": "memo://note"})
            with anyio.fail_after(10):
                await updated.wait()
        async with Client(url, mode="auto") as modern:
            async with modern.listen(tools_list_changed=True,
                                     resource_subscriptions=["memo://note"]) as subscription:
                await modern.call_tool("m_grow", {"name": "fresher"})
                events = []
                with anyio.fail_after(10):
                    async for event in subscription:
                        events.append(type(event).__name__)
                        if len(events) == 1:
                            await modern.call_tool("m_touch", {"uri": "memo://note"})
                        if len(events) == 2:
                            break
                got["modern_events"] = events
            got["modern_tools"] = {tool.name for tool in (await modern.list_tools()).tools}
        return got

    got = run(scenario())
    assert "m_fresh" in got["legacy_tools"], got
    assert legacy_seen == ["notifications/tools/list_changed",
                           "notifications/resources/updated memo://note"], legacy_seen
    assert got["modern_events"] == ["ToolsListChanged", "ResourceUpdated"], got
    assert {"m_fresh", "m_fresher"} <= got["modern_tools"], got
    listens = [e for e in debug_log(upstreams["modern"]) if e["rpc"] == "subscriptions/listen"]
    assert listens, "the gateway never listened upstream"


def switch_era(port: int, era: str) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/debug/era", data=era.encode(),
                                     method="POST")
    with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310 (http, loopback)
        assert answer.read().decode() == era


def test_a_server_that_changes_era_is_probed_again(
        start_daemon: StartDaemon, migrated_url: str, upstreams: dict[str, int]) -> None:
    """The remembered era fails (the server was replaced by one of the other era, same URL):
    the gateway forgets it, probes again and retries the call, which succeeds."""
    _, _, url = setup(start_daemon, migrated_url, upstreams)
    port = upstreams["modern"]

    async def calls() -> list[str]:
        texts = []
        async with Client(url, mode="auto") as client:
            texts.append((await client.call_tool("m_echo", {"text": "before"})).content[0].text)
            switch_era(port, "legacy")
            texts.append((await client.call_tool("m_echo", {"text": "after"})).content[0].text)
        return texts

    seen_before = len(debug_log(port))
    try:
        assert run(calls()) == ["before", "after"]
    finally:
        switch_era(port, "modern")
    later = [entry["rpc"] for entry in debug_log(port)[seen_before:] if entry["rpc"]]
    # The call after the switch was refused, then the handshake succeeded and it was retried.
    assert later.count("tools/call") == 3, later
    assert "initialize" in later[later.index("tools/call") + 1:], later
