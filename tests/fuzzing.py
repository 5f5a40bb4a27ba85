"""Property-based fuzzing of a running daemon's MCP endpoints (both eras) and HTTP edge.

Shared by ``tests/test_fuzz.py`` (bounded, in the suite) and ``bench/fuzz.py`` (the long run).
The strategies draw whole HTTP requests (``Case``): JSON-RPC messages that are valid in shape
but wrong in type (ids that are strings with lone surrogates, huge or float numbers, nested
values or null; known and unknown methods; params of every type), batches and non-objects;
handshake-era POSTs with and without a session, 2026-07-28 POSTs whose routing headers match
their body or not, ``notifications/cancelled`` with any ``requestId``, the legacy ``/sse`` +
``/message`` transport, raw bodies (invalid UTF-8, truncated JSON, deep nesting, ``NaN``) and
odd headers, on the MCP routes and the REST API.

``check`` holds each answer to the properties: a status below 500; on an MCP route a body that
is one JSON-RPC response of the right shape (an error object, or a result answering the id that
was sent), empty for 202/204, or an SSE stream of such messages; on the REST API the API's error
shape. ``LogWatch`` reads the daemon's log as it grows: no line at level 50 or above and no
traceback. ``Target.still_serves`` is the liveness check: a plain ``tools/call`` answered right.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
from hypothesis import strategies as st

LEGACY_VERSION = "2025-11-25"
MODERN_VERSION = "2026-07-28"
ACCEPT = "application/json, text/event-stream"
PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO_META = "io.modelcontextprotocol/clientInfo"
LOG_LEVEL_META = "io.modelcontextprotocol/logLevel"
#: The echo tool of ``bench/echo_server.py``, as the playbook exposes it twice: from a
#: handshake-only process and (prefixed) from one that speaks both eras.
TOOLS = ("echo", "m_echo")
METHODS = ("initialize", "ping", "tools/list", "tools/call", "prompts/list", "prompts/get",
           "resources/list", "resources/read", "resources/templates/list",
           "resources/subscribe", "resources/unsubscribe", "completion/complete",
           "logging/setLevel", "server/discover", "subscriptions/listen",
           "notifications/initialized", "notifications/cancelled",
           "notifications/roots/list_changed", "notifications/progress")
NAME_KEYS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
#: Strings that reach corners: lone and paired surrogates, NUL, the routing headers' base64
#: sentinel (well-formed or not), version strings, the gateway's own requestState prefix.
SPECIAL_TEXT = ("", "echo", "m_echo", "welcome", "\ud800", "\udfff", "a\udc00b", "\ud83d\ude00",
                "😀", "\x00", "a\nb", "=?base64?ZWNobw==?=", "=?base64?!!?=", "=?base64??=",
                MODERN_VERSION, LEGACY_VERSION, "director-exchange:nope", "test://static",
                "ref/prompt", "ref/resource", "%ff", "../..", "x" * 300)
HUGE_NUMBERS = (2**53 + 1, 2**63, -(2**63) - 1, 10**40, -(10**300), 1e308, 5e-324, -0.0)


# --- JSON values ------------------------------------------------------------------------------


def texts(max_size: int = 12) -> st.SearchStrategy[str]:
    """Strings, lone surrogates included (hypothesis' ``text()`` never draws them)."""
    code_points = st.lists(st.integers(0, 0x10FFFF), max_size=max_size).map(
        lambda points: "".join(map(chr, points)))
    return st.one_of(st.sampled_from(SPECIAL_TEXT), st.text(max_size=max_size), code_points)


NUMBERS = st.one_of(st.integers(), st.sampled_from(HUGE_NUMBERS), st.floats())
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, texts())
JSON_VALUES = st.recursive(
    SCALARS, lambda children: st.one_of(st.lists(children, max_size=4),
                                        st.dictionaries(texts(8), children, max_size=4)),
    max_leaves=10)
IDS = st.one_of(st.integers(-5, 1000), st.sampled_from(HUGE_NUMBERS), texts(), st.floats(),
                st.none(), st.booleans(), JSON_VALUES)


