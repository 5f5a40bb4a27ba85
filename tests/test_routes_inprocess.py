"""The MCP routes in process: ``treq.testing.StubTreq`` drives ``McpRoutes``' Klein resource over
the real engine on ``task.Clock``, with a fake upstream (tests/test_sessions_inprocess.py's
harness) and a fake authenticator; no daemon, no socket, no sleeping.

What needs a real process stays in tests/test_mcp_gateway.py (real clients, real servers); here
are the HTTP-level rules whose timing or input is awkward to reach from outside: a session
served over HTTP until exactly its idle time, a call that waits for its upstream as long as
the test says, and every refused input with its status and JSON-RPC error.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.python.failure import Failure

from director.accounts import store
from director.mcp.jsonrpc import INVALID_REQUEST, PARSE_ERROR
from director.mcp.protocol import LATEST_LEGACY_VERSION, SERVER_ERROR
from director.web.auth import Principal
from director.web.errors import Unauthorized
from director.web.mcp_routes import McpRoutes
from tests.test_sessions_inprocess import IDLE_SECONDS, NOW, Harness

JSON = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


class Authenticator:
    """Each ``X-API-Key`` is a key of the harness playbook's owner; none is refused."""

    def __init__(self, harness: Harness) -> None:
        self.settings = harness.engine.settings
        self.cache = type("Cache", (), {"loaded": True})()
        self.user = store.User(harness.playbook.user_id, "owner@example.com", "active", NOW)
        self.keys: dict[bytes, store.ApiKey] = {}

    async def authenticate(self, request: Any, **_: object) -> Principal:
        presented = request.getHeader(b"x-api-key")
        if presented is None:
            raise Unauthorized("no credentials")
        key = self.keys.setdefault(presented, store.ApiKey(
            uuid.uuid4(), self.user.id, "k", presented.decode()[:8], NOW))
        return Principal(self.user, key=key)


class Gateway:
    """The routes, and a client of them holding one API key."""

    def __init__(self) -> None:
        self.harness = Harness()
        playbooks = self.harness.playbooks
        playbooks.loaded = True  # type: ignore[attr-defined]
        playbooks.get = lambda user_id, playbook_id: next(  # type: ignore[attr-defined]
            (p for p in playbooks.playbooks.values()
             if p.user_id == user_id and p.id == playbook_id), None)
        routes = McpRoutes(self.harness.engine, Authenticator(self.harness),  # type: ignore[arg-type]
                           playbooks)  # type: ignore[arg-type]
        self.client = StubTreq(routes.resource())
        self.url = f"http://director.test/{self.harness.playbook.id}/mcp"

    def post(self, body: Any, key: str = "key-one", session: str | None = None,
             headers: dict[str, str] | None = None) -> defer.Deferred[Any]:
        sent = dict(JSON, **{"x-api-key": key}, **(headers or {}))
        if session is not None:
            sent["mcp-session-id"] = session
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(self.url, data=data, headers=sent)

    def answer(self, pending: defer.Deferred[Any]) -> tuple[int, Any, Any]:
        """The response to a request whose handling has finished (status, body, headers)."""
        self.client.flush()
        response = self.result(pending)
        body = self.result(response.content())
        return response.code, json.loads(body) if body else None, response.headers

    @staticmethod
    def outcome(deferred: defer.Deferred[Any]) -> list[Any]:
        """What ``deferred`` has come to (a one-item list), or an empty list while it waits."""
        outcome: list[Any] = []

        def seen(value: Any) -> Any:
            outcome.append(value)
            return value

        deferred.addBoth(seen)
        return outcome

    def finished(self, deferred: defer.Deferred[Any]) -> bool:
        return bool(self.outcome(deferred))

    def result(self, deferred: defer.Deferred[Any]) -> Any:
        outcome = self.outcome(deferred)
        assert outcome, "still waiting"
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]

    def open_session(self, key: str = "key-one") -> str:
        status, body, headers = self.answer(self.post(
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": LATEST_LEGACY_VERSION, "capabilities": {},
                "clientInfo": {"name": "in-process", "version": "1"}}}, key=key))
        assert status == 200, body
        assert body["result"]["protocolVersion"] == LATEST_LEGACY_VERSION
        session = headers.getRawHeaders(b"mcp-session-id")[0].decode()
        status, _, _ = self.answer(self.post(
            {"jsonrpc": "2.0", "method": "notifications/initialized"}, key=key, session=session))
        assert status == 202
        return session


