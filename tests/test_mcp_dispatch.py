"""``director.web.mcp_dispatch``: the MCP endpoints' hand-written dispatch keeps what Klein gave
the clients — 404 and 405 (with ``Allow``) in the MCP error shape, a handler cancelled when its
client goes away, nothing written to a request that is already over — for handlers that answer
at once and for those that wait."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from director.mcp.protocol import SERVER_ERROR
from director.web.errors import ApiError
from director.web.mcp_dispatch import McpResource
from director.web.mcp_errors import McpHttpError


class Handlers:
    """Route handlers that record their calls and answer when the test says."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, str]] = []
        self.pending: defer.Deferred[Any] | None = None
        self.answer: Any = b"answered"
        self.cancelled = False

    async def immediate(self, request: Any, playbook_id: str) -> Any:
        self.seen.append((request.method, playbook_id))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    async def waiting(self, request: Any, playbook_id: str) -> Any:
        self.seen.append((request.method, playbook_id))
        self.pending = defer.Deferred()
        try:
            return await self.pending
        except defer.CancelledError:
            self.cancelled = True
            raise


def serve(path: bytes, method: bytes = b"POST",
          handlers: Handlers | None = None) -> tuple[DummyRequest, Any, Handlers]:
    handlers = handlers or Handlers()
    resource = McpResource({b"mcp": {b"POST": handlers.waiting, b"GET": handlers.immediate,
                                     b"DELETE": handlers.immediate},
                            b"message": {b"POST": handlers.immediate}})
    request = DummyRequest(path.split(b"/"))
    request.method, request.path = method, b"/playbooks/" + path
    return request, resource.render(request), handlers


def error_of(body: Any) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    return error


@pytest.mark.parametrize("path", [b"pb/nope", b"pb/mcp/", b"pb", b"pb/mcp/extra", b"/mcp",
                                  b"a/b/mcp"])
def test_a_path_that_is_no_endpoint_is_404_in_the_mcp_error_shape(path: bytes) -> None:
    request, body, handlers = serve(path)
    assert request.responseCode == 404
    error = error_of(body)
    assert error["code"] == SERVER_ERROR and error["message"].startswith("no such MCP endpoint")
    assert handlers.seen == []


def test_a_segment_holding_a_slash_is_no_playbook_id() -> None:
    handlers = Handlers()
    request = DummyRequest([b"a/b", b"mcp"])  # as Twisted splits, then unquotes, a%2Fb/mcp
    request.method, request.path = b"POST", b"/playbooks/a%2Fb/mcp"
    McpResource({b"mcp": {b"POST": handlers.immediate}}).render(request)
    assert request.responseCode == 404 and handlers.seen == []


@pytest.mark.parametrize(("path", "method", "allowed"), [
    (b"pb/mcp", b"PUT", "DELETE, GET, HEAD, POST"),
    (b"pb/message", b"GET", "POST"),
])
def test_a_method_the_endpoint_does_not_take_is_405_with_allow(path: bytes, method: bytes,
                                                                allowed: str) -> None:
    request, body, handlers = serve(path, method)
    assert request.responseCode == 405
    assert request.responseHeaders.getRawHeaders(b"allow") == [allowed.encode()]
    assert "method not allowed here" in error_of(body)["message"] and handlers.seen == []


def test_head_is_served_by_the_get_handler_and_the_path_moves_to_prepath() -> None:
    request, body, handlers = serve(b"pb-1/mcp", b"HEAD")
    assert (body, handlers.seen) == (b"answered", [(b"HEAD", "pb-1")])
    assert (request.prepath, request.postpath) == ([b"pb-1", b"mcp"], [])
    assert request.route == "/playbooks/{playbook_id}/mcp"  # what metrics and spans say


def test_an_immediate_refusal_is_answered_in_the_same_render() -> None:
    handlers = Handlers()
    handlers.answer = McpHttpError(409, SERVER_ERROR, "Conflict", headers={"X-Why": "test"})
    request, body, _ = serve(b"pb/mcp", b"GET", handlers)
    assert request.responseCode == 409 and error_of(body)["message"] == "Conflict"
    assert request.responseHeaders.getRawHeaders(b"x-why") == [b"test"]
    handlers.answer = ApiError("slow down", status=429, code="rate_limited")
    request, body, _ = serve(b"pb/mcp", b"DELETE", handlers)
    assert request.responseCode == 429
    assert error_of(body)["data"]["code"] == "rate_limited"


def test_an_unexpected_error_is_a_logged_500_that_names_nothing_inside() -> None:
    handlers = Handlers()
    handlers.answer = KeyError("secret detail")
    request, body, _ = serve(b"pb/mcp", b"GET", handlers)
    assert request.responseCode == 500
    assert error_of(body)["message"] == "internal error" and b"secret" not in body


def test_a_waiting_handler_answers_when_it_is_done() -> None:
    request, body, handlers = serve(b"pb/mcp")
    assert body is NOT_DONE_YET and request.finished == 0
    assert handlers.pending is not None
    handlers.pending.callback(b'{"ok": true}')
    assert request.written == [b'{"ok": true}'] and request.finished == 1


def test_a_waiting_handler_that_fails_is_answered_with_its_error() -> None:
    request, _, handlers = serve(b"pb/mcp")
    assert handlers.pending is not None
    handlers.pending.errback(McpHttpError(404, SERVER_ERROR, "session not found"))
    assert request.responseCode == 404 and request.finished == 1
    assert error_of(b"".join(request.written))["message"] == "session not found"


def test_a_client_going_away_cancels_the_handler_and_nothing_is_written() -> None:
    request, _, handlers = serve(b"pb/mcp")
    assert handlers.pending is not None and not handlers.cancelled
    request.processingFailed(Failure(ConnectionError("gone")))
    assert handlers.cancelled
    assert request.written == [] and request.finished == 0


def test_a_handler_that_finished_the_request_itself_gets_nothing_more_written() -> None:
    handlers = Handlers()
    request, _, _ = serve(b"pb/mcp", b"POST", handlers)
    assert handlers.pending is not None
    request.write(b"streamed")
    request.finish()
    handlers.pending.callback(None)
    assert request.written == [b"streamed"] and request.finished == 1