def _or_junk(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``strategy``, or any JSON value (a wrong type in a right place)."""
    return st.one_of(strategy, JSON_VALUES)


def _optional(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


NAMES = _or_junk(st.sampled_from((*TOOLS, "welcome", "nope")) | texts())
URIS = _or_junk(st.sampled_from(("test://static", "file:///etc/passwd", "")) | texts())
VERSIONS = _or_junk(st.sampled_from((MODERN_VERSION, LEGACY_VERSION, "2024-11-05", "1999-01-01")))
ENVELOPE = st.fixed_dictionaries(
    {PROTOCOL_VERSION_META: st.just(MODERN_VERSION) | VERSIONS,
     CLIENT_CAPABILITIES_META: st.just({}) | st.just({"sampling": {}}) | JSON_VALUES},
    optional={CLIENT_INFO_META: st.just({"name": "fuzz", "version": "1"}) | JSON_VALUES,
              LOG_LEVEL_META: _or_junk(st.sampled_from(LEVELS)),
              "progressToken": IDS})
META = st.one_of(ENVELOPE, JSON_VALUES)


def _params(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Params with these fields (each present or not, right or wrong in type), the modern
    envelope or junk in ``_meta``; or params that are not an object at all."""
    shaped = _optional({**fields, "_meta": META, "requestState": _or_junk(texts()),
                        "inputResponses": JSON_VALUES, "cursor": _or_junk(texts())})
    return st.one_of(shaped, shaped, shaped, JSON_VALUES)


#: Params per method. Built once: a strategy built per example costs more than its draws.
PARAMS: dict[str, st.SearchStrategy[Any]] = {method: _params(fields) for method, fields in {
    "tools/call": {"name": NAMES, "arguments": _or_junk(
        st.fixed_dictionaries({"text": _or_junk(texts())}))},
    "prompts/get": {"name": NAMES, "arguments": JSON_VALUES},
    "resources/read": {"uri": URIS},
    "resources/subscribe": {"uri": URIS},
    "resources/unsubscribe": {"uri": URIS},
    "completion/complete": {
        "ref": _or_junk(_optional({"type": _or_junk(st.sampled_from(
            ("ref/prompt", "ref/resource"))), "name": NAMES, "uri": URIS})),
        "argument": JSON_VALUES},
    "logging/setLevel": {"level": _or_junk(st.sampled_from(LEVELS))},
    "notifications/cancelled": {"requestId": IDS, "reason": JSON_VALUES},
    "notifications/progress": {"progressToken": IDS, "progress": NUMBERS},
    "subscriptions/listen": {"notifications": _or_junk(_optional({
        "toolsListChanged": _or_junk(st.booleans()),
        "resourceSubscriptions": _or_junk(st.lists(URIS, max_size=3))}))},
    "initialize": {"protocolVersion": VERSIONS, "capabilities": JSON_VALUES,
                   "clientInfo": _or_junk(st.just({"name": "fuzz", "version": "1"}))},
    "": {},
}.items()}
ANY_METHOD = st.one_of(st.sampled_from(METHODS), st.sampled_from(METHODS), texts(), JSON_VALUES)
_JSONRPC = st.one_of(st.just("2.0"), st.just("2.0"), JSON_VALUES)
_ID = st.one_of(st.integers(1, 10**6), IDS)
_ONE_IN_FIVE = st.integers(0, 4)
_ERROR = _or_junk(st.fixed_dictionaries({"code": _or_junk(st.integers()),
                                         "message": _or_junk(texts())}))
_OUTCOME = st.sampled_from(("result", "error"))


def draw_message(draw: st.DrawFn, method: Any) -> dict[str, Any]:
    """One JSON-RPC message for ``method``: a request or notification (mostly), a response,
    or not quite either (keys missing, of the wrong type, or extra)."""
    message: dict[str, Any] = {"jsonrpc": draw(_JSONRPC)}
    if draw(st.booleans()) or not str(method).startswith("notifications/"):
        message["id"] = draw(_ID)
    if draw(_ONE_IN_FIVE) == 0 and draw(st.booleans()):  # a response from the client
        message[draw(_OUTCOME)] = draw(_ERROR)
        return message
    message["method"] = method
    if draw(_ONE_IN_FIVE):
        message["params"] = draw(PARAMS.get(method if isinstance(method, str) else "",
                                            PARAMS[""]))
    return message


@st.composite
def messages(draw: st.DrawFn) -> Any:
    return draw_message(draw, draw(ANY_METHOD))


MESSAGES = messages()


# --- bodies -----------------------------------------------------------------------------------


def _ascii(value: Any) -> bytes:
    """JSON as Python writes it: lone surrogates as ``\\udXXX`` escapes, NaN as ``NaN``."""
    return json.dumps(value).encode()


def _raw_utf8(value: Any) -> bytes:
    """Surrogates as their (invalid) three UTF-8 bytes instead of escapes."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _deep(depth: int, opener: bytes) -> bytes:
    closer = {b"[": b"]", b'{"a":': b"}"}[opener]
    return opener * depth + b"1" + closer * depth


RAW_BODIES = st.one_of(
    st.binary(max_size=40),
    st.integers(1, 5000).flatmap(lambda depth: st.sampled_from(
        (_deep(depth, b"["), _deep(depth, b'{"a":')))),
    st.sampled_from((b"", b"null", b"[]", b"{}", b'"\\ud800"', b"\xef\xbb\xbf{}", b"NaN",
                     b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":Infinity}}',
                     b'{"jsonrpc":"2.0","id":1e999,"method":"ping"}',
                     b'{"jsonrpc":"2.0","id":1,"method":"ping"}{"jsonrpc":"2.0"}',
                     '{"jsonrpc":"2.0","id":1,"method":"ping"}'.encode("utf-16"))),
)
_BODY_KINDS = st.sampled_from(("ascii", "ascii", "ascii", "raw", "cut", "batch", "value", "bytes"))
_BATCH = st.lists(MESSAGES, max_size=3)
_CUT = st.floats(0, 1)


def draw_body(draw: st.DrawFn, message: Any) -> bytes:
    """``message`` encoded in one of several ways (or cut short), a batch of messages, another
    JSON value, or raw bytes."""
    kind = draw(_BODY_KINDS)
    if kind == "ascii":
        return _ascii(message)
    if kind == "raw":
        return _raw_utf8(message)
    if kind == "cut":
        whole = _ascii(message)
        return whole[:int(len(whole) * draw(_CUT))]
    if kind == "batch":
        return _ascii([message, *draw(_BATCH)])
    if kind == "value":
        return _ascii(draw(JSON_VALUES))
    return draw(RAW_BODIES)


# --- requests ---------------------------------------------------------------------------------


def http_request(port: int, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One plain request on a fresh connection: status, headers (lower-case), body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        connection.close()


def open_session(port: int, key: str, playbook: str = "fz") -> str:
    """A handshake-era session, initialised."""
    headers = {"content-type": "application/json", "accept": ACCEPT, "x-api-key": key}
    path = f"/playbooks/{playbook}/mcp"
    status, answered, body = http_request(port, "POST", path, json.dumps({
        "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": LEGACY_VERSION, "capabilities": {},
            "clientInfo": {"name": "fuzz", "version": "1"}}}).encode(), headers)
    assert status == 200, body
    session = answered["mcp-session-id"]
    status, _, _ = http_request(port, "POST", path, json.dumps({
        "jsonrpc": "2.0", "method": "notifications/initialized"}).encode(),
        {**headers, "mcp-session-id": session})
    assert status == 202
    return session


@attrs.frozen
class Target:
    """The daemon under fuzz: its port, a key, a playbook with the echo tools, a live
    handshake-era session and a live legacy-SSE session (held by ``SseHolder``)."""

    port: int
    key: str
    playbook: str
    session: str
    sse_session: Callable[[], str]

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        return http_request(self.port, method, path, body, headers)

    def mcp_headers(self, session: str | None = None) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": ACCEPT, "x-api-key": self.key}
        if session is not None:
            headers["mcp-session-id"] = session
        return headers

    def still_serves(self) -> None:
        """A plain handshake-era ``tools/call`` of echo on a new session gets the right answer
        (and so does a modern one); fails the caller otherwise."""
        path = f"/playbooks/{self.playbook}/mcp"
        status, headers, body = self.request("POST", path, _ascii({
            "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": LEGACY_VERSION, "capabilities": {},
                "clientInfo": {"name": "liveness", "version": "1"}}}), self.mcp_headers())
        assert status == 200, (status, body)
        session = headers["mcp-session-id"]
        call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "still here ✓"}}}
        status, _, body = self.request("POST", path, _ascii(call), self.mcp_headers(session))
        assert status == 200 and parse_answer(body) == {
            "jsonrpc": "2.0", "id": 7,
            "result": {"content": [{"type": "text", "text": "still here ✓"}]}}, (status, body)
        self.request("DELETE", path, None, self.mcp_headers(session))
        modern = dict(call, params={**call["params"], "_meta": {
            PROTOCOL_VERSION_META: MODERN_VERSION, CLIENT_CAPABILITIES_META: {}}})
        status, _, body = self.request("POST", path, _ascii(modern), {
            **self.mcp_headers(), "mcp-protocol-version": MODERN_VERSION,
            "mcp-method": "tools/call", "mcp-name": "echo"})
        answer = parse_answer(body)
        assert status == 200 and answer["result"]["content"] == [
            {"type": "text", "text": "still here ✓"}], (status, body)


@attrs.frozen
class Case:
    """One HTTP request to send, and the JSON-RPC id an answer to it may carry."""

    method: str
    path: str
    headers: tuple[tuple[str, bytes], ...]
    body: bytes | None
    sent: Any = None  # the message drawn, when the body is one

    @property
    def mcp(self) -> bool:
        return self.path.startswith("/playbooks/")

    def __repr__(self) -> str:  # what a failing example shows
        return (f"Case({self.method} {self.path!r}, headers={dict(self.headers)!r}, "
                f"body={self.body[:2000] if self.body else self.body!r})")


def _header_value(text: str) -> bytes:
    """A header value as a client could send it (no CR/LF), bytes beyond ASCII included."""
    return text.encode("utf-8", "surrogatepass").replace(b"\r", b"").replace(b"\n", b"")


HEADER_TEXT = st.one_of(texts(), st.sampled_from((
    MODERN_VERSION, LEGACY_VERSION, "=?base64?ZWNobw==?=", "*/*", "application/json",
    "text/event-stream", "application/json; charset=utf-16", "Bearer dk_nope", "dk_" + "A" * 64,
    "director_session=abc; Path=/", "http://evil.example", "127.0.0.1", "a-1", "nope-999999")))


_SESSION_KINDS = st.sampled_from(("none", "live", "live", "junk"))
_LEGACY_VERSION_HEADER = st.one_of(st.none(), st.sampled_from((LEGACY_VERSION, "2024-11-05")),
                                   HEADER_TEXT)
_FEW_HEADERS = st.integers(0, 3)


def _draw_session(draw: st.DrawFn, live: str) -> str | None:
    """The live session (mostly), none, or a wrong one."""
    kind = draw(_SESSION_KINDS)
    return None if kind == "none" else live if kind == "live" else draw(HEADER_TEXT)


@st.composite
def handshake_posts(draw: st.DrawFn, target: Target) -> Case:
    """POST /mcp in the handshake era: with the live session, none, or a wrong one."""
    message = draw(MESSAGES)
    headers: dict[str, bytes] = {"content-type": b"application/json", "accept": ACCEPT.encode(),
                                 "x-api-key": target.key.encode()}
    session = _draw_session(draw, target.session)
    if session is not None:
        headers["mcp-session-id"] = _header_value(session)
    version = draw(_LEGACY_VERSION_HEADER)
    if version is not None:
        headers["mcp-protocol-version"] = _header_value(version)
    headers.update(draw(FEW_ODD_HEADERS))
    return Case("POST", f"/playbooks/{target.playbook}/mcp", tuple(headers.items()),
                draw_body(draw, message), message)


def routing_headers(message: Any) -> dict[str, bytes]:
    """The 2026-07-28 routing headers a correct client sends for ``message``."""
    if not isinstance(message, dict):
        return {}
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    version = meta.get(PROTOCOL_VERSION_META) if isinstance(meta, dict) else MODERN_VERSION
    headers = {"mcp-protocol-version": _header_value(str(version)),
               "mcp-method": _header_value(str(message.get("method")))}
    name_key = NAME_KEYS.get(str(message.get("method")))
    name = params.get(name_key) if name_key and isinstance(params, dict) else None
    if isinstance(name, str):
        headers["mcp-name"] = _header_value(name if name.isascii() and name.isprintable()
                                            and name == name.strip() else
                                            "=?base64?" + base64.b64encode(
                                                name.encode("utf-8", "surrogatepass")).decode()
                                            + "?=")
    return headers


_MODERN_METHOD = st.one_of(st.sampled_from(METHODS), texts())
_OVERRIDDEN = st.lists(st.sampled_from(("mcp-protocol-version", "mcp-method", "mcp-name",
                                        "mcp-param-token", "mcp-session-id")), max_size=2)
_REPEATED = st.lists(st.tuples(st.sampled_from(("mcp-method", "mcp-name",
                                                "mcp-protocol-version")),
                               HEADER_TEXT.map(_header_value)), max_size=1)


@st.composite
def modern_posts(draw: st.DrawFn, target: Target) -> Case:
    """POST /mcp in the 2026-07-28 era: the envelope in ``_meta`` (mostly valid), routing
    headers that match the body (mostly), disagree, repeat or are missing."""
    message = draw_message(draw, draw(_MODERN_METHOD))
    if isinstance(message.get("params"), dict) and draw(_FEW_HEADERS):
        message["params"]["_meta"] = draw(ENVELOPE)
    headers: dict[str, bytes] = {"content-type": b"application/json", "accept": ACCEPT.encode(),
                                 "x-api-key": target.key.encode()}
    if draw(_FEW_HEADERS):
        headers.update(routing_headers(message))
    for name in draw(_OVERRIDDEN):
        headers[name] = _header_value(draw(HEADER_TEXT))
    return Case("POST", f"/playbooks/{target.playbook}/mcp",
                (*headers.items(), *draw(_REPEATED)), draw_body(draw, message), message)


_WHERE = st.sampled_from(("session", "modern", "sse"))
_ENCODINGS = st.sampled_from((_ascii, _raw_utf8))


@st.composite
def cancellations(draw: st.DrawFn, target: Target) -> Case:
    """``notifications/cancelled`` with any ``requestId``, in each era and transport."""
    params = {"requestId": draw(IDS)}
    if draw(st.booleans()):
        params["reason"] = draw(JSON_VALUES)
    message = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params}
    where = draw(_WHERE)
    headers = target.mcp_headers(target.session if where == "session" else None)
    path = f"/playbooks/{target.playbook}/mcp"
    if where == "modern":
        params["_meta"] = {PROTOCOL_VERSION_META: MODERN_VERSION, CLIENT_CAPABILITIES_META: {}}
        headers.update({"mcp-protocol-version": MODERN_VERSION,
                        "mcp-method": "notifications/cancelled"})
    elif where == "sse":
        path = f"/playbooks/{target.playbook}/message?sessionId={target.sse_session()}"
    return Case("POST", path, tuple((k, v.encode()) for k, v in headers.items()),
                draw(_ENCODINGS)(message), message)


_ONE_IN_TEN = st.integers(0, 9)


@st.composite
def sse_transport(draw: st.DrawFn, target: Target) -> Case:
    """The legacy HTTP+SSE transport: POST /message (live session, none, wrong) or GET /sse."""
    if draw(_ONE_IN_TEN) == 0:
        return Case("GET", f"/playbooks/{target.playbook}/sse?key={target.key}", (), None)
    message = draw(MESSAGES)
    session = _draw_session(draw, target.sse_session())
    query = "" if session is None else "?sessionId=" + quote(
        session.encode("utf-8", "surrogatepass"), safe="")
    headers = {"content-type": b"application/json", "x-api-key": target.key.encode(),
               **draw(FEW_ODD_HEADERS)}
    return Case("POST", f"/playbooks/{target.playbook}/message{query}", tuple(headers.items()),
                draw_body(draw, message), message)


#: Path segments for the edge: other playbooks, traversal, encoded bytes (valid UTF-8: invalid
#: percent-encoding in a path is item 10 of issue 16, handled on its own branch). The target's
#: own playbook is added on the MCP routes only: on the API, a valid DELETE or PATCH of it would
#: end the fuzzing of everything behind it (the API has its own fuzzer, tests/test_openapi.py).
SEGMENTS = ("other", "nope", "", ".", "..", "%2e%2e", "%c3%a9", "%00", "%20", "a%2Fb", "mcp",
            "x" * 200, "%F0%9F%98%80", "%25", "%ff", "%ed%a0%80")
PATHS = ("/playbooks/{p}/mcp", "/playbooks/{p}/sse", "/playbooks/{p}/message",
         "/playbooks/{p}", "/playbooks/", "/api/v1/playbooks", "/api/v1/playbooks/{p}",
         "/api/v1/playbooks/{p}/servers", "/api/v1/playbooks/{p}/servers/{p}",
         "/api/v1/playbooks/{p}/prompts", "/api/v1/playbooks/{p}/tools", "/api/v1/me",
         "/api/v1/keys", "/api/v1/playbooks/import", "/api/v1/playbooks/{p}/export",
         "/api/v1/auth/login", "/api/health", "/api/v1/{p}", "/{p}")
QUERIES = ("", "?key={key}", "?key=", "?key=%ff", "?key={key}&key=dk_x", "?sessionId=%00",
           "?cursor=%ff", "?cursor=WyJcdWQ4MDAiXQ", "?limit=-1", "?limit=99999999999999999999",
           "?a=%ed%a0%80", "?=&&=")
HEADER_NAMES = ("host", "origin", "cookie", "authorization", "x-api-key", "content-type",
                "accept", "last-event-id", "mcp-session-id", "mcp-protocol-version",
                "mcp-method", "mcp-name", "mcp-param-text", "traceparent",
                "access-control-request-method")


def odd_headers(most: int) -> st.SearchStrategy[dict[str, bytes]]:
    """Up to ``most`` of ``HEADER_NAMES`` with odd values."""
    return st.dictionaries(st.sampled_from(HEADER_NAMES), HEADER_TEXT.map(_header_value),
                           max_size=most)


ODD_HEADERS = odd_headers(4)
#: Mostly none: a request that the edge refuses tells little about what is behind it.
FEW_ODD_HEADERS = st.one_of(st.just({}), st.just({}), st.just({}), odd_headers(1))
_PATH_TEMPLATES = st.sampled_from(PATHS)
_SEGMENTS = st.sampled_from(SEGMENTS)
_MCP_SEGMENTS = st.one_of(st.none(), st.none(), _SEGMENTS)  # None: the target's playbook
_QUERIES = st.sampled_from(QUERIES)
_METHODS = st.sampled_from(("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "POST",
                            "POST", "TRACE", "FOO"))
_EDGE_MESSAGES = st.one_of(MESSAGES, JSON_VALUES)


@st.composite
def edge_requests(draw: st.DrawFn, target: Target) -> Case:
    """Any method on any route (MCP and REST API), odd headers, any body."""
    template = draw(_PATH_TEMPLATES)
    segment = draw(_MCP_SEGMENTS if template.startswith("/playbooks/") else _SEGMENTS)
    query = draw(_QUERIES).replace("{key}", target.key)
    path = template.replace("{p}", target.playbook if segment is None else segment) + query
    method = draw(_METHODS)
    headers: dict[str, bytes] = {"x-api-key": target.key.encode(),
                                 "content-type": b"application/json", "accept": ACCEPT.encode()}
    if method == "GET" and draw(st.booleans()):  # the live session (never ended here),
        headers["mcp-session-id"] = target.session.encode()  # resumed from an event id or not
        resume = draw(HEADER_TEXT)
        headers["last-event-id"] = _header_value(
            resume if draw(st.booleans()) else f"{target.session[:8]}-{resume}")
    headers.update(draw(ODD_HEADERS))
    message = draw(_EDGE_MESSAGES)
    body = None if method in ("GET", "HEAD") and draw(st.booleans()) else \
        draw_body(draw, message)
    return Case(method, path, tuple(headers.items()), body, message)


STRATEGIES: dict[str, Callable[[Target], st.SearchStrategy[Case]]] = {
    "handshake": handshake_posts, "modern": modern_posts, "cancelled": cancellations,
    "sse": sse_transport, "edge": edge_requests,
}


# --- sending and judging ----------------------------------------------------------------------


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    events: tuple[bytes, ...] = ()  # ``data:`` of each SSE event read (streams only)


def send(port: int, case: Case, stream_seconds: float = 5.0) -> Answer:
    """Send ``case``; an SSE answer to a POST is read until it carries the response (or, for
    ``subscriptions/listen``, its acknowledgement), at most ``stream_seconds``; a GET stream is
    left as soon as it is open."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(case.method, case.path, skip_accept_encoding=True)
        for name, value in case.headers:
            connection.putheader(name, value)
        if case.body is not None:
            connection.putheader("content-length", str(len(case.body)))
        connection.endheaders(case.body)
        response = connection.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        if headers.get("content-type", "").startswith("text/event-stream"):
            if case.method == "GET":  # a stream that stays open: that it opened is enough
                return Answer(response.status, headers, b"")
            return Answer(response.status, headers, b"", _events(
                connection, response, stream_seconds))
        return Answer(response.status, headers, response.read())
    finally:
        connection.close()


def _events(connection: http.client.HTTPConnection, response: http.client.HTTPResponse,
            seconds: float) -> tuple[bytes, ...]:
    events: list[bytes] = []
    data: list[bytes] = []
    deadline = time.monotonic() + seconds
    assert connection.sock is not None
    while time.monotonic() < deadline:
        connection.sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            line = response.readline()
        except TimeoutError:
            break
        if not line:
            break
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif not line and data:
            events.append(b"\n".join(data))
            data = []
            if _ends_stream(events[-1]):
                break
    return tuple(events)


def _ends_stream(data: bytes) -> bool:
    try:
        message = json.loads(data)
    except ValueError:
        return True  # check() will say what is wrong
    return not isinstance(message, dict) or "method" not in message or \
        message["method"] == "notifications/subscriptions/acknowledged"


def parse_answer(body: bytes) -> Any:
    """A JSON body, or the last ``data:`` of an SSE body."""
    text = body.decode()
    if text.lstrip().startswith("{"):
        return json.loads(text)
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    return json.loads(events[-1])


class Unacceptable(AssertionError):
    """An answer that breaks a property."""


def check(case: Case, answer: Answer) -> None:
    """The properties every answer must have (module docstring); ``Unacceptable`` if not."""
    if answer.status >= 500:
        raise Unacceptable(f"HTTP {answer.status}: {answer.body[:500]!r}")
    if case.method == "HEAD" or answer.status in (204, 304) or \
            answer.headers.get("content-type", "").startswith("text/event-stream"):
        for data in answer.events:
            _check_message(case, json.loads(data), final=False)
        return
    if answer.status == 202:
        if answer.body not in (b"", b"Accepted"):
            raise Unacceptable(f"202 with a body: {answer.body[:300]!r}")
        return
    if case.method == "OPTIONS" and answer.status == 204:
        return
    if answer.status == 400 and not answer.body and "content-type" not in answer.headers:
        return  # Twisted's HTTP parser refused the request (a NUL in a header value, …)
    if not case.mcp and not answer.headers.get("content-type", "").startswith(
            "application/json"):
        return  # the REST API's YAML export, its OpenAPI document, …
    try:
        body = json.loads(answer.body)
    except ValueError:
        raise Unacceptable(f"HTTP {answer.status} with a body that is not JSON: "
                           f"{answer.body[:300]!r}") from None
    if case.mcp and not (answer.status in _EDGE_STATUSES and _api_error_shape(body)):
        _check_message(case, body, final=True)
    elif not case.mcp and answer.status >= 400 and not _api_error_shape(body):
        raise Unacceptable(f"HTTP {answer.status} without the API's error shape: {body!r}")


#: Statuses an MCP route may answer with the API's error shape: refusals at the edge (host,
#: origin, body size) and paths the MCP routes never see (``/playbooks/``: the application's
#: 404; not UTF-8: its 400; ``//``: its redirect).
_EDGE_STATUSES = (308, 400, 403, 404, 413)


def _api_error_shape(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("code"), str) and \
        isinstance(error.get("message"), str) and "jsonrpc" not in body


def _check_message(case: Case, message: Any, final: bool) -> None:
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise Unacceptable(f"not a JSON-RPC 2.0 message: {message!r}")
    if "method" in message and not final:
        return  # a notification or request relayed before the answer
    outcome = [key for key in ("result", "error") if key in message]
    if len(outcome) != 1 or "id" not in message:
        raise Unacceptable(f"not a JSON-RPC response: {message!r}")
    if "error" in message:
        error = message["error"]
        if not isinstance(error, dict) or not isinstance(error.get("code"), int) or \
                not isinstance(error.get("message"), str):
            raise Unacceptable(f"a malformed error object: {message!r}")
    elif not isinstance(message["result"], dict):
        raise Unacceptable(f"a result that is not an object: {message!r}")
    answered = message["id"]
    # As the daemon read it: a surrogate pair drawn as two code points is one character.
    sent = json.loads(_ascii(case.sent.get("id"))) if isinstance(case.sent, dict) else None
    if answered is not None and answered != sent:
        raise Unacceptable(f"answered id {answered!r}, but the request's id was {sent!r}")
    if "result" in message and answered is None:
        raise Unacceptable(f"a result without an id: {message!r}")


# --- the daemon's side ------------------------------------------------------------------------


class LogWatch:
    """Reads the daemon's log as it grows; ``problems()`` are the new lines at level 50 or
    above, tracebacks included, since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.count = 0

    def problems(self) -> list[str]:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            chunk = log.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        found = []
        for line in complete.decode("utf-8", "replace").splitlines():
            try:
                level = int(json.loads(line).get("level", 0))
            except (ValueError, TypeError, AttributeError):
                level = 0
            if level >= 50 or "Traceback" in line:
                found.append(line[:2000])
        self.count += len(found)
        return found


class SseHolder:
    """Holds one legacy ``GET /sse`` stream open (its session is the fuzzer's ``/message``
    target), reads every event on it and checks each answer's shape; reopens the stream if
    the daemon ends it."""

    def __init__(self, port: int, playbook: str, key: str) -> None:
        self.port, self.playbook, self.key = port, playbook, key
        self.problems: list[str] = []
        self.events = 0
        self._session = ""
        self._ready = threading.Event()
        self._stop = False
        self._connection: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, name="sse-holder", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise AssertionError(f"GET /sse gave no endpoint event: {self.problems}")

    def session(self) -> str:
        return self._session

    def _run(self) -> None:
        while not self._stop:
            with contextlib.suppress(OSError):
                self._hold()
            if not self._stop:
                time.sleep(0.1)

    def _hold(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port)
        self._connection = connection
        try:
            connection.request("GET", f"/playbooks/{self.playbook}/sse",
                               headers={"x-api-key": self.key, "accept": "text/event-stream"})
            response = connection.getresponse()
            data: list[bytes] = []
            event = b"message"
            while not self._stop:
                line = response.readline()
                if not line:
                    return
                line = line.rstrip(b"\r\n")
                if line.startswith(b"event:"):
                    event = line[6:].strip()
                elif line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                elif not line and data:
                    self._event(event, b"\n".join(data))
                    data, event = [], b"message"
        finally:
            connection.close()

    def _event(self, event: bytes, data: bytes) -> None:
        if event == b"endpoint":
            self._session = data.decode().rpartition("sessionId=")[2].split("&")[0]
            self._ready.set()
            return
        self.events += 1
        try:
            message = json.loads(data)
            if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
                raise ValueError("not a JSON-RPC 2.0 message")
        except ValueError as failure:
            self.problems.append(f"an SSE event that is not a JSON-RPC message ({failure}): "
                                 f"{data[:300]!r}")

    def close(self) -> None:
        self._stop = True
        sock = self._connection.sock if self._connection is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
