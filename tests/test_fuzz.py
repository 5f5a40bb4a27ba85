"""No input gets a 5xx or hurts the daemon: a property-based fuzzer (``tests/fuzzing.py``) over
both eras' JSON-RPC, the legacy SSE transport and the HTTP edge, against one real daemon whose
playbook holds real stdio upstreams; then plain regression tests, one per bug it found.

Hypothesis profiles: ``director-fuzz-ci`` (the default: a few hundred examples per strategy,
derandomized so that CI replays the same inputs, no example database) and
``director-fuzz-long`` (``DIRECTOR_FUZZ_PROFILE=long``: thousands, drawn afresh each run). The
100,000-input run is ``python -m bench --only fuzz``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, note, settings
from twisted.internet import defer
from twisted.internet.task import Clock

from director.db import migrate
from director.mcp import jsonrpc
from director.mcp.modern.exchange import Exchange
from tests.accounts_helpers import call, eventually, sign_up
from tests.fuzzing import (
    CLIENT_CAPABILITIES_META,
    MODERN_VERSION,
    PROTOCOL_VERSION_META,
    STRATEGIES,
    Case,
    LogWatch,
    SseHolder,
    Target,
    check,
    open_session,
    parse_answer,
    send,
)
from tests.harness import Daemon, PostgresServer, base_environment, free_port

ECHO = str(Path(__file__).resolve().parent.parent / "bench" / "echo_server.py")
RAW = str(Path(__file__).resolve().parent / "fixtures" / "raw_server.py")
_QUIET = list(HealthCheck)  # slow examples and large data are the point here
settings.register_profile("director-fuzz-ci", max_examples=500, deadline=None,
                          derandomize=True, database=None, suppress_health_check=_QUIET)
settings.register_profile("director-fuzz-long", max_examples=5000, deadline=None,
                          suppress_health_check=_QUIET)
PROFILE = settings.get_profile(f"director-fuzz-{os.environ.get('DIRECTOR_FUZZ_PROFILE', 'ci')}")


@attrs.frozen
class Fuzzed:
    daemon: Daemon
    target: Target
    log: LogWatch
    holder: SseHolder

    def post(self, body: bytes | dict[str, Any], headers: dict[str, str] | None = None,
             path: str | None = None) -> tuple[int, Any]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, _, answer = self.target.request(
            "POST", path or f"/playbooks/{self.target.playbook}/mcp", raw,
            {**self.target.mcp_headers(), **(headers or {})})
        return status, parse_answer(answer) if answer.strip() not in (b"", b"Accepted") else None


def start_fuzzed_daemon(postgres: PostgresServer, database: str) -> tuple[Daemon, Target,
                                                                           SseHolder]:
    """A daemon whose playbook ``fz`` has the echo server twice (handshake-only, and speaking
    both eras under the prefix ``m_``), plus a playbook ``raw`` with the misbehaving fixture
    server; a live handshake-era session and a held legacy SSE stream."""
    url = postgres.url_for(database)
    migrate.upgrade(url)
    daemon = Daemon(base_environment(
        DATABASE_URL=url, PORT=str(free_port()), DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true",
        API_KEY_RATE_LIMIT_MAX_REQUESTS="100000000", MCP_MAX_SESSIONS_PER_USER="1000000",
        # (the per-user limit of issue 16's item 6, on its own branch)
        USER_RATE_LIMIT_MAX_REQUESTS="100000000"))
    daemon.wait_healthy()
    owner = sign_up(daemon, "fuzz@example.com")
    for name, servers in (("Fz", [
            {"name": "echo", "type": "stdio", "command": sys.executable, "args": [ECHO]},
            {"name": "modern", "type": "stdio", "command": sys.executable,
             "args": [ECHO, "--eras", "both"], "prefix": "m_"}]),
            ("Raw", [{"name": "raw", "type": "stdio", "command": sys.executable,
                      "args": [RAW]}])):
        assert call(daemon, "POST", "/api/v1/playbooks", {"name": name}, key=owner.key)[0] == 201
        for server in servers:
            status, _, body = call(daemon, "POST", f"/api/v1/playbooks/{name.lower()}/servers",
                                   server, key=owner.key)
            assert status == 201, body
    holder = SseHolder(daemon.port, "fz", owner.key)
    target = Target(daemon.port, owner.key, "fz", open_session(daemon.port, owner.key),
                    holder.session)
    target.still_serves()
    return daemon, target, holder


@pytest.fixture(scope="module")
def fuzzed(postgres: PostgresServer) -> Iterator[Fuzzed]:
    database = postgres.create_database()
    daemon, target, holder = start_fuzzed_daemon(postgres, database)
    yield Fuzzed(daemon, target, LogWatch(daemon.log_path), holder)
    holder.close()
    daemon.stop()
    postgres.drop_database(database)


# --- the fuzzer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_no_input_gets_a_5xx_or_hurts_the_daemon(fuzzed: Fuzzed, strategy: str) -> None:
    @given(case=STRATEGIES[strategy](fuzzed.target))
    @settings(PROFILE)
    def answered_well(case: Case) -> None:
        note(repr(case))
        check(case, send(fuzzed.target.port, case))
        problems = fuzzed.log.problems()
        assert not problems, "\n".join(problems)

    answered_well()
    fuzzed.target.still_serves()
    assert fuzzed.log.problems() == []
    assert fuzzed.holder.problems == []
    assert fuzzed.daemon.process.poll() is None


# --- what it found, one plain test each -----------------------------------------------------------


def modern(message: dict[str, Any], name: str | None = None) -> tuple[dict[str, Any],
                                                                       dict[str, str]]:
    """``message`` as a correct 2026-07-28 client sends it: envelope and routing headers."""
    params = dict(message.get("params") or {})
    params["_meta"] = {PROTOCOL_VERSION_META: MODERN_VERSION, CLIENT_CAPABILITIES_META: {}}
    headers = {"mcp-protocol-version": MODERN_VERSION, "mcp-method": message["method"]}
    if name is not None:
        headers["mcp-name"] = name
    return dict(message, params=params), headers


LONE_SURROGATES = [
    b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}',
    b'{"jsonrpc":"2.0","id":2,"method":"tools/\\udfff"}',
    b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"\\ud800"}}',
    b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"echo",'
    b'"arguments":{"text":"cut \\ud83d"}}}',
    b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"echo",'
    b'"arguments":{"\\udc00":"key"}}}',
    # the same surrogate as raw (CESU-8) bytes instead of an escape: not UTF-8
    b'{"jsonrpc":"2.0","id":6,"method":"ping","params":{"x":"\xed\xa0\x80"}}',
]


@pytest.mark.parametrize("body", LONE_SURROGATES)
def test_a_lone_surrogate_is_refused_with_400_in_every_era_and_transport(
        fuzzed: Fuzzed, body: bytes) -> None:
    session = {"mcp-session-id": fuzzed.target.session}
    version = {"mcp-protocol-version": MODERN_VERSION, "mcp-method": "ping"}
    sse = f"/playbooks/fz/message?sessionId={fuzzed.target.sse_session()}"
    for headers, path in ((session, None), (version, None), ({}, sse)):
        status, answer = fuzzed.post(body, headers, path)
        assert status == 400, (headers, answer)
        assert answer["id"] is None and answer["error"]["code"] == -32700, answer
        assert "surrogate" in answer["error"]["message"] or \
            "UTF-8" in answer["error"]["message"], answer
    assert fuzzed.log.problems() == []


def test_a_lone_surrogate_never_reaches_the_upstream_nor_leaves_a_call_pending(
        fuzzed: Fuzzed) -> None:
    """It used to reach the stdio write, fail there, and leave the call waiting for its
    timeout; now it is refused at once and the upstream goes on answering."""
    status, answer = fuzzed.post(LONE_SURROGATES[3], {"mcp-session-id": fuzzed.target.session})
    assert status == 400 and answer["error"]["code"] == -32700
    status, answer = fuzzed.post({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"text": "cut 😀"}}},
        {"mcp-session-id": fuzzed.target.session})
    assert status == 200 and answer["result"]["content"][0]["text"] == "cut 😀", answer


@pytest.mark.parametrize("request_id", [{}, {"a": 1}, [], [1], None, True, 1.5])
def test_cancelled_with_a_request_id_that_cannot_be_one_is_a_400(
        fuzzed: Fuzzed, request_id: Any) -> None:
    cancelled = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                 "params": {"requestId": request_id}}
    sse = f"/playbooks/fz/message?sessionId={fuzzed.target.sse_session()}"
    for headers, path in (({"mcp-session-id": fuzzed.target.session}, None), ({}, sse)):
        status, answer = fuzzed.post(cancelled, headers, path)
        if request_id is None:  # requestId is optional: nothing to cancel
            assert status == 202, answer
            continue
        assert status == 400, answer
        assert answer["error"] == {
            "code": -32602,
            "message": "notifications/cancelled: requestId must be a string or an integer"}
    # The stateless era has no client notifications: acknowledged and dropped, whatever they say.
    message, headers = modern(cancelled)
    assert fuzzed.post(message, headers)[0] == 202
    assert fuzzed.log.problems() == []


@pytest.mark.parametrize("request_id", ["call-1", 77])
def test_cancelled_with_a_real_request_id_is_accepted(fuzzed: Fuzzed, request_id: Any) -> None:
    status, _ = fuzzed.post({"jsonrpc": "2.0", "method": "notifications/cancelled",
                             "params": {"requestId": request_id, "reason": "changed my mind"}},
                            {"mcp-session-id": fuzzed.target.session})
    assert status == 202


@pytest.mark.parametrize("body, reason", [
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo",'
     b'"arguments":{"text":NaN}}}', "NaN is not a JSON number"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo",'
     b'"arguments":{"text":-Infinity}}}', "-Infinity is not a JSON number"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo",'
     b'"arguments":{"text":1e999}}}', "the number 1e999 is out of range"),
    (b"[" * 129 + b"]" * 129, "nested more than 128 levels deep"),
    (b"[" * 100_000 + b"]" * 100_000, "nested more than 128 levels deep"),
    ('{"jsonrpc":"2.0","id":1,"method":"ping"}'.encode("utf-16"), "not UTF-8"),
])
def test_json_that_is_not_interoperable_is_refused_with_400(
        fuzzed: Fuzzed, body: bytes, reason: str) -> None:
    """Python reads NaN and 1e999 (and wrote them back to the upstream as NaN and Infinity,
    which a strict upstream cannot parse)."""
    status, answer = fuzzed.post(body, {"mcp-session-id": fuzzed.target.session})
    assert status == 400 and answer["error"]["code"] == -32700, answer
    assert reason in answer["error"]["message"], answer


@pytest.mark.parametrize("error", [{"code": "abc", "message": "x"}, {"code": 1.5, "message": "x"},
                                   {"code": 1, "message": 2}, {"code": True, "message": "x"},
                                   "boom", [], None])
def test_a_client_error_response_of_the_wrong_shape_is_a_400(fuzzed: Fuzzed, error: Any) -> None:
    status, answer = fuzzed.post({"jsonrpc": "2.0", "id": "director-1", "error": error},
                                 {"mcp-session-id": fuzzed.target.session})
    assert status == 400, answer
    assert answer["error"]["code"] == -32600, answer


@pytest.mark.parametrize("era", ["handshake", "modern"])
def test_an_upstreams_text_that_is_not_valid_unicode_is_repaired_not_dropped(
        fuzzed: Fuzzed, era: str) -> None:
    """A JavaScript server that cuts a string inside an emoji sends a lone surrogate; a Python
    one may send NaN. The client gets the answer, with U+FFFD and null in their places, at
    once (the whole line used to be dropped as unparseable, the call left to time out)."""
    message = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
               "params": {"name": "unpaired", "arguments": {}}}
    path = "/playbooks/raw/mcp"
    if era == "handshake":
        headers = {"mcp-session-id": open_session(fuzzed.target.port, fuzzed.target.key, "raw")}
    else:
        message, headers = modern(message, "unpaired")
    status, answer = fuzzed.post(message, headers, path)
    assert status == 200, answer
    assert answer["result"]["content"] == [{"type": "text", "text": "cut \ufffd"}]
    assert answer["result"]["structuredContent"] == {"ratio": None, "big": None}


@pytest.mark.parametrize("body", [b'{"name":"\\ud800"}', b'{"name":NaN}',
                                  b'{"name":"x","description":"\\udfff"}'])
def test_the_rest_api_refuses_what_postgresql_could_not_store(fuzzed: Fuzzed,
                                                              body: bytes) -> None:
    status, _, answer = call(fuzzed.daemon, "POST", "/api/v1/playbooks", body,
                             key=fuzzed.target.key)
    assert status == 400 and answer["error"]["code"] == "malformed_json", answer
    assert fuzzed.log.problems() == []


def test_a_cursor_holding_a_lone_surrogate_is_a_400(fuzzed: Fuzzed) -> None:
    cursor = "WyJcdWQ4MDAiXQ"  # base64 of ["\ud800"]
    status, _, answer = call(fuzzed.daemon, "GET", f"/api/v1/playbooks?cursor={cursor}",
                             key=fuzzed.target.key)
    assert status == 400 and answer["error"]["details"]["fields"] == {
        "cursor": "is not a cursor this API returned"}, answer



@pytest.mark.parametrize("path", ["/playbooks//mcp", "/api//v1/me", "/api/v1//playbooks"])
def test_a_path_with_a_double_slash_is_a_404_not_a_500(fuzzed: Fuzzed, path: str) -> None:
    """Routing's redirect (``//`` → ``/``) used to reach the catch-all handler: 500. No route
    is reached that way, and a Location would be built from the Host header: 404."""
    status, headers, answer = call(fuzzed.daemon, "GET", path, key=fuzzed.target.key)
    assert status == 404, answer
    assert "location" not in headers
    assert answer["error"]["code"] == "not_found"
    assert fuzzed.log.problems() == []


@pytest.mark.parametrize("host", [b"x\xf0\xb5\xb2\xbf\xc2\x9a", b"\xed\xa0\x80", b"a" * 64])
def test_a_host_header_that_is_no_host_name_is_a_400_on_the_health_check(
        fuzzed: Fuzzed, host: bytes) -> None:
    """``/api/health`` skips the Host check (load balancers probe by address), and the router
    then failed to bind to a Host it could not encode: a 500 for IDNA, a traceback at level 60
    for UTF-8."""
    answer = send(fuzzed.target.port, Case("GET", "/api/health", (("host", host),), None))
    assert answer.status == 400, answer
    assert json.loads(answer.body)["error"]["code"] == "bad_host"
    assert fuzzed.log.problems() == []


def test_a_last_event_id_with_a_digit_int_cannot_read_resumes_nothing(fuzzed: Fuzzed) -> None:
    """``"²".isdigit()`` is true and ``int("²")`` fails: a GET resuming from such an id was a
    500; now it is an id that is not ours (nothing replayed)."""
    session = open_session(fuzzed.target.port, fuzzed.target.key)
    resume = (("x-api-key", fuzzed.target.key.encode()), ("accept", b"text/event-stream"),
              ("mcp-session-id", session.encode()),
              ("last-event-id", session[:8].encode() + b"-\xb2"))
    answer = send(fuzzed.target.port, Case("GET", "/playbooks/fz/mcp", resume, None))
    assert answer.status == 200, answer
    assert answer.headers["content-type"] == "text/event-stream"
    assert fuzzed.log.problems() == []


def test_a_modern_call_refused_at_once_leaves_no_exchange_behind() -> None:
    """Found by the long run (the daemon's RSS grew with every round of the same modern
    inputs): a tools/call refused before it awaited anything (a name that is not a string)
    ended before its Exchange was registered, whose end had unregistered nothing; the
    Exchange stayed in its context for good. It now registers itself first."""
    registry: dict[str, Exchange] = {}
    answered = defer.succeed(jsonrpc.error(1, jsonrpc.INVALID_PARAMS, "name must be a string"))
    refused = Exchange("tools/call", answered, Clock(), registry)
    assert refused.done and registry == {}
    pending: defer.Deferred[Any] = defer.Deferred()
    waiting = Exchange("tools/call", pending, Clock(), registry)
    assert registry == {waiting.state: waiting}
    waiting.asks["ask-1"] = ({"method": "roots/list"}, defer.Deferred())
    first = waiting.state
    waiting.input_required()  # a new requestState each round, the old one forgotten
    assert waiting.state != first and registry == {waiting.state: waiting}
    pending.callback(jsonrpc.result(1, {}))
    assert registry == {}


def test_a_legacy_sse_session_ends_when_its_client_goes_away(fuzzed: Fuzzed) -> None:
    """Found by the long run (about 9 KB of RSS per ``GET /sse``): Twisted tells a stream's
    producer that the connection is gone (``stopProducing``) before the request's
    notifyFinish fires, and the stream took the first for a mere stop, so its on_close never
    ran: the session lived on for MCP_SESSION_IDLE_SECONDS, counting against the user's cap."""
    key = fuzzed.target.key
    holder = SseHolder(fuzzed.target.port, "fz", key)
    session = holder.session()
    message = f"/playbooks/fz/message?sessionId={session}"
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    assert fuzzed.post(ping, path=message)[0] == 202  # alive while its stream is open
    holder.close()
    eventually(lambda: fuzzed.post(ping, path=message)[0] == 404)
