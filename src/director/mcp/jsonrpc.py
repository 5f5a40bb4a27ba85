"""JSON-RPC 2.0 as MCP uses it: message shapes, error codes, and strict-but-cheap parsing.

Messages stay plain ``dict`` objects end to end so that whatever a client or an upstream
sent passes through byte-faithfully (schemas, ``_meta``, unknown fields); only the envelope
is checked here.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from director import jsontext
from director.jsontext import JsonTextError
from director.mcp.protocol import (  # noqa: F401 - the codes, re-exported for jsonrpc.X
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    REQUEST_TIMEOUT,
    RESOURCE_NOT_FOUND,
)

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


def parse_message(raw: bytes | str, *, repair: bool = False) -> Message:
    """One JSON-RPC message, or ``ProtocolError`` (-32700 / -32600) saying what is wrong.

    The text is read by ``jsontext.loads``: strict for what a client sends, ``repair`` for
    what an upstream sends (see there). A client's error response must be well-formed too;
    an upstream's is taken as it is (``error_of`` makes the best of it)."""
    try:
        message = jsontext.loads(raw, repair=repair)
    except JsonTextError as failure:
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
    elif not repair and "error" in message and not _well_formed_error(message["error"]):
        raise ProtocolError(INVALID_REQUEST, "error must be an object with an integer code and "
                                             "a string message")
    if "id" in message and not is_valid_id(message["id"]):
        raise ProtocolError(INVALID_REQUEST, "id must be a string or an integer")
    return message


def is_valid_id(value: Any) -> bool:
    """A request id as MCP allows it: a string or an integer (never null, a bool or a float)."""
    return isinstance(value, str) or _is_integer(value)


def _well_formed_error(error: Any) -> bool:
    return isinstance(error, dict) and _is_integer(error.get("code")) and \
        isinstance(error.get("message"), str)


def _is_integer(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def error_of(error: Any) -> ProtocolError:
    """A peer's error object as a ``ProtocolError``, whatever its shape: a code that is not an
    integer becomes -32603, a message that is not a string its JSON text."""
    if not isinstance(error, dict):
        return ProtocolError(INTERNAL_ERROR, _as_text(error))
    code = error.get("code")
    message = error.get("message", "")
    return ProtocolError(code if _is_integer(code) else INTERNAL_ERROR,
                         message if isinstance(message, str) else _as_text(message),
                         error.get("data"))


def _as_text(value: Any) -> str:
    try:
        return jsontext.dumps(value).decode()
    except JsonTextError:
        return repr(value)


def encode(message: Message) -> bytes:
    """The message as one line of compact JSON; ``JsonTextError`` when it has no JSON form
    (which only a message the gateway built from something not read by ``jsontext`` can)."""
    return jsontext.dumps(message)