def test_a_call_waits_for_its_upstream_and_the_session_lives_until_its_idle_time() -> None:
    gateway = Gateway()
    session = gateway.open_session()
    status, body, _ = gateway.answer(gateway.post(
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session=session))
    assert status == 200
    [tool] = body["result"]["tools"]
    calling = gateway.post({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                            "params": {"name": tool["name"], "arguments": {}}}, session=session)
    gateway.client.flush()
    assert not gateway.finished(calling)  # the upstream has not answered
    [upstream_call] = gateway.harness.upstream.calls
    upstream_call.callback({"content": [{"type": "text", "text": "done"}]})
    status, body, _ = gateway.answer(calling)
    assert status == 200 and body == {"jsonrpc": "2.0", "id": 3, "result": {
        "content": [{"type": "text", "text": "done"}]}}
    gateway.harness.clock.advance(IDLE_SECONDS)  # idle exactly that long at the check: kept
    status, _, _ = gateway.answer(gateway.post(
        {"jsonrpc": "2.0", "id": 4, "method": "ping"}, session=session))
    assert status == 200
    gateway.harness.clock.advance(IDLE_SECONDS * 1.5)
    status, body, _ = gateway.answer(gateway.post(
        {"jsonrpc": "2.0", "id": 5, "method": "ping"}, session=session))
    assert status == 404 and body["error"]["code"] == SERVER_ERROR
    assert "initialize again" in body["error"]["message"]


def test_a_session_answers_only_the_credential_that_opened_it() -> None:
    gateway = Gateway()
    session = gateway.open_session("key-one")
    status, body, _ = gateway.answer(gateway.post(
        {"jsonrpc": "2.0", "id": 2, "method": "ping"}, key="key-two", session=session))
    assert status == 404 and "session not found" in body["error"]["message"]
    status, body, _ = gateway.answer(gateway.post(
        {"jsonrpc": "2.0", "id": 3, "method": "ping"}, key="key-one", session=session))
    assert (status, body) == (200, {"jsonrpc": "2.0", "id": 3, "result": {}})


@pytest.mark.parametrize(("body", "headers", "status", "code", "words"), [
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"', {}, 400, PARSE_ERROR, "parse error"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}', {"content-type": "text/plain"}, 415,
     INVALID_REQUEST, "application/json"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}', {"accept": "text/html"}, 406,
     INVALID_REQUEST, "Not Acceptable"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}', {}, 400, INVALID_REQUEST,
     "Mcp-Session-Id header is required"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}', {"mcp-session-id": "nope"}, 404,
     SERVER_ERROR, "session not found"),
    (b'[1, 2]', {}, 400, INVALID_REQUEST, ""),
])
def test_a_refused_request_gets_its_status_and_error_and_changes_nothing(
        body: bytes, headers: dict[str, str], status: int, code: int, words: str) -> None:
    gateway = Gateway()
    before = dict(gateway.harness.engine.sessions)
    answered, error, _ = gateway.answer(gateway.post(body, headers=headers))
    assert answered == status, error
    assert error["error"]["code"] == code and words in error["error"]["message"]
    assert gateway.harness.engine.sessions == before


def test_an_unknown_playbook_is_404_and_no_credential_is_401() -> None:
    gateway = Gateway()
    gateway.url = "http://director.test/someone-elses/mcp"
    status, body, _ = gateway.answer(gateway.post({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
    assert status == 404 and body["error"]["message"] == "no playbook 'someone-elses'"
    anonymous = gateway.client.post(gateway.url, data=b"{}", headers=JSON)
    status, _, headers = gateway.answer(anonymous)
    assert status == 401 and headers.getRawHeaders(b"www-authenticate")
