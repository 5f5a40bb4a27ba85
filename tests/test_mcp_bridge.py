"""Both protocol eras on both sides of the gateway: the SDK client in ``mode="auto"`` (which
negotiates 2026-07-28 with the gateway) and ``mode="legacy"`` against upstreams that speak only
the stateless era or only the handshake era (tests/fixtures/modern_http_server.py), a sampling
tool in all four combinations — so every server→client request crosses the era boundary one
way or the other (``input_required`` ⇄ ``sampling/createMessage``)."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    ports = {"modern": free_port(), "legacy": free_port()}
    with local_servers([[sys.executable, FIXTURE, "--era", era, "--port", str(port)]
                        for era, port in ports.items()], list(ports.values())):
        yield ports


def debug_log(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/log", timeout=5) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


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
                assert {"m_sample", "l_sample", "m_echo", "l_echo"} <= names, names
                for prefix in ("m", "l"):
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
                                    for p in ("m", "l")])
    assert time.monotonic() - started < 30

    # The modern-only upstream: initialize was refused once, then server/discover; later
    # sessions went straight to server/discover (the choice is remembered per server).
    modern = [entry["rpc"] for entry in debug_log(upstreams["modern"]) if entry["rpc"]]
    assert modern.count("initialize") == 1, modern
    assert modern.count("server/discover") >= 2, modern
    # The handshake-only upstream is never probed: the handshake comes first.
    legacy = [entry["rpc"] for entry in debug_log(upstreams["legacy"]) if entry["rpc"]]
    assert "server/discover" not in legacy and "initialize" in legacy, legacy


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


def test_a_client_that_refuses_sampling_gets_the_upstreams_error(
        start_daemon: StartDaemon, migrated_url: str, upstreams: dict[str, int]) -> None:
    _, _, url = setup(start_daemon, migrated_url, upstreams)

    async def refuse(context: Any, params: types.CreateMessageRequestParams) -> Any:
        return types.ErrorData(code=-1, message="no model here")

    async def scenario() -> list[str]:
        outcomes = []
        for mode in ("auto", "legacy"):
            async with Client(url, mode=mode, sampling_callback=refuse) as client:
                for prefix in ("m", "l"):
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
