"""JSON-RPC 2.0 as MCP uses it: message shapes, error codes, and strict-but-cheap parsing.

Messages stay plain ``dict`` objects end to end so that whatever a client or an upstream
sent passes through byte-faithfully (schemas, ``_meta``, unknown fields); only the envelope
is checked here.
"""

from __future__ import annotations

import json
from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: MCP: a request that timed out or whose upstream went away (server-defined range).
REQUEST_TIMEOUT = -32001
UPSTREAM_UNAVAILABLE = -32002
RESOURCE_NOT_FOUND = -32002

Message = dict[str, Any]
RequestId = str | int


class ProtocolError(Exception):
    """A JSON-RPC error to answer with (``code``, ``message``, optional ``data``)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def error_object(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def request(request_id: RequestId, method: str, params: Any = None) -> Message:
    message: Message = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def notification(method: str, params: Any = None) -> Message:
    message: Message = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return message


def result(request_id: RequestId | None, value: Any) -> Message:
    return {"jsonrpc": "2.0", "id": request_id, "result": value}


def error(request_id: RequestId | None, code: int, message: str, data: Any = None) -> Message:
    return {"jsonrpc": "2.0", "id": request_id,
            "error": ProtocolError(code, message, data).error_object()}


def is_request(message: Message) -> bool:
    return "method" in message and "id" in message


def is_notification(message: Message) -> bool:
    return "method" in message and "id" not in message


def is_response(message: Message) -> bool:
    return "method" not in message and "id" in message and ("result" in message or
                                                            "error" in message)


def parse_message(raw: bytes | str) -> Message:
    """One JSON-RPC message, or ``ProtocolError`` (-32700 / -32600) saying what is wrong."""
    try:
        message = json.loads(raw)
    except RecursionError:
        raise ProtocolError(PARSE_ERROR, "parse error: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as failure:
        raise ProtocolError(PARSE_ERROR, f"parse error: {failure}") from None
    if isinstance(message, list):
        raise ProtocolError(INVALID_REQUEST, "JSON-RPC batches are not supported by MCP")
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise ProtocolError(INVALID_REQUEST, 'not a JSON-RPC 2.0 message ("jsonrpc": "2.0")')
    if "method" in message:
        if not isinstance(message["method"], str) or not message["method"]:
            raise ProtocolError(INVALID_REQUEST, "method must be a non-empty string")
        if "params" in message and not isinstance(message["params"], dict):
            raise ProtocolError(INVALID_REQUEST, "params must be an object")
    elif not is_response(message):
        raise ProtocolError(INVALID_REQUEST, "neither a request, a notification nor a response")
    if "id" in message and (isinstance(message["id"], bool) or
                            not isinstance(message["id"], str | int)):
        raise ProtocolError(INVALID_REQUEST, "id must be a string or an integer")
    return message


def encode(message: Message) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
