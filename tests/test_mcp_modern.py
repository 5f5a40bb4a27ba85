"""The stateless era (MCP 2026-07-28) on ``/playbooks/{id}/mcp``: the SDK client negotiating it
through the gateway, every header and error rule on raw HTTP, two instances answering without
affinity, and ``subscriptions/listen`` fed by playbook edits made on the other instance."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import mcp_types as types
import pytest
from mcp.client.client import Client
from mcp.shared.exceptions import MCPError

from director.mcp import headers
from director.mcp.modern import envelope as modern_envelope
from tests.accounts_helpers import Account, call, sign_up
from tests.harness import Daemon
from tests.raw_stream import RawStream
from tests.test_mcp_gateway import ACCEPT, INIT, parse_response, reference_server

StartDaemon = Callable[..., Daemon]
VERSION = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": VERSION,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"}}
NAME_KEYS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


class Instance:
    """One daemon of the deployment, spoken to with raw modern requests."""

    def __init__(self, daemon: Daemon, owner: Account) -> None:
        self.daemon = daemon
        self.owner = owner

    def url(self) -> str:
        return f"{self.daemon.base}/playbooks/ref/mcp?key={self.owner.key}"

    def post(self, method: str, params: dict[str, Any] | None = None, *, request_id: Any = 1,
             meta: dict[str, Any] | None = None, headers: dict[str, str | None] | None = None,
             ) -> tuple[int, dict[str, str], Any]:
        """A well-formed modern request unless ``meta``/``headers`` say otherwise (a header
        given as None is left out)."""
        body = {"jsonrpc": "2.0", "id": request_id, "method": method,
                "params": {**(params or {}), "_meta": META if meta is None else meta}}
        sent: dict[str, str | None] = {
            "accept": ACCEPT, "content-type": "application/json", "x-api-key": self.owner.key,
            "mcp-protocol-version": VERSION, "mcp-method": method}
        name_key = NAME_KEYS.get(method)
        if name_key and params and name_key in params:
            sent["mcp-name"] = params[name_key]
        sent.update(headers or {})
        status, response_headers, raw = self.daemon.request(
            "POST", "/playbooks/ref/mcp", json.dumps(body).encode(),
            {k: v for k, v in sent.items() if v is not None})
        return status, response_headers, parse_response(raw) if raw else None


def setup_instance(daemon: Daemon, owner: Account | None = None) -> Instance:
    daemon.wait_healthy()
    if owner is None:
        owner = sign_up(daemon, "modern@example.com")
        assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Ref"}, key=owner.key)[0] == 201
        status, _, body = call(daemon, "POST", "/api/v1/playbooks/ref/servers",
                               reference_server(), key=owner.key)
        assert status == 201, body
        assert call(daemon, "POST", "/api/v1/playbooks/ref/prompts", {
            "name": "welcome", "body": "Welcome {{name}}.",
            "arguments": [{"name": "name", "required": True}]}, key=owner.key)[0] == 201
    return Instance(daemon, owner)


@pytest.fixture
def instance(start_daemon: StartDaemon, migrated_url: str) -> Instance:
    return setup_instance(start_daemon(DATABASE_URL=migrated_url,
                                       DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true"))


@pytest.fixture
def pair(start_daemon: StartDaemon, migrated_url: str) -> Iterator[tuple[Instance, Instance]]:
    env = {"DATABASE_URL": migrated_url, "DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS": "true"}
    first, second = start_daemon(**env), start_daemon(**env)
    one = setup_instance(first)
    two = setup_instance(second, one.owner)
    yield one, two


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 60))


# --- the SDK client -----------------------------------------------------------------------


def test_sdk_client_negotiates_2026_and_uses_everything(instance: Instance) -> None:
    progress: list[float] = []
    logs: list[Any] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params.data)

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async def scenario() -> dict[str, Any]:
        got: dict[str, Any] = {}
        async with Client(instance.url(), mode="auto", log_level="info",
                          logging_callback=on_log) as client:
            got["version"] = client.protocol_version
            got["server"] = client.server_info
            got["tools"] = await client.list_tools()
            got["echo"] = await client.call_tool("echo", {"text": "héllo"})
            got["add"] = await client.call_tool("add", {"a": 2, "b": 40})
            got["prompts"] = await client.list_prompts()
            got["welcome"] = await client.get_prompt("welcome", {"name": "Ada"})
            got["resources"] = await client.list_resources()
            got["static"] = await client.read_resource("test://static")
            got["slow"] = await client.call_tool("slow", {"steps": 3, "delay": 0.05},
                                                 progress_callback=on_progress)
            got["chatty"] = await client.call_tool("chatty", {"message": "hello log"})
            # The reference server speaks 2026-07-28 too, so the call goes to it in that era
            # (with this client's capabilities: no sampling), where its handshake-era style
            # tool (ctx.session.create_message) cannot ask: its own error, passed through.
            try:
                await client.call_tool("ask", {"question": "2+2?"})
            except MCPError as failure:
                got["ask"] = failure
        async with Client(instance.url(), mode="auto", logging_callback=on_log) as quiet:
            got["quiet"] = await quiet.call_tool("chatty", {"message": "not asked for"})
        async with Client(instance.url(), mode="legacy") as legacy:
            got["legacy_version"] = legacy.protocol_version
            got["legacy_echo"] = await legacy.call_tool("echo", {"text": "legacy"})
        return got

    got = run(scenario())
    assert got["version"] == VERSION and got["server"].name == "director/ref"
    names = [tool.name for tool in got["tools"].tools]
    assert names[:3] == ["echo", "add", "norm"] and "ask" in names
    assert got["echo"].content[0].text == "héllo" and not got["echo"].is_error
    assert got["add"].structured_content == {"result": 42}
    assert [p.name for p in got["prompts"].prompts] == ["welcome"]
    assert got["welcome"].messages[0].content.text == "Welcome Ada."
    assert [str(r.uri) for r in got["resources"].resources] == ["test://static"]
    assert got["static"].contents[0].text == "static content"
    assert got["slow"].content[0].text == "done after 3 steps" and progress == [1, 2, 3]
    assert got["chatty"].content[0].text == "logged" and got["quiet"].content[0].text == "logged"
    assert json.dumps(logs).count("hello log") == 1 and "not asked for" not in json.dumps(logs)
    assert got["ask"].error.code == -32600 and "sampling/createMessage" in str(got["ask"])
    assert got["legacy_version"] == "2025-11-25"
    assert got["legacy_echo"].content[0].text == "legacy"


# --- raw HTTP: headers, errors, result shapes ---------------------------------------------


def error(response: tuple[int, dict[str, str], Any]) -> tuple[int, int]:
    status, _, body = response
    return status, body["error"]["code"]


def test_header_rules_and_errors(instance: Instance) -> None:
    post = instance.post
    # The envelope and its routing headers.
    assert error(post("tools/list", headers={"mcp-protocol-version": None})) == (400, -32020)
    assert error(post("tools/list", meta={**META, "io.modelcontextprotocol/protocolVersion":
                                          "2099-01-01"})) == (400, -32020)
    assert error(post("tools/list", headers={"mcp-protocol-version": "2025-11-25"})) == \
        (400, -32020)  # a handshake-era header on an enveloped request, without a session
    assert error(post("tools/list", headers={"mcp-method": None})) == (400, -32020)
    assert error(post("tools/list", headers={"mcp-method": "prompts/list"})) == (400, -32020)
    echo = {"name": "echo", "arguments": {"text": "x"}}
    assert error(post("tools/call", echo, headers={"mcp-name": None})) == (400, -32020)
    assert error(post("tools/call", echo, headers={"mcp-name": "add"})) == (400, -32020)
    assert error(post("resources/read", {"uri": "test://static"},
                      headers={"mcp-name": "test://other"})) == (400, -32020)
    encoded = "=?base64?" + base64.b64encode(b"echo").decode() + "?="
    assert post("tools/call", echo, headers={"mcp-name": encoded})[0] == 200
    assert error(post("tools/list", meta={})) == (400, -32602)
    assert error(post("tools/list", meta={**META, "io.modelcontextprotocol/logLevel": "loud"})) \
        == (400, -32602)
    status, _, body = post("tools/list", meta={**META, "io.modelcontextprotocol/protocolVersion":
                                               "2099-01-01"},
                           headers={"mcp-protocol-version": "2099-01-01"})
    assert (status, body["error"]["code"]) == (400, -32022)
    assert body["error"]["data"]["requested"] == "2099-01-01"
    # Only what server/discover lists too; the message names the handshake-era versions.
    assert body["error"]["data"]["supported"] == [VERSION]
    assert "2025-11-25" in body["error"]["message"]
    assert error(post("no/such")) == (404, -32601)
    assert error(post("ping")) == (404, -32601)  # removed in this era
    assert error(post("initialize", {"protocolVersion": VERSION})) == (404, -32601)
    assert error(post("logging/setLevel", {"level": "info"})) == (404, -32601)
    assert error(post("tools/call", {"name": "nope", "arguments": {}},
                      headers={"mcp-name": "nope"})) == (400, -32602)
    # "Resource not found" is -32602 in this era (SEP-2164), -32002 in the handshake era.
    status, _, body = post("resources/read", {"uri": "test://nowhere"},
                           headers={"mcp-name": "test://nowhere"})
    assert (status, body["error"]["code"]) == (400, -32602), body
    assert body["error"]["data"] == {"uri": "test://nowhere"}
    # A duplicated routing header: only visible on the raw wire.
    raw = json.dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/list",
                      "params": {"_meta": META}}).encode()
    with socket.create_connection(("127.0.0.1", instance.daemon.port), timeout=10) as sock:
        sock.sendall(b"POST /playbooks/ref/mcp HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nAccept: " + ACCEPT.encode() +
                     b"\r\nx-api-key: " + instance.owner.key.encode() +
                     b"\r\nMCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/list"
                     b"\r\nMcp-Method: tools/list\r\nConnection: close\r\nContent-Length: " +
                     str(len(raw)).encode() + b"\r\n\r\n" + raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"-32020" in answer
    # Notifications are acknowledged and dropped; responses are not accepted.
    headers = {"accept": ACCEPT, "content-type": "application/json",
               "x-api-key": instance.owner.key, "mcp-protocol-version": VERSION}
    notification = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                    "params": {"requestId": 1, "_meta": META}}
    assert instance.daemon.request("POST", "/playbooks/ref/mcp",
                                   json.dumps(notification).encode(), headers)[0] == 202
    status, _, body = instance.daemon.request("POST", "/playbooks/ref/mcp", json.dumps(
        {"jsonrpc": "2.0", "id": 3, "result": {}}).encode(), headers)
    assert (status, json.loads(body)["error"]["code"]) == (400, -32600)
    # GET and DELETE: 405 in this era; the handshake era keeps its rules on the same URL.
    for method in ("GET", "DELETE"):
        status, response_headers, _ = instance.daemon.request(
            method, "/playbooks/ref/mcp", headers={"x-api-key": instance.owner.key,
                                                   "mcp-protocol-version": VERSION})
        assert (status, response_headers.get("allow")) == (405, "POST")
    assert instance.daemon.request("GET", "/playbooks/ref/mcp",
                                   headers={"x-api-key": instance.owner.key})[0] == 400
    status, response_headers, _ = instance.daemon.request(
        "POST", "/playbooks/ref/mcp", json.dumps(INIT).encode(),
        {"accept": ACCEPT, "content-type": "application/json", "x-api-key": instance.owner.key})
    session = response_headers["mcp-session-id"]
    status, _, body = instance.daemon.request(
        "POST", "/playbooks/ref/mcp", json.dumps({"jsonrpc": "2.0", "id": 2,
                                                  "method": "tools/list"}).encode(),
        {"accept": ACCEPT, "content-type": "application/json", "x-api-key": instance.owner.key,
         "mcp-session-id": session, "mcp-protocol-version": "2025-11-25"})
    assert status == 200 and "resultType" not in parse_response(body)["result"]


def test_result_shapes(instance: Instance) -> None:
    server_info = {"name": "director/ref", "title": "Director MCP gateway", "version": "0.1.0"}
    status, headers, body = instance.post("server/discover")
    assert status == 200 and "mcp-session-id" not in headers
    discover = body["result"]
    assert discover["supportedVersions"] == [VERSION]
    assert discover["capabilities"]["tools"] == {"listChanged": True}
    assert discover["capabilities"]["resources"] == {"subscribe": True, "listChanged": True}
    assert (discover["resultType"], discover["cacheScope"], discover["ttlMs"]) == \
        ("complete", "private", 0)
    assert discover["_meta"]["io.modelcontextprotocol/serverInfo"] == server_info
    types.DiscoverResult.model_validate(discover)
    listings = {}
    for method in ("tools/list", "prompts/list", "resources/list", "resources/templates/list"):
        result = instance.post(method)[2]["result"]
        assert (result["resultType"], result["cacheScope"], result["ttlMs"]) == \
            ("complete", "private", 0), method
        assert result["_meta"]["io.modelcontextprotocol/serverInfo"] == server_info
        listings[method] = result
    again = instance.post("tools/list", request_id="other")[2]["result"]
    assert again == listings["tools/list"]  # deterministic order
    read = instance.post("resources/read", {"uri": "test://static"})[2]["result"]
    assert (read["cacheScope"], read["ttlMs"], read["contents"][0]["text"]) == \
        ("private", 0, "static content")
    called = instance.post("tools/call", {"name": "echo", "arguments": {"text": "hi"}})[2]
    assert called["result"]["resultType"] == "complete" and "ttlMs" not in called["result"]
    assert called["result"]["content"][0]["text"] == "hi"
    prompt = instance.post("prompts/get", {"name": "welcome", "arguments": {"name": "Bo"}})[2]
    assert prompt["result"]["messages"][0]["content"]["text"] == "Welcome Bo."
    assert prompt["result"]["_meta"]["io.modelcontextprotocol/serverInfo"] == server_info


# --- two instances, subscriptions/listen ----------------------------------------------------


class ListenStream(RawStream):
    """A raw ``subscriptions/listen`` POST, its SSE answer read in the background."""

    def __init__(self, instance: Instance, request_id: str, notifications: dict[str, Any]):
        body = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "subscriptions/listen",
                           "params": {"notifications": notifications, "_meta": META}}).encode()
        super().__init__(instance.daemon.port, (
            b"POST /playbooks/ref/mcp HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nAccept: " + ACCEPT.encode() +
            b"\r\nx-api-key: " + instance.owner.key.encode() +
            b"\r\nMCP-Protocol-Version: 2026-07-28\r\nMcp-Method: subscriptions/listen"
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body))

    def wait_for(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 10.0
                 ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((m for m in self.messages() if wanted(m)), None)
            if found is not None:
                return found
            time.sleep(0.02)
        raise AssertionError(f"not received; got {self.messages()}")


def method_is(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda message: message.get("method") == name


def test_two_instances_without_affinity_and_listen_across_them(
        pair: tuple[Instance, Instance]) -> None:
    one, two = pair
    # Round robin without a session: any instance answers any request.
    for index in range(6):
        target = pair[index % 2]
        text = f"rr{index}"
        status, headers, body = target.post(
            "tools/call", {"name": "echo", "arguments": {"text": text}}, request_id=index)
        assert status == 200 and "mcp-session-id" not in headers
        assert body["result"]["content"][0]["text"] == text
    assert one.post("tools/list")[2] == two.post("tools/list")[2]

    stream = ListenStream(two, "sub-1", {"toolsListChanged": True, "promptsListChanged": True,
                                         "resourceSubscriptions": ["test://static"]})
    try:
        ack = stream.wait_for(lambda message: True)  # the first message
        assert ack["method"] == "notifications/subscriptions/acknowledged"
        assert ack["params"] == {
            "notifications": {"promptsListChanged": True, "toolsListChanged": True,
                              "resourceSubscriptions": ["test://static"]},
            "_meta": {"io.modelcontextprotocol/subscriptionId": "sub-1"}}
        head = stream.data.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 200") and b"content-type: text/event-stream" in head
        # Edits through the API of the OTHER instance reach this stream.
        assert call(one.daemon, "POST", "/api/v1/playbooks/ref/prompts",
                    {"name": "second", "body": "b"}, key=one.owner.key)[0] == 201
        prompts = stream.wait_for(method_is("notifications/prompts/list_changed"))
        assert prompts["params"]["_meta"] == {"io.modelcontextprotocol/subscriptionId": "sub-1"}
        assert call(one.daemon, "PATCH", "/api/v1/playbooks/ref/servers/reference",
                    {"prefix": "ref_"}, key=one.owner.key)[0] == 200
        tools = stream.wait_for(method_is("notifications/tools/list_changed"))
        assert tools["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "sub-1"
        assert not any(m.get("method") == "notifications/resources/list_changed"
                       for m in stream.messages())  # not asked for
        names = [t["name"] for t in two.post("tools/list")[2]["result"]["tools"]]
        assert names[0] == "ref_echo"

        # The SDK's own listen() against this instance, fed by an edit on the other one.
        async def sdk_listen() -> Any:
            async with Client(two.url(), mode="auto") as client, \
                    client.listen(prompts_list_changed=True) as subscription:
                await asyncio.to_thread(call, one.daemon, "POST", "/api/v1/playbooks/ref/prompts",
                                        {"name": "third", "body": "b"}, key=one.owner.key)
                async for event in subscription:
                    return event, subscription.honored

        event, honored = run(sdk_listen())
        assert type(event).__name__ == "PromptsListChanged" and honored.prompts_list_changed

        # Deleting the playbook ends the stream gracefully: the listen request's result.
        assert call(one.daemon, "DELETE", "/api/v1/playbooks/ref", key=one.owner.key)[0] == 204
        final = stream.wait_for(lambda message: message.get("id") == "sub-1")
        assert final["result"]["resultType"] == "complete"
        assert final["result"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "sub-1"
        deadline = time.monotonic() + 5
        while not stream.ended and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stream.ended or stream.data.endswith(b"0\r\n\r\n")
    finally:
        stream.close()


# --- pure functions -----------------------------------------------------------------------


def test_constants_agree_with_the_sdk_types() -> None:
    import mcp_types
    from mcp.shared import inbound
    from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

    from director.mcp import protocol

    assert protocol.MODERN_VERSIONS == MODERN_PROTOCOL_VERSIONS
    assert tuple(reversed(HANDSHAKE_PROTOCOL_VERSIONS)) == protocol.LEGACY_VERSIONS  # newest first
    assert set(modern_envelope.SUPPORTED_VERSIONS) == {*MODERN_PROTOCOL_VERSIONS,
                                              *HANDSHAKE_PROTOCOL_VERSIONS}
    assert protocol.PROTOCOL_VERSION_META == mcp_types.PROTOCOL_VERSION_META_KEY
    assert protocol.CLIENT_CAPABILITIES_META == mcp_types.CLIENT_CAPABILITIES_META_KEY
    assert protocol.CLIENT_INFO_META == mcp_types.CLIENT_INFO_META_KEY
    assert protocol.LOG_LEVEL_META == mcp_types.LOG_LEVEL_META_KEY
    assert protocol.SERVER_INFO_META == mcp_types.SERVER_INFO_META_KEY
    assert (protocol.HEADER_MISMATCH, protocol.UNSUPPORTED_PROTOCOL_VERSION,
            protocol.MISSING_REQUIRED_CLIENT_CAPABILITY) == \
        (mcp_types.HEADER_MISMATCH, mcp_types.UNSUPPORTED_PROTOCOL_VERSION,
         mcp_types.MISSING_REQUIRED_CLIENT_CAPABILITY)
    assert (protocol.PARSE_ERROR, protocol.INVALID_REQUEST, protocol.METHOD_NOT_FOUND,
            protocol.INVALID_PARAMS, protocol.INTERNAL_ERROR) == \
        (mcp_types.PARSE_ERROR, mcp_types.INVALID_REQUEST, mcp_types.METHOD_NOT_FOUND,
         mcp_types.INVALID_PARAMS, mcp_types.INTERNAL_ERROR)
    assert dict(inbound.ERROR_CODE_HTTP_STATUS) == modern_envelope.HTTP_STATUS
    assert dict(inbound.NAME_BEARING_METHODS) == modern_envelope.NAME_BEARING_METHODS
    assert inbound.MCP_PARAM_HEADER_PREFIX.lower() == headers.PARAM_HEADER_PREFIX
    assert modern_envelope.CACHEABLE_METHODS == mcp_types.methods.CACHEABLE_METHODS
    assert {m for m, v in mcp_types.methods.CLIENT_REQUESTS if v == VERSION} == modern_envelope.METHODS
    assert tuple(mcp_types.LoggingLevel.__args__) == modern_envelope.LOG_LEVELS  # type: ignore[attr-defined]


def test_mcp_param_headers_agree_with_the_sdk() -> None:
    from mcp.shared import inbound

    schema = {"type": "object", "properties": {
        "region": {"type": "string", "x-mcp-header": "Region"},
        "count": {"type": "integer", "x-mcp-header": "Count"},
        "dry": {"type": "boolean", "x-mcp-header": "Dry"},
        "nested": {"type": "object", "properties": {
            "id": {"type": "string", "x-mcp-header": "Nested-Id"}}},
        "plain": {"type": "string"}}}
    invalid = {"type": "object", "properties": {"x": {"type": "number", "x-mcp-header": "X"}}}
    cases: list[tuple[Any, dict[str, Any], dict[str, str]]] = [
        (schema, {"region": "eu", "count": 3, "dry": True, "nested": {"id": "é"}},
         {"mcp-param-region": "eu", "mcp-param-count": "3.0", "mcp-param-dry": "true",
          "mcp-param-nested-id": inbound.encode_header_value("é")}),
        (schema, {"region": "eu"}, {"mcp-param-region": "us"}),
        (schema, {"region": "eu"}, {}),
        (schema, {}, {"mcp-param-region": "eu"}),
        (schema, {"count": 3}, {"mcp-param-count": "3.5"}),
        (schema, {"region": "x"}, {"mcp-param-region": "=?base64?!!?="}),
        (schema, {"plain": "p"}, {"mcp-param-plain": "q"}),
        (invalid, {"x": 1.5}, {}),
    ]
    for tool_schema, arguments, sent in cases:
        ours = headers.param_header_mismatch(tool_schema, arguments,
                                             {k: [v] for k, v in sent.items()})
        theirs = inbound.validate_mcp_param_headers(tool_schema, arguments, sent)
        assert (ours is None) == (theirs is None), (arguments, headers, ours, theirs)


def test_the_headers_the_gateway_sends_upstream_agree_with_the_sdk_client() -> None:
    from mcp.shared import inbound

    for value in ("eu", " padded", "é", "a\tb", "=?base64?ZXU=?=", "", "x" * 300):
        assert headers.encode_header_value(value) == inbound.encode_header_value(value), value
    schema = {"type": "object", "properties": {
        "region": {"type": "string", "x-mcp-header": "Region"},
        "count": {"type": "integer", "x-mcp-header": "Count"},
        "dry": {"type": "boolean", "x-mcp-header": "Dry"},
        "nested": {"type": "object", "properties": {
            "id": {"type": "string", "x-mcp-header": "Nested-Id"}}}}}
    header_map = {path: token for path, token, _ in headers.header_annotations(schema) or ()}
    for arguments in ({"region": "eu", "count": 3, "dry": False, "nested": {"id": "é"}},
                      {"region": None, "nested": "not an object"}, {}):
        ours = headers.param_headers(schema, arguments)
        assert ours == inbound.mcp_param_headers(header_map, arguments), arguments
        # and what the gateway sends, its own check accepts
        assert headers.param_header_mismatch(
            schema, arguments, {k.lower(): [v] for k, v in ours.items()}) is None


def test_an_upstreams_discover_answer_that_lies_is_not_taken_for_the_modern_era() -> None:
    from director.mcp.upstream.envelope import NotModern, discovered, listened

    for answer in (None, [], {}, {"supportedVersions": VERSION},
                   {"supportedVersions": ["2025-11-25"]}, {"supportedVersions": [None]}):
        with pytest.raises(NotModern):
            discovered("up", answer)
    # Odd fields around a valid version: sane defaults, nothing taken from the wrong types.
    assert discovered("up", {"supportedVersions": [VERSION], "capabilities": "all",
                             "_meta": 3, "instructions": 7}) == {
        "protocolVersion": VERSION, "capabilities": {},
        "serverInfo": {"name": "up", "version": ""}}
    # Listen notifications: the upstream's subscription id is dropped, odd params pass as
    # they are, the acknowledgement stays with the connection that asked.
    stamped = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed", "params": {
        "_meta": {"io.modelcontextprotocol/subscriptionId": 4, "other": 1}}}
    assert listened(stamped) == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed",
                                 "params": {"_meta": {"other": 1}}}
    odd = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed", "params": [1]}
    assert listened(odd) == odd
    assert listened({"jsonrpc": "2.0",
                     "method": "notifications/subscriptions/acknowledged"}) is None
