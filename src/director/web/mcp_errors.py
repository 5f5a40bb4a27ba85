"""How a refused or failed MCP request is answered: a JSON-RPC error object with the HTTP
status that says what happened (``McpHttpError``), whatever raised it."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from director.mcp import jsonrpc
from director.mcp.engine import CredentialRevoked
from director.mcp.protocol import SERVER_ERROR
from director.web.errors import ApiError

log = Logger(namespace="mcp.http")


class McpHttpError(Exception):
    """An HTTP-level refusal, answered as a JSON-RPC error with this status."""

    def __init__(self, status: int, code: int, message: str, request_id: Any = None,
                 headers: dict[str, str] | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.request_id, self.headers, self.data = request_id, headers or {}, data


def error_response(request: Request, error: McpHttpError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in error.headers.items():
        request.setHeader(name.encode(), value.encode())
    body = jsonrpc.error(error.request_id, error.code, error.message, error.data)
    return json.dumps(body).encode()


def as_mcp_error(failure: Failure) -> McpHttpError | None:
    """What the client is told of ``failure``; None for a cancelled request (nobody to tell)."""
    error = failure.value
    if isinstance(error, McpHttpError):
        return error
    if isinstance(error, ApiError):
        return McpHttpError(error.status, SERVER_ERROR, error.message, headers=error.headers,
                            data={"code": error.code, **error.details})
    if isinstance(error, CredentialRevoked):
        return McpHttpError(401, SERVER_ERROR, "this credential was revoked a moment ago; "
                                               "authenticate again",
                            headers={"WWW-Authenticate": 'Bearer realm="director"'})
    if isinstance(error, defer.CancelledError):
        return None
    log.failure("unhandled error on an MCP route", failure)
    return McpHttpError(500, jsonrpc.INTERNAL_ERROR, "internal error")
