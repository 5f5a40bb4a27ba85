"""JSON text at the edges: what ``jsontext`` reads strictly (clients) or repairs (upstreams),
how ``jsonrpc`` builds on it, and how the writing side fails when a message has no JSON form:
at once and precisely, never by leaving a call to wait (a real stdio upstream). Also the
numbers in headers and event ids that ``int`` cannot read."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from director import jsontext
from director.jsontext import MAX_DEPTH, JsonTextError
from director.mcp import jsonrpc
from director.mcp.headers import param_header_mismatch
from director.mcp.jsonrpc import ProtocolError
from director.mcp.sse import SseParser
from director.mcp.streams import ReplayBuffer, response_bytes
from director.mcp.upstream.account import stdio_account
from director.mcp.upstream.base import UpstreamRequestError, encoded
from director.mcp.upstream.connect import CheckedEndpoints
from director.mcp.upstream.http_plumbing import new_pool
from director.mcp.upstream.legacy_sse import LegacySseUpstream
from director.mcp.upstream.stdio import StdioUpstream
from director.mcp.upstream.streamable import StreamableHttpUpstream
from tests.test_upstream_http import reference

RAW = Path(__file__).resolve().parent / "fixtures" / "raw_server.py"


@pytest.mark.parametrize("text, reason", [
    (b'"\\ud800"', "lone surrogate"),
    (b'{"\\udfff": 1}', "lone surrogate"),
    (b'["ok", ["\\uDBFF"]]', "lone surrogate"),
    ('"\ud800"', "lone surrogate"),  # a str that already holds one
    (b'"\xed\xa0\x80"', "not UTF-8"),  # the surrogate as bytes
    (b'"\xff"', "not UTF-8"),
    ('"x"'.encode("utf-16"), "not UTF-8"),
    (b"NaN", "NaN is not a JSON number"),
    (b"[Infinity]", "Infinity is not a JSON number"),
    (b"[1e400]", "out of range"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nested more than"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested more than"),
    (b"1" * 5000, "Exceeds the limit"),
    (b'{"a": 1', "Expecting"),
])
def test_strict_reading_refuses_what_is_not_interoperable(text: bytes | str,
                                                          reason: str) -> None:
    with pytest.raises(JsonTextError, match=reason):
        jsontext.loads(text)


@pytest.mark.parametrize("text, value", [
    (b'"\\ud83d\\ude00 \\u00e9"', "😀 é"),  # an escaped pair is one character, not two
    (b'"\\\\ud800"', "\\ud800"),  # an escaped backslash, then text: no surrogate at all
    (b"\xef\xbb\xbf[1]", [1]),  # a byte order mark is ignored
    (b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, json.loads("[" * MAX_DEPTH + "]" * MAX_DEPTH)),
    (b"[1.5e308, -0.0, 12345678901234567890]", [1.5e308, -0.0, 12345678901234567890]),
])
def test_strict_reading_keeps_everything_else(text: bytes, value: Any) -> None:
    assert jsontext.loads(text) == value


def test_repair_reading_replaces_what_it_can() -> None:
    repaired = jsontext.loads(b'{"t": "cut \\ud83d", "\\udc00": [NaN, -Infinity, 1e999], '
                              b'"raw": "\xff"}', repair=True)
    assert repaired == {"t": "cut \ufffd", "\ufffd": [None, None, None], "raw": "\ufffd"}
    with pytest.raises(JsonTextError, match="nested"):
        jsontext.loads(b"[" * 200 + b"]" * 200, repair=True)


@pytest.mark.parametrize("value, reason", [
    ({"t": "\ud800"}, "lone surrogate"),
    ({"n": float("nan")}, "Out of range"),
    ({"s": {1, 2}}, "not JSON serializable"),
])
def test_writing_refuses_what_has_no_json_form(value: Any, reason: str) -> None:
    with pytest.raises(JsonTextError, match=reason):
        jsontext.dumps(value)


def test_writing_refuses_a_value_that_contains_itself_or_a_key_that_is_no_string() -> None:
    looped: list[Any] = []
    looped.append({"again": looped})
    with pytest.raises(JsonTextError, match="nested too deeply"):
        jsontext.dumps(looped)
    with pytest.raises(JsonTextError, match="keys must be str"):
        jsontext.dumps({(1, 2): "tuple"})


@pytest.mark.parametrize("value", [
    {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "é \u2028 \""}]}},
    [1, 2.5, -0.0, 1e308, None, True, False, "", {}, []], "\x00\x1f", 2**70, {"1": {"2": 3}},
])
def test_writing_is_compact_utf8_as_json_dumps_would_write_it(value: Any) -> None:
    assert jsontext.dumps(value) == json.dumps(
        value, ensure_ascii=False, separators=(",", ":")).encode()


def test_a_client_message_is_strict_an_upstream_one_repaired() -> None:
    line = b'{"jsonrpc":"2.0","id":1,"result":{"text":"\\ud800"}}'
    with pytest.raises(ProtocolError) as refused:
        jsonrpc.parse_message(line)
    assert refused.value.code == jsonrpc.PARSE_ERROR
    assert jsonrpc.parse_message(line, repair=True)["result"] == {"text": "\ufffd"}
    # A client's error response must be well-formed; an upstream's is made the best of.
    odd = b'{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":["m"]}}'
    with pytest.raises(ProtocolError) as refused:
        jsonrpc.parse_message(odd)
    assert refused.value.code == jsonrpc.INVALID_REQUEST
    error = jsonrpc.error_of(jsonrpc.parse_message(odd, repair=True)["error"])
    assert (error.code, error.message) == (jsonrpc.INTERNAL_ERROR, '["m"]')


@pytest.mark.parametrize("error, code, message", [
    ({"code": -32602, "message": "bad", "data": {"x": 1}}, -32602, "bad"),
    ({"code": True, "message": "bad"}, -32603, "bad"),
    ({"code": 1.5}, -32603, ""),
    ({"code": 10**30, "message": 7}, 10**30, "7"),
    ("boom", -32603, '"boom"'),
    (None, -32603, "null"),
])
def test_error_of_makes_a_protocol_error_of_any_error_object(error: Any, code: int,
                                                             message: str) -> None:
    converted = jsonrpc.error_of(error)
    assert (converted.code, converted.message) == (code, message)


def test_an_answer_that_cannot_be_encoded_still_answers_its_request() -> None:
    answer = json.loads(response_bytes(jsonrpc.result(7, {"text": "\ud800"})))
    assert answer["id"] == 7 and answer["error"]["code"] == jsonrpc.INTERNAL_ERROR
    assert "lone surrogate" in answer["error"]["message"]


def test_a_request_that_cannot_be_encoded_is_an_invalid_params_error() -> None:
    with pytest.raises(UpstreamRequestError) as refused:
        encoded("up", jsonrpc.request(1, "tools/call", {"arguments": {"x": float("inf")}}))
    assert refused.value.error["code"] == jsonrpc.INVALID_PARAMS
    assert refused.value.error["message"].startswith("tools/call cannot be sent to up: ")


@pytest_twisted.ensureDeferred
async def test_a_stdio_call_that_cannot_be_written_fails_at_once_and_the_server_goes_on(
        ) -> None:
    """It used to be registered as pending, fail in the write and wait for its timeout."""
    upstream = StdioUpstream("raw", sys.executable, [str(RAW)], {}, None, reactor,
                             account=stdio_account("nobody"))  # as a root daemon does
    try:
        await upstream.start()
        calling = defer.ensureDeferred(upstream.request(
            "tools/call", {"name": "echo", "arguments": {"text": "cut \ud83d"}}, timeout=3600))
        assert calling.called, "the call must fail at once, not wait for its timeout"
        with pytest.raises(UpstreamRequestError) as refused:
            await calling
        assert refused.value.error["code"] == jsonrpc.INVALID_PARAMS
        assert "lone surrogate" in refused.value.error["message"]
        result = await upstream.request("tools/call", {"name": "echo",
                                                       "arguments": {"text": "cut 😀"}})
        assert result["content"][0]["text"] == "cut 😀"
        unpaired = await upstream.request("tools/call", {"name": "unpaired", "arguments": {}})
        assert unpaired["content"][0]["text"] == "cut \ufffd"
    finally:
        await upstream.close()


def test_digits_that_int_cannot_read_are_not_numbers() -> None:
    """``str.isdigit`` takes "²" and any length; ``int`` refuses "²" and past 4,300 digits."""
    replay = ReplayBuffer("abcdefgh")
    event = replay.record(b"{}")
    assert replay.after("abcdefgh-\u00b2") is None
    assert replay.after("abcdefgh-" + "9" * 5000) is None
    assert replay.after("abcdefgh-0") == [event]
    parser = SseParser()
    parser.feed(b"retry: \xc2\xb2\n\nretry: " + b"9" * 5000 + b"\n\nretry: 250\n\n")
    assert parser.retry == 250
    schema = {"type": "object", "properties": {
        "n": {"type": "integer", "x-mcp-header": "N"}}}
    assert param_header_mismatch(schema, {"n": 1}, {"mcp-param-n": ["1" * 5000]}) == \
        "Mcp-Param-N header does not match the 'n' argument"


@pytest.mark.parametrize("transport", ["streamable-http", "sse"])
@pytest_twisted.ensureDeferred
async def test_an_http_call_that_cannot_be_written_fails_at_once_and_the_session_goes_on(
        transport: str) -> None:
    server = reference(transport, "--json-response") if transport != "sse" else \
        reference("sse")
    pool = new_pool(reactor, endpoints=CheckedEndpoints(reactor, allow_insecure=True))  # loopback
    session: Any = None
    try:
        await threads.deferToThread(server.wait_ready)
        session = StreamableHttpUpstream("ref", f"{server.base}/mcp", {}, reactor, pool) \
            if transport != "sse" else LegacySseUpstream("ref", f"{server.base}/sse", {},
                                                         reactor, pool)
        await session.start()
        with pytest.raises(UpstreamRequestError) as refused:
            await session.request("tools/call", {"name": "echo",
                                                 "arguments": {"text": float("nan")}},
                                  timeout=3600)
        assert refused.value.error["code"] == jsonrpc.INVALID_PARAMS
        result = await session.request("tools/call", {"name": "echo",
                                                      "arguments": {"text": "after"}})
        assert result["content"][0]["text"] == "after"
    finally:
        if session is not None:
            await session.close()
        await pool.closeCachedConnections()
        server.stop()
