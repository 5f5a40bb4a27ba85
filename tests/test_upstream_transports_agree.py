"""The same server behaviour (tests/fixtures/scripted_server.py) over every upstream transport:
stdio, Streamable HTTP, HTTP+SSE and the stateless era. Where the transports used to differ
(each had its own JSON-RPC bookkeeping before ``upstream/peer.py``), they now must not."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web import resource, server

from director.mcp import jsonrpc
from director.mcp.protocol import INVALID_PARAMS, METHOD_NOT_FOUND
from director.mcp.upstream.account import stdio_account
from director.mcp.upstream.base import UpstreamRequestError
from director.mcp.upstream.connect import CheckedEndpoints
from director.mcp.upstream.http_plumbing import new_pool
from director.mcp.upstream.legacy_sse import LegacySseUpstream
from director.mcp.upstream.modern import ModernFirstHttpUpstream
from director.mcp.upstream.stdio import StdioUpstream
from director.mcp.upstream.streamable import StreamableHttpUpstream
from tests.fixtures.scripted_server import replies

SCRIPT = Path(__file__).parent / "fixtures" / "scripted_server.py"
TRANSPORTS = ("stdio", "streamable-http", "sse", "modern")


def sse_event(message: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + json.dumps(message).encode() + b"\n\n"


def scripted(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The script, but for the stateless era's change stream, which it does not offer (the
    session would otherwise keep re-opening it)."""
    if message.get("method") == "subscriptions/listen":
        return [jsonrpc.error(message["id"], METHOD_NOT_FOUND, "no change stream")]
    return replies(message)


class StreamableScript(resource.Resource):
    """Streamable HTTP (and the stateless era): each request's replies as its SSE stream."""

    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        answers = scripted(json.loads(request.content.getvalue()))
        if not answers:
            request.setResponseCode(202)
            return b""
        request.setHeader(b"content-type", b"text/event-stream")
        return b"".join(sse_event(answer) for answer in answers)

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(405)  # no stream of its own
        return b""


class LegacyScript(resource.Resource):
    """HTTP+SSE: the endpoint on the GET stream, every reply on that same stream."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.stream: Any = None

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"event: endpoint\ndata: /messages\n\n")
        self.stream = request
        request.notifyFinish().addBoth(lambda _: setattr(self, "stream", None))
        return server.NOT_DONE_YET

    def render_POST(self, request: Any) -> bytes:
        for answer in scripted(json.loads(request.content.getvalue())):
            self.stream.write(sse_event(answer))
        request.setResponseCode(202)
        return b""


@asynccontextmanager
async def started(transport: str) -> AsyncIterator[Any]:
    """A started session with the scripted server over ``transport``, closed afterwards."""
    if transport == "stdio":
        session: Any = StdioUpstream("scripted", sys.executable, [str(SCRIPT)], {}, None,
                                     reactor, account=stdio_account("nobody"))
        try:
            await session.start()
            yield session
        finally:
            await session.close()
        return
    site = server.Site(LegacyScript() if transport == "sse" else StreamableScript())
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    pool = new_pool(reactor, endpoints=CheckedEndpoints(reactor, allow_insecure=True))
    kind = {"streamable-http": StreamableHttpUpstream, "sse": LegacySseUpstream,
            "modern": ModernFirstHttpUpstream}[transport]
    session = kind("scripted", f"http://127.0.0.1:{port.getHost().port}/mcp", {}, reactor, pool)
    try:
        await session.start()
        assert session.transport_name == ("sse" if transport == "sse" else "streamable-http")
        assert getattr(session, "era", "legacy") == ("modern" if transport == "modern"
                                                     else "legacy")
        yield session
    finally:
        await session.close()
        await pool.closeCachedConnections()
        await port.stopListening()


def text_of(result: dict[str, Any]) -> str:
    return str(result["content"][0]["text"])


async def call(session: Any, tool: str, arguments: dict[str, Any] | None = None,
               **options: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"name": tool, "arguments": arguments or {}}
    if "token" in options:
        params["_meta"] = {"progressToken": options.pop("token")}
    result: dict[str, Any] = await session.request("tools/call", params, timeout=10, **options)
    return result


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_an_answer_whose_id_is_a_digit_string_is_accepted(transport: str) -> None:
    async with started(transport) as session:
        assert text_of(await call(session, "string_id")) == "string id"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_progress_tokens_go_up_in_one_form(transport: str) -> None:
    async with started(transport) as session:
        progress: list[dict[str, Any]] = []
        seen = json.loads(text_of(await call(session, "progress", token="caller's",
                                             on_progress=progress.append)))
        # The token the server saw is the request's own id, an integer, over every transport.
        assert isinstance(seen["token"], int) and seen["token"] == seen["id"]
        assert [(each["progressToken"], each["progress"]) for each in progress] == \
            [("caller's", 1)]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_a_failing_hook_breaks_neither_the_call_nor_the_transport(
        transport: str, logged_failures: list[str]) -> None:
    async with started(transport) as session:
        def broken(_: Any) -> None:
            raise RuntimeError("bug in the gateway")

        session.on_notification = broken
        for _ in range(2):
            seen = json.loads(text_of(await call(session, "progress", token="t",
                                                 on_progress=broken)))
            assert seen["token"] == seen["id"]
        assert logged_failures == ["[scripted] on_progress failed",
                                   "[scripted] on_notification failed"] * 2


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_a_cancellation_of_an_answered_server_request_is_swallowed(
        transport: str) -> None:
    async with started(transport) as session:
        asked: list[tuple[str, Any]] = []
        notified: list[dict[str, Any]] = []

        async def answer(method: str, params: dict[str, Any]) -> dict[str, Any]:
            asked.append((method, params))
            return {}

        session.on_request = answer
        session.on_notification = notified.append
        assert text_of(await call(session, "late_cancel")) == "after the cancellation"
        assert asked == [("ping", {})]
        assert notified == []  # the cancellation names nothing pending: nobody hears of it


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_an_error_answer_fails_its_call_and_the_next_one_goes_through(
        transport: str) -> None:
    """Over HTTP the error ends the request while its POST stream is being read: that stream
    must end by itself, not be dropped back into the connection pool half closed."""
    async with started(transport) as session:
        for _ in range(2):
            with pytest.raises(UpstreamRequestError) as refused:
                await call(session, "refuse", {"code": INVALID_PARAMS})
            assert refused.value.error == {"code": INVALID_PARAMS, "message": "refused"}
            assert text_of(await call(session, "string_id")) == "string id"
